"""Evaluation schedulers: diffusers' samplers over a model's own noise schedule, by name.

Training samples with safediff's DDIM step, which records log-probabilities (`rollout`). The
papers evaluate with other samplers: SafeDiffusion-R1 generates its evaluation images with LMS and
reports robustness across nine schedulers (Euler ancestral, DDPM, KDPM2 ancestral, Euler, DDIM,
DPM multistep, PNDM, LMS, Heun: the legend of its scheduler ablation), the Safe Denoiser paper
with DDPM. `SCHEDULERS` names them (plus DPM++ SDE and UniPC); `scheduler_rollout` samples with
one in a plain loop: x_T scaled by `init_noise_sigma`, then per timestep `scale_model_input`, the
UNet with classifier-free guidance exactly as `predict_noise`, the guidance hooks, `step`.

How it departs from diffusers' pipeline loop:

- the scheduler is built from the model's `DDIMSchedule` (betas recovered from its alpha-bars as
  beta_t = 1 - a_t / a_{t-1}; prediction type and steps_offset as the model's; timestep spacing
  as `SCHEDULERS` says), not from a scheduler config, so any model safediff samples (the
  sandbox's too) works; alpha-bars agree with the config-built scheduler to float32 rounding;
- randomness: sample i draws x_T and every step's noise from its own CPU generator `generators[i]`
  (diffusers' `step(..., generator=[g_1, ..., g_B])` draws one row per generator), so a batch
  equals its samples run one at a time for every scheduler here. DPMSolverSDEScheduler is left out
  for that reason: its Brownian-tree noise is seeded once per batch.
- no log-probabilities: `Trajectory.log_probs` are zeros. These trajectories are for evaluation;
  GRPO needs DDIM (`rollout`).

Guidance hooks (SLD, the Safe Denoiser) see the same `GuidanceStep` as under DDIM, and the math
holds for every scheduler here: epsilon and v are predictions at the UNet's *input*, which is the
DDPM-parametrised x_t = sqrt(a) x0 + sqrt(1 - a) eps. For DDPM-space schedulers (DDIM, DDPM, PNDM,
DPM++, UniPC) the sample is x_t and a = alphas_cumprod[t]; for sigma-space ones (LMS, Euler, Heun,
KDPM2) the sample is x0 + sigma eps and `scale_model_input` divides it by sqrt(sigma^2 + 1), so the
UNet input is x_t with a = 1 / (sigma^2 + 1) = (that scale)^2, the same a the scheduler uses to
turn the output into x0. The hooks get x_t = the UNet input and that a, so x0 = (x_t - sqrt(1 - a)
eps) / sqrt(a) is the scheduler's own x0 and a corrected eps moves the scheduler to the corrected
x0. A hook's step index counts UNet evaluations (Heun and KDPM2 evaluate twice per step), as
diffusers' SLD pipeline counts them.
"""

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from safediff.errors import SafediffError
from safediff.sampling.rollout import (
    DenoisingModel,
    Guidance,
    GuidedPredictor,
    Trajectory,
    _param,
    batch_conditioning,
    check_sampling_inputs,
    initial_latents,
)
from safediff.sampling.schedule import DDIMSchedule


@dataclass(frozen=True)
class SchedulerSpec:
    """One catalogue entry: a diffusers scheduler class (by name) and its settings.

    kwargs: constructor arguments over those from the model's schedule (they win).
    stochastic: the step draws noise (from each sample's own generator).
    """

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    note: str = ""


_LINSPACE = {"timestep_spacing": "linspace"}

SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec(
        "DDIMScheduler",
        note="safediff's own DDIM step (eta, log-probs); the diffusers class only in parity tests",
    ),
    "ddpm": SchedulerSpec("DDPMScheduler", stochastic=True, note="the Safe Denoiser paper's"),
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}, note="as SD 1.x ships it"),
    "lms": SchedulerSpec("LMSDiscreteScheduler", _LINSPACE, note="SafeDiffusion-R1's evaluation"),
    "euler": SchedulerSpec("EulerDiscreteScheduler", _LINSPACE),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", _LINSPACE, stochastic=True),
    "heun": SchedulerSpec("HeunDiscreteScheduler", _LINSPACE, note="two UNet calls per step"),
    "kdpm2_a": SchedulerSpec(
        "KDPM2AncestralDiscreteScheduler",
        _LINSPACE,
        stochastic=True,
        note="two UNet calls per step",
    ),
    "dpm++": SchedulerSpec("DPMSolverMultistepScheduler", _LINSPACE, note="DPM-Solver++ 2M"),
    "dpm++_sde": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {**_LINSPACE, "algorithm_type": "sde-dpmsolver++"},
        stochastic=True,
    ),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", _LINSPACE),
}
"""Evaluation schedulers by name: SafeDiffusion-R1's nine (ddim, ddpm, pndm, lms, euler, euler_a,
heun, kdpm2_a, and DPM multistep as "dpm++"), and two common extras (dpm++_sde, unipc).

Timestep spacing: DDIM, DDPM and PNDM take the model's (as the native DDIM sampler); the others
take "linspace", their diffusers default, which is what `Cls.from_config(pipe.scheduler.config)`
gives for an SD 1.x config (it names no spacing) and what SafeDiffusion-R1's evaluation script
builds LMS with. (A config naming its spacing, as SDXL's "leading", would give that instead.)"""


def check_scheduler(name: str) -> str:
    """`name` when the catalogue has it, else SafediffError naming the choices."""
    if name not in SCHEDULERS:
        raise SafediffError(
            f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)} (--scheduler)"
        )
    return name


def betas_from_alpha_bars(alphas_cumprod: Tensor) -> np.ndarray:
    """beta_t = 1 - a_t / a_{t-1} (a_{-1} = 1), float64 [T]: the betas whose cumulative product
    is the schedule's alpha-bars (diffusers' `trained_betas`)."""
    ac = alphas_cumprod.detach().double().cpu()
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    return (1 - ac / prev).numpy()


def build_scheduler(name: str, schedule: DDIMSchedule) -> Any:
    """A fresh diffusers scheduler `name` over `schedule` (betas, prediction type, spacing)."""
    import diffusers

    spec = SCHEDULERS[check_scheduler(name)]
    cls = getattr(diffusers, spec.cls)
    config: dict[str, Any] = {
        "num_train_timesteps": schedule.num_train_timesteps,
        "trained_betas": betas_from_alpha_bars(schedule.alphas_cumprod),
        "prediction_type": schedule.prediction_type,
        "steps_offset": schedule.steps_offset,
        "timestep_spacing": schedule.timestep_spacing,
        "set_alpha_to_one": schedule.final_alpha_cumprod == 1.0,
        "clip_sample": False,  # safediff's DDIM step does not clip x0; neither do SD's configs
        **spec.kwargs,
    }
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in config.items() if k in accepted})


@dataclass(frozen=True)
class _StepAlpha:
    """The alpha-bar of the current scheduler step, where `_guided_output` reads a schedule."""

    value: Tensor  # 0-dim
    prediction_type: str

    def alpha_bar(self, timesteps: Tensor) -> Tensor:
        return self.value.to(device=timesteps.device, dtype=torch.float32).expand(timesteps.shape)


def _alpha_at(scheduler: Any, t: Tensor, x: Tensor) -> Tensor:
    """a of the UNet input at timestep t (see the module docstring), 0-dim on x's device."""
    if float(scheduler.init_noise_sigma) != 1.0:  # sigma space: input scaled by sqrt(a)
        scale = scheduler.scale_model_input(x.new_ones(()), t)
        return (scale.to(x.device, torch.float32)) ** 2
    return scheduler.alphas_cumprod.to(x.device, torch.float32)[int(t)]


def scheduler_rollout(
    model: DenoisingModel,
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    generators: list[torch.Generator],
    name: str,
    *,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    initial_noise: Tensor | None = None,
    decode: bool = True,
    progress: bool = False,
    guidance: Sequence[Guidance] = (),
) -> Trajectory:
    """Sample N images with catalogue scheduler `name` (no log-probabilities).

    Arguments as `rollout`'s (eta and reduction do not apply). num_steps: the scheduler's
    inference steps (`set_timesteps`); Heun and KDPM2 evaluate the UNet about twice per step.

    Returns a `Trajectory` over the K = len(scheduler.timesteps) UNet evaluations: latents
    [N, K+1, C, h, w] are the scheduler's samples (sigma-space schedulers: x0 + sigma eps, so
    latents[:, 0] = x_T * init_noise_sigma; latents[:, -1] is x_0 for every scheduler);
    log_probs [N, K] zeros; timesteps [K] the scheduler's (float for some spacings);
    prev_timesteps [K] the next one (-1 after the last); guidance_states as in `rollout`.
    """
    n = prompt_embeds.shape[0]
    shape = tuple(model.latent_shape)
    check_sampling_inputs(n, generators, batch_size, shape, initial_noise, negative_embeds)
    device = _param(model.unet).device
    timesteps = _fresh(name, model.schedule, num_steps, device).timesteps
    k = len(timesteps)
    prev_timesteps = torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])

    latents = torch.empty((n, k + 1, *shape), dtype=torch.float32, device=device)
    predict = GuidedPredictor(guidance, n, k, shape, device)
    images = [] if decode else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=-(-n // batch_size) * k, desc=f"sample ({name})", unit="step")

    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            b, gens = stop - start, generators[start:stop]
            cond, uncond = batch_conditioning(prompt_embeds, negative_embeds, start, stop, device)
            sched = _fresh(name, model.schedule, num_steps, device)  # multistep state per batch
            takes_generator = "generator" in inspect.signature(sched.step).parameters
            x = initial_latents(gens, shape, device, initial_noise, start, stop)  # as under DDIM
            x = x * sched.init_noise_sigma
            latents[start:stop, 0] = x
            for i, t in enumerate(sched.timesteps):
                model_input = sched.scale_model_input(x, t)  # the DDPM-parametrised x_t
                tb = t.expand(b)
                step_alpha = (  # what the hooks read alpha-bar from (none without hooks)
                    _StepAlpha(_alpha_at(sched, t, x), model.schedule.prediction_type)
                    if predict.guidance
                    else None
                )
                out = predict(
                    model.unet, step_alpha, model_input, tb, i, start, stop, cond, uncond,
                    guidance_scale,
                )  # fmt: skip
                extra = {"generator": list(gens)} if takes_generator else {}
                x = sched.step(out, t, x, **extra).prev_sample.to(torch.float32)
                latents[start:stop, i + 1] = x
                if bar is not None:
                    bar.update(1)
            if images is not None:
                images.append(model.decode(x).to(torch.float32))
    if bar is not None:
        bar.close()
    return Trajectory(
        latents=latents,
        log_probs=torch.zeros((n, k), dtype=torch.float32, device=device),
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
        images=torch.cat(images) if images is not None else None,
        guidance_states=predict.stored,
    )


def _fresh(name: str, schedule: DDIMSchedule, num_steps: int, device: torch.device) -> Any:
    """A new scheduler with its timesteps set (no history from an earlier batch)."""
    if not 1 <= num_steps <= schedule.num_train_timesteps:
        raise SafediffError(
            f"num_steps must be in [1, {schedule.num_train_timesteps}], got {num_steps}"
        )
    sched = build_scheduler(name, schedule)
    sched.set_timesteps(num_steps, device=device)
    return sched
