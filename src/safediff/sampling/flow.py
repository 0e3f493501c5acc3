"""Flow-matching sampling with log-probabilities: the schedule, the SDE step, the window, rollouts.

Rectified flow (SD3 / SD3.5, FLUX): x_t = (1 - t) x0 + t eps, the network predicts the velocity
v = eps - x0, and sampling runs t (the scheduler's sigma, after its shift) from 1 to 0. The ODE
sampler is diffusers' FlowMatchEulerDiscreteScheduler: x_next = x_t + (t_next - t) v.

Flow-GRPO (Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL",
https://arxiv.org/abs/2505.05470, eq. (9)-(12); reference `sde_step_with_logprob` in
yifan123/flow_grpo) replaces the ODE by an SDE with the same marginals, so each step is a Gaussian
with a log-density that GRPO can train on. `flow_sde_step` is that step as a pure function (no
scheduler object, no step counter): given a stored x_next it re-scores the transition, batched over
samples sitting at different steps. With noise level a = 0 it is the Euler ODE step exactly.

MixGRPO (Li et al., "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE",
https://arxiv.org/abs/2507.21802): SDE steps only inside a window of the trajectory, ODE steps
elsewhere, and only the window's transitions trained; `sde_window` says which steps those are at a
given epoch.

`flow_rollout` samples trajectories (per-sample CPU generators, so batched == one at a time) and
`flow_transition_log_prob` recomputes stored transitions' log-probs with gradient: the two pieces a
GRPO loss needs, mirroring `rollout` / `transition_log_prob` of sampling/rollout.py.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.sampling.ddim import REDUCTIONS
from safediff.sampling.rollout import (
    Trajectory,
    batch_conditioning,
    check_sampling_inputs,
    draw_noise,
    initial_latents,
)

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))
TIME_SHIFT_TYPES = ("exponential", "linear")
SIGMA_SPACINGS = ("scheduler", "flux")
WINDOW_RULES = ("fixed", "sliding", "cyclic")
# FlowMatchEulerDiscreteScheduler options this module does not reproduce (refused when set).
_UNSUPPORTED = (
    "invert_sigmas",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


# ---------------------------------------------------------------------------------------------
# The schedule


def flow_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu of resolution-dependent shifting: linear in the number of image tokens, base_shift at
    base_seq_len and max_shift at max_seq_len (diffusers' `calculate_shift`, FLUX's defaults)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Static shift (SD3: 3.0): s' = shift * s / (1 + (shift - 1) s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: Tensor, kind: str = "exponential") -> Tensor:
    """Dynamic shift (FLUX): e^mu / (e^mu + (1/s - 1)) ("exponential") or mu / (mu + (1/s - 1))."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return mu / (mu + (1 / sigmas - 1))


@dataclass(frozen=True)
class FlowSchedule:
    """The sigmas of diffusers' FlowMatchEulerDiscreteScheduler, as plain data.

    num_train_timesteps: N; the transformer's timestep is t = sigma * N (FLUX's adapter divides
        by N again, as FluxPipeline does).
    shift: static shift (SD3 / SD3.5: 3.0); unused with dynamic shifting.
    use_dynamic_shifting: FLUX's resolution-dependent shift, mu = `flow_shift_mu(image_seq_len,
        base_image_seq_len, max_image_seq_len, base_shift, max_shift)`, applied by `time_shift`.
    time_shift_type: "exponential" (FLUX) or "linear".
    sigma_spacing: how the pipeline spaces the unshifted sigmas. "scheduler": the scheduler's own
        linspace(sigma_max, sigma_min, S) of its init-time sigmas (StableDiffusion3Pipeline passes
        no sigmas); "flux": linspace(1, 1/S, S) (what FluxPipeline passes).
    image_seq_len: image tokens of one latent at the model's resolution ((h/2) * (w/2) for
        patch size 2); needed with dynamic shifting.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    sigma_spacing: str = "scheduler"
    image_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise SafediffError(
                f"time_shift_type {self.time_shift_type!r} is not supported; use {TIME_SHIFT_TYPES}"
            )
        if self.sigma_spacing not in SIGMA_SPACINGS:
            raise SafediffError(
                f"sigma_spacing {self.sigma_spacing!r} is not supported; use {SIGMA_SPACINGS}"
            )
        if self.use_dynamic_shifting and self.image_seq_len is None:
            raise SafediffError(
                "a flow schedule with dynamic shifting needs image_seq_len (image tokens per latent)"
            )
        if self.shift <= 0 or self.num_train_timesteps < 1:
            raise SafediffError(
                f"flow schedule needs shift > 0 and num_train_timesteps >= 1, got {self.shift} "
                f"and {self.num_train_timesteps}"
            )

    @classmethod
    def from_scheduler_config(
        cls,
        config: dict[str, Any],
        *,
        sigma_spacing: str = "scheduler",
        image_seq_len: int | None = None,
    ) -> "FlowSchedule":
        """From a FlowMatchEulerDiscreteScheduler config (dict or FrozenDict)."""
        cfg = dict(config)
        bad = [k for k in _UNSUPPORTED if cfg.get(k)]
        if bad:
            raise SafediffError(
                f"flow scheduler options {', '.join(bad)} are not supported by safediff's flow "
                "sampler; use the plain FlowMatchEulerDiscreteScheduler config"
            )
        return cls(
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            shift=float(cfg.get("shift", 1.0)),
            use_dynamic_shifting=bool(cfg.get("use_dynamic_shifting", False)),
            base_shift=float(cfg.get("base_shift") or 0.5),
            max_shift=float(cfg.get("max_shift") or 1.15),
            base_image_seq_len=int(cfg.get("base_image_seq_len") or 256),
            max_image_seq_len=int(cfg.get("max_image_seq_len") or 4096),
            time_shift_type=str(cfg.get("time_shift_type", "exponential")),
            sigma_spacing=sigma_spacing,
            image_seq_len=image_seq_len,
        )

    def mu(self) -> float:
        """mu of the dynamic shift at `image_seq_len` (see `flow_shift_mu`)."""
        if self.image_seq_len is None:
            raise SafediffError("mu needs image_seq_len")
        return flow_shift_mu(
            self.image_seq_len,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift,
            self.max_shift,
        )

    def sigmas(self, num_steps: int) -> Tensor:
        """[S + 1] float32 sigmas from 1 (pure noise) down to the final 0, as the scheduler's
        `set_timesteps` makes them for the pipeline (`sigma_spacing`)."""
        if num_steps < 1:
            raise SafediffError(f"flow sampling needs num_steps >= 1, got {num_steps}")
        n = self.num_train_timesteps
        if self.sigma_spacing == "flux":
            # the pipeline's float64 linspace, cast to float32 by set_timesteps before shifting
            base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
            base = base.to(torch.float32)
        else:
            # The scheduler's init-time sigmas, in float32 as it computes them: sigma_max = 1 and
            # sigma_min = 1/N, shifted statically unless the shift is dynamic.
            lo = torch.tensor(1.0 / n, dtype=torch.float32)
            if not self.use_dynamic_shifting:
                lo = shift_sigmas(lo, self.shift)
            base = torch.linspace(n * 1.0, float(lo) * n, num_steps, dtype=torch.float64) / n
        if self.use_dynamic_shifting:
            sig = time_shift(self.mu(), base, self.time_shift_type)
        else:
            sig = shift_sigmas(base, self.shift)
        return torch.cat([sig.to(torch.float32), torch.zeros(1)])

    def for_latent(self, height: int, width: int, patch_size: int = 2) -> "FlowSchedule":
        """This schedule for latents of height x width cells: image_seq_len = (h/p) * (w/p), the
        number of image tokens, which sets FLUX's dynamic shift (FluxPipeline and
        StableDiffusion3Pipeline compute mu from the latents they sample)."""
        tokens = (height // patch_size) * (width // patch_size)
        return self if tokens == self.image_seq_len else replace(self, image_seq_len=tokens)

    def timesteps(self, num_steps: int) -> Tensor:
        """[S] float32 transformer timesteps sigma * N of the S steps (high noise first)."""
        return self.sigmas(num_steps)[:-1] * self.num_train_timesteps


def is_flow_schedule(schedule: Any) -> bool:
    """Whether a model's `schedule` is a `FlowSchedule` (flow-matching model)."""
    return isinstance(schedule, FlowSchedule)


# ---------------------------------------------------------------------------------------------
# The step


@dataclass
class FlowStepOutput:
    """One flow transition x_t -> x_next.

    prev_sample: [B, C, h, w] float32, x_next (sampled, or the stored one passed in).
    log_prob: [B] float32, log p(x_next | x_t) reduced over non-batch dims; zeros where std == 0.
    mean: [B, C, h, w] float32, the Gaussian's mean (carries the network's gradient).
    std: [B] float32, the step's standard deviation std_t * sqrt(-dt) (0 for an ODE step).
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def x0_from_velocity(sample: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """x0 = x_t - t v (rectified flow, v = eps - x0). sigma: float or [B] (broadcast)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (sample.ndim - 1)))
    return sample.to(torch.float32) - sigma * velocity.to(torch.float32)


def eps_from_velocity(sample: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """eps = x_t + (1 - t) v. sigma: float or [B]."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (sample.ndim - 1)))
    return sample.to(torch.float32) + (1 - sigma) * velocity.to(torch.float32)


def sde_std(sigmas: Tensor, step_index: Tensor, noise_level: float) -> Tensor:
    """std_t = a * sqrt(t / (1 - t)) at the steps `step_index` ([B] int64 -> [B] float32).

    At t = 1 the root's denominator uses sigmas[1] instead of t (1 - 1 = 0), as the reference
    does (its `sigma_max = sigmas[1]`).
    """
    sigmas = sigmas.to(torch.float32)
    t = sigmas[step_index]
    denom_t = torch.where(t == 1, sigmas[1].expand_as(t), t)
    return noise_level * torch.sqrt(t / (1 - denom_t))


def flow_sde_step(
    sigmas: Tensor,
    velocity: Tensor,
    sample: Tensor,
    step_index: Tensor | int,
    noise_level: float,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    reduction: str = "mean",
) -> FlowStepOutput:
    """Take (or re-score) one Flow-GRPO SDE step x_t -> x_next with its Gaussian log-probability.

    Args:
        sigmas: [S + 1] the trajectory's sigmas (`FlowSchedule.sigmas(S)`), 1 ... 0.
        velocity: [B, C, h, w] the network's v at (x_t, t) (after CFG), any float dtype.
        sample: [B, C, h, w] x_t.
        step_index: [B] int64 (or an int for all), i with t = sigmas[i], t_next = sigmas[i + 1];
            samples may sit at different steps.
        noise_level: a >= 0 (Flow-GRPO uses 0.7). 0: the deterministic Euler ODE step.
        noise: [B, C, h, w] z ~ N(0, I) to sample x_next; or
        prev_sample: [B, C, h, w] a stored x_next to re-score. Exactly one of the two.
        reduction: "mean" (the reference's) or "sum" over the non-batch dims, with the meaning of
            `ddim_step_with_logprob`'s (a PPO clip range on a "mean" log-prob bounds the
            geometric mean of the per-element ratios).

    Formulas (DESIGN.md section 9; dt = t_next - t < 0):
        std_t = a * sqrt(t / (1 - t))                 (`sde_std`; t = 1 -> sigmas[1] below)
        mean  = x_t + [v + std_t^2 / (2 t) * (x_t + (1 - t) v)] * dt
              = x_t + [v + std_t^2 / (2 t) * eps] * dt  (eps = x_t + (1 - t) v)
        x_next = mean + std_t * sqrt(-dt) * z
        log p = sum/mean of -(x_next - mean)^2 / (2 s^2) - log s - log sqrt(2 pi), s = std_t sqrt(-dt)
    x_next is detached in the log-prob (gradient only through the mean), as in the reference.
    With a = 0 the step is Euler's x_t + dt v (FlowMatchEulerDiscreteScheduler.step); its
    log-density does not exist and log_prob is zeros (training needs a > 0).

    Departures from the reference: the reference reads sigma_max = sigmas[1] of the scheduler
    object (the same number here); it recovers the step index from a float timestep lookup, here
    the index is passed in (no float matching); everything is computed in float32.
    """
    if reduction not in REDUCTIONS:
        raise SafediffError(f"reduction {reduction!r} is not supported; use one of {REDUCTIONS}")
    if (noise is None) == (prev_sample is None):
        raise SafediffError(
            "flow_sde_step needs exactly one of noise= (to sample x_next) or prev_sample= "
            "(to re-score a stored x_next)"
        )
    if not noise_level >= 0:
        raise SafediffError(f"flow noise level must be >= 0, got {noise_level}")
    if velocity.shape != sample.shape:
        raise SafediffError(
            f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} must match"
        )
    given = noise if noise is not None else prev_sample
    if given.shape != sample.shape:
        raise SafediffError(
            f"{'noise' if noise is not None else 'prev_sample'} has shape {tuple(given.shape)}; "
            f"expected the sample's {tuple(sample.shape)}"
        )
    batch, device = sample.shape[0], sample.device
    idx = torch.as_tensor(step_index, device=device).to(torch.int64)
    idx = idx.expand(batch) if idx.ndim == 0 else idx
    n_steps = sigmas.shape[0] - 1
    if idx.shape != (batch,) or bool(((idx < 0) | (idx >= n_steps)).any()):
        raise SafediffError(
            f"step_index must be [{batch}] integers in [0, {n_steps - 1}] for {n_steps} sigmas "
            "steps"
        )
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    bshape = (batch,) + (1,) * (sample.ndim - 1)
    x = sample.to(torch.float32)
    v = velocity.to(torch.float32)

    t = sigmas[idx].view(bshape)  # sigma_t
    dt = (sigmas[idx + 1] - sigmas[idx]).view(bshape)  # < 0
    std_t = sde_std(sigmas, idx, noise_level).view(bshape)
    # The SDE's drift: v plus the score correction std_t^2 / (2 t) * eps (Flow-GRPO eq. (9)).
    eps = x + (1 - t) * v
    mean = x + (v + std_t**2 / (2 * t) * eps) * dt
    std = std_t * torch.sqrt(-dt)  # [B, 1, 1, 1]
    if prev_sample is None:
        prev_sample = mean + std * noise.to(device=device, dtype=torch.float32)
    else:
        prev_sample = prev_sample.to(device=device, dtype=torch.float32)

    degenerate = std == 0  # a == 0: an ODE step, no density
    safe_std = torch.where(degenerate, torch.ones_like(std), std)
    per_element = (
        -((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2)
        - torch.log(safe_std)
        - _LOG_SQRT_2PI
    )
    dims = tuple(range(1, per_element.ndim))
    log_prob = per_element.mean(dims) if reduction == "mean" else per_element.sum(dims)
    log_prob = torch.where(degenerate.reshape(batch), torch.zeros_like(log_prob), log_prob)
    return FlowStepOutput(prev_sample, log_prob, mean, std.reshape(batch))


# ---------------------------------------------------------------------------------------------
# The stochastic window (MixGRPO)


@dataclass(frozen=True)
class SDEWindow:
    """Which steps of an S-step trajectory are SDE steps (and trained) at one epoch.

    start: index of the window's first step; size: W steps; num_steps: S.
    mask: [S] bool, True on steps start .. start + W - 1 (SDE, trained); False: ODE, not trained.
    """

    start: int
    size: int
    num_steps: int

    @property
    def mask(self) -> Tensor:
        m = torch.zeros(self.num_steps, dtype=torch.bool)
        m[self.start : self.start + self.size] = True
        return m

    @property
    def steps(self) -> list[int]:
        return list(range(self.start, self.start + self.size))


def sde_window(
    num_steps: int,
    window_size: int,
    epoch: int,
    rule: str = "sliding",
    *,
    start: int = 0,
    stride: int = 1,
    every: int = 1,
    limit: int | None = None,
) -> SDEWindow:
    """The SDE window of `window_size` steps at `epoch` (MixGRPO's mixed ODE-SDE sampling).

    Rule (the window moves from high noise towards low noise over training):
        moves = (epoch // every) * stride; last = limit - window_size (the last valid start);
        limit (default num_steps): the window stays inside steps [0, limit)
        "fixed":   the window stays at `start`;
        "sliding": start + moves, stopping at `last` (then it stays there);
        "cyclic":  start + moves, wrapping round to `start` after `last` (positions start..last).
    MixGRPO's released run (fastvideo/utils/grpo_states.py and its MixGRPO script: strategy
    "progressive", sampling_steps 25, group_size 4, prog_overlap_step 1, iters_per_group 25,
    roll_back) is "cyclic" with window_size=4, stride=1, every=25 counted in its training
    iterations (pass that counter as `epoch`). Departures: this function is stateless (a pure
    function of the counter, so a resumed run needs no window state); the reference caps the
    window at max_timesteps (it never trains the last step) and lets it shrink and empty at the
    end before rolling back, here the window always has its full W steps (limit=S - 1 keeps
    it off the last step, as the reference's ignore_last).
    Its "random" / "decay" strategies are not provided.
    A window larger than the trajectory, or a start that leaves no room for it, is an error.
    """
    if rule not in WINDOW_RULES:
        raise SafediffError(f"window rule {rule!r} is not supported; use one of {WINDOW_RULES}")
    limit = num_steps if limit is None else int(limit)
    if not 1 <= limit <= num_steps:
        raise SafediffError(f"SDE window limit must lie in [1, {num_steps}], got {limit}")
    if window_size < 1 or window_size > limit:
        raise SafediffError(
            f"SDE window of {window_size} steps does not fit a trajectory of {limit} steps; "
            f"use a window size in [1, {limit}]"
        )
    last = limit - window_size
    if not 0 <= start <= last:
        raise SafediffError(
            f"SDE window start {start} leaves no room for {window_size} steps of {num_steps}; "
            f"use a start in [0, {last}]"
        )
    if stride < 0 or every < 1 or epoch < 0:
        raise SafediffError(
            f"SDE window needs stride >= 0, every >= 1 and epoch >= 0, got {stride}, {every}, "
            f"{epoch}"
        )
    moves = (epoch // every) * stride
    if rule == "fixed":
        pos = start
    elif rule == "sliding":
        pos = min(start + moves, last)
    else:
        pos = start + moves % (last - start + 1)
    return SDEWindow(start=pos, size=window_size, num_steps=num_steps)


# ---------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class FlowTrajectory(Trajectory):
    """A `Trajectory` of a flow model (see there), with:

    timesteps: [S] float32 transformer timesteps sigma * N; prev_timesteps: [S] those of the
        step's output (0 for the last).
    sigmas: [S + 1] float32, the trajectory's sigmas (1 ... 0).
    sde_mask: [S] bool, the SDE (trainable) steps; log_probs are zeros elsewhere.
    noise_level: a; guidance: FLUX's distilled guidance value (None for CFG models).
    """

    sigmas: Tensor | None = None
    sde_mask: Tensor | None = None
    noise_level: float = 0.0
    guidance: float | None = None


def has_guidance_input(unet: nn.Module) -> bool:
    """Whether the transformer takes the guidance value as an input (FLUX-dev's guidance_embeds)."""
    config = getattr(unet, "config", None)
    return bool(dict(config).get("guidance_embeds", False)) if config is not None else False


def flow_velocity(
    unet: nn.Module,
    x: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
    *,
    guidance: float | None = None,
) -> Tensor:
    """The velocity at (x, t) [B, C, h, w] float32, with CFG when `uncond` is given (one batched
    call on cat([uncond, cond]), u + g (c - u), as StableDiffusion3Pipeline does) or with the
    distilled `guidance` value passed to the transformer (FLUX; then no CFG)."""
    p = next(unet.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    t = t.to(device=p.device)
    cond = cond.to(device=p.device, dtype=p.dtype)
    kwargs = {}
    if guidance is not None:
        kwargs["guidance"] = torch.full((x.shape[0],), float(guidance), device=p.device)
    if uncond is None or guidance_scale == 1:
        return unet(x, t, encoder_hidden_states=cond, **kwargs).sample.to(torch.float32)
    uncond = uncond.to(device=p.device, dtype=p.dtype)
    if uncond.shape[0] == 1 and x.shape[0] != 1:
        uncond = uncond.expand(x.shape[0], *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise SafediffError(
            f"negative embeddings {tuple(uncond.shape)} do not match the prompt embeddings "
            f"{tuple(cond.shape)}; encode both with the same tokenizer length"
        )
    kwargs = {k: torch.cat([g, g]) for k, g in kwargs.items()}
    out = unet(
        torch.cat([x, x]),
        torch.cat([t, t]),
        encoder_hidden_states=torch.cat([uncond, cond]),
        **kwargs,
    ).sample.to(torch.float32)
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def flow_branches(
    unet: nn.Module,
    x: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor,
    extra: Sequence[Tensor],
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(unconditional, conditional, extra) velocities [B, C, h, w] float32 at (x, t) from one
    transformer call on cat([uncond, cond, *extra]) (the CFG batch with the conditionings of
    hooks that declare `extra_embeds`, diffusers' SLD layout). uncond, extra: [1 or B, L, D]."""
    p = next(unet.parameters())
    batch = x.shape[0]
    parts = [
        e.to(device=p.device, dtype=p.dtype).expand(batch, *e.shape[1:])
        for e in (uncond, cond, *extra)
    ]
    if any(e.shape != parts[1].shape for e in parts):
        raise SafediffError(
            f"conditionings {[tuple(e.shape) for e in parts]} do not match the prompt "
            "embeddings; encode all of them with the model's own text encoder"
        )
    k = len(parts)
    x = x.to(device=p.device, dtype=p.dtype)
    out = unet(
        torch.cat([x] * k),
        torch.cat([t.to(p.device)] * k),
        encoder_hidden_states=torch.cat(parts),
    ).sample.to(torch.float32)
    v_uncond, v_cond, *outs = out.chunk(k)
    return v_uncond, v_cond, outs


@dataclass
class FlowGuidanceStep:
    """What a flow guidance hook (`flow_guidance(step, state) -> (v', state')`) sees at one step
    of B samples, float32 on the transformer's device.

    x_t: [B, C, h, w]; sigma: [B] the flow time; step: [B] int64 index of the step (0 = noisiest).
    velocity: [B, C, h, w] v after CFG and the hooks before this one.
    v_cond, v_uncond: [B, C, h, w] the CFG branches (None without CFG); guidance_scale: g.
    extra: velocities of the hooks' `extra_embeds` conditionings, by hook name.
    """

    x_t: Tensor
    sigma: Tensor
    step: Tensor
    velocity: Tensor
    v_cond: Tensor | None
    v_uncond: Tensor | None
    guidance_scale: float
    extra: dict[str, Tensor]

    def eps_from_velocity(self, velocity: Tensor) -> Tensor:
        """eps = x_t + (1 - sigma) v, [B, C, h, w]."""
        return eps_from_velocity(self.x_t, velocity, self.sigma)

    def velocity_from_eps_change(self, delta_eps: Tensor) -> Tensor:
        """The velocity whose eps is eps(velocity) + delta_eps: v + delta_eps / (1 - sigma);
        rows at sigma = 1 (where eps = x_t whatever v is) keep v. Returns `velocity` itself when
        delta_eps is all zero, so an inactive hook leaves sampling bitwise unchanged."""
        if not bool(delta_eps.any()):
            return self.velocity
        s = self.sigma.to(torch.float32).reshape(-1, *([1] * (delta_eps.ndim - 1)))
        safe = torch.where(s < 1, 1 - s, torch.ones_like(s))
        return torch.where(s < 1, self.velocity + delta_eps / safe, self.velocity)


def resolve_flow_guidance(
    unet: nn.Module, guidance_scale: float, distilled_guidance: float | None
) -> tuple[float, float | None]:
    """(CFG scale, distilled guidance) for a flow model.

    A transformer with a guidance input (FLUX-dev) takes `guidance_scale` as its distilled
    guidance value (FluxPipeline's guidance_scale; no unconditional pass) unless
    `distilled_guidance` says otherwise; any other model (SD3, FLUX-schnell) uses guidance_scale
    as a CFG scale, and a `distilled_guidance` given to it is an error.
    """
    if has_guidance_input(unet):
        return 1.0, float(guidance_scale if distilled_guidance is None else distilled_guidance)
    if distilled_guidance is not None:
        raise SafediffError(
            "distilled guidance was given to a model without a guidance input (only FLUX-dev-style "
            "transformers with guidance_embeds take one); use guidance_scale for CFG instead"
        )
    return float(guidance_scale), None


def flow_rollout(
    model: Any,
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    generators: list[torch.Generator],
    *,
    num_steps: int,
    noise_level: float,
    guidance_scale: float,
    batch_size: int,
    window: SDEWindow | None = None,
    distilled_guidance: float | None = None,
    initial_noise: Tensor | None = None,
    reduction: str = "mean",
    decode: bool = True,
    progress: bool = False,
    hooks: Sequence[Any] = (),
) -> FlowTrajectory:
    """Sample N flow trajectories with `flow_sde_step`, recording each step's log-probability.

    model: a `T2IModel` whose schedule is a `FlowSchedule` and whose unet predicts the velocity,
        called unet(x, t = sigma * N, encoder_hidden_states=c[, guidance=g]).sample.
    prompt_embeds: [N, L, D]; negative_embeds: [1 or N, L, D] for CFG or None.
    generators: N CPU generators; sample i draws x_T and then one z per step (at ODE steps too,
        so its streams do not depend on the window), so results do not depend on batch_size.
    num_steps: S; noise_level: a of the SDE steps.
    guidance_scale / distilled_guidance: see `resolve_flow_guidance` (CFG for SD3, the guidance
        input for FLUX-dev).
    window: SDE steps only inside it (MixGRPO), ODE elsewhere; None: every step is an SDE step.
    hooks: velocity corrections applied in order after CFG (`flow_velocity_hooks`): a method
        flow_velocity(x_t, v, sigma [B], t [B]) -> v' (the Safe Denoiser's x0 correction), or
        flow_guidance(`FlowGuidanceStep`, state) -> (v', state') with `init_state` and
        `extra_embeds` (SLD: needs the CFG branches; its per-sample state is kept per row, so
        batched == one at a time).
    Returns a `FlowTrajectory`; log_probs are zeros on ODE steps. x_T is N(0, I) (flow's
    init_noise_sigma is 1).
    """
    n = prompt_embeds.shape[0]
    shape = tuple(model.latent_shape)
    check_sampling_inputs(n, generators, batch_size, shape, initial_noise, negative_embeds)
    if window is not None and window.num_steps != num_steps:
        raise SafediffError(
            f"SDE window is for {window.num_steps} steps but the rollout has {num_steps}"
        )
    scale, guidance = resolve_flow_guidance(model.unet, guidance_scale, distilled_guidance)
    if scale == 1:
        negative_embeds = None
    device = next(model.unet.parameters()).device
    # the shift depends on the image size with dynamic shifting (FLUX): use the latents' own
    sigmas = model.schedule.for_latent(*shape[1:]).sigmas(num_steps).to(device)
    timesteps = sigmas[:-1] * model.schedule.num_train_timesteps
    sde_mask = (window.mask if window is not None else torch.ones(num_steps, dtype=torch.bool)).to(
        device
    )
    latents = torch.empty((n, num_steps + 1, *shape), dtype=torch.float32, device=device)
    log_probs = torch.zeros((n, num_steps), dtype=torch.float32, device=device)
    images = [] if decode else None
    guided = [h for h in hooks if hasattr(h, "flow_guidance")]
    states = [h.init_state(n, shape, device) if h in guided else {} for h in hooks]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=-(-n // batch_size) * num_steps, desc="flow rollout", unit="step")
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            b = stop - start
            gens = generators[start:stop]
            cond, uncond = batch_conditioning(prompt_embeds, negative_embeds, start, stop, device)
            x = initial_latents(gens, shape, device, initial_noise, start, stop)
            latents[start:stop, 0] = x
            for i in range(num_steps):
                z = draw_noise(gens, shape, device)
                t_i, s_i = timesteps[i].expand(b), sigmas[i].expand(b)
                if guided:
                    rows = [{k: v[start:stop] for k, v in st.items()} for st in states]
                    v, rows = _guided_velocity(
                        model.unet, x, t_i, s_i, i, cond, uncond, scale, guidance, hooks, rows
                    )
                    for st, row in zip(states, rows, strict=True):
                        for k, value in row.items():
                            st[k][start:stop] = value
                else:
                    v = flow_velocity(model.unet, x, t_i, cond, uncond, scale, guidance=guidance)
                    for hook in hooks:
                        v = hook.flow_velocity(x, v, s_i, t_i)
                a = noise_level if bool(sde_mask[i]) else 0.0
                out = flow_sde_step(sigmas, v, x, i, a, noise=z, reduction=reduction)
                x = out.prev_sample
                latents[start:stop, i + 1] = x
                log_probs[start:stop, i] = out.log_prob
                if bar is not None:
                    bar.update(1)
            if images is not None:
                images.append(model.decode(x).to(torch.float32))
    if bar is not None:
        bar.close()
    return FlowTrajectory(
        latents=latents,
        log_probs=log_probs,
        timesteps=timesteps,
        prev_timesteps=sigmas[1:] * model.schedule.num_train_timesteps,
        images=torch.cat(images) if images is not None else None,
        sigmas=sigmas,
        sde_mask=sde_mask,
        noise_level=float(noise_level),
        guidance=guidance,
    )


def _guided_velocity(
    unet: nn.Module,
    x: Tensor,
    t: Tensor,
    sigma: Tensor,
    step: int,
    cond: Tensor,
    uncond: Tensor | None,
    scale: float,
    guidance: float | None,
    hooks: Sequence[Any],
    states: list[dict[str, Tensor]],
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """v after CFG and the hooks, with the CFG branches (and the hooks' extra conditionings) from
    one transformer call; states: the hooks' rows of this batch, returned updated. Without CFG
    (uncond None; FLUX-dev's distilled `guidance` goes to the transformer) the hooks see no
    branches (SLD then refuses, as on DDPM models)."""
    with_extra = [h for h in hooks if getattr(h, "extra_embeds", None) is not None]
    v_u = v_c = None
    extra: dict[str, Tensor] = {}
    if uncond is None:
        v = flow_velocity(unet, x, t, cond, None, 1.0, guidance=guidance)
    else:
        v_u, v_c, outs = flow_branches(
            unet, x, t, cond, uncond, [h.extra_embeds for h in with_extra]
        )
        v = v_u + scale * (v_c - v_u)  # as `flow_velocity` combines them
        extra = {h.name: o for h, o in zip(with_extra, outs, strict=True)}
    info = FlowGuidanceStep(
        x_t=x.to(torch.float32),
        sigma=sigma.to(torch.float32),
        step=torch.full((x.shape[0],), step, dtype=torch.int64, device=x.device),
        velocity=v,
        v_cond=v_c,
        v_uncond=v_u,
        guidance_scale=scale,
        extra=extra,
    )
    v, new_states = info.velocity, []
    for hook, state in zip(hooks, states, strict=True):
        if hasattr(hook, "flow_guidance"):
            v, state = hook.flow_guidance(replace(info, velocity=v), state)
        else:
            v = hook.flow_velocity(x, v, sigma, t)
        new_states.append(state)
    return v, new_states


def flow_transition_log_prob(
    unet: nn.Module,
    sigmas: Tensor,
    num_train_timesteps: int,
    x_t: Tensor,
    x_next: Tensor,
    step_index: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
    noise_level: float,
    reduction: str = "mean",
    *,
    guidance: float | None = None,
) -> FlowStepOutput:
    """Recompute the log-prob of M stored flow transitions x_t -> x_next, with gradient.

    sigmas: [S + 1] the trajectory's (`FlowTrajectory.sigmas`); x_t, x_next: [M, C, h, w];
    step_index: [M] int64 (transitions may come from different steps); cond: [M, L, D]; uncond:
    [1 or M, L, D] or None; guidance: `FlowTrajectory.guidance` (FLUX-dev) or None. Use the
    rollout's scale, noise level and reduction, so that on-policy the ratio is exactly 1.
    Not under no_grad: the GRPO loss differentiates log_prob through the transformer.
    """
    p = next(unet.parameters())
    sigmas = sigmas.to(p.device)
    step_index = step_index.to(device=p.device, dtype=torch.int64)
    x_t = x_t.to(device=p.device, dtype=torch.float32)
    t = sigmas[step_index] * num_train_timesteps
    v = flow_velocity(unet, x_t, t, cond, uncond, guidance_scale, guidance=guidance)
    return flow_sde_step(
        sigmas,
        v,
        x_t,
        step_index,
        noise_level,
        prev_sample=x_next.to(p.device),
        reduction=reduction,
    )


__all__ = (
    "FlowGuidanceStep",
    "FlowSchedule",
    "FlowStepOutput",
    "FlowTrajectory",
    "SDEWindow",
    "eps_from_velocity",
    "flow_branches",
    "flow_rollout",
    "flow_sample",
    "flow_sde_step",
    "flow_shift_mu",
    "flow_transition_log_prob",
    "flow_velocity",
    "flow_velocity_hooks",
    "has_guidance_input",
    "is_flow_schedule",
    "resolve_flow_guidance",
    "sde_window",
    "x0_from_velocity",
)


def flow_sample(
    model: Any,
    cond: Tensor,
    generators: list[torch.Generator],
    settings: Any,
    guidance_scale: float,
    negative: Tensor | None,
    hooks: Sequence[Any] = (),
    *,
    window: SDEWindow | None = None,
    initial_noise: Tensor | None = None,
    reduction: str = "mean",
    decode: bool = True,
    progress: bool = False,
) -> tuple[FlowTrajectory, Tensor | None]:
    """`sample()`'s flow branch: (trajectory, the negative embeddings used or None).

    settings: a `SamplerSettings`; its eta is the SDE noise level a (0: the ODE sampler), its
    scheduler must be "ddim" (the default: the names of other schedulers are DDPM-type
    samplers, which flow models do not use). guidance_scale: CFG scale for SD3, the guidance
    input for FLUX-dev (`resolve_flow_guidance`); negative: [1 or N, L, D] replacing the
    negative prompt's embeddings (CFG models only). Sampler hooks act here only if they have
    a flow form (`flow_velocity_hooks`: the Safe Denoiser; SLD, on CFG models only); the others
    (SAFREE, ...) are refused with a one-line error.
    """
    if settings.scheduler != "ddim":
        raise SafediffError(
            f"scheduler {settings.scheduler!r} is a DDPM-type sampler; flow models (SD3, FLUX) "
            "sample with the flow sampler: leave the scheduler at its default"
        )
    hooks = flow_velocity_hooks(hooks)
    needs_cfg = [h.name for h in hooks if hasattr(h, "flow_guidance")]
    if needs_cfg and has_guidance_input(model.unet):
        raise SafediffError(
            f"{', '.join(needs_cfg)} does not apply to guidance-distilled FLUX models: it acts on "
            "the classifier-free guidance branches, and the guidance is a transformer input with "
            "no unconditional pass; use safe-denoiser, DES or a trained model"
        )
    if negative is not None and has_guidance_input(model.unet):
        raise SafediffError(
            "negative prompts (negprompt) do not apply to guidance-distilled FLUX models: the "
            "guidance is a transformer input and there is no unconditional pass to replace; use "
            "safe-denoiser, DES or a trained model"
        )
    scale, _ = resolve_flow_guidance(model.unet, guidance_scale, None)
    uncond = None
    if scale != 1:
        uncond = negative
        if uncond is None:
            uncond = model.encode_text([settings.negative_prompt], cond.device)  # [1, L, D]
    traj = flow_rollout(
        model,
        cond,
        uncond,
        generators,
        num_steps=settings.num_steps,
        noise_level=settings.eta,
        guidance_scale=guidance_scale,
        batch_size=settings.batch_size,
        window=window,
        initial_noise=initial_noise,
        reduction=reduction,
        decode=decode,
        progress=progress,
        hooks=hooks,
    )
    return traj, uncond


def flow_velocity_hooks(hooks: Sequence[Any]) -> list[Any]:
    """The sampler hooks as flow-model velocity corrections: each must have a method
    flow_velocity(x_t [B, C, h, w], v [B, C, h, w], sigma [B], t [B]) -> v' (the Safe Denoiser)
    or flow_guidance(`FlowGuidanceStep`, state) -> (v', state') (SLD); any other (SAFREE, ...:
    guidance written for DDPM models only) is a one-line error naming it."""
    flow_forms = ("flow_velocity", "flow_guidance")
    bad = [
        getattr(h, "name", type(h).__name__)
        for h in hooks
        if not any(hasattr(h, f) for f in flow_forms)
    ]
    if bad:
        raise SafediffError(
            f"sampler-side defenses ({', '.join(bad)}) do not support flow models (SD3, FLUX): "
            "they act on DDPM's noise prediction; use safe-denoiser, sld, negative prompts, DES or "
            "a trained model"
        )
    return list(hooks)
