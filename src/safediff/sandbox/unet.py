"""The sandbox's diffusion model: its configuration (data), weight files, and the T2IModel adapter.

The denoiser is diffusers' `UNet2DConditionModel` working directly in pixel space: x is a
3 x 32 x 32 image scaled to [-1, 1], and there is no VAE (`decode` is (x / 2 + 0.5).clamp(0, 1)).
It cross-attends to the frozen all-MiniLM-L6-v2 token states [B, 20, 384] (`text_encoder.py`),
projected to the UNet's cross-attention width by its own `encoder_hid_proj` (a Linear 384 -> 96,
trained with the UNet). Attention sits at 16 x 16 and 8 x 8 only: on a CPU, attention at 32 x 32
costs about 4x more than at 16 x 16 for little gain on flat-coloured shapes.

Noise schedule (SANDBOX_SCHEDULER_CONFIG): the cosine schedule ("squaredcos_cap_v2", Nichol &
Dhariwal 2021, designed for 32 x 32 pixel images: the linear schedule of DDPM destroys a small
image's content in the first third of the steps), 1000 training steps, epsilon prediction, no x0
clipping (safediff's DDIM step never clips), "leading" DDIM spacing with steps_offset 1. With
"leading" spacing the first inference step is t = 951 (alpha-bar 0.006), never the near-zero
alpha-bar of t = 999, where an epsilon model's x0 estimate is unusable.

A weight file (`diffusion.safetensors`) holds the EMA weights of the UNet and, in its safetensors
metadata under "safediff", the JSON of {"kind", "unet_config", "scheduler_config", "text_encoder",
"prediction_type", "train": {...}}: the file alone rebuilds the model.
"""

from functools import partial
from pathlib import Path
from typing import Any

import torch

from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.sampling.schedule import DDIMSchedule
from safediff.sandbox.manifest import load_weights
from safediff.sandbox.text_encoder import (
    HIDDEN_SIZE,
    MAX_LENGTH,
    NAME,
    MiniLMTextEncoderAdapter,
    SandboxTextEncoder,
    load_text_encoder,
)

DIFFUSION_FILE = "diffusion.safetensors"
KIND = "sandbox-diffusion"
IMAGE_SHAPE = (3, 32, 32)

SANDBOX_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 96],  # 32x32 -> 16x16 -> 8x8
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",  # at 8x8
    "cross_attention_dim": 96,
    "encoder_hid_dim": HIDDEN_SIZE,  # Linear 384 -> 96 on the MiniLM token states
    "encoder_hid_dim_type": "text_proj",
    # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads (a known
    # misnomer it keeps for compatibility): 4 heads of 16 (at 64 ch) and 24 (at 96 ch) dims.
    "attention_head_dim": 4,
    "transformer_layers_per_block": 1,
    "norm_num_groups": 8,
}
"""UNet2DConditionModel keyword arguments: 2.80M parameters."""

TINY_SANDBOX_UNET_CONFIG: dict[str, Any] = {
    **SANDBOX_UNET_CONFIG,
    "block_out_channels": [8, 16, 16],
    "cross_attention_dim": 16,
    "attention_head_dim": 2,
}
"""The same architecture at toy widths (random weights): tests and smoke runs in seconds."""

SANDBOX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
"""A diffusers DDIMScheduler config (see the module docstring for why these values)."""


def build_unet(config: dict[str, Any] | None = None, seed: int = 0):
    """A freshly initialised UNet2DConditionModel (default SANDBOX_UNET_CONFIG).

    The weights are a pure function of `seed`: the global torch RNG is forked, not consumed.
    """
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**dict(config or SANDBOX_UNET_CONFIG))


def model_metadata(
    unet_config: dict[str, Any],
    scheduler_config: dict[str, Any],
    train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The self-description stored in a diffusion weight file."""
    return {
        "kind": KIND,
        "unet_config": dict(unet_config),
        "scheduler_config": dict(scheduler_config),
        "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
        "text_encoder": {"name": NAME, "max_length": MAX_LENGTH, "hidden_size": HIDDEN_SIZE},
        "train": dict(train or {}),
    }


def _diffusion_file(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights / DIFFUSION_FILE if weights.is_dir() else weights


def load_sandbox_unet(weights: str | Path, device: torch.device | str = "cpu"):
    """(UNet2DConditionModel in eval mode on `device`, metadata) from a diffusion weight file or a
    folder holding `diffusion.safetensors`."""
    path = _diffusion_file(weights)
    state, meta = load_weights(path, KIND)
    unet = build_unet(meta["unet_config"])
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SafediffError(
            f"{path} does not match its own UNet config ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys); rebuild it with `safediff sandbox build`"
        )
    return unet.to(device).eval(), meta


def _encode(text_encoder: SandboxTextEncoder, prompts: list[str], device) -> torch.Tensor:
    return text_encoder.token_states(prompts, device=device)


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixel-space "latents" [B, 3, 32, 32] in about [-1, 1] -> images float32 in [0, 1]."""
    return (x.detach().to(torch.float32) / 2 + 0.5).clamp(0, 1)


def sandbox_t2i(
    unet, scheduler_config: dict[str, Any], text_encoder: SandboxTextEncoder, source: str
) -> T2IModel:
    """Wrap a sandbox UNet, its schedule and the MiniLM text encoder into a `T2IModel`."""
    return T2IModel(
        unet=unet,
        encode_text=partial(_encode, text_encoder),
        decode=decode_pixels,
        schedule=DDIMSchedule.from_scheduler_config(dict(scheduler_config)),
        latent_shape=IMAGE_SHAPE,
        components={
            "text_encoder": text_encoder.model,
            "tokenizer": text_encoder.tokenizer,
            # DES and `des:FOLDER` defenses train / swap the MiniLM through this adapter
            "text_encoder_adapter": MiniLMTextEncoderAdapter(
                text_encoder.tokenizer, text_encoder.model
            ),
        },
        source=source,
    )


def load_sandbox_model(
    weights_dir: str | Path,
    device: torch.device | str = "cpu",
    text_encoder: SandboxTextEncoder | None = None,
) -> T2IModel:
    """The sandbox text-to-image model as a `T2IModel`.

    weights_dir: a folder holding `diffusion.safetensors` (what `train_diffusion` writes) or the
        file itself.
    text_encoder: an already loaded MiniLM to share (loaded offline here when None).
    encode_text returns MiniLM token states [B, 20, 384]; decode maps [-1, 1] pixels to [0, 1];
    the schedule comes from the scheduler config saved in the weight file.
    """
    path = _diffusion_file(weights_dir)
    unet, meta = load_sandbox_unet(path, device)
    te = meta["text_encoder"]
    if te.get("max_length") != MAX_LENGTH or te.get("hidden_size") != HIDDEN_SIZE:
        raise SafediffError(
            f"{path} was trained on text states of length {te.get('max_length')} x "
            f"{te.get('hidden_size')}, this code makes {MAX_LENGTH} x {HIDDEN_SIZE}"
        )
    text_encoder = text_encoder or load_text_encoder(device)
    text_encoder.to(device)
    return sandbox_t2i(unet, meta["scheduler_config"], text_encoder, source=f"sandbox:{path}")
