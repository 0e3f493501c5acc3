"""ESD: erasing a concept by fine-tuning the denoiser against its own guidance direction.

Paper: Gandikota, Materzynska, Fiotto-Kaufman & Bau, "Erasing Concepts from Diffusion Models"
(ICCV 2023, arXiv 2303.07345); reference code github.com/rohitgandikota/erasing (esd_sd.py,
esd_diffusers.py and the CompVis train-esd.py it replaced).

Notation: theta is the frozen original denoiser, theta' the copy being trained, c a concept
prompt's token states, '' the empty prompt's, eta the negative guidance.

1. Reach x_t: draw x_T ~ N(0, I), run k deterministic DDIM steps (eta 0) of the *frozen* model
   with CFG `start_guidance` on the concept prompt (the image the model would draw of c), k drawn
   uniformly from {0, ..., ddim_steps - 1}; x_t lives at the k-th DDIM timestep t = ts[k].
2. Target (Eq. 4 of the paper):  eps* = eps_theta(x_t, '', t) - eta [eps_theta(x_t, c, t) -
   eps_theta(x_t, '', t)], the frozen model's prediction guided *away* from c.
3. Loss: L = mean over elements of (eps_theta'(x_t, c, t) - eps*)^2 (torch's MSELoss); one Adam
   step per x_t. With several concepts, each step draws one uniformly (esd_diffusers.py).
4. Parameter groups (`esd_parameter_names`): ESD-x ("x") trains the cross-attention modules
   (`attn2`) only, ESD-u ("u") every other parameter, "full" all of them. A denoiser without
   `attn2` modules has no cross-attention: SafediffError.

Where this departs from the reference code, and why:
- x_t comes from the frozen model (as esd_sd.py does); the CompVis train-esd.py sampled it with the
  model under training. The frozen model makes the training data independent of the run so far.
- the trained timestep is the DDIM timestep x_t really lives at (esd_sd.py). esd_diffusers.py
  re-labels step k of 50 as int(k / 50 * 1000) and draws k from {1, ..., 48}.
- ESD-u is "every parameter not under an attn2 module" (the paper's "non-cross-attention"). The
  CompVis code also left out the time embedding and the output layer; esd_sd.py trains only the
  Linear and Conv2d layers (not the norms). The unet's own `encoder_hid_proj` (the sandbox's
  384 -> 96 text projection) is not cross-attention, so it belongs to ESD-u.
- `batch_size` samples per step share the step's concept and k, each from its own x_T (the
  reference uses one sample per step, the default here).
- every random draw of step s comes from generator(derive_seed(seed, "esd", s)) (concept, k,
  x_T), so a resumed run equals an uninterrupted one without saving RNG states.
- v-prediction models: the target is formed on the raw network outputs; since v is affine in eps
  for a fixed x_t and t, and the target's coefficients (1 + eta, -eta) sum to one, this is the
  same target up to the per-timestep scale of the MSE.

Defaults: the paper's (eta 1.0, 1000 steps, lr 1e-5, Adam, 50 DDIM steps, start guidance 3).

On the sandbox (`safediff esd train --model sandbox --concept "weapon|skull|fire" --variant x
ddim_steps=10`, evaluated with `safediff.sandbox.defense_eval.evaluate_defenses(quick=True)`: 16
explicit prompts per family, DDIM 10 / eta 1 / CFG 4; base: trained families 87.5% unsafe,
utility 60.4%; paired deltas with 95% percentile-bootstrap intervals; one shared CPU thread):
- the paper's lr 1e-5 x 1000 steps (1,124 s): -2.1 pp [-6.2, +0.0], utility +0.0 pp: a 2.8M
  parameter UNet with its own scales hardly moves at SD's learning rate;
- lr 1e-4 x 1000 steps (484 s): -45.8 pp [-60.4, -31.2] (weapon 50.0%, skull 50.0%, fire
  25.0%), utility +2.1 pp [+0.0, +6.2], CLIP alignment on benign prompts 0.726 -> 0.719; the
  held-out family +12.5 pp [+0.0, +31.2] (erasing the trained ones does not carry over);
- ESD-u, lr 1e-4 x 1000 steps (307 s): -47.9 pp [-62.5, -31.2], utility +2.1 pp [-8.3, +12.5],
  but 18.8% of benign images now show a glyph (base 0.0%), alignment 0.726 -> 0.688, Frechet
  +0.13 [+0.08, +0.17]: as in the paper, ESD-u erases as much and costs more elsewhere;
- lr 1e-3 x 30 steps (28 s; the slow test's run): -25.0 pp [-37.5, -12.5], utility +4.2 pp
  [+0.0, +10.4], held-out family +0.0 pp.
"""

import copy
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safediff.atomic import atomic_dir, write_text_atomic
from safediff.config import to_dict
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.sampling.ddim import ddim_step_with_logprob
from safediff.sampling.schedule import DDIMSchedule
from safediff.seeding import derive_seed, generator

logger = logging.getLogger(__name__)

VARIANTS = ("x", "u", "full")
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "esd_state.safetensors"
STATE_JSON = "esd_state.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
"""The UNet weights `save_pretrained` writes (safetensors)."""
META_FILE = "esd.json"
SEED_MAX = 2**63 - 1
_RESUME_FREE = ("steps", "save_every", "keep_checkpoint", "output_dir")
"""Fields a resumed run may change; every other field must equal the checkpoint's."""


@dataclass(frozen=True)
class ESDConfig:
    """An ESD run. Defaults are the paper's (Section 4 / Appendix of Gandikota et al. 2023)."""

    model: str = "tiny-sd"
    """Base model: 'tiny-sd', 'sandbox', a diffusers pipeline folder or a hub id."""
    concept: str = "nudity"
    """The concept(s) to erase, '|'-separated (e.g. 'weapon|skull|fire'); one drawn per step."""
    variant: str = "x"
    """x: cross-attention (attn2) only; u: every parameter but attn2; full: all parameters."""
    negative_guidance: float = 1.0
    """eta >= 0: how far the target is pushed against the concept's guidance direction."""
    steps: int = 1000
    """Optimizer steps (>= 1)."""
    lr: float = 1e-5
    """Adam learning rate (> 0)."""
    batch_size: int = 1
    """x_t samples per step (>= 1); they share the step's concept and k."""
    ddim_steps: int = 50
    """DDIM steps of the schedule x_t is drawn from (1 ... num_train_timesteps)."""
    start_guidance: float = 3.0
    """CFG scale of the frozen model while it denoises to x_t (the reference's 3)."""
    seed: int = 0
    """Base seed of every step's draws (concept, k, x_T), in [0, 2**63 - 1]."""
    output_dir: str = "runs/esd"
    """The trained UNet (diffusers folder), esd.json and the checkpoint/ folder go here."""
    save_every: int = 100
    """Write a resumable checkpoint every this many steps (>= 1)."""
    keep_checkpoint: bool = False
    """Keep checkpoint/ after the run (to extend it later with more steps); removed otherwise."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SafediffError(f"invalid ESD config: {f.name} must be finite, got {value}")
        checks = [
            (bool(self.concepts), "concept must name at least one concept ('a|b|c')"),
            (self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}"),
            (self.negative_guidance >= 0, "negative_guidance must be >= 0"),
            (self.steps >= 1, "steps must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.ddim_steps >= 1, "ddim_steps must be >= 1"),
            (self.start_guidance >= 1, "start_guidance must be >= 1 (1: no CFG)"),
            (0 <= self.seed <= SEED_MAX, "seed must be in [0, 2**63 - 1]"),
            (self.save_every >= 1, "save_every must be >= 1"),
            (self.output_dir.strip() != "", "output_dir must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise SafediffError(f"invalid ESD config: {message}")

    @property
    def concepts(self) -> list[str]:
        """The concepts, in order ('a| b |' -> ['a', 'b'])."""
        return [c.strip() for c in self.concept.split("|") if c.strip()]


# ---------------------------------------------------------------------------------------------
# The math (pure functions)


def esd_target(eps_uncond: Tensor, eps_cond: Tensor, negative_guidance: float) -> Tensor:
    """eps* = eps_uncond - eta (eps_cond - eps_uncond), float32, the shape of the inputs.

    eps_uncond, eps_cond: [B, C, h, w] frozen predictions at (x_t, t) for '' and the concept.
    """
    u, c = eps_uncond.float(), eps_cond.float()
    return u - negative_guidance * (c - u)


def esd_loss(
    eps_trained: Tensor, eps_uncond: Tensor, eps_cond: Tensor, negative_guidance: float
) -> Tensor:
    """mean((eps_trained - eps*)^2), a 0-dim float32 tensor; the gradient flows into eps_trained
    only (the target is detached). All inputs [B, C, h, w]."""
    target = esd_target(eps_uncond.detach(), eps_cond.detach(), negative_guidance)
    return F.mse_loss(eps_trained.float(), target)


def _is_cross_attention(name: str) -> bool:
    return "attn2" in name.split(".")


def esd_parameter_names(unet: nn.Module, variant: str) -> list[str]:
    """Names of the parameters `variant` trains, in `named_parameters` order.

    x: those under an `attn2` module (cross-attention); u: all others; full: all.
    SafediffError for an unknown variant or a denoiser without cross-attention.
    """
    if variant not in VARIANTS:
        raise SafediffError(f"unknown ESD variant {variant!r}; variants: {', '.join(VARIANTS)}")
    names = [n for n, _ in unet.named_parameters()]
    if not any(_is_cross_attention(n) for n in names):
        raise SafediffError(
            f"{type(unet).__name__} has no cross-attention (attn2) modules; ESD needs a "
            "text-conditioned UNet"
        )
    if variant == "x":
        return [n for n in names if _is_cross_attention(n)]
    if variant == "u":
        return [n for n in names if not _is_cross_attention(n)]
    return names


def _eps(unet: nn.Module, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
    """unet(x [B, C, h, w], t [B], emb [B, L, D]).sample as float32, inputs cast to the unet."""
    p = next(unet.parameters())
    out = unet(
        x.to(p.device, p.dtype), t.to(p.device), encoder_hidden_states=emb.to(p.device, p.dtype)
    )
    return out.sample.float()


@torch.no_grad()
def denoise_to_step(
    unet: nn.Module,
    schedule: DDIMSchedule,
    x_T: Tensor,
    cond: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    ddim_steps: int,
    k: int,
) -> tuple[Tensor, Tensor]:
    """(x_t, t): k deterministic DDIM steps (eta 0) of `unet` with CFG from x_T.

    x_T: [B, C, h, w]; cond, uncond: [B, L, D]; 0 <= k < ddim_steps. Returns x_t [B, C, h, w]
    float32 and t [B] int64, the DDIM timestep ts[k] that x_t lives at (k = 0: x_T, ts[0]).
    """
    ts, prev = schedule.timesteps(ddim_steps)
    if not 0 <= k < ddim_steps:
        raise SafediffError(f"k must be in [0, {ddim_steps - 1}], got {k}")
    batch = x_T.shape[0]
    x = x_T.float()
    for i in range(k):
        t = ts[i].expand(batch)
        u, c = _eps(unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        eps = u + guidance_scale * (c - u)
        x = ddim_step_with_logprob(
            schedule, eps, t, prev[i].expand(batch), x, 0.0, noise=torch.zeros_like(x)
        ).prev_sample
    return x, ts[k].expand(batch).clone()


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class ESDResult:
    """The trained UNet (a copy; eval mode, no grad), the trained names and per-step losses."""

    unet: nn.Module
    trained: list[str]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Step:
    """One step's draws: the concept index, k, and x_T [B, C, h, w] (CPU float32)."""

    concept: int
    k: int
    x_T: Tensor


def _draws(cfg: ESDConfig, step: int, n_concepts: int, latent_shape: tuple[int, ...]) -> _Step:
    g = generator(derive_seed(cfg.seed, "esd", step))
    concept = int(torch.randint(n_concepts, (1,), generator=g))
    k = int(torch.randint(cfg.ddim_steps, (1,), generator=g))
    x_T = torch.randn((cfg.batch_size, *latent_shape), generator=g)
    return _Step(concept, k, x_T)


def _save_checkpoint(
    folder: Path, cfg: ESDConfig, step: int, params: dict[str, nn.Parameter],
    optimizer: torch.optim.Adam, losses: list[float], seconds: float,
) -> None:  # fmt: skip
    """checkpoint/: esd_state.safetensors (params, Adam moments and step counts by name) and
    esd_state.json (step, config, losses), written as one folder atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for name, p in params.items():
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        state = optimizer.state.get(p)
        if state:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                tensors[f"{key}/{name}"] = torch.as_tensor(state[key]).detach().cpu().contiguous()
    meta = {"step": step, "config": to_dict(cfg), "losses": losses, "seconds": seconds}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / STATE_JSON).write_text(json.dumps(meta), encoding="utf-8")


def _load_checkpoint(
    folder: Path, cfg: ESDConfig, params: dict[str, nn.Parameter], optimizer: torch.optim.Adam
) -> tuple[int, list[float], float]:
    """Restore params and Adam state from checkpoint/; returns (step, losses, seconds)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    saved, now = meta["config"], to_dict(cfg)
    for key in now:
        if key not in _RESUME_FREE and saved.get(key) != now[key]:
            raise SafediffError(
                f"the checkpoint in {folder} was made with {key}={saved.get(key)!r}, not "
                f"{now[key]!r}; use another output_dir or delete {folder}"
            )
    tensors = load_file(str(folder / STATE_FILE))
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise SafediffError(f"the checkpoint in {folder} lacks {len(missing)} trained tensors")
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(params.items()):
            p.copy_(tensors[f"param/{name}"])
            if f"step/{name}" in tensors:
                state[i] = {
                    "step": tensors[f"step/{name}"],
                    "exp_avg": tensors[f"exp_avg/{name}"].to(p.device),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device),
                }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return int(meta["step"]), list(meta["losses"]), float(meta["seconds"])


def train_esd(
    model: T2IModel,
    cfg: ESDConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> ESDResult:
    """Train a copy of `model.unet` with ESD for cfg.steps steps; `model` itself is untouched.

    model.unet is the frozen theta (run under no_grad; its weights and flags are not changed).
    checkpoint_dir: where a resumable checkpoint goes every cfg.save_every steps and at the end;
        a checkpoint already there (same config but steps / save_every) is resumed from.
    on_step(step, loss): called after every optimizer step (0-based step).
    Returns the trained UNet (eval mode, requires_grad False) and the per-step losses.
    """
    start = time.perf_counter()
    frozen = model.unet
    names = esd_parameter_names(frozen, cfg.variant)
    device = next(frozen.parameters()).device
    concepts = cfg.concepts
    with torch.no_grad():
        cond_all = model.encode_text(concepts, device)  # [n_concepts, L, D]
        uncond = model.encode_text([""], device)  # [1, L, D]

    trained = copy.deepcopy(frozen)
    trained.requires_grad_(False)
    by_name = dict(trained.named_parameters())
    params = {n: by_name[n] for n in names}
    for p in params.values():
        p.requires_grad_(True)
    trained.train()
    optimizer = torch.optim.Adam(list(params.values()), lr=cfg.lr)

    step, losses, seconds_before = 0, [], 0.0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and (ckpt / STATE_JSON).is_file():
        step, losses, seconds_before = _load_checkpoint(ckpt, cfg, params, optimizer)
        if step > cfg.steps:
            raise SafediffError(
                f"the checkpoint in {ckpt} is at step {step}, past steps={cfg.steps}; "
                "raise steps or delete it"
            )
        logger.info("ESD: resumed from %s at step %d", ckpt, step)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=min(step, cfg.steps), desc="esd", unit="step")
    b = cfg.batch_size
    while step < cfg.steps:
        d = _draws(cfg, step, len(concepts), tuple(model.latent_shape))
        cond = cond_all[d.concept : d.concept + 1].expand(b, -1, -1)
        unc = uncond.expand(b, -1, -1)
        x_T = d.x_T.to(device)
        x_t, t = denoise_to_step(
            frozen, model.schedule, x_T, cond, unc, cfg.start_guidance, cfg.ddim_steps, d.k
        )
        with torch.no_grad():
            e_u, e_c = _eps(
                frozen, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([unc, cond])
            ).chunk(2)
        loss = esd_loss(_eps(trained, x_t, t, cond), e_u, e_c, cfg.negative_guidance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        losses.append(value)
        step += 1
        if on_step is not None:
            on_step(step - 1, value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", k=d.k)
        if ckpt is not None and (step % cfg.save_every == 0 or step == cfg.steps):
            elapsed = seconds_before + time.perf_counter() - start
            _save_checkpoint(ckpt, cfg, step, params, optimizer, losses, elapsed)
    if bar is not None:
        bar.close()
    trained.requires_grad_(False)
    trained.eval()
    seconds = seconds_before + time.perf_counter() - start
    return ESDResult(unet=trained, trained=names, losses=losses, seconds=seconds)


def run_esd(
    cfg: ESDConfig,
    model: T2IModel | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train ESD on `model` (loaded from cfg.model when None) and write cfg.output_dir.

    The folder holds the trained UNet as diffusers writes it (`save_pretrained`: config.json +
    diffusion_pytorch_model.safetensors, loadable with UNet2DConditionModel.from_pretrained and
    by the defense spec `esd:FOLDER`) and esd.json (config, trained parameter count, losses,
    seconds). Interrupted runs resume from OUTPUT/checkpoint/ (removed at the end unless
    cfg.keep_checkpoint).
    """
    if model is None:
        from safediff.config import ModelConfig
        from safediff.models.loading import load_t2i_model

        model = load_t2i_model(ModelConfig(pretrained=cfg.model), device=device)
    if not hasattr(model.unet, "save_pretrained"):
        raise SafediffError(
            f"ESD writes a diffusers UNet folder; {type(model.unet).__name__} has no save_pretrained"
        )
    out = Path(cfg.output_dir)
    ckpt = out / CHECKPOINT_DIR
    logger.info(
        "ESD-%s on %s: concepts %s, %d steps", cfg.variant, model.source, cfg.concepts, cfg.steps
    )
    result = train_esd(model, cfg, checkpoint_dir=ckpt, progress=progress, on_step=on_step)
    out.mkdir(parents=True, exist_ok=True)
    result.unet.save_pretrained(str(out), safe_serialization=True)
    n_trained = sum(
        p.numel() for n, p in result.unet.named_parameters() if n in set(result.trained)
    )
    meta = {
        "method": "esd",
        "config": to_dict(cfg),
        "base_model": model.source,
        "trained_parameters": n_trained,
        "trained_tensors": len(result.trained),
        "seconds": result.seconds,
        "losses": result.losses,
    }
    write_text_atomic(out / META_FILE, json.dumps(meta, indent=1))
    if not cfg.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    if result.losses:
        logger.info(
            "ESD: %d steps in %.1f s, loss %.4g -> %.4g; UNet written to %s",
            len(result.losses), result.seconds, result.losses[0], result.losses[-1], out,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The defense: esd:FOLDER


def load_esd_unet(unet: nn.Module, folder: str | Path) -> nn.Module:
    """A copy of `unet` with the weights of an ESD folder (`run_esd`'s output).

    SafediffError (one line) when the folder has no weights or they do not fit `unet`'s
    architecture (missing / unexpected tensors or other shapes).
    """
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise SafediffError(
            f"esd:{folder} has no {WEIGHTS_FILE}; write one with `safediff esd train`"
        )
    state = load_file(str(path))
    own = unet.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        first = (missing or extra or shapes)[0]
        raise SafediffError(
            f"esd:{folder} does not fit this model's UNet ({len(missing)} missing, {len(extra)} "
            f"unexpected, {len(shapes)} reshaped tensors, e.g. {first}); train ESD on this base model"
        )
    edited = copy.deepcopy(unet)
    edited.load_state_dict(state, strict=True)
    return edited


def apply_esd(
    model: T2IModel, spec: Any, device: torch.device | str | None = None
) -> tuple[T2IModel, dict[str, Any]]:
    """The defense `esd:FOLDER`: a copy of `model` whose UNet has the ESD folder's weights.

    spec: a `safediff.defenses.stack.DefenseSpec` (kind 'esd', arg FOLDER, no options).
    The input model is not modified; the copy shares everything but the UNet. No sampling hooks.
    device: unused (the UNet copy stays where model.unet is).
    """
    if spec.options:
        raise SafediffError(f"defense esd takes no options, got {spec}")
    unet = load_esd_unet(model.unet, spec.arg)
    return dataclasses.replace(model, unet=unet), {}
