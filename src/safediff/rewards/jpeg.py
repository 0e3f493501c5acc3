"""The reference's JPEG round-trip, for parity runs only (never in the default hot path).

SafeDiffusion-R1's training loop turns every generated image into a PIL image
(`(x * 255).astype(uint8)`: truncation, not rounding), saves it as a .jpg and reads it back
before the reward model sees it. `jpeg_roundtrip` reproduces that in memory so a reward can be
compared number for number with the reference: by default at the reference's quality, PIL's
default JPEG quality 75 (`REFERENCE_QUALITY`); the reference also resizes every image to 512 x 512
(PIL's default bicubic; `REFERENCE_RESIZE`, a no-op for SD 1.5's 512 px images) before saving,
which `resize_to` does. The round-trip is a parity path only: safediff's rewards score the decoded
images directly unless asked (`jpeg_parity`).
"""

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from safediff.errors import SafediffError

REFERENCE_QUALITY = 75
"""The JPEG quality of the reference's round-trip: PIL's default (its `pil.save(path.jpg)`)."""

REFERENCE_RESIZE = 512
"""The side the reference resizes every image to before saving it (`pil.resize((512, 512))`)."""


def jpeg_roundtrip(
    images: torch.Tensor,
    quality: int = REFERENCE_QUALITY,
    resize_to: int | None = None,
    truncate: bool = True,
) -> torch.Tensor:
    """images [B, 3, H, W] float in [0, 1] -> the same after tensor -> PIL -> JPEG -> tensor.

    quality: JPEG quality (1-95 is PIL's useful range); default the reference's 75.
    resize_to: resize each PIL image to S x S (PIL bicubic) before encoding, as the reference
        does with 512; None keeps the size.
    truncate: uint8 by truncation (the reference's astype) rather than rounding.
    Returns float32 [B, 3, H', W'] in [0, 1] on the input's device (H' = W' = resize_to if set).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise SafediffError(
            f"jpeg_roundtrip: images must be [B, 3, H, W], got {tuple(images.shape)}"
        )
    if not 1 <= int(quality) <= 100:
        raise SafediffError(f"jpeg_roundtrip: quality must be in [1, 100], got {quality}")
    x = images.detach().to(torch.float32).clamp(0, 1).cpu().numpy().transpose(0, 2, 3, 1) * 255.0
    x = x.astype(np.uint8) if truncate else np.rint(x).astype(np.uint8)
    out = []
    for arr in x:
        pil = Image.fromarray(arr)
        if resize_to is not None:
            pil = pil.resize((int(resize_to), int(resize_to)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        back = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(back.transpose(2, 0, 1).copy()))
    return torch.stack(out, dim=0).to(images.device)


def prepare_reward_images(
    images: torch.Tensor,
    prompts: Sequence[str],
    name: str,
    *,
    jpeg_parity: bool,
    jpeg_quality: int,
    jpeg_resize: int | None,
) -> torch.Tensor:
    """Check a reward's inputs (images [B, 3, H, W] in [0, 1], one prompt per image) and apply the
    reference's JPEG round-trip when `jpeg_parity` is on. Returns the images to score."""
    from safediff.rewards.encoders.base import check_images

    check_images(images, f"reward {name!r}")
    if len(prompts) != images.shape[0]:
        raise SafediffError(
            f"reward {name!r}: got {images.shape[0]} images but {len(prompts)} prompts"
        )
    if jpeg_parity:
        images = jpeg_roundtrip(images, quality=jpeg_quality, resize_to=jpeg_resize)
    return images
