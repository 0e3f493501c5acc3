"""Builders of the CLIP-family rewards from plain keyword arguments (config params).

`reward_builders()` maps reward names to builders that the reward registry merges into its
catalogue; each is called with the config's params plus `device=...`:

  steering   SteeringReward   encoder, anchors, alpha, mode, gating, threshold, temperature, ...
  alignment  AlignmentReward  encoder, scale, ...
  weighted   WeightedReward   components: [{name, weight, params}, ...]

`encoder` is a spec string (see `safediff.rewards.encoders`: 'hpsv2:/path/HPS_v2.1_compressed.pt',
'openclip:ViT-B-32:/path/ckpt', 'hf-clip:/path/folder') or an already built encoder. Inside one
weighted reward, components with the same encoder spec share one loaded encoder.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from safediff.errors import SafediffError
from safediff.rewards.alignment import AlignmentReward
from safediff.rewards.anchors import AnchorSet, load_anchor_set
from safediff.rewards.encoders import load_encoder
from safediff.rewards.encoders.base import ImageTextEncoder, is_finite_number, parse_dtype
from safediff.rewards.jpeg import REFERENCE_QUALITY
from safediff.rewards.steering_reward import SteeringReward, resolve_autocast
from safediff.rewards.unsafe_penalty import UnsafePenaltyReward
from safediff.rewards.weighted import WeightedReward


def _encoder(
    encoder: str | ImageTextEncoder,
    device: torch.device | str,
    dtype: str,
    precision: str | None,
) -> ImageTextEncoder:
    if isinstance(encoder, str):
        return load_encoder(encoder, device=device, dtype=dtype, precision=precision)
    if not (hasattr(encoder, "encode_images") and hasattr(encoder, "encode_text")):
        raise SafediffError(f"encoder must be a spec string or an encoder object, got {encoder!r}")
    return encoder


def _autocast(autocast: str | None, device: torch.device | str) -> torch.dtype | None:
    """'auto': float16 on CUDA (the reference's HPSv2 autocast), off elsewhere."""
    if autocast in (None, "", "none", "off", False):
        return None
    if autocast == "auto":
        return resolve_autocast("auto", device)
    dtype = parse_dtype(autocast)
    if dtype == torch.float32:
        return None
    return dtype


def _number(name: str, value: Any) -> float:
    if not is_finite_number(value):
        raise SafediffError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def build_steering_reward(
    encoder: str | ImageTextEncoder,
    anchors: str | AnchorSet = "compact",
    alpha: float = 0.5,
    mode: str = "translation",
    gating: str = "all",
    threshold: float = 0.0,
    temperature: float = 0.05,
    jpeg_parity: bool = False,
    jpeg_quality: int = REFERENCE_QUALITY,
    jpeg_resize: int | None = None,
    dtype: str = "float32",
    precision: str | None = None,
    autocast: str | None = "auto",
    chunk_size: int | None = None,
    device: torch.device | str = "cpu",
) -> SteeringReward:
    """SteeringReward from plain params.

    encoder: spec string or encoder object. anchors: shipped set name ('compact', 'extended',
    'empty_positive') or a YAML path. dtype: encoder weight dtype. precision: explicit open_clip
    precision (optional). autocast: 'auto' (default: float16 on CUDA, as the reference runs
    HPSv2, off on the CPU), None/'none', or 'float16'/'bfloat16'. Other params: see SteeringReward.
    """
    anchor_set = anchors if isinstance(anchors, AnchorSet) else load_anchor_set(anchors)
    return SteeringReward(
        _encoder(encoder, device, dtype, precision),
        anchor_set,
        alpha=_number("alpha", alpha),
        mode=mode,
        gating=gating,
        threshold=_number("threshold", threshold),
        temperature=_number("temperature", temperature),
        jpeg_parity=jpeg_parity,
        jpeg_quality=jpeg_quality,
        jpeg_resize=jpeg_resize,
        autocast_dtype=_autocast(autocast, device),
        chunk_size=chunk_size,
    )


def build_alignment_reward(
    encoder: str | ImageTextEncoder,
    scale: float = 1.0,
    jpeg_parity: bool = False,
    jpeg_quality: int = REFERENCE_QUALITY,
    jpeg_resize: int | None = None,
    dtype: str = "float32",
    precision: str | None = None,
    autocast: str | None = "auto",
    chunk_size: int | None = None,
    device: torch.device | str = "cpu",
) -> AlignmentReward:
    """AlignmentReward (HPSv2 / CLIP score without steering) from plain params."""
    return AlignmentReward(
        _encoder(encoder, device, dtype, precision),
        scale=_number("scale", scale),
        jpeg_parity=jpeg_parity,
        jpeg_quality=jpeg_quality,
        jpeg_resize=jpeg_resize,
        autocast_dtype=_autocast(autocast, device),
        chunk_size=chunk_size,
    )


def build_weighted_reward(
    components: Sequence[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    builders: Mapping[str, Callable[..., Any]] | None = None,
) -> WeightedReward:
    """WeightedReward from [{name, weight, params}, ...].

    name: a reward name (this module's, or any in `builders`, e.g. the registry's catalogue);
    weight: its coefficient (default 1.0); params: that builder's keyword arguments.
    Components that name the same encoder spec, dtype and precision share one encoder.
    """
    table: dict[str, Callable[..., Any]] = dict(reward_builders())
    if builders:
        table.update(builders)
    if not isinstance(components, Sequence) or isinstance(components, str) or not components:
        raise SafediffError("weighted reward needs components: a list of {name, weight, params}")
    shared: dict[tuple[str, str, str | None], ImageTextEncoder] = {}
    built = []
    for i, comp in enumerate(components):
        if not isinstance(comp, Mapping) or "name" not in comp:
            raise SafediffError(f"weighted reward component {i} must be a mapping with a 'name'")
        unknown = sorted(set(comp) - {"name", "weight", "params"})
        if unknown:
            raise SafediffError(
                f"weighted reward component {i}: unknown key {unknown[0]!r} (use name, weight, params)"
            )
        name = comp["name"]
        if name not in table:
            raise SafediffError(
                f"weighted reward component {i}: unknown reward {name!r}; known: {', '.join(sorted(table))}"
            )
        params = dict(comp.get("params") or {})
        spec = params.get("encoder")
        if isinstance(spec, str) and table[name] in (build_steering_reward, build_alignment_reward):
            key = (spec, str(params.get("dtype", "float32")), params.get("precision"))
            if key not in shared:
                shared[key] = load_encoder(spec, device=device, dtype=key[1], precision=key[2])
            params["encoder"] = shared[key]
        try:
            reward = table[name](**params, device=device)
        except TypeError as err:
            raise SafediffError(f"weighted reward component {i} ({name!r}): {err}") from err
        built.append((_number(f"component {i} weight", comp.get("weight", 1.0)), reward))
    return WeightedReward(built)


def build_unsafe_penalty_reward(
    encoder: str | ImageTextEncoder,
    anchors: str | AnchorSet = "compact",
    dtype: str = "float32",
    precision: str | None = None,
    autocast: str | None = "auto",
    chunk_size: int | None = None,
    device: torch.device | str = "cpu",
) -> UnsafePenaltyReward:
    """The negative-only reward (-cos(image, mean unsafe anchor)) from plain params."""
    anchor_set = anchors if isinstance(anchors, AnchorSet) else load_anchor_set(anchors)
    return UnsafePenaltyReward(
        _encoder(encoder, device, dtype, precision),
        anchor_set,
        autocast_dtype=_autocast(autocast, device),
        chunk_size=chunk_size,
    )


def reward_builders() -> dict[str, Callable[..., Any]]:
    """Reward name -> builder(**params, device=...) for the registry to merge."""
    return {
        "steering": build_steering_reward,
        "alignment": build_alignment_reward,
        "weighted": build_weighted_reward,
        "unsafe_penalty": build_unsafe_penalty_reward,
    }
