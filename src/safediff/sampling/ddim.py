"""A pure DDIM step that also returns the log-probability of the transition it makes.

Paper: Song et al., "Denoising Diffusion Implicit Models" (https://arxiv.org/abs/2010.02502),
formulas (12) and (16). The arithmetic mirrors diffusers' `DDIMScheduler.step` (so eta = 0
reproduces it), but there is no scheduler object and no step counter: every call is a function of
its arguments only, batched over samples that may sit at *different* timesteps. Given a stored
x_{t-1} the same function recomputes that transition's log-probability, which is what lets the
GRPO trainer revisit any stored step, in any order.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from safediff.errors import SafediffError
from safediff.sampling.schedule import DDIMSchedule

REDUCTIONS = ("mean", "sum")
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


@dataclass
class DDIMStepOutput:
    """One DDIM transition x_t -> x_{t-1}.

    prev_sample: [B, C, h, w] float32, x_{t-1} (sampled, or the stored one that was passed in).
    log_prob: [B] float32, log p(x_{t-1} | x_t) reduced over the non-batch dims ("mean" or "sum",
        see `ddim_step_with_logprob`); zeros when eta == 0 (undefined there, see below).
    mean: [B, C, h, w] float32, mu_t, the mean of the Gaussian step (carries the UNet's gradient).
    std: [B] float32, sigma_t(eta) = eta * sqrt(variance), the step's standard deviation.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise SafediffError(f"reduction {reduction!r} is not supported; use one of {REDUCTIONS}")


def _reduce(per_element: Tensor, reduction: str) -> Tensor:
    """[B, ...] -> [B] by mean or sum over every non-batch dim."""
    dims = tuple(range(1, per_element.ndim))
    return per_element.mean(dim=dims) if reduction == "mean" else per_element.sum(dim=dims)


def _per_sample(values: Tensor, batch: int, name: str, device: torch.device) -> Tensor:
    """A [B] int64 tensor of timesteps on `device` (a 0-dim tensor or an int is broadcast)."""
    values = torch.as_tensor(values, device=device).to(torch.int64)
    if values.ndim == 0:
        values = values.expand(batch)
    if values.shape != (batch,):
        raise SafediffError(
            f"{name} must have shape ({batch},) (one timestep per sample), got {tuple(values.shape)}"
        )
    return values


def ddim_step_with_logprob(
    schedule: DDIMSchedule,
    model_output: Tensor,
    timestep: Tensor,
    prev_timestep: Tensor,
    sample: Tensor,
    eta: float,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    reduction: str = "mean",
) -> DDIMStepOutput:
    """Take (or re-score) one DDIM step x_t -> x_{t-1} and return its Gaussian log-probability.

    Args:
        schedule: alpha-bar values and the model's prediction type ("epsilon" or "v_prediction").
        model_output: [B, C, h, w], the network's output at (x_t, t): eps_theta, or v for
            v-prediction models. Any float dtype; all math is done in float32.
        timestep: [B] int64, t of each sample (samples may be at different timesteps).
        prev_timestep: [B] int64, the timestep x_{t-1} lives at; -1 means "clean", where
            alpha-bar is the schedule's final_alpha_cumprod (see `DDIMSchedule.alpha_bar`).
        sample: [B, C, h, w], x_t.
        eta: DDIM stochasticity, >= 0 (0: deterministic DDIM, 1: DDPM-like variance).
        noise: [B, C, h, w], z ~ N(0, I) to sample x_{t-1} = mu + std * z.
        prev_sample: [B, C, h, w], a stored x_{t-1} whose log-prob is recomputed instead.
            Exactly one of `noise` and `prev_sample` must be given.
        reduction: how the per-element log-density is reduced over the non-batch dims.
            "mean" is what the reference (ddpo-pytorch / SafeDiffusion-R1) uses: the log-prob is
            1/D times the true log-density (D = C*h*w), so a PPO clip range c bounds the
            *geometric mean of the per-element ratios*, exp(mean log r_i), to [1-c, 1+c]; the
            whole-latent ratio is that to the power D, which is why the reference's clip range is as
            small as 1e-4. "sum" is the true log-density of x_{t-1}, and the clip range then bounds
            the ratio of the full Gaussian densities.

    Returns:
        DDIMStepOutput with prev_sample, log_prob [B], mean and std [B], all float32.

    Notation (variable -> DDIM paper):
        a_t, a_p  -> alpha_t, alpha_{t-1} (the cumulative products alpha-bar of the paper)
        eps       -> eps_theta^{(t)}(x_t)
        x0        -> f_theta^{(t)}(x_t), the "predicted x_0"
        std       -> sigma_t(eta)
        direction -> "direction pointing to x_t"
        mean      -> x_{t-1} without its random noise (mu)

    Stages:
        1. alpha-bar at t and at the previous timestep (final_alpha_cumprod for prev = -1).
        2. x0 and eps from the model output (formula (12); v -> eps and x0 as diffusers does).
        3. No clipping or thresholding of x0: Stable Diffusion configs set clip_sample=False and
           thresholding=False, so this matches diffusers for them; other configs are not matched.
        4. variance s2 = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p), formula (16);
           std = eta * sqrt(s2).
        5. direction = sqrt(1 - a_p - std^2) * eps (clamped at 0 under the root, which only bites
           for eta > 1 or rounding; diffusers would return NaN there).
        6. mean = sqrt(a_p) * x0 + direction; x_{t-1} = mean + std * z (or the given prev_sample).
        7. log p = -(x_{t-1} - mean)^2 / (2 std^2) - log std - log sqrt(2 pi) per element,
           reduced by `reduction`. x_{t-1} is detached, as in the reference: gradients reach the
           log-prob only through the mean (std depends on the schedule alone).

    With eta == 0 the step is deterministic (std = 0) and its log-density does not exist; log_prob
    is then returned as zeros and must not be used (training needs eta > 0). The same holds per
    sample for a last step into a_p = 1 (configs with set_alpha_to_one=True, not SD's).
    """
    _check_reduction(reduction)
    if (noise is None) == (prev_sample is None):
        raise SafediffError(
            "ddim_step_with_logprob needs exactly one of noise= (to sample x_{t-1}) or "
            "prev_sample= (to re-score a stored x_{t-1})"
        )
    if eta < 0:
        raise SafediffError(f"eta must be >= 0, got {eta}")
    if model_output.shape != sample.shape:
        raise SafediffError(
            f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} must have the same shape"
        )
    given = noise if noise is not None else prev_sample
    if given.shape != sample.shape:
        raise SafediffError(
            f"{'noise' if noise is not None else 'prev_sample'} has shape {tuple(given.shape)}; "
            f"expected the sample's shape {tuple(sample.shape)}"
        )

    sample = sample.to(torch.float32)
    model_output = model_output.to(torch.float32)
    batch = sample.shape[0]
    bshape = (batch,) + (1,) * (sample.ndim - 1)  # broadcast [B] over the non-batch dims
    timestep = _per_sample(timestep, batch, "timestep", sample.device)
    prev_timestep = _per_sample(prev_timestep, batch, "prev_timestep", sample.device)

    # 1. alpha-bar at t and t-1; the last step (prev = -1) uses final_alpha_cumprod.
    alpha_prod_t = schedule.alpha_bar(timestep).view(bshape)  # a_t
    alpha_prod_t_prev = schedule.alpha_bar(prev_timestep).view(bshape)  # a_p
    beta_prod_t = 1 - alpha_prod_t

    # 2. predicted x_0 ("f_theta", formula (12)) and predicted noise.
    if schedule.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    else:  # "v_prediction" (validated by DDIMSchedule)
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample

    # 3. no x0 clipping: SD configs have clip_sample=False.

    # 4. sigma_t(eta), formula (16).
    std_dev_t = _sigma(alpha_prod_t, alpha_prod_t_prev, eta)  # [B, 1, 1, 1]

    # 5. "direction pointing to x_t" of formula (12).
    direction_coeff = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0) ** 0.5
    pred_sample_direction = direction_coeff * pred_epsilon

    # 6. mu_t = x_{t-1} without its random noise, then x_{t-1} itself.
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if prev_sample is None:
        prev_sample = prev_sample_mean + std_dev_t * noise.to(torch.float32)
    else:
        prev_sample = prev_sample.to(torch.float32)

    # 7. Gaussian log-density of x_{t-1} (same expression as torch.distributions.Normal).
    # A step with std == 0 (eta == 0, or a_p == 1 when set_alpha_to_one) is deterministic and has
    # no density: its log-prob is reported as 0. std is swapped for 1 there first so that neither
    # the value nor the gradient turns into NaN.
    degenerate = std_dev_t == 0
    safe_std = torch.where(degenerate, torch.ones_like(std_dev_t), std_dev_t)
    x = prev_sample.detach()
    per_element = (
        -((x - prev_sample_mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    )
    log_prob = _reduce(per_element, reduction)
    log_prob = torch.where(degenerate.reshape(batch), torch.zeros_like(log_prob), log_prob)

    return DDIMStepOutput(
        prev_sample=prev_sample,
        log_prob=log_prob,
        mean=prev_sample_mean,
        std=std_dev_t.reshape(batch),
    )


def gaussian_kl(mean_a: Tensor, mean_b: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mean_a, std^2) || N(mean_b, std^2)) per sample, for two Gaussians with equal std.

    mean_a, mean_b: [B, C, h, w]; std: [B] (or anything broadcastable to [B]), >= 0; samples
    with std == 0 (a deterministic step, whose log-prob is reported as 0) get a KL of 0.
    Per element the KL is (mean_a - mean_b)^2 / (2 std^2); it is reduced over the non-batch dims by
    "mean" or "sum", the same way as the log-prob (so a "sum" KL is the KL between the full
    Gaussian steps and a "mean" KL is that divided by C*h*w). Returns [B] float32, differentiable in
    both means. Used as the optional KL penalty to the reference policy in GRPO.
    """
    _check_reduction(reduction)
    if mean_a.shape != mean_b.shape:
        raise SafediffError(
            f"gaussian_kl: mean_a {tuple(mean_a.shape)} and mean_b {tuple(mean_b.shape)} differ in shape"
        )
    mean_a = mean_a.to(torch.float32)
    mean_b = mean_b.to(torch.float32)
    batch = mean_a.shape[0]
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_a.device).expand(batch)
    std = std.reshape((batch,) + (1,) * (mean_a.ndim - 1))
    # A deterministic step (std == 0: eta == 0, or the last step when set_alpha_to_one) has no
    # density; as its log-prob is reported as 0, its KL term is 0 too (not 0 / 0).
    degenerate = std == 0
    safe_std = torch.where(degenerate, torch.ones_like(std), std)
    per_element = torch.where(
        degenerate, torch.zeros_like(mean_a), (mean_a - mean_b) ** 2 / (2 * safe_std**2)
    )
    return _reduce(per_element, reduction)


def step_std(schedule: DDIMSchedule, t: Tensor, t_prev: Tensor, eta: float) -> Tensor:
    """sigma_t(eta) of DDIM steps t -> t_prev ([S] int64 each, t_prev = -1 for the last step):
    [S] float32, the same formula (16) as `ddim_step`. 0 marks a deterministic step (eta == 0, or
    the last step when final_alpha_cumprod == 1), which has no log-density to train on."""
    a_t = schedule.alpha_bar(t).to(torch.float32)
    a_p = schedule.alpha_bar(t_prev).to(torch.float32)
    return _sigma(a_t, a_p, eta)


def _sigma(alpha_prod_t: Tensor, alpha_prod_t_prev: Tensor, eta: float) -> Tensor:
    """sigma_t(eta) = eta * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)), formula (16)."""
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (
        1 - alpha_prod_t / alpha_prod_t_prev
    )
    return eta * variance.clamp(min=0) ** 0.5
