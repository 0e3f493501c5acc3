"""The Safe Denoiser: a training-free correction of the denoiser away from a negation set.

Paper: Kim, Kim, Yusuf, Ermon & Park, "Training-Free Safe Denoisers for Safe Use of Diffusion
Models" (NeurIPS 2025, arXiv 2502.08011); reference code github.com/MingyuKim87/Safe_Denoiser.

Theory (the paper's notation). Let the data density be a mixture p_data = (1 - a) p_safe +
a p_unsafe and write E_data(x_t) = E[x_0 | x_t], E_safe(x_t) = E[x_0 | x_t, safe],
E_unsafe(x_t) = E[x_0 | x_t, unsafe]. Since E_data = w_s E_safe + w_u E_unsafe with posterior
weights w_u = a p_unsafe(x_t) / p_data(x_t) = 1 - w_s, solving for E_safe gives

    E_safe(x_t) = E_data(x_t) + beta*(x_t) (E_data(x_t) - E_unsafe(x_t)),
    beta*(x_t) = a p_unsafe(x_t) / ((1 - a) p_safe(x_t))     (the posterior odds of "unsafe").

Here E_data is the pretrained model's clean-sample estimate x0_hat (after CFG), so the correction
pushes x0_hat away from the unsafe posterior mean, in proportion to how likely x_t is unsafe.

Practice (what this module computes). For an empirical negation set {y_i}, i = 1..N (for SD: VAE
latents of unsafe images; for the sandbox: unsafe renders, in the model's x0 space), E_unsafe is a
kernel-weighted mean evaluated at the current clean estimate x0_hat:

    k_i = exp(-d(x0_hat, y_i) / (2 h^2)),  w_i = k_i / sum_j k_j,  E_unsafe = sum_i w_i y_i,

with bandwidth h, and d the Euclidean distance ||x - y|| (`distance="l2"`, what the released code
uses) or its square (`"sq_l2"`, a Gaussian kernel). (For comparison, the exact Tweedie posterior of
a point-mass unsafe set would weigh y_i by N(x_t; sqrt(a_t) y_i, (1 - a_t) I) instead.) beta* is
replaced by a switch: beta = scale when the kernel mass m = sum_i k_i passes the gate
m > tau - margin and t lies in the window [t_min, t_max], else 0. Two update forms are offered:

    update="paper":    x0_safe = x0_hat + beta (x0_hat - E_unsafe)     (the formula above)
    update="released": x0_safe = x0_hat - beta E_unsafe                 (the reference code's,
                       as ported by third parties: drops the (1 + beta) x0_hat factor)

The switch looks at the unsafe set alone. Where that mass does not tell unsafe estimates from
safe ones (the sandbox's pixel space: AUC 0.5-0.7), gate "odds" estimates beta* itself, as the
theory defines it, from a reference set {s_j}, j = 1..M, of safe samples in the same space:

    beta = min(prior_odds * p_unsafe(x0_hat) / p_safe(x0_hat), scale),
    p_unsafe = mean_i k(x0_hat, y_i),  p_safe = mean_j k(x0_hat, s_j)   (same kernel),

so beta grows with how much closer the estimate is to unsafe samples than to safe ones, and
`scale` caps it.

The preset "nudity" is the reference's SD 1.4 setting: h = 3.15, scale = 0.33, margin = 1.6,
t in [780, 1000] (11 of 50 DDIM steps), unsquared distance, released update. tau is a value the
reference stores with its negation set; its derivation is not in the public code we could read,
so here tau is either given (`gate_threshold`) or calibrated from the set as the mean
leave-one-out kernel mass sum_{j != i} k(y_i, y_j) a negation sample receives from the others.

Inside the sampler the corrected x0_safe is turned back into eps' = (x_t - sqrt(a_t) x0_safe) /
sqrt(1 - a_t) (`GuidanceStep.eps_from_x0`), so the DDIM step uses x0_safe in both of its terms and
its log-prob is that of the corrected mean (see safediff.sampling.rollout).

Cost: distances come from one matrix product, ||x||^2 + ||y||^2 - 2 x y^T ([B, N]), weights from a
log-sum-exp, E_unsafe from a second product w Y ([B, D]); nothing of size B x N x D is built (the
reference builds one, which is what makes it slow, not the method); gate "odds" adds one product
with the reference set ([B, M]). Rows outside the window cost nothing.
"""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.models.digest import module_digest
from safediff.sampling.rollout import GuidanceStep

DISTANCES = ("l2", "sq_l2")
UPDATES = ("released", "paper")
GATES = ("mass", "odds")
NEGSET_KEY = "samples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class SafeDenoiserConfig:
    """Safe Denoiser settings; the defaults are the reference's nudity preset (SD 1.4)."""

    bandwidth: float = 3.15
    """h: kernel bandwidth, k = exp(-d / (2 h^2)), in the units of the negation samples."""
    scale: float = 0.33
    """beta when the gate is open (eta in some ports)."""
    gate_margin: float = 1.6
    """The gate opens when the kernel mass m = sum_i k_i exceeds gate_threshold - gate_margin."""
    gate_threshold: float | None = None
    """tau; None calibrates it from the negation set (mean leave-one-out kernel mass)."""
    t_min: int = 780
    """Lowest training timestep at which the correction acts (inclusive)."""
    t_max: int = 1000
    """Highest training timestep at which the correction acts (inclusive)."""
    distance: str = "l2"
    """'l2': d = ||x - y|| (reference code); 'sq_l2': d = ||x - y||^2 (Gaussian kernel)."""
    update: str = "released"
    """'released': x0 - beta E_unsafe (reference code); 'paper': x0 + beta (x0 - E_unsafe)."""
    gate: str = "mass"
    """'mass': beta = scale where the kernel mass passes the gate (reference code); 'odds':
    beta = min(prior_odds p_unsafe(x0) / p_safe(x0), scale), the paper's beta* with kernel density
    estimates over the negation set and a reference set of safe samples (which it then needs)."""
    prior_odds: float = 1.0
    """a / (1 - a), the prior odds of "unsafe" in the 'odds' gate."""

    def __post_init__(self) -> None:
        checks = [
            (self.bandwidth > 0, "bandwidth must be > 0"),
            (self.scale >= 0, "scale must be >= 0"),
            (self.t_min <= self.t_max, "t_min must be <= t_max"),
            (self.distance in DISTANCES, f"distance must be one of {DISTANCES}"),
            (self.update in UPDATES, f"update must be one of {UPDATES}"),
            (self.gate in GATES, f"gate must be one of {GATES}"),
            (self.prior_odds > 0, "prior_odds must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise SafediffError(f"invalid Safe Denoiser config: {message}")


SAFE_DENOISER_PRESETS: dict[str, SafeDenoiserConfig] = {
    "nudity": SafeDenoiserConfig(),
    "nudity-paper": SafeDenoiserConfig(update="paper"),
}
"""Named settings: 'nudity' is the reference's SD 1.4 nudity run; 'nudity-paper' the same with the
paper's update form."""


# ---------------------------------------------------------------------------------------------
# Kernel math (pure functions)


def kernel_log_weights(
    x: Tensor, y: Tensor, bandwidth: float, distance: str = "l2", y_sq_norms: Tensor | None = None
) -> Tensor:
    """log k(x_b, y_i) = -d(x_b, y_i) / (2 h^2): x [B, D], y [N, D] -> [B, N] float32.

    Squared distances come from ||x||^2 + ||y||^2 - 2 x y^T (one [B, D] x [D, N] product; clamped
    at 0 against rounding). y_sq_norms: precomputed ||y_i||^2 [N] (saves one pass over y).
    """
    if distance not in DISTANCES:
        raise SafediffError(f"distance {distance!r} is not supported; use one of {DISTANCES}")
    x = x.float()
    y = y.float()
    if y_sq_norms is None:
        y_sq_norms = (y * y).sum(dim=1)
    d2 = ((x * x).sum(dim=1, keepdim=True) + y_sq_norms.unsqueeze(0) - 2 * (x @ y.T)).clamp_min(0)
    d = d2.sqrt() if distance == "l2" else d2
    return -d / (2 * bandwidth**2)


def unsafe_posterior_mean(
    x: Tensor, y: Tensor, bandwidth: float, distance: str = "l2", y_sq_norms: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """E_unsafe(x_b) = sum_i w_bi y_i and log m_b = log sum_i k_bi, for x [B, D], y [N, D].

    Returns E_unsafe [B, D] and the log kernel mass [B] (float32). Weights are a softmax of the
    log kernels, so they stay finite when every k underflows (then E_unsafe is the mean of the
    nearest samples and log m is very negative).
    """
    log_k = kernel_log_weights(x, y, bandwidth, distance, y_sq_norms)  # [B, N]
    log_mass = torch.logsumexp(log_k, dim=1)  # [B]
    weights = torch.softmax(log_k, dim=1)  # [B, N]
    return weights @ y.float(), log_mass  # [B, D], [B]


def log_posterior_odds(
    x: Tensor,
    y_unsafe: Tensor,
    y_safe: Tensor,
    bandwidth: float,
    distance: str = "l2",
    prior_odds: float = 1.0,
    unsafe_sq_norms: Tensor | None = None,
    safe_sq_norms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """log beta*(x_b) = log prior_odds + log p_unsafe(x_b) - log p_safe(x_b), and E_unsafe(x_b).

    p_unsafe and p_safe are kernel density estimates with the same kernel over y_unsafe [N, D]
    and y_safe [M, D]: p(x) = mean_i k(x, y_i) (the kernel's normaliser cancels in the ratio).
    Returns the log odds [B] and E_unsafe [B, D] (as `unsafe_posterior_mean`), float32.
    """
    log_ku = kernel_log_weights(x, y_unsafe, bandwidth, distance, unsafe_sq_norms)  # [B, N]
    log_ks = kernel_log_weights(x, y_safe, bandwidth, distance, safe_sq_norms)  # [B, M]
    log_pu = torch.logsumexp(log_ku, dim=1) - math.log(y_unsafe.shape[0])
    log_ps = torch.logsumexp(log_ks, dim=1) - math.log(y_safe.shape[0])
    e_unsafe = torch.softmax(log_ku, dim=1) @ y_unsafe.float()
    return math.log(prior_odds) + log_pu - log_ps, e_unsafe


def odds_beta(log_odds: Tensor, cap: float) -> Tensor:
    """beta = min(exp(log_odds), cap), computed without overflow, [B]."""
    return log_odds.clamp(max=math.log(cap)).exp() if cap > 0 else torch.zeros_like(log_odds)


def safe_clean_estimate(x0: Tensor, e_unsafe: Tensor, beta: Tensor, update: str) -> Tensor:
    """x0_safe for x0, e_unsafe [B, ...] and beta [B] (0 where the correction is off).

    "paper": x0 + beta (x0 - E_unsafe); "released": x0 - beta E_unsafe.
    """
    b = beta.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    if update == "paper":
        return x0 + b * (x0 - e_unsafe)
    if update == "released":
        return x0 - b * e_unsafe
    raise SafediffError(f"update {update!r} is not supported; use one of {UPDATES}")


def calibrate_gate_threshold(
    y: Tensor, bandwidth: float, distance: str = "l2", chunk: int = 512
) -> float:
    """tau = mean_i sum_{j != i} k(y_i, y_j) over a negation set y [N, D] (0.0 when N == 1).

    Computed in row chunks ([chunk, N] at a time) from the same kernel as the correction.
    """
    n = y.shape[0]
    if n < 2:
        return 0.0
    y = y.float()
    sq = (y * y).sum(dim=1)
    total = 0.0
    for start in range(0, n, chunk):
        log_k = kernel_log_weights(y[start : start + chunk], y, bandwidth, distance, sq)
        rows = torch.arange(log_k.shape[0], device=y.device)
        log_k[rows, rows + start] = -math.inf  # leave one out
        total += float(torch.logsumexp(log_k, dim=1).exp().sum())
    return total / n


# ---------------------------------------------------------------------------------------------
# The negation set


@dataclass
class NegationSet:
    """Negation samples in the model's x0 space: [N, C, h, w] float32 (SD: scaled VAE latents).

    source: where they came from (a folder, 'tensor', ...); digest: hash of the inputs they were
    built from (the cache key), '' when unknown.
    """

    samples: Tensor
    source: str = ""
    digest: str = ""

    def __post_init__(self) -> None:
        if self.samples.ndim < 2 or self.samples.shape[0] < 1:
            raise SafediffError(
                f"a negation set needs at least one sample [N, ...], got shape {tuple(self.samples.shape)}"
            )
        self.samples = self.samples.float()

    @classmethod
    def from_tensor(cls, samples: Tensor, source: str = "tensor") -> "NegationSet":
        """Negation samples given directly (e.g. the sandbox's unsafe renders), [N, C, h, w]."""
        return cls(samples.detach(), source=source)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write as safetensors (tensor 'samples'; source and digest in the metadata)."""
        from safetensors.torch import save_file

        from safediff.atomic import atomic_path

        path = Path(path)
        meta = {"source": self.source, "digest": self.digest, "count": str(len(self))}
        meta.update(extra or {})
        with atomic_path(path) as tmp:
            save_file({NEGSET_KEY: self.samples.contiguous().cpu()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "NegationSet":
        """Read a negation set written by `save` / `build_sd_negation_set`."""
        from safetensors import SafetensorError, safe_open

        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise SafediffError(
                f"negation set not found: {p}; build one with `safediff negset build`"
            )
        try:
            with safe_open(str(p), framework="pt") as f:
                if NEGSET_KEY not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    raise SafediffError(
                        f"{p} holds no '{NEGSET_KEY}' tensor; is it a negation set?"
                    )
                samples = f.get_tensor(NEGSET_KEY)
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise SafediffError(f"could not read negation set {p}: {err}") from None
        return cls(samples, source=meta.get("source", str(p)), digest=meta.get("digest", ""))


def _file_digest(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def image_files(source: str | Path | list[str | Path]) -> list[Path]:
    """Image paths from a folder (sorted; png/jpg/jpeg/webp/bmp) or a list of files."""
    if isinstance(source, (str, Path)):
        folder = Path(source).expanduser().resolve()
        if not folder.is_dir():
            raise SafediffError(f"negation image folder not found: {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = [Path(p).expanduser().resolve() for p in source]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise SafediffError(f"negation image(s) not found: {', '.join(missing[:3])}")
    if not files:
        raise SafediffError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    return files


def load_image(path: Path, resolution: int) -> Tensor:
    """An RGB image as [3, R, R] float32 in [0, 1]: shorter side resized to R, centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize(
                (max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC
            )
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise SafediffError(f"could not read image {path}: {err}") from None
    return data.reshape(resolution, resolution, 3).permute(2, 0, 1).float() / 255


def encode_images(vae: nn.Module, images: Tensor, batch_size: int = 8) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] -> SD latents [N, C, H/f, W/f] float32 (no grad).

    The latent is the mean of the VAE posterior, shifted and scaled as SD's decoder expects:
    (mean - shift_factor) * scaling_factor (the inverse of `decode_latents`). The reference samples
    from the posterior instead; the mean makes the negation set deterministic.
    """
    p = next(vae.parameters())
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device=p.device, dtype=p.dtype) * 2 - 1
            z = vae.encode(x).latent_dist.mean.float()
            if shift is not None:
                z = z - float(shift)
            out.append((z * scaling).cpu())
    return torch.cat(out)


def build_sd_negation_set(
    vae: nn.Module,
    images: str | Path | list[str | Path],
    resolution: int,
    cache_dir: str | Path,
    batch_size: int = 8,
) -> Path:
    """Encode unsafe images into an SD negation set, cached as safetensors keyed by its inputs.

    images: a folder or a list of image files; resolution: the model's image side in pixels.
    The cache file is cache_dir/negset-<key>.safetensors, key = blake2b of (format version,
    resolution, the VAE's weights and config, every image's bytes in order); an existing file
    with that key is returned without encoding anything.
    """
    files = image_files(images)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"safediff-negset-v1:{resolution}:".encode())
    h.update(module_digest(vae).encode())
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for path in files:
        h.update(b"\x00image\x00")
        _file_digest(h, path)
    digest = h.hexdigest()
    out = Path(cache_dir).expanduser() / f"negset-{digest[:16]}.safetensors"
    if out.is_file():
        return out
    pixels = torch.stack([load_image(p, resolution) for p in files])
    latents = encode_images(vae, pixels, batch_size)
    source = str(Path(images).resolve()) if isinstance(images, (str, Path)) else "image list"
    NegationSet(latents, source=source, digest=digest).save(
        out, extra={"resolution": str(resolution), "kind": "sd-vae-latents"}
    )
    return out


# ---------------------------------------------------------------------------------------------
# The guidance hook


class SafeDenoiser:
    """The Safe Denoiser as a sampler guidance hook (stateless; see the module docstring).

    negset: a `NegationSet` (or a tensor [N, C, h, w]) in the model's x0 space; cfg: the settings;
    device: where the negation set lives (that of the latents; moved lazily otherwise);
    reference: safe samples in the same space (a `NegationSet` file holds them as well), needed by
    gate "odds" only.
    """

    name = "safe-denoiser"

    def __init__(
        self,
        negset: NegationSet | Tensor,
        cfg: SafeDenoiserConfig | None = None,
        device: torch.device | str | None = None,
        reference: NegationSet | Tensor | None = None,
    ) -> None:
        if isinstance(negset, Tensor):
            negset = NegationSet.from_tensor(negset)
        if isinstance(reference, Tensor):
            reference = NegationSet.from_tensor(reference)
        self.cfg = cfg or SafeDenoiserConfig()
        if (self.cfg.gate == "odds") != (reference is not None):
            raise SafediffError(
                "the Safe Denoiser's 'odds' gate needs a reference set of safe samples "
                "(option reference=FILE.safetensors), and only that gate uses one; "
                f"got gate={self.cfg.gate!r} with{'out' if reference is None else ''} a reference"
            )
        if reference is not None and reference.sample_shape != negset.sample_shape:
            raise SafediffError(
                f"reference samples have shape {reference.sample_shape} but the negation set's "
                f"are {negset.sample_shape}; build both at the model's resolution"
            )
        self.negset = negset
        self.reference = reference
        samples = negset.samples if device is None else negset.samples.to(device)
        self._y = samples.reshape(len(negset), -1)  # [N, D]
        self._y_sq = (self._y * self._y).sum(dim=1)  # [N]
        self._s = self._s_sq = None
        if reference is not None:
            ref = reference.samples if device is None else reference.samples.to(device)
            self._s = ref.reshape(len(reference), -1)  # [M, D]
            self._s_sq = (self._s * self._s).sum(dim=1)  # [M]
        tau = self.cfg.gate_threshold
        if self.cfg.gate == "odds":
            tau = 0.0  # the mass gate's threshold is unused (and not worth calibrating)
        elif tau is None:
            tau = calibrate_gate_threshold(self._y, self.cfg.bandwidth, self.cfg.distance)
        self.gate_threshold = float(tau)
        cut = self.gate_threshold - self.cfg.gate_margin
        # The gate compares log m with log(tau - margin); a cut <= 0 means "always open".
        self.log_gate = math.log(cut) if cut > 0 else -math.inf

    def _negset_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._y.device != device:
            self._y, self._y_sq = self._y.to(device), self._y_sq.to(device)
            if self._s is not None:
                self._s, self._s_sq = self._s.to(device), self._s_sq.to(device)
        return self._y, self._y_sq

    def in_window(self, t: Tensor) -> Tensor:
        """[B] bool: t in [t_min, t_max]."""
        return (t >= self.cfg.t_min) & (t <= self.cfg.t_max)

    def correct(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x0_safe [B, C, h, w], active [B] bool, log gate score [B] for clean estimates x0 at t.

        The score is the log kernel mass (gate "mass") or the log posterior odds (gate "odds").
        Rows outside the window are returned as they are (score -inf, not computed).
        """
        if tuple(x0.shape[1:]) != self.negset.sample_shape:
            raise SafediffError(
                f"negation samples have shape {self.negset.sample_shape} but the model's latents "
                f"are {tuple(x0.shape[1:])}; build the negation set at the model's resolution"
            )
        window = self.in_window(t)
        log_mass = torch.full((x0.shape[0],), -math.inf, device=x0.device)
        if not bool(window.any()):
            return x0, window, log_mass
        y, y_sq = self._negset_on(x0.device)
        # float32 even under a caller's autocast: ||x||^2 + ||y||^2 - 2 x.y cancels badly in bf16
        cfg = self.cfg
        flat = x0.float().reshape(x0.shape[0], -1)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            if cfg.gate == "odds":
                score, e_unsafe = log_posterior_odds(
                    flat, y, self._s, cfg.bandwidth, cfg.distance, cfg.prior_odds, y_sq, self._s_sq
                )
                beta = torch.where(window, odds_beta(score, cfg.scale), 0.0)
                active = window & (beta > 0)
            else:
                e_unsafe, score = unsafe_posterior_mean(flat, y, cfg.bandwidth, cfg.distance, y_sq)
                active = window & (score > self.log_gate)
                beta = active.float() * cfg.scale
        score = torch.where(window, score, -math.inf)
        x0_safe = safe_clean_estimate(x0, e_unsafe.reshape(x0.shape), beta, cfg.update)
        return x0_safe, active, score

    def init_state(
        self, n: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> dict[str, Tensor]:
        return {}

    def flow_velocity(self, x_t: Tensor, velocity: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        """The corrected velocity of a flow model (SD3, FLUX; `safediff.sampling.flow`).

        x_t, velocity: [B, C, h, w]; sigma: [B] the flow time (x_t = (1 - sigma) x0 + sigma eps,
        v = eps - x0); t: [B] the transformer's timestep sigma * N, on which the window
        [t_min, t_max] is read (N = 1000 for SD3 / FLUX, the scale of the DDPM presets).
        The same x0 correction in the flow parameterisation: x0 = x_t - sigma v, x0_safe =
        `correct`(x0, t), and back v' = (x_t - x0_safe) / sigma (sigma > 0 at every step the
        sampler takes), so the Euler / SDE step uses x0_safe as DDIM's does. Departure: the
        paper and its code are for DDPM models; its presets (bandwidth, tau, window) were tuned
        on SD 1.4's latents and are not re-tuned for SD3 / FLUX latents (16 channels, other
        scale): build the negation set with the flow model's VAE and calibrate tau from it.
        """
        sigma = sigma.to(device=x_t.device, dtype=torch.float32)
        t = torch.as_tensor(t, device=x_t.device)
        if not bool(self.in_window(t).any()):
            return velocity
        s = sigma.reshape(-1, *([1] * (x_t.ndim - 1)))
        x = x_t.to(torch.float32)
        v = velocity.to(torch.float32)
        x0_safe, active, _ = self.correct(x - s * v, t)
        if not bool(active.any()):
            return velocity
        mask = active.reshape(s.shape)
        return torch.where(mask, (x - x0_safe) / s, v)

    def __call__(
        self, step: GuidanceStep, state: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if not bool(self.in_window(step.t).any()):
            return step.eps, state
        x0_safe, active, _ = self.correct(step.x0, step.t)
        if not bool(active.any()):
            return step.eps, state
        mask = active.reshape(-1, *([1] * (step.eps.ndim - 1)))
        return torch.where(mask, step.eps_from_x0(x0_safe), step.eps), state
