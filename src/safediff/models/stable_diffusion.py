"""Adapter: Stable Diffusion 1.x / 2.x components -> safediff's `T2IModel` convention.

The SD pipeline's pieces map onto T2IModel as follows:
- unet: the UNet2DConditionModel, unchanged (the only trainable part);
- encode_text: CLIP tokenizer (pad to 77 with truncation) -> text encoder's last hidden state
  [B, 77, D], exactly what StableDiffusionPipeline feeds the UNet (no clip-skip, no pooling);
- decode: latents / vae.scaling_factor (+ shift_factor when the VAE has one) -> VAE decoder ->
  (x / 2 + 0.5).clamp(0, 1), the pipeline's own post-processing before PIL conversion;
- schedule: a DDIMSchedule built from the scheduler's config (any diffusers scheduler class
  sharing the beta fields, e.g. SD 1.5's PNDM config).
The VAE and the text encoder are frozen here (requires_grad False, eval mode).
"""

from functools import partial
from typing import Any

import torch
from torch import nn

from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.sampling.schedule import DDIMSchedule

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def encode_prompts(
    tokenizer: Any, text_encoder: nn.Module, prompts: list[str], device: torch.device | str
) -> torch.Tensor:
    """Prompts -> CLIP token states [B, L, D] on `device`, in the text encoder's dtype (no grad).

    Tokens are padded to and truncated at `tokenizer.model_max_length` (L = 77 for SD), and the
    last hidden state (after the final layer norm) is returned, as StableDiffusionPipeline does.
    """
    if isinstance(prompts, str):
        raise SafediffError("encode_text takes a list of prompts, got a single string")
    te_device, te_dtype = _module_device_dtype(text_encoder)
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        states = text_encoder(ids.to(te_device))[0]  # [B, L, D] last_hidden_state
    return states.to(device=device, dtype=te_dtype)


def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents [B, C, h, w] -> images [B, 3, h*f, w*f] float32 in [0, 1], on the latents' device.

    Undoes SD's latent scaling (z / scaling_factor, + shift_factor if the VAE defines one) before
    decoding; no gradient flows (the decoder is frozen and rewards score images as data).
    """
    vae_device, vae_dtype = _module_device_dtype(vae)
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    with torch.no_grad():
        z = latents.detach().to(device=vae_device, dtype=vae_dtype) / scaling
        if shift is not None:
            z = z + float(shift)
        images = vae.decode(z).sample  # [B, 3, H, W] in about [-1, 1]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
    return images.to(latents.device)


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1) (8 for SD, 2 for the tiny SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and put `module` in eval mode (in place); returns it."""
    module.requires_grad_(False)
    return module.eval()


def checked_resolution(unet: nn.Module, vae: nn.Module, resolution: int | None, source: str) -> int:
    """The image side in pixels: `resolution`, or the UNet's sample size x the VAE factor when
    None; an error naming the model when it is not a positive multiple of VAE factor x UNet
    downsampling."""
    factor = vae_scale_factor(vae)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution is None:
        resolution = int(unet.config.sample_size) * factor
    if resolution <= 0 or resolution % (factor * unet_factor):
        raise SafediffError(
            f"resolution {resolution} does not fit model {source!r}: it must be a positive multiple "
            f"of {factor * unet_factor} (VAE factor {factor} x UNet downsampling {unet_factor})"
        )
    return resolution


def sd_components_to_t2i(
    components: dict[str, Any], source: str, resolution: int | None = None
) -> T2IModel:
    """Wrap SD components (diffusers names) into a `T2IModel`.

    components: at least unet, vae, text_encoder, tokenizer, scheduler (extra entries are kept).
    source: where they came from (hub id, folder, "tiny-sd"), recorded on the model.
    resolution: image side in pixels; None -> unet.config.sample_size * vae factor. Must be a
        multiple of vae factor * the UNet's own downsampling (2 ** (UNet blocks - 1)).
    The VAE and text encoder are frozen in place; the UNet's trainability is left to the caller.
    """
    missing = [name for name in REQUIRED_COMPONENTS if components.get(name) is None]
    if missing:
        raise SafediffError(
            f"model {source!r} lacks the component(s) {', '.join(missing)}; a Stable Diffusion "
            f"pipeline needs {', '.join(REQUIRED_COMPONENTS)}"
        )
    unet, vae = components["unet"], components["vae"]
    text_encoder, tokenizer = components["text_encoder"], components["tokenizer"]
    freeze(vae)
    freeze(text_encoder)

    resolution = checked_resolution(unet, vae, resolution, source)
    side = resolution // vae_scale_factor(vae)
    latent_shape = (int(unet.config.in_channels), side, side)

    schedule = DDIMSchedule.from_scheduler_config(dict(components["scheduler"].config))
    return T2IModel(
        unet=unet,
        encode_text=partial(encode_prompts, tokenizer, text_encoder),
        decode=partial(decode_latents, vae),
        schedule=schedule,
        latent_shape=latent_shape,
        components={k: v for k, v in components.items() if k != "unet"},
        source=source,
    )


def diffusers_pipeline(components: dict[str, Any], unet: nn.Module | None = None) -> Any:
    """A diffusers `StableDiffusionPipeline` over SD components (diffusers names), with no safety
    checker or feature extractor and its progress bar off: the reference's sampler, for parity
    tests, benchmarks and `save_pretrained`.

    components: unet (unless given as `unet`), vae, text_encoder, tokenizer, scheduler; a
    `T2IModel`'s components plus its unet: `diffusers_pipeline(model.components, model.unet)`.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=unet if unet is not None else components["unet"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
