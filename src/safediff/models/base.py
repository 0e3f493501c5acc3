"""The one convention every text-to-image model is wrapped into.

Samplers, trainers and rewards see only `T2IModel`: a denoiser called as
`unet(x, t, encoder_hidden_states=c).sample`, a prompt encoder, a decoder to [0, 1] images and a
`DDIMSchedule`. Adapters for model families (Stable Diffusion 1.x / 2.x in stable_diffusion.py,
SDXL in sdxl.py, the sandbox as a plug-in) live in their own files and build a `T2IModel` at the
boundary.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from safediff.sampling.flow import FlowSchedule
from safediff.sampling.schedule import DDIMSchedule


@dataclass
class T2IModel:
    """A text-to-image diffusion model in safediff's convention.

    unet: the denoiser (diffusers UNet2DConditionModel or anything with the same call), trained by
        GRPO. Called as unet(x [B, C, h, w], t [B], encoder_hidden_states=[B, L, D]).sample.
    encode_text: prompts -> token states [B, L, D] on the given device (no grad). Conditioning
        beyond token states travels as extra rows of this one tensor (SDXL: L = 77 + 1, the last
        row packing the pooled embedding and size/crop time ids; its UNet unpacks it, sdxl.py).
    decode: latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1] (no grad).
    schedule: the noise schedule the UNet was trained with: a `DDIMSchedule` (DDPM-type models,
        sampled by DDIM / the diffusers schedulers) or a `FlowSchedule` (rectified-flow models,
        SD3 / FLUX, whose "unet" is a velocity-predicting transformer adapted by models/flow.py
        and sampled by sampling/flow.py; `sample()` dispatches on this type).
    latent_shape: (C, h, w) of one latent at the model's default resolution.
    components: the other modules (vae, text_encoder, tokenizer, ...), by diffusers' names, so a
        pipeline folder can be written back out; never used by the sampler.
    source: where the model came from (hub id, folder, "tiny-sd", ...), for logs and saved configs.
    """

    unet: nn.Module
    encode_text: Callable[[list[str], torch.device], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    schedule: DDIMSchedule | FlowSchedule
    latent_shape: tuple[int, int, int]
    components: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "T2IModel":
        """Move the UNet and every module component to `device` (and frozen parts to `dtype`)."""
        self.unet.to(device)
        for comp in self.components.values():
            if isinstance(comp, nn.Module):
                comp.to(device=device, dtype=dtype) if dtype is not None else comp.to(device)
        return self
