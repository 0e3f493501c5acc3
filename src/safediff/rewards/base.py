"""The one reward signature.

A reward takes images as float tensors in [0, 1] of shape [B, 3, H, W], the prompts that produced
them ([B] strings) and optional per-sample metadata, and returns a float32 tensor [B] on the images'
device. Higher is better. Rewards own their preprocessing and take devices and dtypes as
constructor arguments; they keep no module-level caches. NaN entries are allowed in the output:
the trainer skips the groups they fall in and logs how many.

Optional capabilities are declared as protocols, so callers ask `isinstance(reward, GatedReward)`
rather than probing attributes: `GatedReward` (a per-prompt gate weight, which grpo.kl_scope
'unsteered' and grpo.pg_scope 'steered' need) and `CachedReward` (a per-prompt cache the trainer
clears at each epoch).
"""

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class GatedReward(Protocol):
    """A reward that steers some prompts more than others (the steering reward)."""

    def prompt_targets(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """For prompts [B]: at least 'weight' [B] float32, the gate weight w in [0, 1] of each
        prompt (1 = fully steered, 0 = left to the plain reward)."""
        ...


@runtime_checkable
class CachedReward(Protocol):
    """A reward that caches per-prompt work; the trainer clears it at each epoch start."""

    def clear_cache(self) -> None:
        """Forget every cached prompt."""
        ...


def check_reward_output(rewards: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Validate a reward's output shape and return it as float32 [B]."""
    from safediff.errors import SafediffError

    if rewards.ndim != 1 or rewards.shape[0] != batch:
        raise SafediffError(
            f"reward {name!r} returned shape {tuple(rewards.shape)}; expected ({batch},)"
        )
    return rewards.to(torch.float32)
