"""A tiny FLUX (dev-style, guidance-distilled) built offline with random weights, for tests.

Every component is the real class a FluxPipeline uses: diffusers' FluxTransformer2DModel (with
guidance_embeds, as FLUX.1-dev: the guidance value is an input, there is no unconditional pass)
and AutoencoderKL (16 latent channels, FLUX's scaling and shift factors, no quant convs),
transformers' CLIPTextModel (its pooled output feeds the transformer) and T5EncoderModel (its
token states are the text stream), the offline CLIP BPE tokenizer (`clip_tokenizer.py`) and the
offline T5 tokenizer of tiny-sd3 (`tiny_sd3.build_t5_tokenizer`), and FLUX.1-dev's
FlowMatchEulerDiscreteScheduler config (dynamic shifting), only at toy widths: CLIP and T5 of
width 32 (= pooled_projection_dim = joint_attention_dim), one double- and one single-stream block
of 2 heads x 16 (rotary axes 4 + 4 + 8 = 16), latents packed in 2 x 2 patches (16 x 4 = 64 input
channels). A 16 x 16 image (8 x 8 latent, 16 image tokens) runs in milliseconds on a CPU. Weights
are a pure function of `seed` (the caller's RNG state is untouched).
"""

from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel

from safediff.errors import SafediffError
from safediff.models.clip_tokenizer import build_clip_tokenizer
from safediff.models.tiny_sd3 import (
    LATENT_CHANNELS,
    build_t5_tokenizer,
    tiny_clip_config,
    tiny_flow_vae,
    tiny_t5,
)

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
TINY_FLUX_RESOLUTION = 16  # image side of tiny-flux (FluxPipeline's default is 1024)
_DIM = 32


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> dict[str, Any]:
    """Components of a tiny random FLUX pipeline, by diffusers' names.

    seed: weights are a pure function of it (the caller's RNG state is untouched).
    guidance_embeds: True for a FLUX.1-dev-like transformer (guidance is an input); False for a
        FLUX.1-schnell-like one (no guidance input).
    Returns {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
    "scheduler"}; modules float32, CPU, eval mode. The transformer has no sample size: images are
    `TINY_FLUX_RESOLUTION` pixels unless the adapter is told otherwise.
    """
    if not isinstance(guidance_embeds, bool):
        raise SafediffError(f"guidance_embeds must be True or False, got {guidance_embeds!r}")
    tokenizer_2 = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,  # 2 x 2 packed latent patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_DIM,
            pooled_projection_dim=_DIM,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        vae = tiny_flow_vae(**FLUX_VAE_FACTORS)
        text_encoder = CLIPTextModel(tiny_clip_config("quick_gelu", layers=2))
        text_encoder_2 = tiny_t5(_DIM, len(tokenizer_2))
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": build_clip_tokenizer(),
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
    }


def save_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Build a tiny FLUX (see `build_tiny_flux`) and write it as a diffusers FluxPipeline folder
    (safetensors) that `FluxPipeline.from_pretrained` and `load_t2i_model` load."""
    from safediff.models.flow_family import flow_pipeline

    path = Path(path)
    comps = build_tiny_flux(seed, guidance_embeds)
    flow_pipeline(comps).save_pretrained(path, safe_serialization=True)
    return path
