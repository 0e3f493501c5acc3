"""The one reward signature.

A reward takes images as float tensors in [0, 1] of shape [B, 3, H, W], the prompts that produced
them ([B] strings) and optional per-sample metadata, and returns a float32 tensor [B] on the images'
device. Higher is better. Rewards own their preprocessing and take devices and dtypes as
constructor arguments; they keep no module-level caches. NaN entries are allowed in the output:
the trainer skips the groups they fall in and logs how many.
"""

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class RewardFn(Protocol):
    """Callable reward: (images [B,3,H,W] in [0,1], prompts [B], metadata) -> rewards [B]."""

    name: str

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor: ...


def check_reward_output(rewards: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Validate a reward's output shape and return it as float32 [B]."""
    from safediff.errors import SafediffError

    if rewards.ndim != 1 or rewards.shape[0] != batch:
        raise SafediffError(
            f"reward {name!r} returned shape {tuple(rewards.shape)}; expected ({batch},)"
        )
    return rewards.to(torch.float32)
