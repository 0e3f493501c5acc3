"""SD 1.5 and SDXL at their published sizes, random weights, offline: one GRPO epoch and one
generation each on this machine, peak memory, and the memory every preset needs at real size.

What it runs (each run in its own subprocess, so peak RSS is per run):
- sd15-lora, sd15-full (skipped when the machine's free memory is below its estimate), sdxl-lora:
  the pipeline built from the published configs below (real diffusers / transformers classes,
  random weights, no download), wrapped by safediff's own adapters (`sd_components_to_t2i`,
  `sdxl_components_to_t2i`), then `GRPOTrainer` from `load_config("tiny-demo", ...)`: one epoch of
  group size 2, 2 samples, 2 denoising steps, the brightness reward, at a reduced resolution; then
  one generation with `safediff.sampling.sample.sample`. Wall time per phase, peak RSS, and
  parameter counts (checked against the published ones).
- hpsv2-encoder: HPSv2's OpenCLIP ViT-H-14 with random weights (`load_openclip_encoder`, no
  checkpoint), one batch of images encoded at 224 px.
- In each LoRA run, the activations one UNet forward keeps for backward, measured (see
  `measure_activations`) in float32, bf16 autocast and bf16 with gradient checkpointing (SDXL:
  not plain bf16), at batch 1 and 2 at `--measure-size` and batch 1 at twice it. `preset_memory`
  scales them by latent
  pixels to each preset's resolution and batch, for the memory table.

    python bench/bench_real_size.py                      # everything: ~20 min, ~16 GiB peak RSS
    python bench/bench_real_size.py --runs sd15-lora --sd15-size 128
    python bench/bench_real_size.py --table-only         # the memory table from MEASURED below

Departures from the published pipelines, none of which changes a tensor shape:
- tokenizers: OpenAI CLIP's real BPE built offline (`safediff.models.clip_tokenizer`); SDXL's
  tokenizer_2 pads with "!" as bigG's does. The SD 1.5 text encoder config uses the CLIP special
  token ids 49406/49407 (the hub folder's config.json carries legacy ids 0/2/1);
- schedulers: a DDIMScheduler over each pipeline's published beta fields (SD 1.5 ships PNDM,
  SDXL Euler), which is all safediff's adapters read;
- the VAE and text encoders are cast to `--frozen-dtype` (bf16 by default, as `load_t2i_model`'s
  `dtype` does; `safediff train` itself loads them in float32); the UNet stays float32.
"""

import argparse
import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GiB = 2**30

# ------------------------------------------------------------------------------ the published configs
# diffusers / transformers config fields of the hub folders, minus bookkeeping keys
# (stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0).

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' legacy name: 8 heads (of 40, 80, 160 channels)
    "norm_num_groups": 32,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],  # legacy name again: heads of 64 channels
    "use_linear_projection": True,
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) token states
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids x 256
    "norm_num_groups": 32,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14's text tower (SD 1.5's and SDXL's text_encoder)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
BIGG_TEXT = {  # OpenCLIP ViT-bigG-14's text tower (SDXL's text_encoder_2, with projection)
    **CLIP_L_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
ARCHS: dict[str, dict[str, Any]] = {
    "sd15": {"unet": SD15_UNET, "vae": SD_VAE, "text_encoders": [CLIP_L_TEXT]},
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoders": [CLIP_L_TEXT, BIGG_TEXT]},
}

# Parameter counts of the published checkpoints (what `count_parameters` must reproduce).
PUBLISHED_PARAMS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    "hpsv2": {"encoder": 986_109_441},  # open_clip ViT-H-14: 632 M vision + 354 M text
}
# sum(in_features + out_features) of the UNet's Linear layers by name, per LoRA target: a LoRA of
# rank r on targets T adds r * sum(LORA_IN_OUT[arch][t] for t in T) parameters.
LORA_IN_OUT = {
    "sd15": {"to_q": 49_920, "to_k": 49_728, "to_v": 49_728, "to_out.0": 49_920},
    "sdxl": {"to_q": 332_800, "to_k": 392_960, "to_v": 392_960, "to_out.0": 332_800},
}
VAE_FACTOR = 8  # both VAEs downsample 8x
LATENT_CHANNELS = 4

# Activations one UNet forward keeps for backward, measured by this bench (`measure_activations`;
# the run of 2026-11-24 on the 2-core CPU machine recorded in bench/RESULTS.md), per arch and
# configuration: bytes = fixed + batch x (per_sample + per_pixel x latent pixels). `fixed` under
# bf16 is autocast's bf16 copy of the weights; the negative float32 `fixed` values are the fit's
# error (nothing is cast in float32: read them as 0). `--table-only` prints the table from these.
MEASURED: dict[str, dict[str, dict[str, float]]] = {
    "sd15": {  # LoRA r16 UNet, fitted at 128 and 256 px
        "fp32": {"fixed": -14_665_728.0, "per_sample": 22_762_496.0, "per_pixel": 389_416.875},
        "bf16": {"fixed": 1_625_141_760.0, "per_sample": 7_722_240.0, "per_pixel": 217_553.875},
        "bf16-ckpt": {"fixed": 213_661_184.0, "per_sample": 7_168.0, "per_pixel": 36_440.0},
    },
    "sdxl": {  # LoRA r16 UNet, fitted at 128 and 256 px; plain bf16 not measured (see RUNS)
        "fp32": {"fixed": -175_341_568.0, "per_sample": 227_931_648.0, "per_pixel": 680_148.0},
        "bf16-ckpt": {"fixed": 150_575_616.0, "per_sample": 5_888.0, "per_pixel": 29_760.0},
    },
}


def scaled_arch(arch: str, factor: int) -> dict[str, Any]:
    """The published configs of `arch` with every width divided by `factor` (1: published).

    Widths (UNet and VAE blocks, text hidden / intermediate / projection, time embedding) and
    group-norm groups shrink by `factor`; depths and head counts stay, except text layers
    (divided, at least 2: SDXL reads the penultimate). factor must divide 32 (8 keeps every
    head at 5+ channels). The token vocabulary and 77 positions stay.
    """
    if 32 % factor:
        raise ValueError(f"factor must divide 32, got {factor}")
    spec = copy.deepcopy(ARCHS[arch])
    if factor == 1:
        return spec
    unet, vae = spec["unet"], spec["vae"]
    unet["block_out_channels"] = [c // factor for c in unet["block_out_channels"]]
    unet["cross_attention_dim"] //= factor
    unet["norm_num_groups"] //= factor
    if "addition_time_embed_dim" in unet:
        unet["addition_time_embed_dim"] //= factor
        unet["projection_class_embeddings_input_dim"] //= factor
    vae["block_out_channels"] = [c // factor for c in vae["block_out_channels"]]
    vae["norm_num_groups"] //= factor
    for text in spec["text_encoders"]:
        for key in ("hidden_size", "intermediate_size", "projection_dim"):
            text[key] //= factor
        text["num_hidden_layers"] = max(2, text["num_hidden_layers"] // factor)
        text["num_attention_heads"] = max(
            1, min(text["num_attention_heads"], text["hidden_size"] // 8)
        )
    return spec


# ------------------------------------------------------------------------------ building
def build_components(
    spec: dict[str, Any], seed: int = 0, frozen_dtype: Any = None
) -> dict[str, Any]:
    """Diffusers-named pipeline components from a spec of `ARCHS` (random weights, CPU).

    The UNet is float32; VAE and text encoders are cast to `frozen_dtype` (None: float32).
    Two text encoders make an SDXL pipeline (the second with a projection, pooled output).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from safediff.models.clip_tokenizer import build_clip_tokenizer
    from safediff.models.tiny_sd import SD_SCHEDULER_CONFIG
    from safediff.models.tiny_sdxl import SDXL_SCHEDULER_CONFIG

    xl = len(spec["text_encoders"]) == 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        encoders = [CLIPTextModel(CLIPTextConfig(**spec["text_encoders"][0]))]
        if xl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoders"][1])))
    if frozen_dtype is not None:
        for module in (vae, *encoders):
            module.to(dtype=frozen_dtype)
    tokenizer = build_clip_tokenizer()
    components = {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": encoders[0].eval(),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler.from_config(
            SDXL_SCHEDULER_CONFIG if xl else SD_SCHEDULER_CONFIG
        ),
    }
    if xl:
        tokenizer_2 = copy.deepcopy(tokenizer)
        tokenizer_2.pad_token = "!"  # bigG's tokenizer pads with "!" (id 0)
        components.update(
            text_encoder_2=encoders[1].eval(),
            tokenizer_2=tokenizer_2,
            force_zeros_for_empty_prompt=True,
        )
    return components


def to_t2i(components: dict[str, Any], source: str, resolution: int) -> Any:
    """safediff's `T2IModel` of built components, through the family's own adapter
    (`sd_components_to_t2i`, or `sdxl_components_to_t2i` when there is a text_encoder_2)."""
    from safediff.models.loading import components_to_t2i

    return components_to_t2i(components, source=source, resolution=resolution)


def count_parameters(components: dict[str, Any]) -> dict[str, int]:
    """Parameters of each nn.Module component, by name."""
    from torch import nn

    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in components.items()
        if isinstance(module, nn.Module)
    }


def lora_in_out(unet: Any, targets: list[str]) -> dict[str, int]:
    """sum(in + out features) of the Linear layers whose name ends with each target (peft's
    matching for plain target names), so that LoRA rank r adds r x the sum parameters."""
    from torch import nn

    out = dict.fromkeys(targets, 0)
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear):
            for t in targets:
                if name == t or name.endswith("." + t):
                    out[t] += module.in_features + module.out_features
    return out


# ------------------------------------------------------------------------------ measuring
def peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def saved_activation_bytes(unet: Any, x: Any, t: Any, cond: Any, autocast_dtype: Any = None) -> int:
    """Bytes of the tensors one forward of `unet` keeps for backward, parameters excluded.

    Counted by storage (views counted once) with a saved-tensors hook; under gradient
    checkpointing the hook sees only what is saved outside the checkpointed blocks, so the inputs
    of every checkpointed block (kept alive for the recomputation) are added by forward
    pre-hooks on diffusers' checkpointed units (ResnetBlock2D, BasicTransformerBlock). The
    recomputation of one block during backward is not included (a block's share is small: one of
    2 x 16 units in SD 1.5, 2 x 70 in SDXL). The forward's graph is freed without a backward.
    """
    import torch
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved: dict[int, int] = {}

    def note(tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params and storage.nbytes():
                saved[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: Any) -> Any:
        note(tensor)
        return tensor

    handles = []
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())
    if checkpointing:
        for module in unet.modules():
            if isinstance(module, ResnetBlock2D | BasicTransformerBlock):
                handles.append(
                    module.register_forward_pre_hook(
                        lambda _m, args, kwargs: (
                            [note(a) for a in (*args, *kwargs.values())] and None
                        ),
                        with_kwargs=True,
                    )
                )
    ctx = (
        torch.autocast("cpu", dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast("cpu", enabled=False)
    )
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            out = unet(x, t, encoder_hidden_states=cond).sample
        total = sum(saved.values())
        del out
    finally:
        for h in handles:
            h.remove()
    return total


MEASURE_KEYS = ("fp32", "bf16", "bf16-ckpt")


def measure_activations(
    model: Any, unet: Any, resolution: int, keys: tuple[str, ...] = MEASURE_KEYS
) -> dict[str, dict[str, float]]:
    """The activations one UNet forward keeps for backward, as a linear model per configuration
    (keys "fp32", "bf16" autocast, "bf16-ckpt" with gradient checkpointing):

        bytes = fixed + batch x (per_sample + per_pixel x latent pixels)

    fitted from three forwards: batch 1 and 2 at `resolution`, batch 1 at 2 x `resolution`.
    fixed is what does not grow with the batch (the bf16 copies of the weights autocast makes and
    keeps for backward); per_sample what grows with the batch but not the image (cross-attention
    keys / values of the 77 tokens). unet: the module as the trainer holds it (a LoRA UNet saves
    what LoRA training saves). keys: which of the three to measure. Its gradient-checkpointing
    setting is restored afterwards.
    """
    import torch

    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    was_ckpt = bool(getattr(base, "is_gradient_checkpointing", False))
    cond = model.encode_text(["a photo of a cat"], "cpu").float()

    def saved(res: int, b: int, dtype: Any) -> int:
        side = res // VAE_FACTOR
        x = torch.randn(b, LATENT_CHANNELS, side, side, generator=torch.Generator().manual_seed(0))
        t = torch.full((b,), 500, dtype=torch.long)
        return saved_activation_bytes(unet, x, t, cond.expand(b, -1, -1), dtype)

    pixels = (resolution // VAE_FACTOR) ** 2
    out: dict[str, dict[str, float]] = {}
    for key, dtype, ckpt in (
        ("fp32", None, False),
        ("bf16", torch.bfloat16, False),
        ("bf16-ckpt", torch.bfloat16, True),
    ):
        if key not in keys:
            continue
        if ckpt:
            base.enable_gradient_checkpointing()
        else:
            base.disable_gradient_checkpointing()
        b1, b2, big = (
            saved(resolution, 1, dtype),
            saved(resolution, 2, dtype),
            saved(2 * resolution, 1, dtype),
        )
        fixed = 2 * b1 - b2
        per_pixel = ((big - fixed) - (b2 - b1)) / (3 * pixels)
        out[key] = {
            "fixed": float(fixed),
            "per_sample": float(b2 - b1 - per_pixel * pixels),
            "per_pixel": float(per_pixel),
        }
    if was_ckpt:
        base.enable_gradient_checkpointing()
    else:
        base.disable_gradient_checkpointing()
    return out


def activation_bytes(profile: dict[str, float], batch: int, latent_pixels: int) -> float:
    """A `measure_activations` profile evaluated at a UNet batch and latent size."""
    return profile["fixed"] + batch * (profile["per_sample"] + profile["per_pixel"] * latent_pixels)


def time_phase(times: dict[str, float], name: str, fn: Any) -> Any:
    t0 = time.perf_counter()
    result = fn()
    times[name] = round(time.perf_counter() - t0, 2)
    return result


# ------------------------------------------------------------------------------ one model run
def grpo_overrides(resolution: int, lora: bool, checkpointing: bool, out_dir: str) -> list[str]:
    """A GRPO epoch as small as GRPO allows: 1 prompt x K=2, 2 DDIM steps, both trained, in one
    backward pass per step (UNet batch 2 samples x 2 CFG branches), float32 on the CPU."""
    return [
        f"model.resolution={resolution}",
        "sampling.num_steps=2",
        "sampling.guidance_scale=5.0",
        "sampling.rollout_batch_size=2",
        "grpo.group_size=2",
        "grpo.samples_per_process=2",
        "grpo.timestep_fraction=1.0",
        "grpo.micro_batch=2",
        "grpo.grad_accum=0",
        "grpo.clip_range=1.0e-4",
        f"lora.enabled={'true' if lora else 'false'}",
        "lora.rank=16",
        "lora.alpha=16.0",
        "optim.lr=1.0e-4",
        "reward.name=brightness",
        "prompts.file=builtin:smoke",
        "run.log_with=none",
        "run.epochs=1",
        f"run.gradient_checkpointing={'true' if checkpointing else 'false'}",
        f"run.output_dir={out_dir}",
    ]


def run_model(
    arch: str,
    *,
    lora: bool,
    resolution: int,
    factor: int = 1,
    checkpointing: bool | None = None,
    frozen_dtype: str = "bfloat16",
    measure_resolution: int | None = None,
    measure_keys: tuple[str, ...] = MEASURE_KEYS,
    out_dir: str = "runs/bench-real-size",
) -> dict[str, Any]:
    """Build `arch` (widths / factor), run one GRPO epoch and one generation at `resolution`;
    returns phase wall times (s), peak RSS (GiB), parameter counts, the epoch's rewards, whether
    the trained parameters moved and, with `measure_resolution`, `measure_activations` there.

    checkpointing: gradient checkpointing in training (None: on for LoRA, as the LoRA presets).
    """
    import torch
    from accelerate import Accelerator

    from safediff.config import load_config
    from safediff.prompts import load_prompts
    from safediff.rewards.brightness import BrightnessReward
    from safediff.rl.grpo import group_advantages
    from safediff.rl.trainer import EpochBatch, GRPOTrainer
    from safediff.sampling.sample import SamplerSettings, sample
    from safediff.seeding import generator

    times: dict[str, float] = {}
    spec = scaled_arch(arch, factor)
    dtype = getattr(torch, frozen_dtype)
    components = time_phase(times, "build", lambda: build_components(spec, 0, dtype))
    params = count_parameters(components)
    lin = lora_in_out(components["unet"], ["to_q", "to_k", "to_v", "to_out.0"])
    rss_built = peak_rss_gib()
    source = f"{arch} published config / {factor}, random weights"
    model = to_t2i(components, source, resolution)
    if checkpointing is None:
        checkpointing = lora
    cfg = load_config("tiny-demo", grpo_overrides(resolution, lora, checkpointing, out_dir))
    acc = Accelerator(cpu=True)
    trainer = time_phase(
        times,
        "trainer_setup",
        lambda: GRPOTrainer(cfg, model, BrightnessReward(), load_prompts(cfg.prompts.file), acc),
    )
    trainable = sum(p.numel() for p in trainer.trainable)
    rollout = time_phase(times, "rollout", lambda: trainer.rollout_epoch(0))
    traj, prompts, embeds, negative = rollout
    _, rewards = time_phase(times, "score", lambda: trainer.score(traj, prompts))
    k = cfg.grpo.group_size
    adv = group_advantages(rewards, torch.arange(len(rewards)) // k, eps=1e-4, clip=2.5)
    batch = EpochBatch(traj, embeds, negative, adv.advantages.float())
    # Parameters that must move in one AdamW step: LoRA's B matrices (A's gradient is 0 while B
    # is 0, as peft initialises it) or, in a full fine-tune, a sample of the UNet's tensors.
    named = [(n, p) for n, p in trainer.bare_unet().named_parameters() if p.requires_grad]
    watched = [p for n, p in named if not lora or "lora_B" in n][:: max(1, len(named) // 16)]
    before = [p.detach().clone() for p in watched]
    stats = time_phase(times, "train", lambda: trainer.train_on(batch, epoch=0))
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, watched, strict=True))
    del before
    rss_trained = peak_rss_gib()

    def generate() -> Any:
        trainer.unet.eval()
        settings = SamplerSettings(num_steps=2, eta=0.0, guidance_scale=5.0, batch_size=1)
        return sample(
            dataclasses.replace(model, unet=trainer.unet),
            ["a lighthouse on a cliff at dusk"],
            [generator(1234)],
            settings,
        ).trajectory.images

    images = time_phase(times, "generate", generate)
    result: dict[str, Any] = {
        "run": f"{arch}-{'lora' if lora else 'full'}",
        "arch": arch,
        "factor": factor,
        "resolution": resolution,
        "frozen_dtype": frozen_dtype,
        "threads": torch.get_num_threads(),
        "params": params,
        "trainable_params": trainable,
        "lora_in_out": lin,
        "times_s": times,
        "peak_rss_gib": {"after_build": round(rss_built, 2), "after_train": round(rss_trained, 2)},
        "reward_mean": float(rewards.mean()),
        "train_loss": stats["loss"],
        "grad_norm": stats["grad_norm"],
        "watched_tensors_moved": f"{moved}/{len(watched)}",
        "gradient_checkpointing": checkpointing,
        "rewards": [round(float(r), 4) for r in rewards],
        "image_shape": list(images.shape),
        "image_finite": bool(torch.isfinite(images).all()),
    }
    if measure_resolution:
        trainer.unet.train()
        result["measure_resolution"] = measure_resolution
        result["activations"] = time_phase(
            times,
            "measure_activations",
            lambda: measure_activations(model, trainer.unet, measure_resolution, measure_keys),
        )
    result["peak_rss_gib"]["end"] = round(peak_rss_gib(), 2)
    return result


def run_reward_encoder(batch: int = 4, image_size: int = 224) -> dict[str, Any]:
    """HPSv2's ViT-H-14 (random weights) built through safediff's open_clip loader, one batch of
    `batch` images encoded (no grad) twice; times of the build and of each call."""
    import torch

    from safediff.rewards.encoders.hpsv2 import HPSV2_ARCH
    from safediff.rewards.encoders.openclip import load_openclip_encoder

    times: dict[str, float] = {}
    enc = time_phase(times, "build", lambda: load_openclip_encoder(HPSV2_ARCH, None))
    params = sum(p.numel() for p in enc.model.parameters())
    images = torch.rand(
        batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        emb = time_phase(times, "encode_first", lambda: enc.encode_images(images))
        time_phase(times, "encode_second", lambda: enc.encode_images(images))
        time_phase(times, "encode_text", lambda: enc.encode_text(["a photo of a cat"] * batch))
    return {
        "run": "hpsv2-encoder",
        "params": {
            "encoder": params,
            "visual": sum(p.numel() for p in enc.model.visual.parameters()),
        },
        "batch": batch,
        "image_size": image_size,
        "embedding_shape": list(emb.shape),
        "threads": torch.get_num_threads(),
        "times_s": times,
        "peak_rss_gib": {"end": round(peak_rss_gib(), 2)},
    }


# ------------------------------------------------------------------------------ the memory model
def arch_of(cfg: Any) -> str:
    """'sdxl' or 'sd15', from the preset's base model id."""
    return "sdxl" if "xl" in cfg.model.pretrained.lower() else "sd15"


def _dtype_bytes(name: str) -> int:
    return 2 if name in ("bfloat16", "bf16", "float16", "fp16", "half") else 4


def preset_memory(
    cfg: Any,
    activations: dict[str, dict[str, float]] | None = None,
    params: dict[str, dict[str, int]] | None = None,
    frozen_bytes: int = 4,
) -> dict[str, float]:
    """Bytes one training process of preset `cfg` holds on its accelerator at the preset's size.

    activations: profiles of `measure_activations` by key ("fp32", "bf16", "bf16-ckpt"); default
        `MEASURED[arch]`. The preset's key: "bf16" under bf16/fp16 mixed precision, else "fp32";
        "-ckpt" added with run.gradient_checkpointing (no "fp32-ckpt" is measured: nan).
        Evaluated at the UNet batch of one backward pass: transitions per backward x 2 CFG
        branches (`train_cfg`), at the preset's latent size.
    params: PUBLISHED_PARAMS by default. frozen_bytes: bytes per frozen VAE / text-encoder
        parameter (`safediff train` loads them in float32: 4).
    Returns bytes per entry (weights, gradients, optimizer, lora, reference_copy, reward_encoder,
    rollout_store, activations) and "total"; plus counts (trainable_params, unet_batch).
    Not included: the rollout's transient working set (UNet forward without grad, VAE decode of
    rollout_batch_size images), which peaks while gradients and activations are freed, and the
    framework's own workspace (CUDA context, allocator slack: ~1-2 GB).
    """
    from safediff.rl.trainer import update_shape
    from safediff.sampling.schedule import DDIMSchedule

    arch = arch_of(cfg)
    counts = (params or PUBLISHED_PARAMS)[arch]
    n_unet = counts["unet"]
    n_frozen = sum(v for k, v in counts.items() if k != "unet")
    if cfg.lora.enabled:
        n_train = cfg.lora.rank * sum(LORA_IN_OUT[arch][t] for t in cfg.lora.target_modules)
    else:
        n_train = n_unet
    out: dict[str, float] = {
        "unet_weights": 4.0 * n_unet,  # the policy stays float32; autocast does the bf16
        "frozen_weights": float(frozen_bytes * n_frozen),
        "lora_weights": 4.0 * n_train if cfg.lora.enabled else 0.0,
        "gradients": 4.0 * n_train,
        "optimizer": 8.0 * n_train,  # AdamW: two float32 moments
        "reference_copy": 4.0 * n_unet if cfg.grpo.kl_coef > 0 and not cfg.lora.enabled else 0.0,
    }
    encoder = str(cfg.reward.params.get("encoder", ""))
    if encoder.startswith("hpsv2"):
        enc_bytes = _dtype_bytes(str(cfg.reward.params.get("dtype", "float32")))
        out["reward_encoder"] = float(enc_bytes * PUBLISHED_PARAMS["hpsv2"]["encoder"])
    else:
        out["reward_encoder"] = 0.0
    res = cfg.model.resolution or (1024 if arch == "sdxl" else 512)
    side = res // VAE_FACTOR
    n, steps = cfg.grpo.samples_per_process, cfg.sampling.num_steps
    out["rollout_store"] = 4.0 * (
        n * (steps + 1) * LATENT_CHANNELS * side * side + n * steps + n * 3 * res * res
    )
    from safediff.models.tiny_sd import SD_SCHEDULER_CONFIG

    shape = update_shape(cfg, DDIMSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG))
    cfg_branches = 2 if cfg.grpo.train_cfg and cfg.sampling.guidance_scale != 1 else 1
    unet_batch = shape.transitions_per_backward * cfg_branches
    key = "fp32" if cfg.run.mixed_precision == "no" else "bf16"
    if cfg.run.gradient_checkpointing:
        key += "-ckpt"
    prof = (activations or MEASURED.get(arch, {})).get(key)
    out["activations"] = (
        float("nan") if prof is None else activation_bytes(prof, unet_batch, side * side)
    )
    out["total"] = sum(out.values())
    out["trainable_params"] = float(n_train)
    out["unet_batch"] = float(unet_batch)
    return out


PRESETS = ("sd15-paper", "sd15-recommended", "sd15-lora-24gb", "sdxl-lora")
TABLE_ROWS = (
    ("unet_weights", "UNet weights (fp32)"),
    ("frozen_weights", "VAE + text encoders (fp32)"),
    ("lora_weights", "LoRA weights"),
    ("gradients", "gradients (fp32)"),
    ("optimizer", "AdamW moments (fp32)"),
    ("reference_copy", "frozen reference UNet (KL)"),
    ("reward_encoder", "reward encoder ViT-H-14"),
    ("rollout_store", "stored rollout"),
    ("activations", "activations (1 backward)"),
    ("total", "total"),
)


def memory_table(activations: dict[str, dict[str, dict[str, float]]] | None = None) -> str:
    """The memory table of every preset (GiB) as markdown."""
    from safediff.config import load_config

    cols = {name: load_config(name) for name in PRESETS}
    mems = {
        name: preset_memory(cfg, (activations or MEASURED).get(arch_of(cfg)))
        for name, cfg in cols.items()
    }
    lines = [
        "| GiB | " + " | ".join(PRESETS) + " |",
        "|---" * (len(PRESETS) + 1) + "|",
    ]
    for key, label in TABLE_ROWS:
        cells = [f"{mems[p][key] / GiB:.2f}" for p in PRESETS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| trainable params | "
        + " | ".join(f"{mems[p]['trainable_params'] / 1e6:.1f} M" for p in PRESETS)
        + " |"
    )
    lines.append(
        "| UNet batch per backward | "
        + " | ".join(
            f"{int(mems[p]['unet_batch'])} at {cols[p].model.resolution} px"
            + (", ckpt" if cols[p].run.gradient_checkpointing else "")
            + f", {cols[p].run.mixed_precision}"
            for p in PRESETS
        )
        + " |"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the driver
RUNS = ("sd15-lora", "sdxl-lora", "hpsv2-encoder", "sd15-full")
# SDXL's plain bf16 profile is not measured here: without checkpointing, autocast keeps a bf16
# copy of the UNet (4.8 GiB) for backward on top of its 9.6 GiB of float32 weights, more than the
# shared 24 GB machine had free. No preset needs it (sdxl-lora checkpoints).
SDXL_MEASURE_KEYS = ("fp32", "bf16-ckpt")


def full_ft_estimate_gib(arch: str, resolution: int) -> float:
    """Host memory a float32 full fine-tune of `arch` needs in this bench: 16 bytes per UNet
    parameter (weights, gradient, two AdamW moments), bf16 frozen parts, ~1.5 GiB of libraries,
    and the activations of the bench's UNet batch of 4 (~0.2 MiB per latent pixel per sample at
    SD 1.5's width, measured)."""
    counts = PUBLISHED_PARAMS[arch]
    frozen = sum(v for k, v in counts.items() if k != "unet")
    latent_pixels = (resolution // VAE_FACTOR) ** 2
    return (16 * counts["unet"] + 2 * frozen + 4 * 0.2 * 2**20 * latent_pixels) / GiB + 1.5


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GiB


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "hpsv2-encoder":
        return run_reward_encoder(args.reward_batch)
    arch, kind = args.child.split("-")
    sizes = {
        "sd15-lora": args.sd15_size,
        "sd15-full": args.sd15_full_size,
        "sdxl-lora": args.sdxl_size,
    }
    return run_model(
        arch,
        lora=kind == "lora",
        resolution=sizes[args.child],
        frozen_dtype=args.frozen_dtype,
        measure_resolution=None if kind == "full" or args.measure_size == 0 else args.measure_size,
        measure_keys=MEASURE_KEYS if arch == "sd15" else SDXL_MEASURE_KEYS,
        out_dir=args.out_dir,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--sd15-size", type=int, default=256, help="sd15-lora image side (px)")
    p.add_argument("--sd15-full-size", type=int, default=128, help="sd15-full image side (px)")
    p.add_argument("--sdxl-size", type=int, default=256, help="sdxl-lora image side (px)")
    p.add_argument(
        "--measure-size",
        type=int,
        default=128,
        help="activations are measured at this side and twice it (px; 0: not measured)",
    )
    p.add_argument("--frozen-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--reward-batch", type=int, default=4, help="images per ViT-H-14 call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--full-ft",
        default="auto",
        choices=("auto", "yes", "no"),
        help="sd15-full: 'auto' runs it only when available memory exceeds its estimate + 2 GiB",
    )
    p.add_argument("--json", help="also write every run's record to this file")
    p.add_argument(
        "--out-dir",
        default="runs/bench-real-size",
        help="the trainer's run folder (nothing is written)",
    )
    p.add_argument("--table-only", action="store_true", help="print the memory table and stop")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.table_only:
        print(memory_table())
        return 0
    records = []
    for run in args.runs.split(","):
        if run not in RUNS:
            p.error(f"unknown run {run!r}; choose from {', '.join(RUNS)}")
        if run == "sd15-full" and args.full_ft != "yes":
            need, free = full_ft_estimate_gib("sd15", args.sd15_full_size), available_gib()
            if args.full_ft == "no" or free < need + 2:
                why = f"needs ~{need:.1f} GiB, {free:.1f} GiB available"
                print(f"sd15-full skipped: {why}", flush=True)
                records.append({"run": run, "skipped": why})
                continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", run, *_pass_through(args)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"{run} failed (exit {proc.returncode}) after {wall:.0f} s", flush=True)
            records.append({"run": run, "failed": proc.returncode, "wall_s": round(wall, 1)})
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec["process_wall_s"] = round(wall, 1)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    print()
    print(results_table(records))
    profiles = {r["arch"]: r["activations"] for r in records if "activations" in r}
    print()
    print(memory_table({**MEASURED, **profiles}))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
    return 0


def _pass_through(args: argparse.Namespace) -> list[str]:
    out = [
        f"--sd15-size={args.sd15_size}",
        f"--sd15-full-size={args.sd15_full_size}",
        f"--measure-size={args.measure_size}",
        f"--sdxl-size={args.sdxl_size}",
        f"--frozen-dtype={args.frozen_dtype}",
        f"--reward-batch={args.reward_batch}",
        f"--threads={args.threads}",
        f"--out-dir={args.out_dir}",
    ]
    return out


def results_table(records: list[dict[str, Any]]) -> str:
    """Phase wall times (s) and peak RSS (GiB) of each run, as markdown."""
    phases = (
        "build",
        "trainer_setup",
        "rollout",
        "score",
        "train",
        "generate",
        "measure_activations",
    )
    lines = [
        "| run | params (M) | " + " | ".join(phases) + " | peak RSS GiB |",
        "|---" * (len(phases) + 3) + "|",
    ]
    for r in records:
        if "times_s" not in r or "arch" not in r:
            continue
        total = sum(r["params"].values()) / 1e6
        cells = [str(r["times_s"].get(ph, "-")) for ph in phases]
        lines.append(
            f"| {r['run']} ({r['resolution']} px) | {total:.0f} | "
            + " | ".join(cells)
            + f" | {r['peak_rss_gib']['end']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
