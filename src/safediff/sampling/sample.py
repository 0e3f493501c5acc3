"""The one sampling entry: prompts and per-sample generators in, a `Trajectory` out.

Every path that turns prompts into images goes through `sample`: the trainer's rollouts, the
evaluation's generation, the demos and the sandbox's base-model check. It does the steps each of
them used to write out: encode the prompts, encode the negative prompt when CFG is on (or take a
defense's replacement), then roll out with the sampler settings. Settings have one home,
`SamplerSettings`, built from a run's `SamplingConfig` (`from_config`), so evaluation samples a
trained model the way it was trained unless told otherwise.

The scheduler: "ddim" (the default, and what training uses) is safediff's DDIM step with
log-probabilities (`rollout`); any other name of `safediff.sampling.schedulers.SCHEDULERS` (lms,
ddpm, euler, dpm++, ...) samples with that diffusers scheduler in a plain loop
(`scheduler_rollout`), for evaluation: no log-probabilities (zeros), no eta.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from safediff.errors import SafediffError
from safediff.sampling.flow import flow_sample, has_guidance_input, is_flow_schedule
from safediff.sampling.rollout import DenoisingModel, Guidance, Trajectory, rollout
from safediff.sampling.schedulers import SCHEDULERS, check_scheduler, scheduler_rollout


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: scheduler, steps, eta, CFG scale and negative prompt, samples per UNet call.

    num_steps: S >= 1. eta: DDIM stochasticity in [0, 1] (training needs eta > 0); 0 for any
    other scheduler. guidance_scale: CFG scale; 1 samples without CFG (no unconditional pass).
    negative_prompt: the unconditional prompt of CFG. batch_size: a memory knob only.
    scheduler: a name of `SCHEDULERS`; "ddim" (safediff's DDIM with log-probs) unless evaluating
    with another sampler.
    """

    num_steps: int
    eta: float
    guidance_scale: float
    negative_prompt: str = ""
    batch_size: int = 8
    scheduler: str = "ddim"

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.batch_size < 1:
            raise SafediffError(
                f"sampler steps and batch size must be >= 1, got {self.num_steps} and "
                f"{self.batch_size}"
            )
        for name, value in (("eta", self.eta), ("guidance scale", self.guidance_scale)):
            if not torch.isfinite(torch.tensor(float(value))):
                raise SafediffError(f"sampler {name} must be a finite number, got {value}")
        if not 0.0 <= self.eta <= 1.0:
            raise SafediffError(f"sampler eta must lie in [0, 1], got {self.eta}")
        check_scheduler(self.scheduler)
        if self.scheduler != "ddim" and self.eta != 0:
            raise SafediffError(
                f"sampler eta {self.eta:g} is DDIM's stochasticity; scheduler {self.scheduler!r} "
                "has none: set eta to 0 (--eta 0) or sample with --scheduler ddim"
            )

    @classmethod
    def from_config(cls, sampling: Any, batch_size: int | None = None) -> "SamplerSettings":
        """From a `safediff.config.SamplingConfig` (its rollout_batch_size unless `batch_size`)."""
        return cls(
            num_steps=int(sampling.num_steps),
            eta=float(sampling.eta),
            guidance_scale=float(sampling.guidance_scale),
            negative_prompt=str(sampling.negative_prompt),
            batch_size=int(batch_size or sampling.rollout_batch_size),
        )

    def describe(self, model: Any = None) -> str:
        """One line for logs. model: the `T2IModel` sampled (optional): a flow model (SD3,
        FLUX) is described with the flow sampler's terms (SDE noise level, or Euler's ODE at
        eta 0; FLUX-dev's guidance is an input, not CFG)."""
        if model is not None and is_flow_schedule(getattr(model, "schedule", None)):
            how = (
                f"{self.num_steps} flow SDE steps, noise level {self.eta:g}"
                if self.eta > 0
                else f"{self.num_steps} flow ODE (Euler) steps"
            )
            if has_guidance_input(model.unet):
                return f"{how}, guidance {self.guidance_scale:g} (a transformer input, no CFG)"
        elif self.scheduler == "ddim":
            how = f"{self.num_steps} DDIM steps, eta {self.eta:g}"
        else:
            how = f"{self.num_steps} {self.scheduler} steps ({SCHEDULERS[self.scheduler].cls})"
        return f"{how}, CFG {self.guidance_scale:g}" + (
            f" against {self.negative_prompt!r}" if self.negative_prompt else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "num_steps": self.num_steps,
            "eta": self.eta,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
        }


@dataclass
class Sampled:
    """A rollout with the conditioning it was sampled with (the trainer re-uses both).

    trajectory: see `Trajectory`. prompt_embeds: [N, L, D]. negative_embeds: [1, L, D] or
    [N, L, D], None when sampled without CFG.
    """

    trajectory: Trajectory
    prompt_embeds: Tensor
    negative_embeds: Tensor | None


def sample(
    model: DenoisingModel,
    prompts: Sequence[str],
    generators: list[torch.Generator],
    settings: SamplerSettings,
    *,
    guidance_scale: float | None = None,
    defense: Mapping[str, Any] | None = None,
    initial_noise: Tensor | None = None,
    reduction: str = "mean",
    decode: bool = True,
    progress: bool = False,
    prompt_embeds: Tensor | None = None,
    window: Any = None,
) -> Sampled:
    """Sample one image per prompt, prompt i drawing all its noise from `generators[i]`.

    guidance_scale: overrides `settings.guidance_scale` (a prompt set's per-row guidance).
    defense: what `safediff.defenses.stack.apply_defenses` returns beside the defended model:
        "negative_embeds" ([1, L, D], replaces the negative prompt's embeddings) and/or
        "guidance" (sampler hooks, `rollout`'s `guidance`). None samples undefended. A hook
        with a `for_prompts(prompts, prompt_embeds, num_steps)` method (SAFREE) is replaced by
        what that returns, bound to these prompts (it may condition steps differently, see
        `GuidedPredictor`).
    initial_noise, reduction, decode, progress: as in `rollout`.
    prompt_embeds: [N, L, D] conditioning used instead of encoding `prompts` (an embedding
        attack's result); `prompts` then only counts the samples (N = len(prompts)).
    The images do not depend on `settings.batch_size`. With a scheduler other than "ddim" the
    trajectory comes from `scheduler_rollout` (its log_probs are zeros; `reduction` is unused).
    Flow models (schedule a `FlowSchedule`: SD3, FLUX) go to `safediff.sampling.flow.flow_sample`
    (settings.eta is the SDE noise level a; window: an `SDEWindow`, SDE steps only inside it).
    """
    scale = settings.guidance_scale if guidance_scale is None else float(guidance_scale)
    extra = dict(defense or {})
    negative = extra.pop("negative_embeds", None)
    hooks: Sequence[Guidance] = extra.pop("guidance", ())
    if extra:
        raise SafediffError(f"unknown defense sampling arguments: {', '.join(sorted(extra))}")
    device = next(model.unet.parameters()).device
    if prompt_embeds is None:
        cond = model.encode_text(list(prompts), device)  # [N, L, D]
    elif prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != len(prompts):
        raise SafediffError(
            f"prompt_embeds must be [N, L, D] with N = {len(prompts)} prompts, got "
            f"{list(prompt_embeds.shape)}"
        )
    else:
        cond = prompt_embeds.to(device)
    if is_flow_schedule(model.schedule):  # SD3 / FLUX: the flow SDE sampler (sampling/flow.py)
        traj, uncond = flow_sample(
            model,
            cond,
            generators,
            settings,
            scale,
            negative,
            hooks,
            window=window,
            initial_noise=initial_noise,
            reduction=reduction,
            decode=decode,
            progress=progress,
        )
        return Sampled(traj, cond, uncond)
    if any(hasattr(h, "for_prompts") for h in hooks):  # hooks that filter the prompts (SAFREE)
        if prompt_embeds is not None:
            raise SafediffError(
                "a defense of this stack (safree) filters the prompts' tokens; it cannot act on "
                "given prompt_embeds: sample from prompts, or drop that defense"
            )
        hooks = [
            h.for_prompts(list(prompts), cond, settings.num_steps)
            if hasattr(h, "for_prompts")
            else h
            for h in hooks
        ]
    cfg = scale != 1  # as `predict_noise`: a scale of 1 is the conditional output alone
    if cfg and negative is None:
        negative = model.encode_text([settings.negative_prompt], device)  # [1, L, D]
    uncond = negative if cfg else None
    common: dict[str, Any] = {
        "num_steps": settings.num_steps,
        "guidance_scale": scale,
        "batch_size": settings.batch_size,
        "initial_noise": initial_noise,
        "decode": decode,
        "progress": progress,
        "guidance": hooks,
    }
    if settings.scheduler == "ddim":  # the sampler GRPO trains: log-probs, eta
        traj = rollout(
            model, cond, uncond, generators, eta=settings.eta, reduction=reduction, **common
        )
    else:
        traj = scheduler_rollout(model, cond, uncond, generators, settings.scheduler, **common)
    return Sampled(traj, cond, uncond)
