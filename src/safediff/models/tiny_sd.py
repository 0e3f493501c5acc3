"""A tiny Stable Diffusion built offline with random weights, for tests and smoke runs.

Every component is the real class a Stable Diffusion 1.x pipeline uses (diffusers'
UNet2DConditionModel and AutoencoderKL, transformers' CLIPTextModel and CLIPTokenizer, a
DDIMScheduler with SD's noise schedule), only at toy widths: the whole pipeline is about 2M
parameters (most of them the 49408 x 32 token embedding) and a 16 x 16 image runs in milliseconds
on a CPU. Weights are random but a pure function of `seed`: the global torch RNG is forked, so
building a tiny SD neither depends on nor disturbs the caller's random state.
"""

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from safediff.errors import SafediffError
from safediff.models.clip_tokenizer import VOCAB_SIZE, build_clip_tokenizer
from safediff.models.stable_diffusion import diffusers_pipeline

# Stable Diffusion 1.x / 2.x's training schedule (scheduler/scheduler_config.json of SD 1.5).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}

_WIDTHS = (32, 64)  # UNet and VAE block widths; two VAE blocks -> one 2x downsampling
_TEXT_DIM = 32


def _tiny_unet(sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=_WIDTHS,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae(**config: Any) -> AutoencoderKL:
    """The tiny VAE of tiny-sd (one 2x downsampling, 4 latent channels); `config` overrides,
    e.g. SDXL's scaling factor."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_WIDTHS),
        up_block_types=("UpDecoderBlock2D",) * len(_WIDTHS),
        block_out_channels=_WIDTHS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


def _tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=_TEXT_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_tiny_sd(
    seed: int = 0, sample_size: int = 8, prediction_type: str = "epsilon"
) -> dict[str, Any]:
    """Components of a tiny random SD 1.x pipeline, by diffusers' names.

    seed: weights are a pure function of it (the caller's RNG state is untouched).
    sample_size: latent side of the UNet's default input; images are 2 x larger (VAE factor 2).
        Must be even (the UNet downsamples once).
    prediction_type: "epsilon" or "v_prediction" (the scheduler's, as in SD 2.x-v).
    Returns {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}; modules are float32 on the
    CPU in eval mode.
    """
    if sample_size < 2 or sample_size % 2:
        raise SafediffError(f"tiny SD sample_size must be an even number >= 2, got {sample_size}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise SafediffError(
            f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(sample_size)
        vae = tiny_vae()
        text_encoder = _tiny_text_encoder()
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": build_clip_tokenizer(),
        "scheduler": scheduler,
    }


def save_pipeline_folder(components: dict[str, Any], path: str | Path) -> Path:
    """Write SD components as a diffusers StableDiffusionPipeline folder (safetensors, no checker).

    The folder loads with `StableDiffusionPipeline.from_pretrained(path)`, with each component's
    own `from_pretrained(path, subfolder=...)`, and with `safediff.models.loading.load_t2i_model`.
    """
    path = Path(path)
    diffusers_pipeline(components).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_sd(
    path: str | Path, seed: int = 0, sample_size: int = 8, prediction_type: str = "epsilon"
) -> Path:
    """Build a tiny SD (see `build_tiny_sd`) and write it as a diffusers pipeline folder."""
    return save_pipeline_folder(build_tiny_sd(seed, sample_size, prediction_type), path)
