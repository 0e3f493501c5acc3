"""The pure DDIM step: against torch.distributions, against diffusers' DDIMScheduler, exactness."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.distributions import Normal, kl_divergence

from safediff.errors import SafediffError
from safediff.sampling.ddim import ddim_step_with_logprob, gaussian_kl, step_std
from safediff.sampling.rollout import predict_noise
from safediff.sampling.schedule import DDIMSchedule

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)
SHAPE = (3, 4, 8, 8)


def sd_scheduler(prediction_type: str = "epsilon", **kw) -> DDIMScheduler:
    return DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type, **kw})


def schedule_of(scheduler: DDIMScheduler) -> DDIMSchedule:
    return DDIMSchedule.from_scheduler_config(dict(scheduler.config))


def fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for a denoiser: smooth in x, depends on t."""
    return torch.sin(x + t / 100.0) * 0.8


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_matches_torch_normal(prediction_type: str, reduction: str) -> None:
    sched = schedule_of(sd_scheduler(prediction_type))
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(SHAPE, generator=g)
    model_output = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    # three samples at three different timesteps, including the last step (prev = -1)
    t = torch.tensor([901, 401, 1])
    t_prev = torch.tensor([801, 301, -1])
    out = ddim_step_with_logprob(
        sched, model_output, t, t_prev, sample, 1.0, noise=noise, reduction=reduction
    )
    assert out.prev_sample.shape == SHAPE and out.mean.shape == SHAPE
    assert out.log_prob.shape == (3,) and out.std.shape == (3,)
    assert out.log_prob.dtype == torch.float32

    # independent formulas (DESIGN.md sec. 2), in float64
    a_t = sched.alphas_cumprod.double()[t.clamp(min=0)]
    a_p = torch.where(
        t_prev >= 0,
        sched.alphas_cumprod.double()[t_prev.clamp(min=0)],
        torch.tensor(sched.final_alpha_cumprod, dtype=torch.float64),
    )
    a_t, a_p = a_t.view(-1, 1, 1, 1), a_p.view(-1, 1, 1, 1)
    x, m = sample.double(), model_output.double()
    if prediction_type == "epsilon":
        eps = m
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    else:
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * m
        eps = a_t.sqrt() * m + (1 - a_t).sqrt() * x
    s2 = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std = s2.sqrt()
    mu = a_p.sqrt() * x0 + (1 - a_p - std**2).sqrt() * eps
    torch.testing.assert_close(out.std.double(), std.flatten(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.mean.double(), mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.prev_sample, out.mean + out.std.view(-1, 1, 1, 1) * noise)

    per_el = Normal(out.mean, out.std.view(-1, 1, 1, 1)).log_prob(out.prev_sample)
    ref = per_el.mean(dim=(1, 2, 3)) if reduction == "mean" else per_el.sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_matches_diffusers_ddim_loop(prediction_type: str, eta: float) -> None:
    scheduler = sd_scheduler(prediction_type)
    scheduler.set_timesteps(10)
    sched = schedule_of(scheduler)
    ts, prev = sched.timesteps(10)
    assert torch.equal(ts, scheduler.timesteps.to(torch.int64))
    assert torch.equal(prev, torch.cat([ts[1:], torch.tensor([-1])]))

    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(SHAPE, generator=g)
    x_ours = x_ref.clone()
    for i, t in enumerate(scheduler.timesteps):
        z = torch.randn(SHAPE, generator=g)
        ref = scheduler.step(
            fake_model(x_ref, int(t)), t, x_ref, eta=eta, variance_noise=z
        ).prev_sample
        out = ddim_step_with_logprob(
            sched,
            fake_model(x_ours, int(t)),
            ts[i].expand(SHAPE[0]),
            prev[i].expand(SHAPE[0]),
            x_ours,
            eta,
            noise=z,
        )
        # bit-identical on CPU today; a small tolerance leaves room for op-order changes
        torch.testing.assert_close(out.prev_sample, ref, rtol=1e-6, atol=1e-6)
        x_ref, x_ours = ref, out.prev_sample
    assert x_ours.abs().max() > 0.1  # the loop did something


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recomputed_log_prob_is_exact(prediction_type: str, reduction: str) -> None:
    sched = schedule_of(sd_scheduler(prediction_type))
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(SHAPE, generator=g)
    model_output = torch.randn(SHAPE, generator=g)
    t, t_prev = torch.tensor([981, 501, 21]), torch.tensor([961, 481, 1])
    sampled = ddim_step_with_logprob(
        sched,
        model_output,
        t,
        t_prev,
        sample,
        1.0,
        noise=torch.randn(SHAPE, generator=g),
        reduction=reduction,
    )
    again = ddim_step_with_logprob(
        sched,
        model_output,
        t,
        t_prev,
        sample,
        1.0,
        prev_sample=sampled.prev_sample,
        reduction=reduction,
    )
    assert torch.equal(again.log_prob, sampled.log_prob)
    assert torch.equal(again.prev_sample, sampled.prev_sample)
    assert torch.equal(torch.exp(again.log_prob - sampled.log_prob), torch.ones(3))


def test_last_step_uses_final_alpha_cumprod() -> None:
    scheduler = sd_scheduler()
    sched = schedule_of(scheduler)
    assert sched.final_alpha_cumprod == pytest.approx(float(scheduler.alphas_cumprod[0]))
    g = torch.Generator().manual_seed(3)
    sample, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.full((3,), 1)
    out = ddim_step_with_logprob(
        sched, eps, t, torch.full((3,), -1), sample, 0.0, noise=torch.zeros(SHAPE)
    )
    a_t = float(sched.alphas_cumprod[1])
    a_p = sched.final_alpha_cumprod
    x0 = (sample - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    torch.testing.assert_close(out.prev_sample, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps)
    assert torch.equal(out.log_prob, torch.zeros(3))  # eta = 0: undefined, reported as 0
    assert torch.equal(out.std, torch.zeros(3))

    # with set_alpha_to_one the last step lands exactly on the predicted x0 (and has std 0)
    sched_one = schedule_of(sd_scheduler(set_alpha_to_one=True))
    assert sched_one.final_alpha_cumprod == 1.0
    out = ddim_step_with_logprob(
        sched_one, eps, t, torch.full((3,), -1), sample, 1.0, noise=torch.randn(SHAPE)
    )
    torch.testing.assert_close(out.prev_sample, x0, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.std, torch.zeros(3))
    assert torch.equal(out.log_prob, torch.zeros(3))  # degenerate step: 0, not NaN


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_kl_matches_torch(reduction: str) -> None:
    g = torch.Generator().manual_seed(4)
    mean_a, mean_b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    std = torch.tensor([0.1, 0.5, 1.3])
    kl = gaussian_kl(mean_a, mean_b, std, reduction)
    s = std.view(-1, 1, 1, 1).expand(SHAPE)
    per_el = kl_divergence(Normal(mean_a, s), Normal(mean_b, s))
    ref = per_el.mean(dim=(1, 2, 3)) if reduction == "mean" else per_el.sum(dim=(1, 2, 3))
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(gaussian_kl(mean_a, mean_a, std, reduction), torch.zeros(3))


def test_gaussian_kl_of_a_deterministic_step_is_zero() -> None:
    g = torch.Generator().manual_seed(5)
    mean_a, mean_b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    std = torch.tensor([0.0, 0.5, 0.0])
    kl = gaussian_kl(mean_a, mean_b, std)
    assert torch.equal(kl[[0, 2]], torch.zeros(2))
    torch.testing.assert_close(kl[1], ((mean_a[1] - mean_b[1]) ** 2 / 0.5).mean())


@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_step_std_matches_the_step(alpha_to_one: bool) -> None:
    sched = schedule_of(sd_scheduler(set_alpha_to_one=alpha_to_one))
    t, t_prev = sched.timesteps(10)
    std = step_std(sched, t, t_prev, eta=0.7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    for s in (0, 4, 9):
        ref = ddim_step_with_logprob(
            sched, x, t[s].expand(3), t_prev[s].expand(3), x, 0.7, noise=torch.zeros(SHAPE)
        ).std
        torch.testing.assert_close(std[s].expand(3), ref)
    assert (std[-1] == 0) == alpha_to_one and bool((std[:-1] > 0).all())


def test_errors() -> None:
    sched = schedule_of(sd_scheduler())
    x = torch.zeros(SHAPE)
    t, tp = torch.full((3,), 501), torch.full((3,), 401)
    with pytest.raises(SafediffError, match="exactly one"):
        ddim_step_with_logprob(sched, x, t, tp, x, 1.0)
    with pytest.raises(SafediffError, match="exactly one"):
        ddim_step_with_logprob(sched, x, t, tp, x, 1.0, noise=x, prev_sample=x)
    with pytest.raises(SafediffError, match="reduction"):
        ddim_step_with_logprob(sched, x, t, tp, x, 1.0, noise=x, reduction="max")
    with pytest.raises(SafediffError, match="shape"):
        ddim_step_with_logprob(sched, x, t[:2], tp[:2], x, 1.0, noise=x)
    with pytest.raises(SafediffError, match="eta"):
        ddim_step_with_logprob(sched, x, t, tp, x, -0.5, noise=x)
    with pytest.raises(SafediffError, match="reduction"):
        gaussian_kl(x, x, torch.ones(3), "max")


def test_half_precision_inputs_are_computed_in_float32() -> None:
    sched = schedule_of(sd_scheduler())
    g = torch.Generator().manual_seed(5)
    sample, eps, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t, tp = torch.full((3,), 501), torch.full((3,), 401)
    out16 = ddim_step_with_logprob(sched, eps.bfloat16(), t, tp, sample, 1.0, noise=z)
    out32 = ddim_step_with_logprob(sched, eps.bfloat16().float(), t, tp, sample, 1.0, noise=z)
    assert out16.prev_sample.dtype == torch.float32 and out16.log_prob.dtype == torch.float32
    assert torch.equal(out16.prev_sample, out32.prev_sample)


def test_bf16_unet_log_prob_drift() -> None:
    """Sample with an fp32 UNet, re-score with a bf16 copy: drift must be finite and small.

    This measures the ratio drift a bf16 trainer sees on-policy (before any update). Run with -s
    to see the numbers.
    """
    sched = schedule_of(sd_scheduler())
    unet32 = tiny_unet()
    unet16 = tiny_unet().to(torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    b = 4
    cond = torch.randn(b, 7, 16, generator=g)
    ts, prev = sched.timesteps(10)
    x = torch.randn(b, 4, 8, 8, generator=g)
    drifts = {"mean": [], "sum": []}
    with torch.no_grad():
        for i in range(10):
            t, tp = ts[i].expand(b), prev[i].expand(b)
            eps32 = predict_noise(unet32, x, t, cond, None, 1.0)
            eps16 = predict_noise(unet16, x, t, cond, None, 1.0)
            assert eps16.dtype == torch.float32
            out = ddim_step_with_logprob(sched, eps32, t, tp, x, 1.0, noise=torch.randn(x.shape))
            for red in ("mean", "sum"):
                lp32 = ddim_step_with_logprob(
                    sched, eps32, t, tp, x, 1.0, prev_sample=out.prev_sample, reduction=red
                ).log_prob
                lp16 = ddim_step_with_logprob(
                    sched, eps16, t, tp, x, 1.0, prev_sample=out.prev_sample, reduction=red
                ).log_prob
                drifts[red].append((lp16 - lp32).abs().max().item())
            x = out.prev_sample
    for red, d in drifts.items():
        print(f"bf16 vs fp32 |log-prob drift| ({red}): max {max(d):.3e}, per step {d}")
        assert all(math.isfinite(v) for v in d)
    # per-element mean log-prob: drift must stay well below a 1e-2 clip range on the ratio
    assert max(drifts["mean"]) < 1e-2
