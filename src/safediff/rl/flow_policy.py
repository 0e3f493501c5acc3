"""The flow-matching policy of GRPO (SD3 / SD3.5, FLUX): what the trainer calls instead of the
DDIM functions when the model's schedule is a `FlowSchedule`.

The trainer's skeleton (rollout -> score -> advantages -> clipped loss -> step) is the same for
both families; only three pieces differ, and they live here as plain functions:

- the rollout's SDE window (`rollout_window`): MixGRPO's mixed ODE-SDE sampling, a pure function of
  the config and the epoch (so a resumed run needs no window state);
- which stored transitions may be trained (`flow_trainable_steps`): the SDE steps of the window
  whose step std exceeds `grpo.min_step_std`;
- the log-probability of stored transitions with gradient (`stored_log_prob`, Flow-GRPO's
  `sde_step_with_logprob` re-scoring a stored x_next) and the KL to the reference policy
  (`flow_kl`, the closed form between two Gaussians of equal std, as Flow-GRPO's
  `(prev_sample_mean - prev_sample_mean_ref)^2 / (2 std^2)`).

Papers and reference code: Flow-GRPO (Liu et al., https://arxiv.org/abs/2505.05470,
yifan123/flow_grpo `train_sd3.py`); MixGRPO (Li et al., https://arxiv.org/abs/2507.21802,
Tencent-Hunyuan/MixGRPO `fastvideo/train_grpo_flux.py`). Departures (besides those of
`safediff.sampling.flow`): the window moves per trainer epoch (one rollout batch and its updates),
MixGRPO moves it per training iteration (pass `sampling.window_every` in epochs); FLUX-dev is
trained without CFG (its guidance is an input, as in MixGRPO), SD3 with CFG on the stored
negative embeddings (`grpo.train_cfg`, Flow-GRPO's `cfg=True`); the clip range acts on the same
"mean" (or "sum") log-prob as the DDIM trainer's.
"""

from typing import Any

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.sampling.ddim import gaussian_kl
from safediff.sampling.flow import (
    FlowSchedule,
    FlowStepOutput,
    FlowTrajectory,
    SDEWindow,
    flow_transition_log_prob,
    is_flow_schedule,
    resolve_flow_guidance,
    sde_std,
    sde_window,
)

FLOW_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
"""`lora.target_modules` for SD3 / SD3.5 and FLUX transformers: the image stream's attention
projections and the text stream's (`add_*_proj`, `to_add_out`) of their joint attention, as
Flow-GRPO's LoRA (there spelled attn.to_q ...; the bare suffixes here also reach SD3.5's second
self-attention `attn2` and FLUX's single blocks' to_q/k/v)."""

ROW_KEYS = ("x_t", "x_prev", "step_index")
"""The per-transition entries of `transition_args` besides cond and uncond (the KL term selects
rows of these)."""


def is_flow_model(model: Any) -> bool:
    """Whether `model` (a `T2IModel`) is a flow-matching model (its schedule a `FlowSchedule`)."""
    return is_flow_schedule(getattr(model, "schedule", None))


def window_limit(num_steps: int, train_last_step: bool) -> int:
    """The steps [0, limit) the SDE window may cover: all S, or S - 1 when the last step is not
    trained (MixGRPO's and Flow-GRPO's reference never train the last step)."""
    return num_steps if train_last_step or num_steps == 1 else num_steps - 1


def rollout_window(sampling: Any, epoch: int, *, train_last_step: bool = True) -> SDEWindow | None:
    """The rollout's SDE window at `epoch` from a `SamplingConfig` (None: every step is an SDE
    step, Flow-GRPO's full-SDE sampling; window_size > 0: MixGRPO's window, see
    `safediff.sampling.flow.sde_window` for the rules)."""
    size = int(getattr(sampling, "window_size", 0) or 0)
    if size == 0:
        return None
    n = int(sampling.num_steps)
    return sde_window(
        n,
        size,
        epoch,
        sampling.window_rule,
        start=int(sampling.window_start),
        stride=int(sampling.window_stride),
        every=int(sampling.window_every),
        limit=window_limit(n, train_last_step),
    )


def flow_trainable_steps(
    sigmas: Tensor,
    sde_mask: Tensor,
    noise_level: float,
    *,
    train_last_step: bool,
    min_step_std: float,
) -> list[int]:
    """Indices of the steps of a flow trajectory that may be trained: SDE steps (`sde_mask` [S]
    bool; ODE steps have no log-prob) whose std std_t * sqrt(-dt) exceeds max(0, min_step_std),
    all but the last unless `train_last_step`. sigmas: [S + 1] the trajectory's."""
    n = int(sde_mask.shape[0])
    if sigmas.shape[0] != n + 1:
        raise SafediffError(f"{sigmas.shape[0]} sigmas for a trajectory of {n} steps")
    sig = sigmas.detach().to("cpu", torch.float32)
    idx = torch.arange(n)
    std = sde_std(sig, idx, noise_level) * torch.sqrt(sig[:-1] - sig[1:])
    mask = sde_mask.detach().cpu()
    limit = n if train_last_step else n - 1
    return [s for s in range(limit) if bool(mask[s]) and float(std[s]) > max(0.0, min_step_std)]


def planned_trainable_steps(
    schedule: FlowSchedule,
    latent_shape: tuple[int, ...] | None,
    sampling: Any,
    *,
    train_last_step: bool,
    min_step_std: float,
) -> list[int]:
    """`flow_trainable_steps` of epoch 0's rollout, without sampling: the trainer's update counts
    (`update_shape`). latent_shape: [C, h, w] of the model (FLUX's shift depends on it) or None. The window keeps its size at every epoch, so the count is the same."""
    n = int(sampling.num_steps)
    if latent_shape is not None:
        schedule = schedule.for_latent(*latent_shape[1:])
    sigmas = schedule.sigmas(n)
    window = rollout_window(sampling, 0, train_last_step=train_last_step)
    mask = window.mask if window is not None else torch.ones(n, dtype=torch.bool)
    return flow_trainable_steps(
        sigmas,
        mask,
        float(sampling.eta),
        train_last_step=train_last_step,
        min_step_std=min_step_std,
    )


def train_cfg_scale(unet: nn.Module, guidance_scale: float) -> float:
    """The CFG scale the stored transitions are re-scored with: `guidance_scale` for SD3, 1 for a
    transformer with a guidance input (FLUX-dev: no unconditional pass)."""
    return resolve_flow_guidance(unet, guidance_scale, None)[0]


def transition_args(
    traj: FlowTrajectory,
    j: Tensor,
    s: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    *,
    num_train_timesteps: int,
    guidance_scale: float,
    reduction: str,
    device: torch.device | str,
) -> dict[str, Any]:
    """The keyword arguments of `stored_log_prob` for M stored transitions (sample j[m], step
    s[m]) of `traj`: x_t = latents[j, s], x_prev = latents[j, s + 1] ([M, C, h, w]),
    step_index = s [M], cond [M, L, D], uncond [M, L, D] or None, and the trajectory's sigmas,
    noise level and distilled guidance. guidance_scale: the CFG scale (`train_cfg_scale`)."""
    if traj.sigmas is None:
        raise SafediffError("a flow trajectory without sigmas cannot be re-scored")
    return {
        "sigmas": traj.sigmas,
        "num_train_timesteps": int(num_train_timesteps),
        "x_t": traj.latents[j, s].to(device),
        "x_prev": traj.latents[j, s + 1].to(device),
        "step_index": s.to(device),
        "cond": cond,
        "uncond": uncond,
        "guidance_scale": float(guidance_scale),
        "noise_level": float(traj.noise_level),
        "reduction": reduction,
        "guidance": traj.guidance,
    }


def stored_log_prob(
    unet: nn.Module,
    *,
    sigmas: Tensor,
    num_train_timesteps: int,
    x_t: Tensor,
    x_prev: Tensor,
    step_index: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
    noise_level: float,
    reduction: str,
    guidance: float | None,
) -> FlowStepOutput:
    """log p(x_prev | x_t) of M stored transitions under `unet`, with gradient (log_prob [M],
    mean [M, C, h, w], std [M]): `flow_transition_log_prob` with `transition_args`' names."""
    return flow_transition_log_prob(
        unet,
        sigmas,
        num_train_timesteps,
        x_t,
        x_prev,
        step_index,
        cond,
        uncond,
        guidance_scale,
        noise_level,
        reduction,
        guidance=guidance,
    )


def flow_kl(out: FlowStepOutput, ref: FlowStepOutput, reduction: str) -> Tensor:
    """KL(pi_theta || pi_ref) per transition [M] between the policy's and the reference's step
    Gaussians (equal std, the step's own): mean over elements of (mu - mu_ref)^2 / (2 std^2)
    ("mean") or its sum ("sum"); 0 at ODE steps. Flow-GRPO's reference divides by 2 std^2 and
    means over the latent dims, i.e. the "mean" reduction."""
    return gaussian_kl(out.mean, ref.mean, out.std, reduction=reduction)


def check_flow_training(model: Any, sampling: Any) -> None:
    """One-line errors for settings a flow GRPO run cannot use (and a window on a DDIM model)."""
    flow = is_flow_model(model)
    if not flow and int(getattr(sampling, "window_size", 0) or 0) > 0:
        raise SafediffError(
            "sampling.window_size (the SDE window) applies to flow models (SD3, FLUX) only; set "
            "it to 0 for a DDIM model"
        )
    if flow and int(getattr(sampling, "window_size", 0) or 0) > int(sampling.num_steps):
        raise SafediffError(
            f"sampling.window_size {sampling.window_size} exceeds sampling.num_steps "
            f"{sampling.num_steps}"
        )


__all__ = (
    "FLOW_LORA_TARGETS",
    "ROW_KEYS",
    "check_flow_training",
    "flow_kl",
    "flow_trainable_steps",
    "is_flow_model",
    "planned_trainable_steps",
    "rollout_window",
    "stored_log_prob",
    "train_cfg_scale",
    "transition_args",
    "window_limit",
)
