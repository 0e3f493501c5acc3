"""A tiny Stable Diffusion XL built offline with random weights, for tests and smoke runs.

Every component is the real class an SDXL pipeline uses (diffusers' UNet2DConditionModel with
addition_embed_type 'text_time' and AutoencoderKL, transformers' CLIPTextModel and
CLIPTextModelWithProjection, two CLIPTokenizers, an EulerDiscreteScheduler with SDXL base 1.0's
scheduler config), only at toy widths, the sizes diffusers' own SDXL pipeline tests use: two
text encoders of width 32 (token states 32 + 32 = 64 = the UNet's cross_attention_dim), a pooled
projection of 32, time ids embedded in 8 channels each (32 + 6 * 8 = 80 =
projection_class_embeddings_input_dim), UNet blocks of 32 and 64 channels with linear-projection
transformers of depth 1 and 2. A 16 x 16 image runs in milliseconds on a CPU. Weights are a pure
function of `seed` (the global torch RNG is forked, so the caller's random state is untouched).

The tokenizers are OpenAI CLIP's BPE built offline (`clip_tokenizer.py`); as in SDXL,
`tokenizer` pads with `<|endoftext|>` and `tokenizer_2` (OpenCLIP bigG's) pads with "!" (id 0).
"""

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from safediff.errors import SafediffError
from safediff.models.clip_tokenizer import VOCAB_SIZE, build_clip_tokenizer
from safediff.models.sdxl import sdxl_pipeline
from safediff.models.tiny_sd import tiny_vae

# SDXL base 1.0's scheduler/scheduler_config.json (the beta fields are what a DDIM sampler reads).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "sample_max_value": 1.0,
}

_WIDTHS = (32, 64)  # UNet and VAE block widths; two VAE blocks -> one 2x downsampling
_TEXT_DIM = 32  # each text encoder's width, and the pooled projection's
_TIME_DIM = 8  # addition_time_embed_dim


def _tiny_unet(sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=_WIDTHS,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_DIM,
        projection_class_embeddings_input_dim=_TEXT_DIM + 6 * _TIME_DIM,
        cross_attention_dim=2 * _TEXT_DIM,
        norm_num_groups=8,
    )


def _text_config(hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=3,  # SDXL reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=_TEXT_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def build_tiny_sdxl(seed: int = 0, sample_size: int = 8) -> dict[str, Any]:
    """Components of a tiny random SDXL pipeline, by diffusers' names.

    seed: weights are a pure function of it (the caller's RNG state is untouched).
    sample_size: latent side of the UNet's default input; images are 2 x larger (VAE factor 2).
        Must be even (the UNet downsamples once).
    Returns {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
    "scheduler", "force_zeros_for_empty_prompt"}; modules are float32 on the CPU in eval mode.
    """
    if sample_size < 2 or sample_size % 2:
        raise SafediffError(f"tiny SDXL sample_size must be an even number >= 2, got {sample_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(sample_size)
        vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE
        text_encoder = CLIPTextModel(_text_config("quick_gelu"))  # CLIP ViT-L's activation
        text_encoder_2 = CLIPTextModelWithProjection(_text_config("gelu"))  # OpenCLIP bigG's
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = copy.deepcopy(tokenizer)  # building the BPE twice costs a second or two
    tokenizer_2.pad_token = "!"  # SDXL's tokenizer_2 pads with "!" (id 0)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        "force_zeros_for_empty_prompt": True,
    }


def save_tiny_sdxl(path: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Build a tiny SDXL (see `build_tiny_sdxl`) and write it as a diffusers
    StableDiffusionXLPipeline folder (safetensors) that `StableDiffusionXLPipeline.from_pretrained`
    and `safediff.models.loading.load_t2i_model` load."""
    path = Path(path)
    sdxl_pipeline(build_tiny_sdxl(seed, sample_size)).save_pretrained(path, safe_serialization=True)
    return path
