"""Plain image-text alignment: cos(E(image), E(prompt)) with a CLIP-family encoder.

With HPSv2.1 as the encoder this is the HPSv2 score (the cosine of the normalised embeddings, no
logit scale) without steering, i.e. the baseline reward SafeDiffusion-R1 steers; with a CLIP it is
the CLIP score divided by 100 (set `scale=100` for the usual CLIP-score units). Prompts are encoded
once each and cached (`clear_cache()` per epoch); images are scored as one batch in torch.
"""

from collections.abc import Sequence
from typing import Any

import torch

from safediff.rewards.base import check_reward_output
from safediff.rewards.encoders.base import (
    ImageTextEncoder,
    PromptCache,
    autocast_context,
    encode_images_chunked,
)
from safediff.rewards.jpeg import REFERENCE_QUALITY, prepare_reward_images


class AlignmentReward:
    """reward = scale * cos(E(image), E(prompt)).

    encoder: a frozen `ImageTextEncoder`.
    scale: multiplies the cosine (1 for HPSv2-style scores, 100 for CLIP score).
    jpeg_parity, jpeg_quality, jpeg_resize: reproduce the reference's JPEG round-trip before
        scoring (its code: PIL resize to 512, then PIL's default quality 75; see rewards/jpeg.py).
    autocast_dtype: run the encoders under torch.autocast with this dtype (None: off).
    chunk_size: encode at most this many images per call (None: the whole batch at once).
    """

    name = "alignment"

    def __init__(
        self,
        encoder: ImageTextEncoder,
        scale: float = 1.0,
        jpeg_parity: bool = False,
        jpeg_quality: int = REFERENCE_QUALITY,
        jpeg_resize: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
        cache_size: int | None = 100_000,
    ):
        self.encoder = encoder
        self.scale = float(scale)
        self.jpeg_parity = bool(jpeg_parity)
        self.jpeg_quality = int(jpeg_quality)
        self.jpeg_resize = jpeg_resize
        self.autocast_dtype = autocast_dtype
        self.chunk_size = chunk_size
        self.cache = PromptCache(cache_size)

    def clear_cache(self) -> None:
        """Forget every cached prompt embedding (call at the start of each epoch)."""
        self.cache.clear()

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor]:
        with autocast_context(self.encoder.device, self.autocast_dtype):
            return (self.encoder.encode_text(prompts).float(),)

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], prompts [B] -> rewards [B] float32 in [-scale, scale]."""
        out_device = images.device
        images = prepare_reward_images(
            images,
            prompts,
            self.name,
            jpeg_parity=self.jpeg_parity,
            jpeg_quality=self.jpeg_quality,
            jpeg_resize=self.jpeg_resize,
        )
        (text,) = self.cache.get_many(prompts, self._encode_prompts)  # [B, D]
        with autocast_context(self.encoder.device, self.autocast_dtype):
            img = encode_images_chunked(self.encoder, images, self.chunk_size).float()
        rewards = self.scale * (img * text).sum(dim=-1)
        return check_reward_output(rewards.to(out_device), images.shape[0], self.name)
