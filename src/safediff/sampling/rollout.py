"""Batched DDIM rollouts with classifier-free guidance, and re-scoring of stored transitions.

`rollout` samples trajectories x_T ... x_0 and records the log-probability of every step as it
was sampled; `transition_log_prob` recomputes the log-probability of any set of stored transitions
(possibly from different timesteps) *with* gradient, for the GRPO loss. Both go through the same
`predict_noise` and `ddim_step_with_logprob`, so on-policy the recomputed log-prob equals the
sampled one and the importance ratio starts at exactly 1 (in float32).

Randomness: every sample owns a CPU `torch.Generator`. Sample i draws x_T and then one z per step,
always from its own generator, on the CPU, so a batched rollout equals the same samples rolled out
one at a time and nothing depends on `batch_size` or the device.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.sampling.ddim import DDIMStepOutput, ddim_step_with_logprob
from safediff.sampling.schedule import DDIMSchedule


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
    """

    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor
    prev_timesteps: Tensor
    images: Tensor | None


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
    p = _param(unet)
    batch = x.shape[0]
    x = x.to(device=p.device, dtype=p.dtype)
    t = t.to(device=p.device)
    cond = cond.to(device=p.device, dtype=p.dtype)
    if uncond is None or guidance_scale == 1:
        return unet(x, t, encoder_hidden_states=cond).sample.to(torch.float32)
    uncond = uncond.to(device=p.device, dtype=p.dtype)
    if uncond.shape[0] == 1 and batch != 1:
        uncond = uncond.expand(batch, *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise SafediffError(
            f"negative embeddings {tuple(uncond.shape)} do not match the prompt embeddings "
            f"{tuple(cond.shape)}; encode both with the same tokenizer length"
        )
    out = unet(
        torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])
    ).sample.to(torch.float32)
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


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
) -> DDIMStepOutput:
    """Recompute the log-prob of M stored transitions x_t -> x_prev, with gradient.

    x_t, x_prev: [M, C, h, w]; t, t_prev: [M] int64 (transitions may come from different steps);
    cond: [M, L, D]; uncond: [M, L, D], [1, L, D] or None. Returns the step's `DDIMStepOutput`
    (log_prob [M], mean and std for a KL term). Not wrapped in no_grad: the trainer differentiates
    log_prob through the UNet. Use the same guidance_scale, eta and reduction as the rollout, or
    the ratio is not 1 on-policy.
    """
    device = _param(unet).device
    x_t = x_t.to(device=device, dtype=torch.float32)
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


def _draw(gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One standard-normal tensor of `shape` from each generator, drawn on the CPU: [len, *shape]."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(
        device
    )


def rollout(
    model: T2IModel,
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    generators: list[torch.Generator],
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    batch_size: int,
    shared_noise: bool = False,
    reduction: str = "mean",
    decode: bool = True,
    progress: bool = False,
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
            its own generator, so results depend neither on batch_size nor on the device.
        num_steps: S, DDIM steps.
        eta: DDIM stochasticity (training needs eta > 0; at eta == 0 log_probs are zeros).
        guidance_scale: CFG scale; 1.0 (or negative_embeds None) turns CFG off.
        batch_size: samples per UNet call (a memory knob: the result does not depend on it, unless
            shared_noise is set).
        shared_noise: the reference implementation's quirk: every sample in a batch of
            `batch_size` uses the noise (x_T and every z) drawn from the batch's *first* generator,
            so the samples of a batch differ only through their prompts; the other generators are
            not used. Results then depend on batch_size. Off by default.
        reduction: "mean" (the reference's) or "sum" log-prob, see `ddim_step_with_logprob`.
        decode: decode x_0 to images with `model.decode` (in batches of batch_size).
        progress: show a tqdm progress bar over batches x steps.

    Returns:
        a `Trajectory`. x_T is not scaled: DDIM's init_noise_sigma is 1. The UNet runs under
        torch.no_grad(); latents and log-probs are float32 whatever the UNet's dtype.
    """
    n = prompt_embeds.shape[0]
    if len(generators) != n:
        raise SafediffError(
            f"got {len(generators)} generators for {n} prompts; pass one per sample"
        )
    for g in generators:
        if g.device.type != "cpu":
            raise SafediffError(
                "rollout draws noise on the CPU; pass CPU generators "
                "(safediff.seeding.generator(seed)), not generators on "
                f"{g.device}"
            )
    if batch_size < 1:
        raise SafediffError(f"batch_size must be >= 1, got {batch_size}")
    if negative_embeds is not None and negative_embeds.shape[0] not in (1, n):
        raise SafediffError(
            f"negative_embeds has batch {negative_embeds.shape[0]}; expected 1 or {n} (one per prompt)"
        )

    device = _param(model.unet).device
    schedule = model.schedule
    timesteps, prev_timesteps = schedule.timesteps(num_steps)
    timesteps, prev_timesteps = timesteps.to(device), prev_timesteps.to(device)
    shape = tuple(model.latent_shape)

    latents = torch.empty((n, num_steps + 1, *shape), dtype=torch.float32, device=device)
    log_probs = torch.empty((n, num_steps), dtype=torch.float32, device=device)
    images = [] if decode else None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=-(-n // batch_size) * num_steps, desc="rollout", unit="step")

    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            b = stop - start
            gens = generators[start:stop]
            if shared_noise:  # reference quirk: the first generator's noise for the whole batch
                gens = gens[:1]
            cond = prompt_embeds[start:stop].to(device)
            uncond = None
            if negative_embeds is not None:
                uncond = (
                    negative_embeds
                    if negative_embeds.shape[0] == 1
                    else negative_embeds[start:stop]
                )
                uncond = uncond.to(device)

            x = (
                _draw(gens, shape, device).expand(b, *shape).contiguous()
            )  # x_T, init_noise_sigma = 1
            latents[start:stop, 0] = x
            for i in range(num_steps):
                t = timesteps[i].expand(b)
                t_prev = prev_timesteps[i].expand(b)
                z = _draw(gens, shape, device).expand(b, *shape)
                eps = predict_noise(model.unet, x, t, cond, uncond, guidance_scale)
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
    )
