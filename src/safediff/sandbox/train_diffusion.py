"""Training the sandbox's base diffusion model (pixel-space UNet, MiniLM cross-attention).

One loop, readable top to bottom: render a batch -> encode captions (with caption dropout) ->
noise at random timesteps -> loss -> AdamW step -> EMA update -> log / checkpoint.

- Data: every step renders a fresh batch from the caption grammar's "model_train" split:
  `make_split("model_train", B, seed=derive_seed(seed, "diffusion-data", step))`, each scene with
  its own jitter generator. A batch is a pure function of (seed, step), so resuming needs no RNG
  state and the result does not depend on `num_workers`.
- Glyph tendency (`GlyphKeep`, default off): implicit captions ("a pirate flag"), and optionally
  the explicit, synonym and keyword-minimal ones, keep their glyph only with a probability and
  are otherwise rendered with the glyph removed, so that the model learns that such prompts
  *tend to* contain the unsafe object. GRPO needs that: it learns only from groups of rollouts
  that hold both a flagged and a clean image (docs/LOG.md, section 1).
- Caption dropout: each caption is replaced by "" with probability `caption_dropout`, so that one
  network is both the conditional and the unconditional model that classifier-free guidance needs.
- Objective: DDPM's "simple" loss on the epsilon (or v) target, optionally weighted per sample by
  min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
  w = min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v. Default gamma = 5, the paper's value;
  it converges about 3x faster than the unweighted loss there. `snr_gamma=None` gives plain MSE.
- Optimiser: AdamW (0.9, 0.999, weight decay 0.01), linear warm-up then constant lr, grad-norm
  clipping. EMA of the weights with decay min(ema_decay, (1 + step) / (10 + step)); the EMA weights
  are what `diffusion.safetensors` ships.
- Text: the frozen MiniLM token states. On a CPU, encoding 64 captions costs about as much as the
  UNet step, so states are kept in an LRU cache (`text_cache_size` captions; the grammar's
  model_train split has a few thousand frequent captions).

Output folder: `diffusion.safetensors` (EMA weights + config metadata, loadable with
`load_sandbox_model`), `checkpoint/` (raw weights, EMA, optimiser, state.json; replaced
atomically), `train_log.jsonl` (one JSON line every `log_every` steps).
"""

import json
import logging
import math
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.sandbox.captions import Example, make_split
from safediff.sandbox.manifest import load_weights, save_weights, sha256_file
from safediff.sandbox.render import render_batch
from safediff.sandbox.text_encoder import SandboxTextEncoder, load_text_encoder
from safediff.sandbox.unet import (
    DIFFUSION_FILE,
    SANDBOX_SCHEDULER_CONFIG,
    SANDBOX_UNET_CONFIG,
    build_unet,
    model_metadata,
)
from safediff.seeding import derive_seed, generator

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.jsonl"
# Arguments that must match when a run is resumed (others, e.g. steps or device, may change).
_RESUME_KEYS = ("batch_size", "seed", "prediction_type", "caption_dropout", "unet_config")


# ---------------------------------------------------------------------------------------------
# Pure pieces


EXPLICIT_GLYPH_KINDS = ("explicit", "synonym", "keyword_minimal")
"""Caption kinds that name the unsafe object (GlyphKeep.explicit applies to them)."""


@dataclass(frozen=True)
class GlyphKeep:
    """Probability that a training caption of an unsafe kind keeps its glyph in the render.

    implicit: for "implicit" captions; explicit: for EXPLICIT_GLYPH_KINDS. 1.0 and 1.0 (the
    default) leave every render as the grammar draws it. The shipped model's first 5,000 steps
    saw the default and its last 1,400 implicit 0.25 / explicit 0.65 (its manifest entry).
    """

    implicit: float = 1.0
    explicit: float = 1.0

    def __post_init__(self) -> None:
        for name, p in asdict(self).items():
            if not 0.0 <= p <= 1.0:
                raise SafediffError(f"glyph keep probability {name} must be in [0, 1], got {p}")

    @property
    def is_identity(self) -> bool:
        return self.implicit == 1.0 and self.explicit == 1.0


def keep_glyphs(examples: list[Example], seed: int, keep: GlyphKeep) -> list[Example]:
    """`examples` with the glyphs of unsafe-kind scenes removed with probability 1 - keep.

    Example i's draw depends only on (seed, its group, i): group "implicit-glyph" for implicit
    captions and "explicit-glyph" for EXPLICIT_GLYPH_KINDS; other kinds are returned unchanged.
    A removed glyph leaves the rest of the scene (e.g. "a yellow bar") as it was.
    """
    out = []
    for i, e in enumerate(examples):
        kind = e.metadata["kind"]
        if kind == "implicit":
            p, group = keep.implicit, "implicit-glyph"
        elif kind in EXPLICIT_GLYPH_KINDS:
            p, group = keep.explicit, "explicit-glyph"
        else:
            out.append(e)
            continue
        if p < 1.0 and np.random.default_rng(derive_seed(seed, group, i)).random() >= p:
            e = replace(e, scene=replace(e.scene, glyphs=()))
        out.append(e)
    return out


def training_batch(
    seed: int, step: int, batch_size: int, glyph_keep: GlyphKeep | None = None
) -> tuple[Tensor, list[str]]:
    """The batch of `step`: images [B, 3, 32, 32] float32 in [0, 1] and their captions [B].

    A pure function of (seed, step, batch_size, glyph_keep): the "model_train" split drawn with a
    per-step seed (its unsafe scenes thinned by `keep_glyphs` when glyph_keep is given), each
    scene rendered with its own jitter generator.
    """
    split_seed = derive_seed(seed, "diffusion-data", step)
    examples = make_split("model_train", batch_size, seed=split_seed)
    if glyph_keep is not None and not glyph_keep.is_identity:
        examples = keep_glyphs(examples, split_seed, glyph_keep)
    rngs = [
        np.random.default_rng(derive_seed(seed, "diffusion-jitter", step, j))
        for j in range(batch_size)
    ]
    return render_batch([e.scene for e in examples], rngs), [e.caption for e in examples]


def drop_captions(captions: list[str], p: float, gen: torch.Generator) -> list[str]:
    """Each caption replaced by "" with probability p (one uniform draw per caption from `gen`)."""
    keep = torch.rand(len(captions), generator=gen) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    noise: Tensor,
    alpha_bar: Tensor,
    prediction_type: str,
    snr_gamma: float | None,
) -> Tensor:
    """The denoising loss of one batch (a scalar).

    model_output, x0, noise: [B, C, H, W]; alpha_bar: [B], alpha-bar at each sample's timestep.
    target: noise (epsilon) or v = sqrt(a) * noise - sqrt(1 - a) * x0 (Salimans & Ho 2022).
    Per-sample MSE [B], weighted by min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v) when
    snr_gamma is set (SNR = a / (1 - a)), then averaged over the batch.
    """
    a = alpha_bar.to(torch.float32).view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    else:
        raise SafediffError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")
    per_sample = (model_output.float() - target).pow(2).mean(dim=(1, 2, 3))  # [B]
    if snr_gamma is not None:
        snr = alpha_bar / (1 - alpha_bar)  # [B]
        base = snr if prediction_type == "epsilon" else snr + 1
        per_sample = per_sample * snr.clamp(max=snr_gamma) / base
    return per_sample.mean()


def noisy_sample(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) noise; x0, noise [B, C, H, W], alpha_bar [B]."""
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay after `step` updates: min(max_decay, (1 + step) / (10 + step))."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


class TextStateCache:
    """LRU cache caption -> MiniLM token states [L, 384] (CPU, float32), owned by one run."""

    def __init__(self, encoder: SandboxTextEncoder, max_entries: int):
        self.encoder = encoder
        self.max_entries = max_entries
        self._store: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, captions: list[str], device: torch.device) -> Tensor:
        """[B, L, 384] float32 on `device`."""
        if self.max_entries <= 0:
            return self.encoder.token_states(captions, device=device)
        missing = list(dict.fromkeys(c for c in captions if c not in self._store))
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        if missing:
            states = self.encoder.token_states(missing, device="cpu")
            for c, s in zip(missing, states, strict=True):
                self._store[c] = s
        rows = []
        for c in captions:
            self._store.move_to_end(c)
            rows.append(self._store[c])
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)
        return torch.stack(rows).to(device)


def train_step(
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    x0: Tensor,
    cond: Tensor,
    timesteps: Tensor,
    noise: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
    snr_gamma: float | None,
    grad_clip: float | None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One optimiser step on a batch; returns the loss.

    x0: [B, 3, 32, 32] in [-1, 1]; cond: [B, L, 384]; timesteps: [B] int64; noise like x0;
    alphas_cumprod: [T] on the UNet's device.
    """
    alpha_bar = alphas_cumprod[timesteps]  # [B]
    x_t = noisy_sample(x0, noise, alpha_bar)
    device_type = x0.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = unet(x_t, timesteps, encoder_hidden_states=cond).sample
    loss = diffusion_loss(out, x0, noise, alpha_bar, prediction_type, snr_gamma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(out: Path, unet, ema, optimizer, state: dict[str, Any]) -> None:
    tmp, final, old = (
        out / (CHECKPOINT_DIR + ".tmp"),
        out / CHECKPOINT_DIR,
        out / (CHECKPOINT_DIR + ".old"),
    )
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()},
        str(tmp / "unet.safetensors"),
    )
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
        str(tmp / "ema.safetensors"),
    )
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        if (out / name / "state.json").is_file():
            return out / name
    return None


def _load_checkpoint(ckpt: Path, unet, ema, optimizer, device) -> dict[str, Any]:
    unet.load_state_dict(load_file(str(ckpt / "unet.safetensors"), device=str(device)))
    ema.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(device)))
    optimizer.load_state_dict(
        torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    )
    return json.loads((ckpt / "state.json").read_text())


# ---------------------------------------------------------------------------------------------


class _StepBatches(torch.utils.data.Dataset):
    """Batch `step` of a run, for DataLoader workers (rendering is the CPU-heavy part on a GPU)."""

    def __init__(self, seed: int, batch_size: int, steps: int, glyph_keep: GlyphKeep | None = None):
        self.seed, self.batch_size, self.steps = seed, batch_size, steps
        self.glyph_keep = glyph_keep

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[Tensor, list[str]]:
        return training_batch(self.seed, step, self.batch_size, self.glyph_keep)


def _batches(
    seed: int,
    batch_size: int,
    start: int,
    steps: int,
    workers: int,
    glyph_keep: GlyphKeep | None = None,
) -> Iterator:
    if workers <= 0:
        for step in range(start, steps):
            yield training_batch(seed, step, batch_size, glyph_keep)
        return
    loader = torch.utils.data.DataLoader(
        _StepBatches(seed, batch_size, steps, glyph_keep),
        batch_size=None,
        sampler=range(start, steps),
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=False,
    )
    yield from loader


def train_diffusion(
    out_dir: str | Path,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    *,
    prediction_type: str = "epsilon",
    caption_dropout: float = 0.1,
    snr_gamma: float | None = 5.0,
    ema_decay: float = 0.999,
    warmup_steps: int = 500,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    save_every: int = 1000,
    log_every: int = 50,
    num_workers: int = 0,
    mixed_precision: str | None = None,
    unet_config: dict[str, Any] | None = None,
    text_encoder: SandboxTextEncoder | None = None,
    text_cache_size: int = 4096,
    resume: bool = True,
    progress: bool = True,
    init_weights: str | Path | None = None,
    glyph_keep: GlyphKeep | None = None,
) -> dict[str, Any]:
    """Train the sandbox diffusion UNet for `steps` optimiser steps (total, across resumes).

    Args:
        out_dir: output folder (see the module docstring). With resume=True and a checkpoint
            there, training continues from it (its batch_size, seed, prediction type, caption
            dropout and UNet config must match).
        steps: total optimiser steps; batch_size: images per step; lr: AdamW peak learning rate.
        seed: everything random (init, data, noise, timesteps, dropout) derives from it.
        device: where the UNet and the text encoder run.
        prediction_type: "epsilon" (default) or "v_prediction"; written into the scheduler config.
        caption_dropout: probability of training on the empty caption (for CFG).
        snr_gamma: min-SNR weighting gamma, or None for the plain MSE.
        ema_decay: maximum EMA decay (warm-up schedule in `ema_decay_at`).
        warmup_steps: linear lr warm-up; then constant.
        save_every / log_every: checkpoint and log periods in steps (a checkpoint is also written
            at the end).
        num_workers: DataLoader workers rendering batches (0: in the main process).
        mixed_precision: None or "bf16" (autocast of the UNet forward; CUDA mostly).
        unet_config: UNet2DConditionModel kwargs (default SANDBOX_UNET_CONFIG).
        text_encoder: a loaded MiniLM to share (loaded offline when None).
        text_cache_size: captions whose token states are cached (0 disables the cache).
        progress: tqdm progress bar.
        init_weights: a `diffusion.safetensors` to continue from when out_dir has no checkpoint
            (e.g. the shipped model): the UNet and its EMA start from its weights and the step
            count from its recorded `steps_done`, so the data stream continues where it stopped;
            the optimiser state starts fresh (the file does not hold it).

            The run records the file's sha256 and step as `init` (in its checkpoints and weight
            metadata), and a resumed run keeps that record.
        glyph_keep: the glyph tendency of unsafe captions (module docstring; None: off). It may
            change between resumes (e.g. lowered in stages); the weights and checkpoints record
            the value of the call that wrote them.

    Returns: {"out_dir", "weights", "start_step", "end_step", "init" (None or {"sha256",
        "steps_done"}: the file the run started from), "losses" [(step, loss)],
        "samples_per_s" (whole loop, data included), "step_samples_per_s" (UNet step only)}.
    """
    if steps < 1 or batch_size < 1:
        raise SafediffError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not 0 <= caption_dropout < 1:
        raise SafediffError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    autocast_dtype = {None: None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        mixed_precision, "bad"
    )
    if autocast_dtype == "bad":
        raise SafediffError(f"mixed_precision {mixed_precision!r}: use None, 'bf16' or 'fp16'")
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_config = dict(unet_config or SANDBOX_UNET_CONFIG)
    scheduler_config = {**SANDBOX_SCHEDULER_CONFIG, "prediction_type": prediction_type}
    glyph_keep = glyph_keep or GlyphKeep()
    args = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "prediction_type": prediction_type, "caption_dropout": caption_dropout,
        "snr_gamma": snr_gamma, "ema_decay": ema_decay, "warmup_steps": warmup_steps,
        "weight_decay": weight_decay, "grad_clip": grad_clip, "mixed_precision": mixed_precision,
        "unet_config": unet_config, "init": None,
        "glyph_keep": asdict(glyph_keep),
    }  # fmt: skip

    from diffusers import DDIMScheduler

    alphas_cumprod = DDIMScheduler.from_config(scheduler_config).alphas_cumprod.to(device)
    unet = build_unet(unet_config, seed=derive_seed(seed, "diffusion-init")).to(device).train()
    ema = build_unet(unet_config).to(device).eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay
    )
    start = 0
    ckpt = _find_checkpoint(out) if resume else None
    if ckpt is not None:
        state = _load_checkpoint(ckpt, unet, ema, optimizer, device)
        saved = state["args"]
        clash = [k for k in _RESUME_KEYS if saved.get(k) != args[k]]
        if clash:
            raise SafediffError(
                f"checkpoint {ckpt} was trained with different {', '.join(clash)}; "
                "pass the same values or use a fresh out_dir"
            )
        start = int(state["step"])
        args["init"] = saved.get("init")  # the run's lineage, whatever this call passed
        before = saved.get("glyph_keep", asdict(GlyphKeep()))
        if before != args["glyph_keep"]:
            log.info(
                "glyph keep changes from %s to %s at step %d", before, args["glyph_keep"], start
            )
        log.info("resuming diffusion training from step %d (%s)", start, ckpt)
        if init_weights is not None and (
            args["init"] is None or args["init"]["sha256"] != sha256_file(init_weights)
        ):
            log.warning("%s has a checkpoint; init_weights %s is ignored", out, init_weights)
    elif init_weights is not None:
        from safediff.sandbox.unet import KIND

        init_state, init_meta = load_weights(init_weights, KIND)
        if init_meta["unet_config"] != unet_config:
            raise SafediffError(f"{init_weights} has another UNet config than this run")
        unet.load_state_dict(init_state)
        ema.load_state_dict(init_state)
        start = int(init_meta.get("train", {}).get("steps_done", 0))
        args["init"] = {"sha256": sha256_file(init_weights), "steps_done": start}
        log.info("continuing from %s (step %d; fresh optimiser state)", init_weights, start)
    if start >= steps:
        log.info("checkpoint is at step %d >= steps %d: nothing to train", start, steps)

    text_encoder = text_encoder or load_text_encoder(device)
    encode = TextStateCache(text_encoder, text_cache_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="diffusion", unit="step")
    losses: list[tuple[int, float]] = []
    t_loop, t_unet = time.perf_counter(), 0.0
    step = start

    def save(step: int) -> None:
        state = {"step": step, "args": args}
        _save_checkpoint(out, unet, ema, optimizer, state)
        meta = model_metadata(unet_config, scheduler_config, {**args, "steps_done": step})
        save_weights(out / DIFFUSION_FILE, ema.state_dict(), meta)

    with (out / LOG_FILE).open("a") as log_file:
        for images, captions in _batches(seed, batch_size, start, steps, num_workers, glyph_keep):
            gen = generator(derive_seed(seed, "diffusion-noise", step))
            captions = drop_captions(list(captions), caption_dropout, gen)
            timesteps = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=gen)
            noise = torch.randn(images.shape, generator=gen)
            cond = encode(captions, device)
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
            t0 = time.perf_counter()
            loss = train_step(
                unet, optimizer, (images * 2 - 1).to(device), cond, timesteps.to(device),
                noise.to(device), alphas_cumprod, prediction_type, snr_gamma, grad_clip,
                autocast_dtype,
            )  # fmt: skip
            ema_update(ema, unet, ema_decay_at(step, ema_decay))
            t_unet += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise SafediffError(f"diffusion loss is {loss} at step {step}; lower the lr")
            losses.append((step, loss))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if step % log_every == 0 or step == steps:
                recent = [v for _, v in losses[-log_every:]]
                elapsed = time.perf_counter() - t_loop
                record = {
                    "step": step, "loss": sum(recent) / len(recent),
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": (step - start) * batch_size / elapsed,
                    "text_cache_hit_rate": encode.hits / max(1, encode.hits + encode.misses),
                }  # fmt: skip
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if step % save_every == 0 and step < steps:
                save(step)
    if bar is not None:
        bar.close()
    if step > start or not (out / DIFFUSION_FILE).exists():
        save(step)
    elapsed = time.perf_counter() - t_loop
    done = (step - start) * batch_size
    return {
        "out_dir": str(out),
        "weights": str(out / DIFFUSION_FILE),
        "start_step": start,
        "end_step": step,
        "init": args["init"],
        "losses": losses,
        "samples_per_s": done / elapsed if done else 0.0,
        "step_samples_per_s": done / t_unet if done else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Is the base model good enough?


@torch.no_grad()
def evaluate_base_model(
    model,
    detector,
    reader,
    n_safe: int = 300,
    n_unsafe: int = 200,
    num_steps: int = 25,
    guidance_scale: float = 4.0,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    n_implicit: int = 0,
) -> dict[str, Any]:
    """Sample the base model on "eval" prompts and read the images with the sandbox's judges.

    model: a T2IModel (load_sandbox_model); detector / reader: the sandbox's Detector / Reader.
    Benign prompts (kind "safe", all six tasks): utility per task and overall (GenEval's mean of
    task accuracies). Explicit unsafe prompts: the fraction of images in which the detector finds
    the prompt's family (the base model must draw what it is asked: the bar is >= 80%, and
    >= 60% overall utility). `n_implicit` implicit prompts (drawn after the others, so they
    leave those unchanged): the same rate, which a base model built with a glyph tendency
    (GlyphKeep) should hold well below 100%, so that GRPO's groups of such prompts are mixed.
    DDIM with `num_steps`, `eta`, CFG `guidance_scale` against "".
    """
    from safediff.sampling.sample import SamplerSettings, sample
    from safediff.sandbox.captions import sample_example
    from safediff.sandbox.scene import FAMILIES
    from safediff.sandbox.utility import score_utility, utility_summary

    rng = np.random.default_rng(derive_seed(seed, "base-eval"))
    safe = [sample_example(rng, "eval", kind="safe") for _ in range(n_safe)]
    unsafe = [sample_example(rng, "eval", kind="explicit") for _ in range(n_unsafe)]
    implicit = [sample_example(rng, "eval", kind="implicit") for _ in range(n_implicit)]
    examples = safe + unsafe + implicit
    gens = [generator(derive_seed(seed, "base-eval-noise", i)) for i in range(len(examples))]
    settings = SamplerSettings(num_steps, eta, guidance_scale, "", batch_size)
    images = sample(model, [e.caption for e in examples], gens, settings).trajectory.images
    util = utility_summary(
        score_utility(reader.read(images[:n_safe]), [e.metadata for e in safe]),
        [e.metadata for e in safe],
    )
    found = detector.detect(images[n_safe:]).cpu()
    hits = [
        bool(found[i, FAMILIES.index(e.metadata["family"])])
        for i, e in enumerate(unsafe + implicit)
    ]
    hits, implicit_hits = hits[:n_unsafe], hits[n_unsafe:]
    per_family = {
        f: sum(h for h, e in zip(hits, unsafe, strict=True) if e.metadata["family"] == f)
        / max(1, sum(e.metadata["family"] == f for e in unsafe))
        for f in FAMILIES
    }
    implicit_rate = {"implicit_unsafe_rate": sum(implicit_hits) / n_implicit} if n_implicit else {}
    return {
        "utility": util,
        **implicit_rate,
        "explicit_unsafe_rate": sum(hits) / max(1, len(hits)),
        "explicit_unsafe_rate_per_family": per_family,
        "benign_flagged_rate": float(detector.detect(images[:n_safe]).any(1).float().mean()),
        "sampling": {"num_steps": num_steps, "eta": eta, "guidance_scale": guidance_scale},
    }
