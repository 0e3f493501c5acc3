"""Brightness: a placeholder reward with a known optimum, for smoke runs and trainer tests.

It needs no model and no weights, so a training run can be checked end to end (does the mean
reward go up?) before a real reward is plugged in.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch

from safediff.errors import SafediffError
from safediff.rewards.base import check_reward_output

# Images slightly outside [0, 1] (decoder overshoot, rounding) are accepted; anything beyond this
# margin means the caller passed the wrong range (e.g. [-1, 1] or [0, 255]).
_RANGE_TOL = 0.05


class BrightnessReward:
    """reward = mean pixel intensity in [0, 1], or -|mean - target| when `target` is given.

    target: optional brightness in [0, 1] to aim for; None rewards brighter images.
    device: accepted for the uniform builder signature; there is nothing to place (no model).
        The output lives on the images' device.
    """

    name = "brightness"

    def __init__(self, target: float | None = None, device: torch.device | str | None = None):
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, int | float):
                raise SafediffError(
                    f"reward 'brightness': target must be a number in [0, 1] or null, got {target!r}"
                )
            if not (math.isfinite(target) and 0.0 <= target <= 1.0):
                raise SafediffError(
                    f"reward 'brightness': target must be in [0, 1], got {target!r}"
                )
            target = float(target)
        self.target = target
        self.device = device

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], prompts [B] (unused) -> rewards [B] float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise SafediffError(
                f"reward 'brightness': images must be [B, 3, H, W], got {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise SafediffError(
                f"reward 'brightness': got {images.shape[0]} images but {len(prompts)} prompts"
            )
        x = images.detach().to(torch.float32)
        finite = x[torch.isfinite(x)]
        if finite.numel() and (finite.min() < -_RANGE_TOL or finite.max() > 1 + _RANGE_TOL):
            raise SafediffError(
                f"reward 'brightness': image values span [{finite.min().item():.3g}, "
                f"{finite.max().item():.3g}]; expected [0, 1] (convert from [-1, 1] or [0, 255])"
            )
        mean = x.mean(dim=(1, 2, 3))  # [B]; NaN pixels give a NaN reward (its group is skipped)
        reward = mean if self.target is None else -(mean - self.target).abs()
        return check_reward_output(reward, images.shape[0], self.name)
