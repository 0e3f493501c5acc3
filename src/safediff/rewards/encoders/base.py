"""The one interface every CLIP-family encoder is wrapped into, and what they share.

An encoder maps images [B, 3, H, W] float in [0, 1] and lists of strings to L2-normalised float32
embeddings [B, D] in one joint space. Each adapter (OpenCLIP, transformers CLIP, HPSv2, later the
sandbox's encoder) owns its preprocessing and does it in torch on its own device: no PIL, no JPEG,
no per-image encoder call in the hot path.

Shared here: the torch preprocessing (an 8-bit resize as PIL's, center crop, normalise) that
mirrors open_clip's and transformers' PIL pipelines, input checks, chunked encoding, and
`PromptCache`, the per-reward cache of per-prompt tensors (owned by a reward instance, cleared
explicitly; never a global).
"""

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from safediff.errors import SafediffError

# OpenAI CLIP's pixel statistics: the default of open_clip and of transformers' CLIPImageProcessor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Images slightly outside [0, 1] (decoder overshoot) are accepted; beyond this the caller most
# likely passed [-1, 1] or [0, 255] images.
_RANGE_TOL = 0.05
# Rows per image (a band across the middle) that check_images reads for the range check.
_CHECK_ROWS = 32

RESIZE_MODES = ("shortest", "longest", "squash")

# Pixels per quantisation pass of the CPU resize: 2^18 float32 (1 MiB) stay in a core's L2 cache.
_QUANT_CHUNK = 1 << 18


@runtime_checkable
class ImageTextEncoder(Protocol):
    """A frozen image/text encoder with a joint embedding space.

    device: where the model lives; inputs are moved there.
    dtype: the dtype images are cast to before the image tower (the model's weight dtype).
    embed_dim: D, the size of the joint embedding.
    name: a short description for logs and reports (architecture and weights).
    """

    device: torch.device
    dtype: torch.dtype
    embed_dim: int
    name: str

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] float in [0, 1], any size -> [B, D] float32, L2-normalised."""
        ...

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """texts [B] -> [B, D] float32, L2-normalised."""
        ...


def check_images(images: torch.Tensor, who: str, values: bool = True) -> None:
    """Raise SafediffError unless `images` is a float [B, 3, H, W] tensor with values in [0, 1].

    values: also check the value range (a wrong convention, [-1, 1] or [0, 255], is a property
    of whole images, so only a band of `_CHECK_ROWS` rows across the middle of each image is
    read: at 512 px a full pass costs as much as the resize, and a band is contiguous memory,
    several times faster to read than as many rows spread over the image). NaN / inf pixels are
    allowed (their reward is NaN; the trainer skips the group).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SafediffError(f"{who}: images must be a [B, 3, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise SafediffError(
            f"{who}: images must be float in [0, 1], got dtype {images.dtype} (divide uint8 by 255)"
        )
    if not values or not images.numel():
        return
    top = max(0, (images.shape[2] - _CHECK_ROWS) // 2)
    rows = images.detach()[:, :, top : top + _CHECK_ROWS]
    lo, hi = rows.amin(), rows.amax()  # two passes: faster than aminmax on a strided view
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        # Replace non-finite pixels by an in-range value (a boolean-mask gather is far slower).
        lo, hi = torch.nan_to_num(rows, nan=0.5, posinf=0.5, neginf=0.5).aminmax()
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise SafediffError(
            f"{who}: image values span [{lo.item():.3g}, {hi.item():.3g}];"
            " expected [0, 1] (convert from [-1, 1] or [0, 255])"
        )


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def resize_crop_normalize(
    images: torch.Tensor,
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
    fill: float = 0.0,
) -> torch.Tensor:
    """CLIP-style eval preprocessing in torch, batched, on the images' device.

    images: [B, 3, H, W] float in [0, 1].
    size: output size S (square) or (S_h, S_w).
    resize_mode:
      'shortest': resize so the short side is S (bicubic, antialiased; the long side is
        int(S * long / short) as torchvision computes it), then center-crop to S x S. This is
        open_clip's default eval transform and transformers' CLIPImageProcessor pipeline.
      'longest': resize so the long side is S, then center-pad with `fill` (open_clip 'longest',
        HPSv2's `light_augmentation` preprocess).
      'squash': resize both sides to S, ignoring the aspect ratio.
    Returns [B, 3, S_h, S_w] float32, (x - mean) / std.

    Resizing is 8-bit, as in the PIL pipelines it mirrors (see `resize`): on images that are
    already multiples of 1/255 it is within 2 uint8 levels of PIL's resize of the same uint8
    image (about 99.5% of pixels equal; a float resize is off by up to 15 levels on sharp
    edges, where PIL clips between its two passes). Images that need gradients are resized in
    float. Sizes that already match skip the resize and are exact (no quantisation).
    """
    if resize_mode not in RESIZE_MODES:
        raise SafediffError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
    x = images.to(torch.float32)
    out_h, out_w = _as_hw(size)
    h, w = x.shape[-2:]
    if resize_mode == "squash":
        x = resize(x, out_h, out_w)
    elif resize_mode == "shortest":
        if out_h == out_w:
            x = resize_shortest(x, out_h)
        else:
            # open_clip ResizeKeepRatio for non-square targets: scale so both sides cover.
            scale = max(out_h / h, out_w / w)
            x = resize(x, round(h * scale), round(w * scale))
        x = center_crop(x, out_h, out_w)
    else:  # longest
        scale = min(out_h / h, out_w / w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        x = resize(x, new_h, new_w)
        pad_h, pad_w = out_h - new_h, out_w - new_w
        top, left = pad_h // 2, pad_w // 2
        x = F.pad(x, (left, pad_w - left, top, pad_h - top), value=fill)
    # A resized (or padded, or cast) batch is ours: normalise it in place, saving a
    # [B, 3, S, S] allocation per step (page faults cost more than the arithmetic on a CPU).
    owned = x.untyped_storage().data_ptr() != images.untyped_storage().data_ptr()
    inplace = owned and x.is_contiguous() and not x.requires_grad
    return normalize_pixels(x, mean, std, inplace=inplace)


def resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bicubic, antialiased resize of [B, C, H, W] float images in [0, 1], as PIL resizes them.

    PIL (open_clip's and transformers' preprocessing, and the reference, which resizes the PIL
    image it decoded) resizes 8-bit images: pixels are rounded to uint8, resized with PIL's
    antialiased bicubic (a = -0.5) and rounded to uint8 again. This does the same, and returns
    float32 multiples of 1/255. On the CPU it runs torch's uint8 kernel (ported from Pillow-SIMD;
    its fixed-point weights put it within 2 uint8 levels of PIL); on other devices PIL's two
    rounded passes are emulated in float. Images with a non-finite pixel come back all NaN
    (their reward is NaN). Images that need gradients are resized in float, without rounding,
    clamped to [0, 1] afterwards as PIL's output is.
    """
    if tuple(x.shape[-2:]) == (h, w):
        return x
    if not (x.shape[-1] and x.shape[-2] and h > 0 and w > 0):
        raise SafediffError(f"cannot resize images of size {tuple(x.shape[-2:])} to {(h, w)}")
    if x.requires_grad:
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        return x.clamp_(0.0, 1.0)
    if x.device.type == "cpu":
        return _resize_uint8_cpu(x, h, w)
    return _resize_rounded(x, h, w)


def _resize_rounded(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`resize` off the CPU: PIL's two uint8 passes emulated in float (no uint8 kernel needed).

    PIL resizes rows first, then columns, rounding to uint8 (half up) and clipping to [0, 255]
    after each pass; the clip between the passes matters on sharp edges, where bicubic
    overshoots.
    """
    x = x.to(torch.float32)
    finite = torch.isfinite(x.sum(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    y = x.mul(255.0).add_(0.5).clamp_(0.0, 255.0).floor_()
    for size in ((x.shape[-2], w), (h, w)):
        y = F.interpolate(y, size=size, mode="bicubic", antialias=True, align_corners=False)
        y = y.add_(0.5).floor_().clamp_(0.0, 255.0)
    return torch.where(finite, y.div_(255.0), torch.full_like(y, float("nan")))


def _resize_uint8_cpu(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`resize` on the CPU: quantise to uint8 in cache-sized steps, then torch's uint8 kernel.

    The images are read from memory once: each step scales, rounds and clamps at most
    `_QUANT_CHUNK` pixels in a reused float buffer (kept in a core's L2 cache) and casts them
    into a uint8 block of whole images, which is resized while it is still in cache. The uint8
    kernel is hand-vectorised (AVX2, from Pillow-SIMD); torch's float antialiased kernel is
    generic C++, slower where the output is large (512 to 224 px; bench/RESULTS.md).
    """
    b, c, ih, iw = x.shape
    per_image = c * ih * iw
    src = x.detach().to(torch.float32).reshape(b, per_image)  # a view if contiguous float32
    step = min(per_image, _QUANT_CHUNK)  # pixels per pass within one image
    block = max(1, _QUANT_CHUNK // per_image)  # whole images per resize call
    scratch = torch.empty(block * step)
    scratch_np = scratch.numpy()
    q = torch.empty(block, c, ih, iw, dtype=torch.uint8)
    q_np = q.numpy().reshape(block, per_image)
    sums = torch.empty(b, -(-per_image // step))  # per-step pixel sums: non-finite iff a pixel is
    out = torch.empty(b, c, h, w)
    with np.errstate(invalid="ignore"):  # NaN pixels cast to 0; their images are set NaN below
        for b0 in range(0, b, block):
            b1 = min(b, b0 + block)
            n = b1 - b0
            for j, c0 in enumerate(range(0, per_image, step)):
                c1 = min(per_image, c0 + step)
                f = scratch[: n * (c1 - c0)].view(n, c1 - c0)
                torch.mul(src[b0:b1, c0:c1], 255.0, out=f).add_(0.5)
                torch.sum(f, dim=1, out=sums[b0:b1, j])
                f.clamp_(0.0, 255.0)
                # numpy's float -> uint8 cast truncates (round half up here) and is several times
                # faster than torch's copy_ into uint8.
                np.copyto(q_np[:n, c0:c1], scratch_np[: f.numel()].reshape(n, -1), casting="unsafe")
            small = F.interpolate(q[:n], size=(h, w), mode="bicubic", antialias=True)
            torch.div(small, 255.0, out=out[b0:b1])
    bad = ~torch.isfinite(sums).all(dim=1)
    if bad.any():
        out[bad] = float("nan")
    return out


def resize_shortest(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision Resize(int): the short side -> size, the long side -> int(size * long / short)."""
    h, w = x.shape[-2:]
    if h <= w:
        return resize(x, size, int(size * w / h))
    return resize(x, int(size * h / w), size)


def center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision's center crop (top = round((H - h) / 2)); zero-pads images that are smaller."""
    ih, iw = x.shape[-2:]
    if ih < h or iw < w:
        ph, pw = max(h - ih, 0), max(w - iw, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        ih, iw = x.shape[-2:]
    top = round((ih - h) / 2.0)
    left = round((iw - w) / 2.0)
    return x[..., top : top + h, left : left + w]


def normalize_pixels(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False
) -> torch.Tensor:
    """(x - mean) / std per channel; x [B, 3, H, W] float32.

    inplace: overwrite and return x (only for a tensor the caller owns); the same numbers.
    """
    mean_t = torch.tensor(tuple(mean), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(tuple(std), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    if inplace:
        return x.sub_(mean_t).div_(std_t)
    return torch.sub(x, mean_t).div_(std_t)  # one new tensor; the same numbers as (x - m) / s


def encode_images_chunked(
    encoder: ImageTextEncoder, images: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """encoder.encode_images over chunks of at most `chunk_size` images (None: one call).

    images [B, 3, H, W] in [0, 1] -> [B, D] float32. Chunking bounds activation memory only; the
    result does not depend on it (up to kernel-level float differences between batch sizes).
    """
    if chunk_size is None or images.shape[0] <= chunk_size:
        return encoder.encode_images(images)
    if chunk_size < 1:
        raise SafediffError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    parts = [encoder.encode_images(c) for c in images.split(chunk_size, dim=0)]
    return torch.cat(parts, dim=0)


class PromptCache:
    """Per-prompt tensors computed once and reused, owned by one reward instance.

    Each entry maps a prompt string to a tuple of tensors (one row per field, e.g. the steered
    target [D], the safety score [] and the gate weight []). `get_many` computes every distinct
    missing prompt in a single batched call. Clear it with `clear()` (e.g. once per epoch, or
    whenever the encoder or anchors change). `max_entries` bounds memory: when a batch would
    overflow it, the cache is emptied first (prompt sets are read in epochs, not streams).

    Counters: `hits`, `misses` (prompts computed) and `calls` (batched computes) since the last
    `reset_stats()`; tests use them to check that each prompt is encoded once.
    """

    def __init__(self, max_entries: int | None = 100_000):
        if max_entries is not None and max_entries < 1:
            raise SafediffError(f"PromptCache max_entries must be >= 1 or None, got {max_entries}")
        self.max_entries = max_entries
        self._store: dict[str, tuple[torch.Tensor, ...]] = {}
        self.reset_stats()

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._store

    def clear(self) -> None:
        """Forget every entry (stats are kept; see reset_stats)."""
        self._store.clear()

    def reset_stats(self) -> None:
        self.hits = 0
        self.misses = 0
        self.calls = 0

    def get_many(
        self,
        prompts: Sequence[str],
        compute: Callable[[list[str]], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        """Stacked fields for `prompts` ([B, ...] each), computing missing ones in one call.

        compute(new_prompts [N]) -> tuple of tensors, each [N, ...], one row per prompt.
        """
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._store))
        missing_set = set(missing)
        self.hits += sum(1 for p in prompts if p not in missing_set)
        if missing:
            if self.max_entries is not None and len(self._store) + len(missing) > self.max_entries:
                self._store.clear()
            fields = compute(missing)
            self.calls += 1
            self.misses += len(missing)
            for i, p in enumerate(missing):
                self._store[p] = tuple(f[i] for f in fields)
        rows = [self._store[p] for p in prompts]
        return tuple(torch.stack(col, dim=0) for col in zip(*rows, strict=True))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [..., D] scaled to unit L2 norm, in float32."""
    return F.normalize(x.to(torch.float32), dim=-1)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'float32'/'fp32', 'float16'/'fp16'/'half', 'bfloat16'/'bf16', or a torch.dtype -> torch.dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    key = str(dtype).lower().removeprefix("torch.")
    if key not in table:
        raise SafediffError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return table[key]


def check_unit_rows(x: torch.Tensor, who: str, atol: float = 1e-3) -> None:
    """Raise SafediffError unless every row of `x` [B, D] has unit norm (an encoder contract)."""
    norms = x.norm(dim=-1)
    if x.numel() and not torch.allclose(norms, torch.ones_like(norms), atol=atol):
        worst = float((norms - 1).abs().max())
        raise SafediffError(
            f"{who}: embeddings must be L2-normalised (max |norm - 1| = {worst:.3g})"
        )


def is_finite_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast on `device` with `dtype`, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
