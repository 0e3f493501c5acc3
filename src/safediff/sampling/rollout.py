"""Batched DDIM rollouts with classifier-free guidance, and re-scoring of stored transitions.

`rollout` samples trajectories x_T ... x_0 and records the log-probability of every step as it
was sampled; `transition_log_prob` recomputes the log-probability of any set of stored transitions
(possibly from different timesteps) *with* gradient, for the GRPO loss. Both go through the same
`predict_noise` and `ddim_step_with_logprob`, so on-policy the recomputed log-prob equals the
sampled one and the importance ratio starts at exactly 1 (in float32).

Randomness: every sample owns a `torch.Generator`. Sample i draws x_T and then one z per step,
always from its own generator, so a batched rollout equals the same samples rolled out one at a
time and nothing depends on `batch_size`. CPU generators (the default) draw on the CPU and the
noise is copied to the device: the images do not depend on the device either. Device noise
(`device_generators`: one generator per sample on the accelerator, seeded from that sample's CPU
generator) skips the per-step host draw and copy; it is another, equally seeded and equally
batch-invariant noise stream, so its images differ from CPU noise's (an option, off by default).

Guidance hooks (defenses that act inside the sampler: SLD, the Safe Denoiser, ...): `rollout` and
`transition_log_prob` take `guidance=[hook, ...]`. At every step the sampler computes the CFG
prediction, converts it to *epsilon units* (whatever the model's prediction type), and hands each
hook in turn a `GuidanceStep` (x_t, t, step index, eps after CFG and the earlier hooks, the
conditional and unconditional branches, a `predict(embeds)` callable for extra UNet evaluations);
each hook returns a corrected eps and its new per-sample state. Conventions:

- eps and x0 are two views of one prediction at x_t: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t).
  A hook that corrects the clean-sample estimate (the Safe Denoiser) returns
  eps' = (x_t - sqrt(a_t) x0') / sqrt(1 - a_t) (`GuidanceStep.eps_from_x0`), so the DDIM step
  recomputes exactly x0' from it and moves along the matching direction: the corrected denoiser is
  used consistently in both terms of the DDIM mean.
- the corrected eps is converted back to the model's output convention (identity for epsilon
  models, v = (eps - sqrt(1 - a_t) x_t) / sqrt(a_t) for v-prediction) and goes through the same
  `ddim_step_with_logprob`, so the stored log-prob is that of the *corrected* mean, and
  `transition_log_prob` with the same hooks recomputes it (with gradient through the UNet and
  through the correction): GRPO on a defended sampler stays on-policy (ratio 1 before an update).
- a hook that leaves every row unchanged returns the eps it was given (the same tensor object);
  when the final eps is the very tensor the sampler computed, the model output is passed to the
  step untouched, so an inactive defense leaves sampling bitwise unchanged.
- state is explicit and per sample: `init_state(n, latent_shape, device)` returns tensors with one
  row per sample (e.g. SLD's momentum); the rollout passes the rows of the current batch and
  writes back the rows it gets, so results stay independent of `batch_size`. The rollout stores
  each step's *input* state in `Trajectory.guidance_states` ([N, S, ...] per key), which is what
  `transition_log_prob` needs to re-score a stateful step out of order.
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.sampling.ddim import DDIMStepOutput, ddim_step_with_logprob
from safediff.sampling.schedule import DDIMSchedule


class DenoisingModel(Protocol):
    """What sampling needs of a model: `safediff.models.base.T2IModel`, the one convention every
    model family is adapted into, is one (sampling is written against this, below models/).

    unet(x [B, C, h, w], t [B], encoder_hidden_states=[B, L, D]).sample -> [B, C, h, w];
    encode_text(prompts, device) -> [B, L, D]; decode(latents) -> images [B, 3, H, W] in [0, 1];
    schedule: its DDIM noise schedule; latent_shape: (C, h, w).
    """

    unet: nn.Module
    schedule: DDIMSchedule
    latent_shape: tuple[int, int, int]
    encode_text: Callable[[list[str], torch.device], Tensor]
    decode: Callable[[Tensor], Tensor]


@dataclass
class Trajectory:
    """Sampled DDIM trajectories of N samples over S steps (all tensors on the UNet's device).

    latents: [N, S+1, C, h, w] float32, x_T ... x_0; latents[:, i] is the input of step i and
        latents[:, i + 1] its output.
    log_probs: [N, S] float32, log p(latents[:, i+1] | latents[:, i]) as sampled (reduction as
        passed to `rollout`; zeros when eta == 0).
    timesteps: [S] int64, t of step i (high noise first).
    prev_timesteps: [S] int64, the timestep latents[:, i+1] lives at (-1 = clean).
    images: [N, 3, H, W] float32 in [0, 1], decoded x_0 (None when decode=False).
    guidance_states: one dict per guidance hook of the rollout (same order): for each state key a
        [N, S, ...] tensor, the hook's state *before* step i of sample n (empty for stateless
        hooks, and an empty list without hooks). Pass `guidance_states_at(n_idx, s_idx)` to
        `transition_log_prob` to re-score steps of a stateful defense.
    """

    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor
    prev_timesteps: Tensor
    images: Tensor | None
    guidance_states: list[dict[str, Tensor]] = field(default_factory=list)

    def guidance_states_at(self, sample_idx: Tensor, step_idx: Tensor) -> list[dict[str, Tensor]]:
        """The hooks' input states of the M transitions (sample_idx[m], step_idx[m]): [M, ...]."""
        return [
            {key: value[sample_idx, step_idx] for key, value in states.items()}
            for states in self.guidance_states
        ]


@dataclass
class GuidanceStep:
    """What a guidance hook sees at one denoising step of B samples (float32, eps units).

    x_t: [B, C, h, w] the current sample.
    t: [B] int64 timesteps; step: [B] int64 index of the step in its rollout (0 = noisiest).
    alpha_bar: [B, 1, 1, 1] a_t.
    eps: [B, C, h, w] the prediction after CFG and after the hooks before this one.
    eps_cond, eps_uncond: [B, C, h, w] the CFG branches (conditional; unconditional/negative
        prompt), None without CFG. eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        when no earlier hook changed it.
    guidance_scale: the CFG scale.
    sample_index: [B] int64 rows of these samples in the rollout (or transitions when re-scoring).
    predict: embeds [B or 1, L, D] -> the UNet's eps at (x_t, t) for those embeddings, no CFG
        (one extra UNet call; gradient flows when the caller has it enabled).
    extra: eps at (x_t, t) for each hook that declares `extra_embeds` ([1, L, D]), by hook name,
        computed in the same UNet batch as CFG (cat([uncond, cond, *extra]), as diffusers' SLD
        pipeline does): cheaper than `predict` and batch-identical to diffusers.
    """

    x_t: Tensor
    t: Tensor
    step: Tensor
    alpha_bar: Tensor
    eps: Tensor
    eps_cond: Tensor | None
    eps_uncond: Tensor | None
    guidance_scale: float
    sample_index: Tensor
    predict: Callable[[Tensor], Tensor]
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def x0(self) -> Tensor:
        """The clean-sample estimate x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), [B, C, h, w]."""
        return (self.x_t - (1 - self.alpha_bar) ** 0.5 * self.eps) / self.alpha_bar**0.5

    def eps_from_x0(self, x0: Tensor) -> Tensor:
        """The eps whose clean-sample estimate at x_t is `x0`: (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""
        return (self.x_t - self.alpha_bar**0.5 * x0) / (1 - self.alpha_bar) ** 0.5


class Guidance(Protocol):
    """A defense acting inside the sampler (see the module docstring for the conventions).

    A hook may also have an attribute `extra_embeds` ([1, L, D] or None): conditionings whose UNet
    output it needs at every step, evaluated in the CFG batch and passed as `step.extra[name]`
    (hook names must then be distinct).
    """

    name: str

    def init_state(
        self, n: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> dict[str, Tensor]:
        """Fresh state of a rollout of n samples: tensors with n rows ({} when stateless)."""
        ...

    def __call__(
        self, step: GuidanceStep, state: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Corrected eps [B, C, h, w] and the state after this step (the B rows given)."""
        ...


def _param(unet: nn.Module) -> Tensor:
    try:
        return next(unet.parameters())
    except StopIteration:
        raise SafediffError("the UNet has no parameters; cannot tell its device/dtype") from None


def predict_noise(
    unet: nn.Module,
    x: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """The UNet's output at (x, t), with classifier-free guidance when `uncond` is given.

    x: [B, C, h, w] latents; t: [B] int64 timesteps; cond: [B, L, D] prompt token states;
    uncond: [B, L, D] or [1, L, D] (broadcast) negative-prompt states, or None for no CFG.
    Without CFG (uncond None or guidance_scale == 1) this is one call unet(x, t, cond). With CFG it
    is one batched call on cat([uncond, cond]) and the result is u + g * (c - u) (Ho & Salimans).
    Inputs are cast to the UNet's parameter dtype (e.g. bf16); the output is float32 [B, C, h, w].
    Gradient flows if the caller has it enabled.
    """
    out_uncond, out_cond, _ = _branches(unet, x, t, cond, uncond, guidance_scale)
    if out_uncond is None:
        return out_cond
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def _branches(
    unet: nn.Module,
    x: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
    extra: Sequence[Tensor] = (),
) -> tuple[Tensor | None, Tensor, list[Tensor]]:
    """(unconditional, conditional, extra) UNet outputs, float32, from one batched call.

    Without CFG the unconditional output is None. extra: further [1 or B, L, D] conditionings
    evaluated in the same batch (cat([uncond, cond, *extra]), the layout diffusers' SLD pipeline
    uses), returned in order.
    """
    p = _param(unet)
    batch = x.shape[0]
    x = x.to(device=p.device, dtype=p.dtype)
    t = t.to(device=p.device)
    cond = cond.to(device=p.device, dtype=p.dtype)
    extra = [
        e.to(device=p.device, dtype=p.dtype).expand(batch, *e.shape[1:])
        if e.shape[0] == 1
        else e.to(device=p.device, dtype=p.dtype)
        for e in extra
    ]
    if uncond is None or guidance_scale == 1:
        if not extra:
            return None, unet(x, t, encoder_hidden_states=cond).sample.to(torch.float32), []
        parts = [cond, *extra]
        out = unet(
            torch.cat([x] * len(parts)),
            torch.cat([t] * len(parts)),
            encoder_hidden_states=torch.cat(parts),
        ).sample.to(torch.float32)
        out_cond, *outs = out.chunk(len(parts))
        return None, out_cond, outs
    uncond = uncond.to(device=p.device, dtype=p.dtype)
    if uncond.shape[0] == 1 and batch != 1:
        uncond = uncond.expand(batch, *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise SafediffError(
            f"negative embeddings {tuple(uncond.shape)} do not match the prompt embeddings "
            f"{tuple(cond.shape)}; encode both with the same tokenizer length"
        )
    parts = [uncond, cond, *extra]
    out = unet(
        torch.cat([x] * len(parts)),
        torch.cat([t] * len(parts)),
        encoder_hidden_states=torch.cat(parts),
    ).sample.to(torch.float32)
    out_uncond, out_cond, *outs = out.chunk(len(parts))
    return out_uncond, out_cond, outs


def _guided_output(
    unet: nn.Module,
    schedule: DDIMSchedule,
    x: Tensor,
    t: Tensor,
    step: Tensor,
    rows: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
    guidance: Sequence[Guidance],
    states: list[dict[str, Tensor]],
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """The model output (the model's convention) after CFG and the guidance hooks, new states.

    x: [B, C, h, w] float32 on the UNet's device; t, step, rows: [B] int64. Without hooks this is
    `predict_noise` exactly.
    """
    with_extra = [h for h in guidance if getattr(h, "extra_embeds", None) is not None]
    out_uncond, out_cond, out_extra = _branches(
        unet, x, t, cond, uncond, guidance_scale, [h.extra_embeds for h in with_extra]
    )
    output = (
        out_cond if out_uncond is None else out_uncond + guidance_scale * (out_cond - out_uncond)
    )
    if not guidance:
        return output, states
    bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
    a_t = schedule.alpha_bar(t.to(x.device)).view(bshape)
    v_pred = schedule.prediction_type == "v_prediction"

    def to_eps(out: Tensor) -> Tensor:  # model output -> eps at this x_t
        return a_t**0.5 * out + (1 - a_t) ** 0.5 * x if v_pred else out

    def predict(embeds: Tensor) -> Tensor:
        if embeds.shape[0] == 1 and x.shape[0] != 1:
            embeds = embeds.expand(x.shape[0], *embeds.shape[1:])
        return to_eps(_branches(unet, x, t, embeds, None, 1.0)[1])

    eps_in = to_eps(output)
    eps_uncond = None if out_uncond is None else to_eps(out_uncond)
    eps_cond = None if out_uncond is None else to_eps(out_cond)
    info = GuidanceStep(
        x_t=x,
        t=t,
        step=step,
        alpha_bar=a_t,
        eps=eps_in,
        eps_cond=eps_cond,
        eps_uncond=eps_uncond,
        guidance_scale=guidance_scale,
        sample_index=rows,
        predict=predict,
        extra={h.name: to_eps(o) for h, o in zip(with_extra, out_extra, strict=True)},
    )
    eps = eps_in
    new_states = []
    for hook, state in zip(guidance, states, strict=True):
        eps, state = hook(dataclasses.replace(info, eps=eps), state)
        new_states.append(state)
    if eps is eps_in:  # no hook changed anything: keep the UNet's output bit for bit
        return output, new_states
    return ((eps - (1 - a_t) ** 0.5 * x) / a_t**0.5 if v_pred else eps), new_states


def _check_guidance_states(
    guidance: Sequence[Guidance],
    states: Sequence[dict[str, Tensor]] | None,
    x_t: Tensor,
) -> list[dict[str, Tensor]]:
    """The hooks' input states for M transitions x_t [M, ...], checked (rows, presence)."""
    m = x_t.shape[0]
    if states is None:
        fresh = [hook.init_state(m, tuple(x_t.shape[1:]), x_t.device) for hook in guidance]
        stateful = [hook.name for hook, st in zip(guidance, fresh, strict=True) if st]
        if stateful:
            raise SafediffError(
                f"guidance hook(s) {', '.join(stateful)} carry state across steps; pass "
                "guidance_states=traj.guidance_states_at(sample_idx, step_idx) from the rollout"
            )
        return fresh
    if len(states) != len(guidance):
        raise SafediffError(
            f"got {len(states)} guidance state dicts for {len(guidance)} guidance hooks; pass "
            "Trajectory.guidance_states_at(sample_idx, step_idx) from the rollout"
        )
    for hook, st in zip(guidance, states, strict=True):
        for key, value in st.items():
            if value.shape[0] != m:
                raise SafediffError(
                    f"guidance state {hook.name}.{key} has {value.shape[0]} rows for {m} "
                    "transitions; index the rollout's states with the same (sample, step) pairs"
                )
    return list(states)


def transition_log_prob(
    unet: nn.Module,
    schedule: DDIMSchedule,
    x_t: Tensor,
    x_prev: Tensor,
    t: Tensor,
    t_prev: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
    eta: float,
    reduction: str = "mean",
    *,
    guidance: Sequence[Guidance] = (),
    guidance_states: Sequence[dict[str, Tensor]] | None = None,
    step_index: Tensor | None = None,
) -> DDIMStepOutput:
    """Recompute the log-prob of M stored transitions x_t -> x_prev, with gradient.

    x_t, x_prev: [M, C, h, w]; t, t_prev: [M] int64 (transitions may come from different steps);
    cond: [M, L, D]; uncond: [M, L, D], [1, L, D] or None. Returns the step's `DDIMStepOutput`
    (log_prob [M], mean and std for a KL term). Not wrapped in no_grad: the trainer differentiates
    log_prob through the UNet. Use the same guidance_scale, eta and reduction as the rollout, or
    the ratio is not 1 on-policy.

    guidance: the rollout's guidance hooks (same objects, same order); then step_index ([M] int64,
    the step index s of each transition) is required, and stateful hooks need guidance_states =
    `traj.guidance_states_at(sample_idx, step_idx)`. The log-prob is then that of the corrected
    mean, with gradient through the correction too.
    """
    device = _param(unet).device
    x_t = x_t.to(device=device, dtype=torch.float32)
    if guidance:
        if step_index is None:
            raise SafediffError(
                "transition_log_prob with guidance hooks needs step_index= (the step index of "
                "each transition in its rollout)"
            )
        m = x_t.shape[0]
        states = _check_guidance_states(guidance, guidance_states, x_t)
        eps, _ = _guided_output(
            unet,
            schedule,
            x_t,
            t.to(device),
            step_index.to(device),
            torch.arange(m, device=device),
            cond,
            uncond,
            guidance_scale,
            guidance,
            [{k: v.to(device) for k, v in st.items()} for st in states],
        )
    else:
        eps = predict_noise(unet, x_t, t, cond, uncond, guidance_scale)
    return ddim_step_with_logprob(
        schedule,
        eps,
        t.to(device),
        t_prev.to(device),
        x_t,
        eta,
        prev_sample=x_prev.to(device),
        reduction=reduction,
    )


def draw_noise(gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One standard-normal tensor of `shape` from each generator: [len, *shape] float32 on `device`.

    Each sample draws on its generator's own device (CPU generators on the CPU, then one copy to
    `device`; generators from `device_generators` on the accelerator, no copy), one draw per
    generator, so the result for a sample does not depend on which others share the batch.
    """
    noise = [torch.randn(shape, generator=g, dtype=torch.float32, device=g.device) for g in gens]
    return torch.stack(noise).to(device)


def device_generators(gens: Sequence[torch.Generator], device: torch.device | str) -> list:
    """Per-sample generators on `device`, each seeded from the matching CPU generator's next draw
    (a 62-bit integer), so device noise stays seeded per sample and batch-invariant.

    gens: N generators (one per sample, as `rollout` takes them); each is advanced by one draw.
    Returns N `torch.Generator`s on `device` (on "cpu" too: the tests check the invariants there).
    The noise they give differs from the CPU generators' own stream (another seed, and CUDA's
    Philox generator): choosing device noise changes the images, never their reproducibility.
    """
    device = torch.device(device)
    out = []
    for g in gens:
        if g.device.type != "cpu":
            raise SafediffError(
                f"device_generators derives device generators from CPU generators; got one on {g.device}"
            )
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        out.append(torch.Generator(device=device).manual_seed(seed))
    return out


def check_sampling_inputs(
    n: int,
    generators: Sequence[torch.Generator],
    batch_size: int,
    shape: tuple[int, ...],
    initial_noise: Tensor | None,
    negative_embeds: Tensor | None,
) -> None:
    """The checks every sampler makes of its inputs (N samples of latent `shape`)."""
    if len(generators) != n:
        raise SafediffError(
            f"got {len(generators)} generators for {n} prompts; pass one per sample"
        )
    if len({g.device for g in generators}) > 1:
        raise SafediffError(
            "generators are on several devices; pass CPU generators "
            "(safediff.seeding.generator(seed)), or all of them through device_generators"
        )
    if batch_size < 1:
        raise SafediffError(f"batch_size must be >= 1, got {batch_size}")
    if initial_noise is not None and (
        initial_noise.ndim != len(shape) + 1
        or tuple(initial_noise.shape[1:]) != shape
        or initial_noise.shape[0] not in (1, n)
    ):
        raise SafediffError(
            f"initial_noise has shape {tuple(initial_noise.shape)}; expected [1, {', '.join(map(str, shape))}] "
            f"(one x_T for every sample) or [{n}, ...] (one per sample)"
        )
    if negative_embeds is not None and negative_embeds.shape[0] not in (1, n):
        raise SafediffError(
            f"negative_embeds has batch {negative_embeds.shape[0]}; expected 1 or {n} (one per prompt)"
        )


def batch_conditioning(
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    start: int,
    stop: int,
    device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """(cond, uncond) of samples start:stop on `device`; a [1, L, D] negative is shared."""
    cond = prompt_embeds[start:stop].to(device)
    if negative_embeds is None:
        return cond, None
    uncond = negative_embeds if negative_embeds.shape[0] == 1 else negative_embeds[start:stop]
    return cond, uncond.to(device)


def initial_latents(
    gens: list[torch.Generator],
    shape: tuple[int, ...],
    device: torch.device,
    initial_noise: Tensor | None,
    start: int,
    stop: int,
) -> Tensor:
    """x_T [B, *shape] of samples start:stop: each generator's first draw, or `initial_noise`'s
    rows (drawn all the same, so every later draw of a generator is unchanged)."""
    x = draw_noise(gens, shape, device)
    if initial_noise is not None:
        rows = initial_noise if initial_noise.shape[0] == 1 else initial_noise[start:stop]
        x = rows.to(device=device, dtype=torch.float32).expand(stop - start, *shape).contiguous()
    return x


class GuidedPredictor:
    """The model output at each step, after CFG and the guidance hooks, with the hooks' per-sample
    states kept and every step's input state stored (`Trajectory.guidance_states`).

    One per sampling call: N samples, `steps` stored steps, latents of `shape`.

    Per-step conditioning: a hook with a `step_embeds(i, start, stop, cond) -> cond` method
    (SAFREE, bound to its prompts by `sample`) chooses the prompt embeddings [B, L, D] of samples
    start:stop at step i; returning `cond` itself leaves the step exactly as without it.
    """

    def __init__(
        self,
        guidance: Sequence[Guidance],
        n: int,
        steps: int,
        shape: tuple[int, ...],
        device: torch.device,
    ) -> None:
        self.guidance = list(guidance)
        self.states = [hook.init_state(n, shape, device) for hook in self.guidance]
        self.stored = [
            {
                key: torch.empty((n, steps, *v.shape[1:]), dtype=v.dtype, device=device)
                for key, v in st.items()
            }
            for st in self.states
        ]

    def __call__(
        self,
        unet: nn.Module,
        schedule: Any,
        x: Tensor,
        t: Tensor,
        i: int,
        start: int,
        stop: int,
        cond: Tensor,
        uncond: Tensor | None,
        guidance_scale: float,
    ) -> Tensor:
        """Output for samples start:stop at step i (x the UNet input, t [B] its timesteps;
        schedule: what the hooks read alpha-bar from)."""
        if not self.guidance:
            return predict_noise(unet, x, t, cond, uncond, guidance_scale)
        for hook in self.guidance:
            step_embeds = getattr(hook, "step_embeds", None)
            if step_embeds is not None:
                cond = step_embeds(i, start, stop, cond)
        b, device = stop - start, x.device
        rows = [{k: v[start:stop] for k, v in st.items()} for st in self.states]
        for store, st in zip(self.stored, rows, strict=True):
            for key, value in st.items():
                store[key][start:stop, i] = value
        out, rows = _guided_output(
            unet,
            schedule,
            x,
            t,
            torch.full((b,), i, dtype=torch.int64, device=device),
            torch.arange(start, stop, device=device),
            cond,
            uncond,
            guidance_scale,
            self.guidance,
            rows,
        )
        for st, new in zip(self.states, rows, strict=True):
            for key, value in new.items():
                st[key][start:stop] = value
        return out


def rollout(
    model: DenoisingModel,
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    generators: list[torch.Generator],
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    batch_size: int,
    initial_noise: Tensor | None = None,
    reduction: str = "mean",
    decode: bool = True,
    progress: bool = False,
    guidance: Sequence[Guidance] = (),
) -> Trajectory:
    """Sample N DDIM trajectories and record each step's log-probability.

    Args:
        model: the text-to-image model; its `schedule` gives the timesteps
            (`schedule.timesteps(num_steps)`) and its UNet's parameters give the device.
        prompt_embeds: [N, L, D] prompt token states.
        negative_embeds: [N, L, D] or [1, L, D] (broadcast) negative-prompt states for CFG, or None
            for no CFG.
        generators: N CPU generators, one per sample. Sample i draws x_T ~ N(0, I) and then one
            z ~ N(0, I) per step (also at eta == 0, so streams do not depend on eta), always from
            its own generator, so results depend neither on batch_size nor on the device. Or N
            generators on the device from `device_generators` (device noise: no per-step host
            draw; other noise, still per sample and independent of batch_size).
        num_steps: S, DDIM steps.
        eta: DDIM stochasticity (training needs eta > 0; at eta == 0 log_probs are zeros).
        guidance_scale: CFG scale; 1.0 (or negative_embeds None) turns CFG off.
        batch_size: samples per UNet call (a memory knob: the result does not depend on it).
        initial_noise: [1, C, h, w] (shared by every sample) or [N, C, h, w], x_T to start from
            instead of each sample's own draw; None: each sample draws its x_T. Each generator
            still draws its x_T (then unused) before its step noise, so the step noise, which
            stays per sample, is the same with or without it. The SafeDiffusion-R1 reference
            starts every trajectory of a process's epoch from one x_T (the trainer's
            `sampling.shared_noise`).
        reduction: "mean" (the reference's) or "sum" log-prob, see `ddim_step_with_logprob`.
        decode: decode x_0 to images with `model.decode` (in batches of batch_size).
        progress: show a tqdm progress bar over batches x steps.
        guidance: guidance hooks applied in order after CFG at every step (see the module
            docstring); their per-step input states are stored in `Trajectory.guidance_states`.

    Returns:
        a `Trajectory`. x_T is not scaled: DDIM's init_noise_sigma is 1. The UNet runs under
        torch.no_grad(); latents and log-probs are float32 whatever the UNet's dtype.
    """
    n = prompt_embeds.shape[0]
    shape = tuple(model.latent_shape)
    check_sampling_inputs(n, generators, batch_size, shape, initial_noise, negative_embeds)

    device = _param(model.unet).device
    schedule = model.schedule
    timesteps, prev_timesteps = schedule.timesteps(num_steps)
    timesteps, prev_timesteps = timesteps.to(device), prev_timesteps.to(device)

    latents = torch.empty((n, num_steps + 1, *shape), dtype=torch.float32, device=device)
    log_probs = torch.empty((n, num_steps), dtype=torch.float32, device=device)
    images = [] if decode else None
    predict = GuidedPredictor(guidance, n, num_steps, shape, device)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=-(-n // batch_size) * num_steps, desc="rollout", unit="step")

    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            b = stop - start
            gens = generators[start:stop]
            cond, uncond = batch_conditioning(prompt_embeds, negative_embeds, start, stop, device)
            x = initial_latents(gens, shape, device, initial_noise, start, stop)  # sigma_T = 1
            latents[start:stop, 0] = x
            for i in range(num_steps):
                t = timesteps[i].expand(b)
                t_prev = prev_timesteps[i].expand(b)
                z = draw_noise(gens, shape, device).expand(b, *shape)
                eps = predict(
                    model.unet, schedule, x, t, i, start, stop, cond, uncond, guidance_scale
                )
                out = ddim_step_with_logprob(
                    schedule, eps, t, t_prev, x, eta, noise=z, reduction=reduction
                )
                x = out.prev_sample
                latents[start:stop, i + 1] = x
                log_probs[start:stop, i] = out.log_prob
                if bar is not None:
                    bar.update(1)
            if images is not None:
                images.append(model.decode(x).to(torch.float32))

    if bar is not None:
        bar.close()
    return Trajectory(
        latents=latents,
        log_probs=log_probs,
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
        images=torch.cat(images) if images is not None else None,
        guidance_states=predict.stored,
    )
