"""The UNet's precision while sampling for evaluation: one name, resolved per device, one cast.

Sampling for evaluation only reads the UNet, so its weights can run in bfloat16 where the
hardware computes it natively: the sampler casts the UNet's inputs to its parameter dtype and its
output back to float32 (`safediff.sampling.rollout.predict_noise`), so latents, noise and the
DDIM step stay float32 and the per-sample seeding is kept. Training never samples this way: the
on-policy ratio needs the rollout's and the re-scoring's arithmetic to match.

"auto" is bfloat16 on a CUDA device that supports it and on a CPU with native bf16 arithmetic
(AVX512-BF16 or AMX tiles, where oneDNN runs bf16 convolutions and matmuls about twice as fast as
float32), float32 elsewhere (emulated bf16 on other CPUs is slower than float32).
"""

import copy
import dataclasses
from typing import Any

import torch

from safediff.errors import SafediffError

UNET_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *UNET_DTYPES)


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 natively (not by emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_unet_dtype(name: str, device: torch.device | str) -> str:
    """'auto' -> 'bfloat16' where `device` computes it natively, else 'float32'; a dtype name is
    checked and returned as given."""
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if name not in UNET_DTYPES:
        raise SafediffError(f"sampling precision {name!r}: use one of {', '.join(CHOICES)}")
    return name


def with_unet_dtype(model: Any, dtype: torch.dtype) -> Any:
    """`model` (a T2IModel) with its UNet cast to `dtype` in place; the same model when already
    so (`safediff generate --unet-dtype`, which loads its own model)."""
    if next(model.unet.parameters()).dtype != dtype:
        # nn.Module.to, not diffusers' override: that one warns about fp32-kept modules the
        # sandbox's and SD's UNets do not have
        torch.nn.Module.to(model.unet, dtype=dtype)
    return model


def with_sampling_dtype(model: Any, name: str) -> Any:
    """A T2IModel sampling with its UNet in dtype `name` ('float32', 'bfloat16', 'float16').

    The same model when its UNet already has that dtype; otherwise a shallow copy holding a cast
    copy of the UNet, so the caller's model (and its float32 weights) are left as they were (the
    copy costs the UNet's memory again in the new dtype: meant for small models and evaluation).
    """
    dtype = UNET_DTYPES.get(name)
    if dtype is None:
        raise SafediffError(f"sampling precision {name!r}: use one of {', '.join(UNET_DTYPES)}")
    if next(model.unet.parameters()).dtype == dtype:
        return model
    return with_unet_dtype(dataclasses.replace(model, unet=copy.deepcopy(model.unet)), dtype)
