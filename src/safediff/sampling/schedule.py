"""The noise schedule a DDIM sampler needs, as plain data (no internal step counter)."""

from dataclasses import dataclass
from typing import Any

import torch

from safediff.errors import SafediffError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DDIMSchedule:
    """alpha-bar values of a trained diffusion model and how inference timesteps are spaced.

    alphas_cumprod: [num_train_timesteps] float32, alpha-bar_t of the training schedule.
    final_alpha_cumprod: alpha-bar used as "previous" for the last step (1.0 when the scheduler
        config has set_alpha_to_one, else alphas_cumprod[0]), as in diffusers' DDIMScheduler.
    prediction_type: what the network predicts, "epsilon" or "v_prediction".
    steps_offset, timestep_spacing: diffusers' conventions ("leading", "trailing", "linspace").
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    timestep_spacing: str = "leading"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise SafediffError(
                f"prediction_type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> "DDIMSchedule":
        """Build from a diffusers scheduler config (DDIM, PNDM, ... share the beta fields)."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(dict(config))
        return cls(
            alphas_cumprod=ddim.alphas_cumprod.to(torch.float32).clone(),
            final_alpha_cumprod=float(ddim.final_alpha_cumprod),
            prediction_type=ddim.config.prediction_type,
            steps_offset=int(ddim.config.steps_offset),
            timestep_spacing=ddim.config.timestep_spacing,
        )

    def timesteps(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference timesteps and their predecessors, both [num_steps] int64, high noise first.

        prev_timesteps[i] is the timestep x_{t-1} lives at; -1 means "clean" (final_alpha_cumprod).
        Matches diffusers' DDIMScheduler.set_timesteps for the same config.
        """
        n_train = self.num_train_timesteps
        if not 1 <= num_steps <= n_train:
            raise SafediffError(f"num_steps must be in [1, {n_train}], got {num_steps}")
        if self.timestep_spacing == "leading":
            ratio = n_train // num_steps
            ts = (torch.arange(num_steps) * ratio).round().flip(0).to(
                torch.int64
            ) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ratio = n_train / num_steps
            ts = (torch.arange(n_train, 0, -ratio).round() - 1).to(torch.int64)
        elif self.timestep_spacing == "linspace":
            ts = torch.linspace(0, n_train - 1, num_steps).round().flip(0).to(torch.int64)
        else:
            raise SafediffError(f"timestep_spacing {self.timestep_spacing!r} is not supported")
        # diffusers' DDIM takes prev = t - n_train // num_steps for every spacing.
        prev = ts - n_train // num_steps
        prev = torch.where(prev < 0, torch.full_like(prev, -1), prev)
        return ts, prev

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha-bar at each timestep (float32, on the timesteps' device); -1 -> final value."""
        ac = self.alphas_cumprod.to(timesteps.device)
        final = torch.tensor(self.final_alpha_cumprod, dtype=ac.dtype, device=ac.device)
        safe_idx = timesteps.clamp(min=0)
        return torch.where(timesteps >= 0, ac[safe_idx], final)
