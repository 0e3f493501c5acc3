"""CLIP-family encoders behind one small interface (`ImageTextEncoder`), and their catalogue.

An encoder is named on the command line or in a config by a spec string, turned into an object
only here, at the edge:

  openclip:MODEL:CHECKPOINT   open_clip architecture (catalogue name or a .json config file)
                              + local weights, e.g. openclip:ViT-B-32:/ckpt/open_clip_model.safetensors
  hf-clip:FOLDER              a transformers CLIPModel folder, e.g. hf-clip:/models/clip-vit-large-patch14
  hpsv2:CHECKPOINT            HPSv2.1 = open_clip ViT-H-14 + HPS_v2.1_compressed.pt

`ENCODER_KINDS` is a plain dict from the kind to a loader(argument, device, dtype, precision);
another encoder family adds itself with `register_encoder_kind`, or as a plug-in through
`safediff.plugins.add_encoder_kind` (the sandbox's image encoder aligned to its sentence encoder,
'sandbox:', is one).
"""

from collections.abc import Callable
from pathlib import Path

import torch

from safediff import plugins
from safediff.errors import SafediffError
from safediff.rewards.encoders.base import ImageTextEncoder, PromptCache, parse_dtype

EncoderLoader = Callable[[str, torch.device, torch.dtype, str | None], ImageTextEncoder]


def _load_openclip(arg: str, device: torch.device, dtype: torch.dtype, precision: str | None):
    from safediff.rewards.encoders.openclip import load_openclip_encoder

    model_name, sep, ckpt = arg.partition(":")
    if not model_name or not sep or not ckpt:
        raise SafediffError(
            f"encoder spec 'openclip:{arg}' needs MODEL:CHECKPOINT, "
            "e.g. openclip:ViT-B-32:/path/open_clip_model.safetensors"
        )
    return load_openclip_encoder(model_name, ckpt, device=device, dtype=dtype, precision=precision)


def _load_hf_clip(arg: str, device: torch.device, dtype: torch.dtype, precision: str | None):
    from safediff.rewards.encoders.hf_clip import load_hf_clip_encoder

    if precision is not None:
        raise SafediffError("hf-clip encoders take dtype, not an open_clip precision")
    return load_hf_clip_encoder(arg, device=device, dtype=dtype)


def _load_hpsv2(arg: str, device: torch.device, dtype: torch.dtype, precision: str | None):
    from safediff.rewards.encoders.hpsv2 import load_hpsv2_encoder

    return load_hpsv2_encoder(arg, device=device, dtype=dtype, precision=precision)


ENCODER_KINDS: dict[str, EncoderLoader] = {
    "openclip": _load_openclip,
    "hf-clip": _load_hf_clip,
    "hpsv2": _load_hpsv2,
}


def known_kinds() -> dict[str, EncoderLoader]:
    """The built-in encoder kinds and those plug-ins add."""
    return {**ENCODER_KINDS, **plugins.encoder_kinds()}


def register_encoder_kind(kind: str, loader: EncoderLoader) -> None:
    """Add an encoder family: specs 'KIND:ARG' call loader(ARG, device, dtype, precision)."""
    if not kind or ":" in kind:
        raise SafediffError(f"encoder kind must be a non-empty name without ':', got {kind!r}")
    if kind in known_kinds():
        raise SafediffError(f"encoder kind {kind!r} is already registered")
    ENCODER_KINDS[kind] = loader


def load_encoder(
    spec: str,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = "float32",
    precision: str | None = None,
) -> ImageTextEncoder:
    """Build the encoder a spec string names (see the module docstring for the forms)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise SafediffError(
            f"encoder spec {spec!r} must look like KIND:ARG with KIND one of "
            f"{', '.join(known_kinds())} (e.g. hpsv2:/path/HPS_v2.1_compressed.pt)"
        )
    kind, _, arg = spec.partition(":")
    kinds = known_kinds()
    loader = kinds.get(kind)
    if loader is None:
        raise SafediffError(
            f"unknown encoder kind {kind!r} in {spec!r}; known kinds: {', '.join(kinds)}"
        )
    if not arg:
        raise SafediffError(f"encoder spec {spec!r} lacks its argument after '{kind}:'")
    arg = str(Path(arg).expanduser()) if kind != "openclip" else arg
    return loader(arg, torch.device(device), parse_dtype(dtype), precision)


__all__ = [
    "ENCODER_KINDS",
    "ImageTextEncoder",
    "PromptCache",
    "known_kinds",
    "load_encoder",
    "parse_dtype",
    "register_encoder_kind",
]
