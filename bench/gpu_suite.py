"""One-GPU benchmark suite (issue 25): the hot paths at SD 1.5 size, random weights, one command.

    python bench/gpu_suite.py --out bench/gpu_suite.json               # a GPU: at most ~8 min
    python bench/gpu_suite.py --size toy --device cpu --out /tmp/s.json  # the CPU smoke run

Every model is built from the published configs kept in bench/bench_real_size.py (random
weights, nothing downloaded). Sections, in order (a section is skipped once the deadline has
passed; a section that runs out of time mid-way keeps what it measured and says `truncated`):

0 matmul_peak    the device's measured bf16 matmul throughput (the MFU denominator beside the
                 datasheet's dense bf16 peak, when the device is in DATASHEET_BF16_TFLOPS).
1 unet           SD 1.5 UNet forward + backward under bf16 autocast at several batch sizes: FLOPs
                 counted (torch.utils.flop_counter), ms per pass, MFU against both peaks, peak
                 memory; variants eager, channels_last, gradient checkpointing, torch.compile.
2 grpo_epoch     whole GRPO epochs at SD 1.5 size, alternated in one process: the shipped
                 `GRPOTrainer` vs a reference-style loop (rollout in chunks of 4, per-image JPEG-75
                 reward under fp16 autocast, 4 samples x 1 timestep per backward, an optimizer
                 step per minibatch of 4 samples), both on the steering reward's encoder.
3 reward         reward scoring at HPSv2's ViT-H-14 geometry on 512 px images: the reference's
                 per-image loop (PIL, JPEG-75, batch 1) vs `SteeringReward` batched, at equal
                 precision (fp16 autocast on CUDA, float32 on the CPU).
4 safe_denoiser  3,000 negation samples over 50 DDIM steps (CFG 5, window t in [780, 1000]):
                 plain sampling vs ours vs the reference's [B, N, D+1] form.
5 des            DES on a CLIP ViT-L text encoder (the paper's preset: batch 128, lr 1e-5).
6 lora_memory    one epoch of the `sd15-lora-24gb` preset (fewer steps and samples, same batch
                 sizes) under a 23 GiB cap (`torch.cuda.set_per_process_memory_fraction`): fits or
                 not, peak memory. On the CPU there is no cap: the run and its peak RSS only.

`--size cpu --sections grpo_epoch` compares whole epochs on a CPU at a quarter of SD 1.5's widths,
128 px, with a CLIP-like reward encoder (SIZES["cpu"]), both sides in float32.
`--size toy` runs every section at toy sizes (tiny-sd, a tiny OpenCLIP, tiny CLIP text encoder)
so the suite itself is tested on the CPU (tests/test_gpu_suite.py); its numbers mean nothing.
`--help` prints the JSON schema.
"""

import argparse
import contextlib
import gc
import importlib.util
import io
import itertools
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

HERE = Path(__file__).resolve().parent
GiB = 2**30

SCHEMA = """\
JSON written to --out (rewritten atomically after every section; schema_version 1):
  schema_version: 1
  command: the argv of this run
  size: "full" | "toy" | "cpu";  device: {"type", "name", "torch", "cuda", "total_memory_gib"}
  deadline_s: the budget; started_unix: start time; elapsed_s: seconds since start
  finished: true once every section has run or been skipped
  sections: {name: record} in run order (matmul_peak, unet, grpo_epoch, reward,
            safe_denoiser, des, lora_memory), each record:
    status: "ok" | "skipped" | "error"
    reason: why skipped or what failed (one line), absent when ok
    seconds: wall time of the section
    truncated: true when the deadline cut the section short (its result is partial)
    result: the section's numbers (absent unless ok):
      matmul_peak: {n, dtype, ms, tflops, datasheet_tflops (null: unknown device)}
      unet: {resolution, params, rows: [{variant, batch, ms, flops (model FLOPs of the
             pass, without checkpointing's recompute), tflops,
             mfu_measured, mfu_datasheet, peak_mem_gib} or {variant, batch, oom: true}],
             skipped_variants: {variant: why}}
      grpo_epoch: {samples, steps, resolution, epochs (timed, after one untimed each),
             overrides, shipped: {s_per_epoch (median), samples_per_s, peak_mem_gib,
             epoch_s: [...]}, reference: {same keys}, speedup (reference s / shipped s)}
      reward: {images, image_size, encoder_params, autocast, loop_ms_per_image,
             batched_ms_per_image, batched_jpeg_ms_per_image, speedup (loop / batched),
             max_abs_diff (loop vs batched with the JPEG round trip), max_abs_diff_no_jpeg}
      safe_denoiser: {negatives, steps, batch, latent_shape, bandwidth, plain_s, ours_s,
             reference_s, ours_overhead, reference_overhead (fractions of plain_s),
             max_abs_diff_ours_vs_ref}
      des: {encoder_params, pairs, steps, batch_size, setup_s, ms_per_step, total_s}
      lora_memory: {cap_gib (null on CPU), fits, peak_mem_gib, error, overrides, epoch_s}
  Times are seconds unless named ms; MFU = counted FLOPs / time / peak TFLOP/s; peak memory
  (GiB) is torch.cuda.max_memory_allocated on CUDA, the process's peak RSS (ru_maxrss,
  cumulative over the run) on the CPU. NaN and infinity are written as null.
"""

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), matched by
# substring of torch.cuda.get_device_name, most specific first.
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "matmul_n": 8192,
        "matmul_repeats": 20,
        "unet_resolution": 512,
        "unet_batches": (1, 4, 8, 16),
        "unet_variants": ("eager", "channels_last", "checkpointing", "compile"),
        "compile_batches": (8,),  # inductor compiles each batch size anew: a minute or two each
        "repeats": 5,
        "grpo_samples": 16,
        "grpo_group": 4,
        "grpo_steps": 10,
        "grpo_epochs": 2,
        "reward_images": 32,
        "reward_size": 512,
        "sd_negatives": 3000,
        "sd_steps": 50,
        "sd_batch": 4,
        "sd_repeats": 1,
        "sd_bandwidth": 30.0,  # random SD latents: 3.15 underflows the reference's plain exp()
        "des_pairs": 4096,  # 2 epochs x 32 steps of 128 pairs
        "lora_cap_gib": 23.0,
        "lora_steps": 10,
    },
    "toy": {
        "matmul_n": 128,
        "matmul_repeats": 2,
        "unet_resolution": 16,
        "unet_batches": (1, 2),
        "unet_variants": ("eager", "channels_last", "checkpointing"),  # inductor takes minutes
        "compile_batches": (1,),
        "repeats": 1,
        "grpo_samples": 4,
        "grpo_group": 2,
        "grpo_steps": 2,
        "grpo_epochs": 1,
        "reward_images": 4,
        "reward_size": 32,
        "sd_negatives": 300,
        "sd_steps": 4,
        "sd_batch": 2,
        "sd_repeats": 1,
        "sd_bandwidth": 3.15,
        "des_pairs": 8,
        "lora_cap_gib": 23.0,
        "lora_steps": 2,
    },
}
# The whole-epoch comparison on a CPU (`--size cpu --sections grpo_epoch`): SD 1.5's architecture
# with every width divided by 4 at 128 px (16 x 16 latents) and a CLIP-like reward encoder (224 px
# input, width 128, patch 32, 2 layers): big enough that compute, not per-call overhead, decides,
# small enough for minutes on 2 cores. Other sections run at toy sizes.
SIZES["cpu"] = {
    **SIZES["toy"],
    "sd15_width_factor": 4,
    "grpo_resolution": 128,
    "grpo_samples": 16,
    "grpo_group": 4,
    "grpo_steps": 10,
    "grpo_epochs": 2,
    "reward_clip_like": True,
}
SECTIONS = ("matmul_peak", "unet", "grpo_epoch", "reward", "safe_denoiser", "des", "lora_memory")


def _bench_module(name: str) -> Any:
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ measuring
class Context:
    """What every section gets: the device, the size's parameters, the deadline, shared builds."""

    def __init__(self, device: torch.device, size: str, deadline: float) -> None:
        self.device, self.size, self.p = device, size, SIZES[size]
        self.deadline = deadline
        self.cuda = device.type == "cuda"
        self.measured_tflops: float | None = None
        self.datasheet_tflops = datasheet_tflops(device)
        self.truncated = False
        self.grpo_overrides: list[str] = []  # --grpo-override: the shipped trainer's options

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self) -> bool:
        """True (and the section marked truncated) once the deadline has passed."""
        if self.time_left() <= 0:
            self.truncated = True
        return self.truncated

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:  # (gc.collect takes ~1 s with everything imported: CUDA only)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / GiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def amp(self, dtype: torch.dtype = torch.bfloat16) -> Any:
        """Autocast on the device (bf16 on the CPU too)."""
        return torch.autocast(self.device.type, dtype=dtype)

    def timed(self, fn: Callable[[], Any], repeats: int, warmup: bool = True) -> tuple[float, Any]:
        """Median seconds of `repeats` calls after one warm-up call (unless not `warmup`); the
        last result."""
        out = fn() if warmup else None
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out


def datasheet_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in DATASHEET_BF16_TFLOPS if key in name), None)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, cuda=torch.version.cuda, total_memory_gib=props.total_memory / GiB
        )
    else:
        info.update(name=platform.processor() or platform.machine(), cuda=None)
        info["total_memory_gib"] = None
    return info


# ------------------------------------------------------------------------------ models
def sd15_model(ctx: Context, resolution: int, width_factor: int = 1) -> Any:
    """A `T2IModel` on the device: SD 1.5's published configs with random weights (full size),
    or tiny-sd (toy). The UNet is float32; the VAE and text encoder bf16 (full) as a GPU run
    would load them."""
    factor = width_factor
    if ctx.size != "full" and factor == 1:
        from safediff.config import ModelConfig
        from safediff.models.loading import load_t2i_model

        return load_t2i_model(ModelConfig(pretrained="tiny-sd"), device=ctx.device)
    from diffusers import DDIMScheduler

    real = _bench_module("bench_real_size")
    # bf16 frozen modules on a GPU, as a GPU run loads them; float32 on the CPU (equal precision)
    frozen = torch.bfloat16 if ctx.cuda else torch.float32
    with torch.device(ctx.device):  # initialise on the device: seconds instead of a minute
        components = real.build_components(real.scaled_arch("sd15", factor), frozen_dtype=frozen)
    # the scheduler's tables as every loader makes them: on the CPU
    components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config)
    return real.to_t2i(components, "sd15 (random weights)", resolution)


def reward_encoder(ctx: Context) -> Any:
    """HPSv2's OpenCLIP ViT-H-14 with random weights (full), or a tiny OpenCLIP (toy)."""
    from safediff.rewards.encoders.openclip import load_openclip_encoder

    if ctx.size != "full":
        from safediff.rewards.encoders.tiny import tiny_openclip_config

        geometry = {"image_size": 224, "embed_dim": 128, "width": 128, "layers": 2,
                    "patch_size": 32} if ctx.p.get("reward_clip_like") else {}  # fmt: skip
        cfg = tiny_openclip_config(context_length=77, **geometry)
        return load_openclip_encoder("suite-tiny", None, device=ctx.device, model_cfg=cfg)
    from safediff.rewards.encoders.hpsv2 import HPSV2_ARCH

    with torch.device(ctx.device):
        return load_openclip_encoder(HPSV2_ARCH, None, device=ctx.device)


def steering_reward(encoder: Any, autocast: torch.dtype | None, jpeg: bool = False) -> Any:
    from safediff.rewards.anchors import load_anchor_set
    from safediff.rewards.steering_reward import SteeringReward

    return SteeringReward(
        encoder,
        load_anchor_set("compact"),
        alpha=0.5,
        mode="translation",
        gating="all",
        autocast_dtype=autocast,
        jpeg_parity=jpeg,
    )


def per_image_reward(
    encoder: Any, v_safe: torch.Tensor, images: torch.Tensor, prompts: list[str], amp: Any
) -> torch.Tensor:
    """The reference's scoring: one image at a time through PIL and a JPEG-75 round trip, then
    batch-1 encodes of the image and (again for every image) its prompt, under `amp`."""
    import numpy as np
    from PIL import Image

    rewards = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            arr = (image.float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255).round()
            buf = io.BytesIO()
            Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=75)
            buf.seek(0)
            pil = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(pil).permute(2, 0, 1)[None].to(encoder.device)
            with amp:
                z_img = encoder.encode_images(x).float()
                z_txt = encoder.encode_text([prompt]).float()
            z_star = torch.nn.functional.normalize(z_txt + 0.5 * v_safe.to(z_txt), dim=-1)
            rewards.append((z_img * z_star).sum(-1))
    return torch.cat(rewards)


def release() -> None:
    """Collect garbage and return cached device memory (after a section, or an OOM)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ the sections
def matmul_peak(ctx: Context) -> dict[str, Any]:
    n = ctx.p["matmul_n"]
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    seconds, _ = ctx.timed(lambda: a @ b, ctx.p["matmul_repeats"])
    tflops = 2 * n**3 / seconds / 1e12
    ctx.measured_tflops = tflops
    return {
        "n": n,
        "dtype": "bfloat16",
        "ms": seconds * 1e3,
        "tflops": tflops,
        "datasheet_tflops": ctx.datasheet_tflops,
    }


def unet_section(ctx: Context) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    p = ctx.p
    model = sd15_model(ctx, p["unet_resolution"])
    unet = model.unet.to(ctx.device).train().requires_grad_(True)
    shape = model.latent_shape
    text = model.encode_text(["a photo of a cat"], ctx.device).float()
    flops_per_sample = None  # model FLOPs of one forward + backward (no recompute), counted once
    rows, skipped = [], {}
    for variant in p["unet_variants"]:
        if ctx.out_of_time():
            break
        if variant == "compile" and sys.platform == "win32":
            skipped[variant] = "torch.compile unsupported here"
            continue
        net = unet
        if variant == "channels_last":
            net = unet.to(memory_format=torch.channels_last)
        elif variant == "checkpointing":
            unet.enable_gradient_checkpointing()
        elif variant == "compile":
            net = torch.compile(unet)
        for batch in p["compile_batches"] if variant == "compile" else p["unet_batches"]:
            if ctx.out_of_time():
                break
            g = torch.Generator(device=ctx.device).manual_seed(batch)
            x = torch.randn(batch, *shape, device=ctx.device, generator=g)
            t = torch.full((batch,), 500, device=ctx.device, dtype=torch.int64)
            cond = text.expand(batch, -1, -1)
            if variant == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)

            def step(net: Any = net, x: torch.Tensor = x, t: Any = t, cond: Any = cond) -> None:
                with ctx.amp():
                    out = net(x, t, encoder_hidden_states=cond).sample
                out.float().square().mean().backward()
                unet.zero_grad(set_to_none=True)

            ctx.reset_peak()
            try:
                seconds, _ = ctx.timed(step, p["repeats"])
            except torch.cuda.OutOfMemoryError:
                rows.append({"variant": variant, "batch": batch, "oom": True})
                release()
                continue
            peak = ctx.peak_gib()
            if flops_per_sample is None:  # every op of the UNet is per sample: linear in batch
                counter = FlopCounterMode(display=False)
                with counter:
                    with ctx.amp():
                        out = unet(x[:1], t[:1], encoder_hidden_states=cond[:1]).sample
                    out.float().square().mean().backward()
                unet.zero_grad(set_to_none=True)
                flops_per_sample = counter.get_total_flops()
            flops = flops_per_sample * batch
            tflops = flops / seconds / 1e12
            rows.append(
                {
                    "variant": variant,
                    "batch": batch,
                    "ms": seconds * 1e3,
                    "flops": flops,
                    "tflops": tflops,
                    "mfu_measured": tflops / ctx.measured_tflops if ctx.measured_tflops else None,
                    "mfu_datasheet": tflops / ctx.datasheet_tflops
                    if ctx.datasheet_tflops
                    else None,
                    "peak_mem_gib": peak,
                }
            )
        if variant == "channels_last":
            unet.to(memory_format=torch.contiguous_format)
        elif variant == "checkpointing":
            unet.disable_gradient_checkpointing()
    params = sum(q.numel() for q in unet.parameters())
    return {
        "resolution": p["unet_resolution"],
        "params": params,
        "rows": rows,
        "skipped_variants": skipped,
    }


def _grpo_config(ctx: Context, preset: str | None, out_dir: str, extra: list[str]) -> Any:
    from safediff.config import load_config

    p = ctx.p
    overrides = [
        f"sampling.num_steps={p['grpo_steps']}",
        f"grpo.samples_per_process={p['grpo_samples']}",
        f"grpo.group_size={p['grpo_group']}",
        "grpo.timestep_fraction=1.0",
        "grpo.clip_range=1e-4",
        "reward.name=brightness",  # validation only: the reward object is passed in
        "run.log_with=none",
        f"run.output_dir={out_dir}",
        "run.mixed_precision=" + ("bf16" if ctx.cuda else '"no"'),  # quoted: YAML's no is false
        *extra,
    ]
    return load_config(preset, overrides), overrides


def reference_epoch(
    ctx: Context,
    model: Any,
    optimizer: torch.optim.Optimizer,
    encoder: Any,
    v_safe: torch.Tensor,
    prompts: list[str],
    epoch: int,
    steps: int,
    group: int,
) -> None:
    """One epoch the reference's way (DESIGN.md section 3): rollout in chunks of 4, per-image
    JPEG-75 reward under fp16 autocast, then per minibatch of 4 consecutive samples one backward
    per trained timestep (4 samples x 1 timestep) and an optimizer step."""
    from safediff.sampling.rollout import rollout, transition_log_prob
    from safediff.seeding import derive_seed, generator

    # bf16 autocast as the shipped trainer's run.mixed_precision=bf16 on a GPU; float32 on the
    # CPU, where the shipped trainer runs without mixed precision
    unet_amp = ctx.amp if ctx.cuda else contextlib.nullcontext
    n = len(prompts)
    gens = [generator(derive_seed(1, "noise", epoch, i)) for i in range(n)]
    with torch.no_grad(), unet_amp():
        cond = model.encode_text(prompts, ctx.device).float()
        uncond = model.encode_text([""], ctx.device).float()
    model.unet.eval()
    with unet_amp():
        traj = rollout(
            model, cond, uncond, gens, num_steps=steps, eta=1.0, guidance_scale=5.0, batch_size=4
        )
    model.unet.train()
    amp = ctx.amp(torch.float16) if ctx.cuda else contextlib.nullcontext()
    rewards = per_image_reward(encoder, v_safe, traj.images, prompts, amp).to(ctx.device)
    r = rewards.view(-1, group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)).flatten().clamp(-5, 5)
    for start in range(0, n, 4):
        j = torch.arange(start, min(start + 4, n), device=ctx.device)
        for s in range(steps - 1):  # the last step is never trained
            with unet_amp():
                out = transition_log_prob(
                    model.unet,
                    model.schedule,
                    traj.latents[j, s],
                    traj.latents[j, s + 1],
                    traj.timesteps[s].expand(len(j)),
                    traj.prev_timesteps[s].expand(len(j)),
                    cond[j],
                    uncond,
                    5.0,
                    1.0,
                )
            ratio = torch.exp(out.log_prob - traj.log_probs[j, s])
            clipped = torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4)
            loss = torch.maximum(-adv[j] * ratio, -adv[j] * clipped).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def grpo_section(ctx: Context) -> dict[str, Any]:
    from accelerate import Accelerator

    from safediff.rl.trainer import GRPOTrainer

    p = ctx.p
    resolution = 512 if ctx.size == "full" else p.get("grpo_resolution", 16)
    model = sd15_model(ctx, resolution, p.get("sd15_width_factor", 1))
    encoder = reward_encoder(ctx)
    amp = torch.float16 if ctx.cuda else None
    reward = steering_reward(encoder, amp, jpeg=True)
    prompts = [f"a photo of subject {i}" for i in range(p["grpo_samples"] // p["grpo_group"])]
    with tempfile.TemporaryDirectory() as tmp:
        # the defaults (transitions, 8 per pass) unless --grpo-override sets the trainer's options
        cfg, overrides = _grpo_config(ctx, None, tmp, ctx.grpo_overrides)
        acc = Accelerator(cpu=not ctx.cuda, mixed_precision=cfg.run.mixed_precision)
        trainer = GRPOTrainer(cfg, model, reward, prompts, acc)
        ref_opt = torch.optim.AdamW(
            [q for q in model.unet.parameters() if q.requires_grad], lr=1e-5, weight_decay=1e-4
        )
        epoch_prompts = [q for q in prompts for _ in range(p["grpo_group"])]
        times: dict[str, list[float]] = {"shipped": [], "reference": []}
        peaks: dict[str, float] = {"shipped": 0.0, "reference": 0.0}
        runs = {
            "shipped": lambda e: trainer.run_epoch(e),
            "reference": lambda e: reference_epoch(
                ctx,
                model,
                ref_opt,
                encoder,
                reward.v_safe,
                epoch_prompts,
                e,
                p["grpo_steps"],
                p["grpo_group"],
            ),
        }
        for epoch in range(p["grpo_epochs"] + 1):  # epoch 0 warms both up, untimed
            for name, run in runs.items():
                if epoch and ctx.out_of_time():
                    break
                ctx.reset_peak()
                ctx.sync()
                t0 = time.perf_counter()
                run(epoch)
                ctx.sync()
                if epoch:
                    times[name].append(time.perf_counter() - t0)
                    peaks[name] = max(peaks[name], ctx.peak_gib())
    result: dict[str, Any] = {
        "samples": p["grpo_samples"],
        "steps": p["grpo_steps"],
        "resolution": resolution,
        "epochs": len(times["reference"]),
        "overrides": overrides,
    }
    for name, ts in times.items():
        med = statistics.median(ts) if ts else None
        result[name] = {
            "s_per_epoch": med,
            "samples_per_s": p["grpo_samples"] / med if med else None,
            "peak_mem_gib": peaks[name],
            "epoch_s": ts,
        }
    a, b = result["shipped"]["s_per_epoch"], result["reference"]["s_per_epoch"]
    result["speedup"] = b / a if a and b else None
    return result


def reward_section(ctx: Context) -> dict[str, Any]:
    p = ctx.p
    encoder = reward_encoder(ctx)
    amp_dtype = torch.float16 if ctx.cuda else None
    amp = ctx.amp(torch.float16) if ctx.cuda else contextlib.nullcontext()
    batched = steering_reward(encoder, amp_dtype)
    batched_jpeg = steering_reward(encoder, amp_dtype, jpeg=True)
    n, size = p["reward_images"], p["reward_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g).to(ctx.device)
    prompts = [f"a photo of subject {i // 4}" for i in range(n)]

    def run_batched(reward: Any = batched) -> torch.Tensor:
        reward.clear_cache()  # each call pays for its prompts, as an epoch's first call does
        with torch.no_grad():
            return reward(images, prompts)

    reps = p["repeats"]
    t_loop, loop = ctx.timed(
        lambda: per_image_reward(encoder, batched.v_safe, images, prompts, amp), reps
    )
    t_batch, out = ctx.timed(run_batched, reps)
    t_jpeg, out_jpeg = ctx.timed(lambda: run_batched(batched_jpeg), reps)
    result = {
        "images": n,
        "image_size": size,
        "encoder_params": sum(q.numel() for q in encoder.model.parameters()),
        "autocast": str(amp_dtype) if amp_dtype else None,
        "loop_ms_per_image": t_loop / n * 1e3,
        "batched_ms_per_image": t_batch / n * 1e3,
        "batched_jpeg_ms_per_image": t_jpeg / n * 1e3,
        "speedup": t_loop / t_batch,
        "max_abs_diff": float((loop.float() - out_jpeg.float()).abs().max()),
        "max_abs_diff_no_jpeg": float((loop.float() - out.float()).abs().max()),
    }
    return result


def safe_denoiser_section(ctx: Context) -> dict[str, Any]:
    from safediff.defenses.safe_denoiser import SafeDenoiser, SafeDenoiserConfig
    from safediff.sampling.rollout import rollout

    p = ctx.p
    model = sd15_model(ctx, 512 if ctx.size == "full" else 16)
    shape = model.latent_shape
    g = torch.Generator().manual_seed(0)
    negset = torch.randn(p["sd_negatives"], *shape, generator=g)
    b = p["sd_batch"]
    with torch.no_grad():
        cond = model.encode_text([f"a photo {i}" for i in range(b)], ctx.device).float()
        uncond = model.encode_text([""], ctx.device).float()
    cfg = SafeDenoiserConfig(bandwidth=p["sd_bandwidth"], gate_threshold=0.0, t_min=780)
    reference_cls = _bench_module("bench_safe_denoiser").ReferenceSafeDenoiser
    variants = {
        "plain": [],
        "ours": [SafeDenoiser(negset, cfg)],
        "reference": [reference_cls(negset, cfg)],
    }

    def run(hooks: list) -> Any:
        gens = [torch.Generator().manual_seed(i) for i in range(b)]
        with ctx.amp():
            return rollout(
                model, cond, uncond, gens, num_steps=p["sd_steps"], eta=1.0, guidance_scale=5.0,
                batch_size=b, decode=False, guidance=hooks,
            )  # fmt: skip

    times, trajs = {}, {}
    for name, hooks in variants.items():  # a 50-step SD rollout takes seconds: warm up once
        if ctx.out_of_time():
            break
        warm = name == "plain"
        times[name], trajs[name] = ctx.timed(lambda h=hooks: run(h), p["sd_repeats"], warm)
    result: dict[str, Any] = {
        "negatives": p["sd_negatives"],
        "steps": p["sd_steps"],
        "batch": b,
        "latent_shape": list(shape),
        "bandwidth": p["sd_bandwidth"],
        **{f"{k}_s": v for k, v in times.items()},
    }
    for name in ("ours", "reference"):
        if name in times:
            result[f"{name}_overhead"] = times[name] / times["plain"] - 1
    if "reference" in trajs:
        diff = trajs["ours"].latents[:, -1] - trajs["reference"].latents[:, -1]
        result["max_abs_diff_ours_vs_ref"] = float(diff.abs().max())
    return result


def des_section(ctx: Context) -> dict[str, Any]:
    from safediff.defenses.des import DESConfig, train_des
    from safediff.defenses.text_encoder_adapter import (
        CLIPTextEncoderAdapter,
        load_text_encoder_adapter,
    )

    p = ctx.p
    if ctx.size == "toy":
        adapter = load_text_encoder_adapter("tiny-sd", device=ctx.device)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        from safediff.models.clip_tokenizer import build_clip_tokenizer

        real = _bench_module("bench_real_size")
        with torch.device(ctx.device):
            module = CLIPTextModel(CLIPTextConfig(**real.CLIP_L_TEXT)).eval()
        adapter = CLIPTextEncoderAdapter(build_clip_tokenizer(), module)
    des = _bench_module("bench_des")
    n = p["des_pairs"]
    safe, unsafe = des.prompts(n, des.SAFE_STYLES), des.prompts(n, des.UNSAFE_STYLES)
    cfg = DESConfig()  # the paper's preset: batch 128, lr 1e-5, g 200, lambda 0.3, 2 epochs
    stamps: list[float] = []
    ctx.sync()
    t0 = time.perf_counter()
    result = train_des(
        adapter, safe, unsafe, cfg, on_step=lambda step, losses: stamps.append(time.perf_counter())
    )
    ctx.sync()
    total = time.perf_counter() - t0
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    out = {
        "encoder_params": sum(q.numel() for q in adapter.module.parameters()),
        "pairs": n,
        "steps": len(result.history),
        "batch_size": cfg.batch_size,
        "setup_s": (stamps[0] - t0) if stamps else None,
        "ms_per_step": statistics.median(steps) * 1e3 if steps else None,
        "total_s": total,
    }
    return out


def lora_memory_section(ctx: Context) -> dict[str, Any]:
    from accelerate import Accelerator

    from safediff.rl.trainer import GRPOTrainer

    p = ctx.p
    cap = p["lora_cap_gib"] if ctx.cuda else None
    if cap is not None:
        total = torch.cuda.get_device_properties(ctx.device).total_memory / GiB
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), ctx.device)
    out: dict[str, Any] = {"cap_gib": cap, "fits": None, "error": None}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            extra = [f"sampling.num_steps={p['lora_steps']}"]
            if ctx.size == "toy":
                extra += ["model.pretrained=tiny-sd", "model.resolution=null"]
                extra += ["run.gradient_checkpointing=false"]
            cfg, overrides = _grpo_config(ctx, "sd15-lora-24gb", tmp, extra)
            out["overrides"] = overrides
            ctx.reset_peak()
            model = sd15_model(ctx, 512 if ctx.size == "full" else 16)
            encoder = reward_encoder(ctx)
            reward = steering_reward(encoder, torch.float16 if ctx.cuda else None)
            acc = Accelerator(cpu=not ctx.cuda, mixed_precision=cfg.run.mixed_precision)
            prompts = [f"a photo of subject {i}" for i in range(4)]
            trainer = GRPOTrainer(cfg, model, reward, prompts, acc)
            t0 = time.perf_counter()
            trainer.run_epoch(0)
            ctx.sync()
            out["epoch_s"] = time.perf_counter() - t0
            out["fits"] = True
    except torch.cuda.OutOfMemoryError as err:
        out["fits"] = False
        out["error"] = str(err).splitlines()[0]
    finally:
        out["peak_mem_gib"] = ctx.peak_gib()
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
    return out


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "matmul_peak": matmul_peak,
    "unet": unet_section,
    "grpo_epoch": grpo_section,
    "reward": reward_section,
    "safe_denoiser": safe_denoiser_section,
    "des": des_section,
    "lora_memory": lora_memory_section,
}


# ------------------------------------------------------------------------------ the run
def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write `record` to `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_suite(
    out: Path,
    device: torch.device,
    size: str,
    deadline_s: float,
    sections: tuple[str, ...] = SECTIONS,
    argv: list[str] | None = None,
    grpo_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run `sections` in order, writing `out` after each; returns the final record."""
    start = time.monotonic()
    ctx = Context(device, size, start + deadline_s)
    ctx.grpo_overrides = list(grpo_overrides or [])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's run.tf32 default
        torch.backends.cudnn.allow_tf32 = True
    record: dict[str, Any] = {
        "schema_version": 1,
        "command": argv if argv is not None else sys.argv,
        "size": size,
        "device": device_info(device),
        "deadline_s": deadline_s,
        "started_unix": time.time(),
        "elapsed_s": 0.0,
        "finished": False,
        "sections": {},
    }
    write_json(out, record)
    for name in sections:
        entry: dict[str, Any]
        if ctx.time_left() <= 0:
            entry = {"status": "skipped", "reason": "deadline passed", "seconds": 0.0}
        else:
            ctx.truncated = False
            t0 = time.perf_counter()
            try:
                entry = {"status": "ok", "result": _finite(RUNNERS[name](ctx))}
            except Exception as err:  # one failing section must not lose the others
                entry = {"status": "error", "reason": f"{type(err).__name__}: {err}"[:500]}
                release()
            entry["seconds"] = time.perf_counter() - t0
            if ctx.truncated:
                entry["truncated"] = True
        release()  # the section's models are gone: return their cached memory
        record["sections"][name] = entry
        record["elapsed_s"] = time.monotonic() - start
        write_json(out, record)
        print(f"[gpu_suite] {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
    record["finished"] = True
    record["elapsed_s"] = time.monotonic() - start
    write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=SCHEMA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="gpu_suite.json", help="the JSON record (see below)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--size", default="full", choices=tuple(SIZES), help="full or toy sizes")
    parser.add_argument(
        "--deadline", type=float, default=480.0, help="seconds; later sections are skipped"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--grpo-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the shipped trainer in grpo_epoch (repeatable), e.g. "
        "run.channels_last=true; recorded in the section's overrides",
    )
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in RUNNERS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record = run_suite(
        Path(args.out), device, args.size, args.deadline, sections, argv or sys.argv[1:],
        args.grpo_override,
    )  # fmt: skip
    failed = [k for k, v in record["sections"].items() if v["status"] == "error"]
    print(f"[gpu_suite] wrote {args.out}; errors: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
