"""A weighted sum of rewards: r = sum_i w_i * r_i(images, prompts, metadata).

Every component sees the same batch. A NaN in any component makes that sample's sum NaN (the
trainer then skips its group), so a broken component is visible rather than silently diluted.
"""

from collections.abc import Sequence
from typing import Any

import torch

from safediff.errors import SafediffError
from safediff.rewards.base import RewardFn, check_reward_output


class WeightedReward:
    """components: (weight, reward) pairs; the result is sum_i weight_i * reward_i, [B] float32."""

    name = "weighted"

    def __init__(self, components: Sequence[tuple[float, RewardFn]]):
        if not components:
            raise SafediffError("weighted reward needs at least one (weight, reward) component")
        checked = []
        for i, pair in enumerate(components):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise SafediffError(f"weighted reward component {i} must be (weight, reward)")
            weight, reward = pair
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise SafediffError(f"weighted reward component {i}: weight must be a number")
            if not callable(reward):
                raise SafediffError(f"weighted reward component {i}: reward must be callable")
            checked.append((float(weight), reward))
        self.components = checked

    def clear_cache(self) -> None:
        """Clear every component's prompt cache (components without one are skipped)."""
        for _, reward in self.components:
            clear = getattr(reward, "clear_cache", None)
            if callable(clear):
                clear()

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The total ('reward') and each component's rewards (keyed by its name), [B] each."""
        batch = images.shape[0]
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(batch, dtype=torch.float32, device=images.device)
        for i, (weight, reward) in enumerate(self.components):
            name = getattr(reward, "name", f"component{i}")
            r = check_reward_output(reward(images, prompts, metadata), batch, name)
            key = name if name not in out and name != "reward" else f"{name}_{i}"
            out[key] = r.to(images.device)
            total = total + weight * out[key]
        out["reward"] = total
        return out

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], prompts [B] -> sum_i w_i r_i, [B] float32."""
        return self.score(images, prompts, metadata)["reward"]
