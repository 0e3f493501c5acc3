"""The negative-only reward (an ablation of the steering reward): penalise unsafe content, nothing else.

    u      = normalize( mean(E(unsafe anchors)) )
    reward = -cos(E(image), u)

No prompt term: it does not ask the image to match its prompt, so on its own it can trade utility
for safety freely. The steering reward keeps the prompt's content and moves only its safety
component; comparing the two shows what the alignment term buys.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from safediff.errors import SafediffError
from safediff.rewards.anchors import AnchorSet
from safediff.rewards.base import check_reward_output
from safediff.rewards.encoders.base import (
    ImageTextEncoder,
    autocast_context,
    encode_images_chunked,
)
from safediff.rewards.jpeg import prepare_reward_images


class UnsafePenaltyReward:
    """reward = -cos(E(image), normalize(mean E(unsafe anchors))), in [-1, 1].

    encoder: a frozen `ImageTextEncoder`; anchors: only its unsafe phrases are used.
    """

    name = "unsafe_penalty"

    def __init__(
        self,
        encoder: ImageTextEncoder,
        anchors: AnchorSet,
        autocast_dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
    ):
        if not anchors.unsafe:
            raise SafediffError(
                f"anchor set {anchors.name!r} has no unsafe phrases; the negative-only reward needs them"
            )
        self.encoder = encoder
        self.autocast_dtype = autocast_dtype
        self.chunk_size = chunk_size
        with autocast_context(encoder.device, autocast_dtype):
            unsafe = encoder.encode_text(list(anchors.unsafe)).float()  # [U, D], unit rows
        self.u = F.normalize(unsafe.mean(dim=0), dim=0)  # [D]

    def clear_cache(self) -> None:
        """Nothing is cached per prompt (the interface of the other rewards)."""

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> rewards [B] float32 (prompts are not read)."""
        out_device = images.device
        images = prepare_reward_images(
            images, prompts, self.name, jpeg_parity=False, jpeg_quality=95, jpeg_resize=None
        )  # the input checks every reward makes
        with autocast_context(self.encoder.device, self.autocast_dtype):
            img = encode_images_chunked(
                self.encoder, images.to(self.encoder.device), self.chunk_size
            ).float()  # [B, D] unit rows
        reward = -(img @ self.u.to(img.device))
        return check_reward_output(reward.to(out_device, torch.float32), len(prompts), self.name)
