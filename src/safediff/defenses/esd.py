"""ESD: erasing a concept by fine-tuning the denoiser against its own guidance direction.

Paper: Gandikota, Materzynska, Fiotto-Kaufman & Bau, "Erasing Concepts from Diffusion Models"
(ICCV 2023, arXiv 2303.07345); reference code github.com/rohitgandikota/erasing (esd_sd.py,
esd_sdxl.py, esd_diffusers.py and the CompVis train-esd.py it replaced).

Notation: theta is the frozen original denoiser, theta' the copy being trained, c a concept
prompt's conditioning, '' the empty prompt's, eta the negative guidance.

1. Reach x_t: draw x_T ~ N(0, I), run k deterministic steps of the *frozen* model's sampler with
   guidance `start_guidance` on the concept prompt (the image the model would draw of c), k drawn
   uniformly from {0, ..., ddim_steps - 1}. DDPM-type models (SD 1.x/2.x, SDXL, the sandbox): DDIM
   steps (eta 0) with CFG, x_t at the k-th DDIM timestep t = ts[k]. Flow models (SD3, FLUX): Euler
   steps of the flow ODE (`sampling/flow.py`, a = 0) on the FlowMatchEuler sigmas of the model's
   schedule, x_t at sigma_k, t = sigma_k * N; SD3 and FLUX-schnell guide with CFG, FLUX-dev takes
   start_guidance as its distilled guidance input (`resolve_flow_guidance`).
2. Target (Eq. 4 of the paper), in the denoiser's own output units:
       eps* = eps_theta(x_t, '', t) - eta [eps_theta(x_t, c, t) - eps_theta(x_t, '', t)]
   and for flow models, with the velocity v = eps - x0,
       v*   = v_theta(x_t, '', t)   - eta [v_theta(x_t, c, t)   - v_theta(x_t, '', t)],
   the frozen model's prediction guided *away* from c.
3. Loss: L = mean over elements of (out_theta'(x_t, c, t) - target)^2 (torch's MSELoss); one Adam
   step per x_t. With several concepts, each step draws one uniformly (esd_diffusers.py).
4. Parameter groups (`esd_parameter_names`): ESD-x ("x") trains the modules that read the text,
   ESD-u ("u") every other parameter, "full" all of them.
   - UNets (SD, SDXL, the sandbox): x = the cross-attention modules (`attn2`). A UNet without
     `attn2` modules has no cross-attention: SafediffError.
   - SD3 (joint attention, MM-DiT): x = the attention's context projections, the ones that read
     or write the text stream: add_q_proj, add_k_proj, add_v_proj, to_add_out (and the
     norm_added_q / norm_added_k scales where qk-norm is on). The image tokens' to_q/to_k/to_v
     and SD3.5's image-only `attn2` belong to u. (The last block is context_pre_only: its text
     stream's output is discarded, so its add_q_proj gets no gradient and does not move.)
   - FLUX: x = the same context projections of the double-stream blocks (`transformer_blocks`).
     Its single-stream blocks run one attention over [text; image] tokens with shared to_q/to_k/
     to_v weights, so no parameter there reads the text alone; they belong to u (editing them
     would move every image token's attention as much as the text's).

Model families: the conditioning is `T2IModel.encode_text`'s packed tensor, so each family's
extra conditioning travels with its prompt. SDXL: the UNet's added conditioning (pooled text
embedding and time ids, models/sdxl.py) is the concept's for the conditional prediction and the
empty prompt's for the unconditional one. SD3 / FLUX: the pooled projections likewise.
FLUX-dev is guidance-distilled: sampling makes no unconditional pass, but its transformer still
takes an empty prompt, and v_theta(x_t, '', t) with guidance input g is (by the distillation)
close to the unconditional velocity; the target's three predictions (trained on c, frozen on c
and on '') are all taken at the guidance input `TARGET_GUIDANCE` = 1, where the distilled
model's v(x, c) and v(x, '') stand for the plain conditional and unconditional velocities that
Eq. 4 combines (a larger g would fold CFG into both terms). The trained model is then
sampled at any g as usual. (Public FLUX ports of ESD do the same: guidance 1 for the training
passes, the sampling guidance only to reach x_t.)

Where this departs from the reference code, and why:
- x_t comes from the frozen model (as esd_sd.py does); the CompVis train-esd.py sampled it with the
  model under training. The frozen model makes the training data independent of the run so far.
- the trained timestep is the DDIM timestep x_t really lives at (esd_sd.py). esd_diffusers.py
  re-labels step k of 50 as int(k / 50 * 1000) and draws k from {1, ..., 48}.
- ESD-u is "every parameter not in ESD-x" (the paper's "non-cross-attention"). The CompVis code
  also left out the time embedding and the output layer; esd_sd.py and esd_sdxl.py train only the
  Linear and Conv2d layers (not the norms). The unet's own `encoder_hid_proj` (the sandbox's
  384 -> 96 text projection) and the transformers' `context_embedder` are input projections, not
  attention, so they belong to ESD-u.
- SDXL's empty prompt: `encode_text("")` is zeros (token states and pooled embedding, time ids
  kept), the unconditional input SDXL's CFG samples with (force_zeros_for_empty_prompt);
  esd_sdxl.py passes negative_prompt="" to encode_prompt and so encodes "" with the encoders.
- `batch_size` samples per step share the step's concept and k, each from its own x_T (the
  reference uses one sample per step, the default here).
- every random draw of step s comes from generator(derive_seed(seed, "esd", s)) (concept, k,
  x_T), so a resumed run equals an uninterrupted one without saving RNG states.
- v-prediction models: the target is formed on the raw network outputs; since v is affine in eps
  for a fixed x_t and t, and the target's coefficients (1 + eta, -eta) sum to one, this is the
  same target up to the per-timestep scale of the MSE. So are flow velocities: for fixed x_t and
  t, v = (eps - x_t) / (1 - t), so v* is eps* in velocity units.

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
from safediff.sampling.flow import (
    FlowSchedule,
    flow_sde_step,
    flow_velocity,
    has_guidance_input,
    is_flow_schedule,
    resolve_flow_guidance,
)
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
TARGET_GUIDANCE = 1.0
"""The guidance input of a guidance-distilled transformer (FLUX-dev) for the target's and the
trained model's predictions (see the module docstring)."""
TEXT_STREAM_ATTENTION = (
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "norm_added_q",
    "norm_added_k",
)
"""An SD3 / FLUX joint attention's modules on the text stream: ESD-x of a flow transformer."""
_RESUME_FREE = ("steps", "save_every", "keep_checkpoint", "output_dir")
"""Fields a resumed run may change; every other field must equal the checkpoint's."""


@dataclass(frozen=True)
class ESDConfig:
    """An ESD run. Defaults are the paper's (Section 4 / Appendix of Gandikota et al. 2023)."""

    model: str = "tiny-sd"
    """Base model: 'tiny-sd', 'tiny-sdxl', 'tiny-sd3', 'tiny-flux', 'sandbox', a diffusers
    pipeline folder (SD, SDXL, SD3, FLUX) or a hub id."""
    concept: str = "nudity"
    """The concept(s) to erase, '|'-separated (e.g. 'weapon|skull|fire'); one drawn per step."""
    variant: str = "x"
    """x: the attention modules that read the text (UNet: attn2; SD3 / FLUX: the joint
    attention's context projections); u: every other parameter; full: all parameters."""
    negative_guidance: float = 1.0
    """eta >= 0: how far the target is pushed against the concept's guidance direction."""
    steps: int = 1000
    """Optimizer steps (>= 1)."""
    lr: float = 1e-5
    """Adam learning rate (> 0)."""
    batch_size: int = 1
    """x_t samples per step (>= 1); they share the step's concept and k."""
    ddim_steps: int = 50
    """Sampler steps of the schedule x_t is drawn from: DDIM steps (1 ... num_train_timesteps),
    or flow ODE steps for SD3 / FLUX."""
    start_guidance: float = 3.0
    """Guidance of the frozen model while it denoises to x_t (the reference's 3): the CFG scale,
    or FLUX-dev's distilled guidance input."""
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

    eps_uncond, eps_cond: [B, C, h, w] frozen predictions at (x_t, t) for '' and the concept
    (noise predictions, or velocities for a flow model: v* has the same form).
    """
    u, c = eps_uncond.float(), eps_cond.float()
    return u - negative_guidance * (c - u)


def esd_loss(
    eps_trained: Tensor, eps_uncond: Tensor, eps_cond: Tensor, negative_guidance: float
) -> Tensor:
    """mean((eps_trained - eps*)^2), a 0-dim float32 tensor; the gradient flows into eps_trained
    only (the target is detached). All inputs [B, C, h, w], in the denoiser's output units."""
    target = esd_target(eps_uncond.detach(), eps_cond.detach(), negative_guidance)
    return F.mse_loss(eps_trained.float(), target)


def _is_cross_attention(name: str) -> bool:
    return "attn2" in name.split(".")


def _reads_text_stream(name: str) -> bool:
    """A parameter of a joint attention's text-stream module ('...attn.add_k_proj.weight')."""
    parts = name.split(".")
    return any(
        part in TEXT_STREAM_ATTENTION and i > 0 and parts[i - 1] == "attn"
        for i, part in enumerate(parts)
    )


def denoiser_family(unet: nn.Module) -> str:
    """'sd3' or 'flux' for an SD3 / FLUX transformer (by its class), else 'unet'."""
    name = type(unet).__name__
    if "Flux" in name and "Transformer" in name:
        return "flux"
    if "SD3" in name and "Transformer" in name:
        return "sd3"
    return "unet"


def esd_parameter_names(unet: nn.Module, variant: str) -> list[str]:
    """Names of the parameters `variant` trains, in `named_parameters` order.

    x: the modules that read the text (a UNet's `attn2`; an SD3 / FLUX transformer's joint
    attention context projections, `TEXT_STREAM_ATTENTION`); u: all others; full: all.
    SafediffError for an unknown variant or a denoiser with no such module.
    """
    if variant not in VARIANTS:
        raise SafediffError(f"unknown ESD variant {variant!r}; variants: {', '.join(VARIANTS)}")
    names = [n for n, _ in unet.named_parameters()]
    family = denoiser_family(unet)
    reads_text = _is_cross_attention if family == "unet" else _reads_text_stream
    if not any(reads_text(n) for n in names):
        what = (
            "cross-attention (attn2) modules; ESD needs a text-conditioned UNet"
            if family == "unet"
            else "joint-attention context projections (add_k_proj, ...)"
        )
        raise SafediffError(f"{type(unet).__name__} has no {what}")
    if variant == "x":
        return [n for n in names if reads_text(n)]
    if variant == "u":
        return [n for n in names if not reads_text(n)]
    return names


def _predict(
    unet: nn.Module, x: Tensor, t: Tensor, emb: Tensor, guidance: float | None = None
) -> Tensor:
    """unet(x [B, C, h, w], t [B], emb [B, L, D][, guidance [B]]).sample as float32 (noise or
    velocity), inputs cast to the unet; `guidance`: a distilled transformer's guidance input."""
    p = next(unet.parameters())
    kwargs = {}
    if guidance is not None:
        kwargs["guidance"] = torch.full((x.shape[0],), float(guidance), device=p.device)
    out = unet(
        x.to(p.device, p.dtype),
        t.to(p.device),
        encoder_hidden_states=emb.to(p.device, p.dtype),
        **kwargs,
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
        u, c = _predict(
            unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])
        ).chunk(2)
        eps = u + guidance_scale * (c - u)
        x = ddim_step_with_logprob(
            schedule, eps, t, prev[i].expand(batch), x, 0.0, noise=torch.zeros_like(x)
        ).prev_sample
    return x, ts[k].expand(batch).clone()


@torch.no_grad()
def flow_denoise_to_step(
    unet: nn.Module,
    schedule: FlowSchedule,
    x_T: Tensor,
    cond: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    num_steps: int,
    k: int,
) -> tuple[Tensor, Tensor]:
    """(x_t, t): k Euler steps of the flow ODE of `unet` (an SD3 / FLUX transformer) from x_T.

    The sigmas are the schedule's for num_steps steps at x_T's size (`FlowSchedule.for_latent`,
    FLUX's resolution shift); guidance as the flow sampler applies it (`resolve_flow_guidance`:
    CFG against `uncond`, or FLUX-dev's guidance input). x_T: [B, C, h, w]; cond, uncond:
    [B, L, D]; 0 <= k < num_steps. Returns x_t [B, C, h, w] float32 at sigma_k and t [B] float32
    = sigma_k * N, the transformer's timestep there (k = 0: x_T, sigma 1).
    """
    if not 0 <= k < num_steps:
        raise SafediffError(f"k must be in [0, {num_steps - 1}], got {k}")
    batch = x_T.shape[0]
    x = x_T.float()
    sigmas = schedule.for_latent(*x.shape[-2:]).sigmas(num_steps).to(x.device)
    ts = sigmas[:-1] * schedule.num_train_timesteps
    scale, guidance = resolve_flow_guidance(unet, guidance_scale, None)
    negative = uncond if scale != 1 else None
    for i in range(k):
        v = flow_velocity(unet, x, ts[i].expand(batch), cond, negative, scale, guidance=guidance)
        x = flow_sde_step(sigmas, v, x, i, 0.0, noise=torch.zeros_like(x)).prev_sample
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

    model: SD 1.x/2.x, SDXL or the sandbox (DDIM schedule: eps or v targets) or SD3 / FLUX (flow
        schedule: velocity targets, x_t from the flow ODE); see the module docstring.
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
    flow = is_flow_schedule(model.schedule)
    reach = flow_denoise_to_step if flow else denoise_to_step
    # a guidance-distilled transformer (FLUX-dev) takes its guidance as an input: see the docstring
    g = TARGET_GUIDANCE if flow and has_guidance_input(frozen) else None
    while step < cfg.steps:
        d = _draws(cfg, step, len(concepts), tuple(model.latent_shape))
        cond = cond_all[d.concept : d.concept + 1].expand(b, -1, -1)
        unc = uncond.expand(b, -1, -1)
        x_T = d.x_T.to(device)
        x_t, t = reach(
            frozen, model.schedule, x_T, cond, unc, cfg.start_guidance, cfg.ddim_steps, d.k
        )
        with torch.no_grad():
            e_u, e_c = _predict(
                frozen, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([unc, cond]), g
            ).chunk(2)
        loss = esd_loss(_predict(trained, x_t, t, cond, g), e_u, e_c, cfg.negative_guidance)
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

    The folder holds the trained denoiser as diffusers writes it (`save_pretrained`: config.json +
    diffusion_pytorch_model.safetensors, loadable with UNet2DConditionModel /
    SD3Transformer2DModel / FluxTransformer2DModel.from_pretrained and by the defense spec
    `esd:FOLDER` on the same base model) and esd.json (config, trained parameter count, losses,
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
        "denoiser": type(result.unet).__name__,
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
            "ESD: %d steps in %.1f s, loss %.4g -> %.4g; denoiser written to %s",
            len(result.losses), result.seconds, result.losses[0], result.losses[-1], out,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The defense: esd:FOLDER


def _saved_class(folder: Path) -> str | None:
    """The diffusers class name in a saved folder's config.json (None when unreadable)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    name = config.get("_class_name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def load_esd_unet(unet: nn.Module, folder: str | Path) -> nn.Module:
    """A copy of `unet` (a UNet or an SD3 / FLUX transformer, with its safediff call hooks) with
    the weights of an ESD folder (`run_esd`'s output).

    SafediffError (one line) when the folder has no weights, holds another denoiser class (a
    FLUX transformer for an SD3 base, ...), or its weights do not fit `unet`'s architecture
    (missing / unexpected tensors or other shapes).
    """
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise SafediffError(
            f"esd:{folder} has no {WEIGHTS_FILE}; write one with `safediff esd train`"
        )
    saved_class = _saved_class(Path(folder))
    if saved_class is not None and saved_class != type(unet).__name__:
        raise SafediffError(
            f"esd:{folder} holds a {saved_class}, but this model's denoiser is a "
            f"{type(unet).__name__}; apply it to the base model it was trained on"
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
    """The defense `esd:FOLDER`: a copy of `model` whose denoiser (UNet, or SD3 / FLUX
    transformer) has the ESD folder's weights.

    spec: a `safediff.defenses.stack.DefenseSpec` (kind 'esd', arg FOLDER, no options).
    The input model is not modified; the copy shares everything but the UNet. No sampling hooks.
    device: unused (the UNet copy stays where model.unet is).
    """
    if spec.options:
        raise SafediffError(f"defense esd takes no options, got {spec}")
    unet = load_esd_unet(model.unet, spec.arg)
    return dataclasses.replace(model, unet=unet), {}
