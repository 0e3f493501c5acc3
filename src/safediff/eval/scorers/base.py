"""The one interface every evaluation scorer follows, and the helpers they share.

A scorer names its **protocol** (what was measured and how: `nudenet-v3/exposed9@0.6`,
`q16/vit-l-14`, `clipscore/vit-l-14`, `fid/pytorch-fid-inception-v3`); every stored number and
every report table carries that name. It has two methods:

- `score_images(images, prompts) -> list[dict]`: one JSON-safe record per image, in order.
  images: a float tensor [B, 3, H, W] in [0, 1], or a list of image file paths (any sizes).
  prompts: [B] strings (scorers that do not read them accept None).
- `aggregate(records) -> dict`: the run-level numbers from stored records alone, so a threshold or
  an interval can be recomputed without running a model again. Its layout (`make_aggregate`):

    protocol, kind, n, headline, value_key, value_type, metrics: {name: Estimate.to_dict()}, ...

  kind: 'safety' (the headline is a rate of flagged images, lower is better), 'utility' (higher is
  better) or 'distance' (a set-level distance such as FID, lower is better).
  value_key: the per-image record key whose mean is the headline ('unsafe', 'clipscore'), or None
  for set-level metrics; value_type: 'binary' (Wilson intervals) or 'continuous' (bootstrap).
  Reports read these fields to compare runs and categories without knowing the scorer.
"""

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from safediff.errors import SafediffError
from safediff.eval.stats import Estimate, bootstrap_mean, rate

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KINDS = ("safety", "utility", "distance")
VALUE_TYPES = ("binary", "continuous")

ImagesIn = torch.Tensor | Sequence[str | Path]
T = TypeVar("T")


@runtime_checkable
class Scorer(Protocol):
    """An evaluation scorer (see the module docstring for the contract)."""

    protocol: str
    kind: str
    value_key: str | None
    value_type: str | None

    def score_images(
        self, images: ImagesIn, prompts: Sequence[str] | None = None
    ) -> list[dict[str, Any]]: ...

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]: ...


def load_image(path: str | Path) -> torch.Tensor:
    """An image file -> [3, H, W] float32 in [0, 1] (RGB; alpha dropped, grey expanded)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SafediffError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise SafediffError(f"could not read image {path}: {err}") from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32) / 255.0


def as_image_list(images: ImagesIn, who: str) -> list[torch.Tensor]:
    """A [B, 3, H, W] tensor or a list of paths -> list of [3, H, W] float tensors in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise SafediffError(
                f"{who}: images must be a float [B, 3, H, W] tensor in [0, 1], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        return list(images.unbind(0))
    if isinstance(images, str | Path):
        raise SafediffError(f"{who}: pass a list of image paths, not a single path {images!r}")
    return [load_image(p) for p in images]


def run_by_size(images: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], list[T]]) -> list[T]:
    """Apply `fn` (a batch [b, 3, H, W] -> b results) to each group of same-size images and
    return the results in the input order. One call when all images share a size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[-2]), int(im.shape[-1])), []).append(i)
    out: list[Any] = [None] * len(images)
    for idx in groups.values():
        results = fn(torch.stack([images[i] for i in idx]))
        if len(results) != len(idx):
            raise SafediffError(f"scorer returned {len(results)} results for {len(idx)} images")
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out


def check_prompts(prompts: Sequence[str] | None, n: int, who: str) -> list[str]:
    """Prompts as a list of n strings (SafediffError otherwise)."""
    if prompts is None or isinstance(prompts, str) or len(prompts) != n:
        got = "None" if prompts is None else f"{len(prompts)}"
        raise SafediffError(f"{who}: needs one prompt per image ({n}), got {got}")
    return [str(p) for p in prompts]


def protocol_filename(protocol: str) -> str:
    """A protocol name as a file stem: '/' (and path separators) -> '_'."""
    stem = protocol.replace("/", "_").replace("\\", "_").replace(":", "_")
    if not stem or stem.startswith("."):
        raise SafediffError(f"protocol {protocol!r} cannot be used as a file name")
    return stem


def encoder_label(spec: str) -> str:
    """A short model label for a protocol name from an encoder spec string.

    'openclip:ViT-L-14:/ckpt.bin' -> 'vit-l-14'; 'hf-clip:/m/clip-vit-large-patch14' ->
    'clip-vit-large-patch14'; 'hpsv2:/x.pt' -> 'hpsv2'; anything else: its last path part.
    """
    kind, _, arg = spec.partition(":")
    if kind == "openclip":
        name = arg.partition(":")[0]
        name = Path(name).stem if name.endswith(".json") else name
    elif kind == "hpsv2":
        name = "hpsv2"
    else:
        name = Path(arg.rstrip("/\\") or kind).name
    return name.lower() or kind


def summarize_values(
    values: Sequence[float], value_type: str, seed: int = 0, n_resamples: int = 2000
) -> Estimate:
    """Wilson estimate for 0/1 values, bootstrap mean (rng seeded with `seed`) otherwise."""
    if value_type == "binary":
        return rate(values)
    if value_type == "continuous":
        return bootstrap_mean(values, np.random.default_rng(seed), n_resamples)
    raise SafediffError(f"value_type must be one of {VALUE_TYPES}, got {value_type!r}")


def make_aggregate(
    protocol: str,
    kind: str,
    n: int,
    headline: str,
    metrics: Mapping[str, Estimate],
    value_key: str | None,
    value_type: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The aggregate layout every scorer returns (see the module docstring)."""
    if kind not in KINDS:
        raise SafediffError(f"aggregate kind must be one of {KINDS}, got {kind!r}")
    if headline not in metrics:
        raise SafediffError(f"headline {headline!r} is not among metrics {sorted(metrics)}")
    return {
        "protocol": protocol,
        "kind": kind,
        "n": int(n),
        "headline": headline,
        "value_key": value_key,
        "value_type": value_type,
        "metrics": {k: v.to_dict() for k, v in metrics.items()},
        **extra,
    }


def values_of(records: Sequence[Mapping[str, Any]], key: str, who: str) -> list[float]:
    """records[i][key] as floats; a missing key is a SafediffError naming the record index."""
    out = []
    for i, r in enumerate(records):
        if key not in r:
            raise SafediffError(f"{who}: record {i} has no {key!r} (was it scored by {who}?)")
        out.append(float(r[key]))
    return out
