"""The flow schedule, Flow-GRPO's SDE step with log-prob, and the MixGRPO window (sampling/flow.py)."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from safediff.errors import SafediffError
from safediff.sampling.flow import (
    FlowSchedule,
    eps_from_velocity,
    flow_sde_step,
    flow_shift_mu,
    sde_window,
    x0_from_velocity,
)

SD3_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _tensors(seed: int, batch: int = 3, shape=(4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *shape), generator=g) for _ in range(3)]


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sigmas_match_diffusers_sd3(steps):
    sched = FlowMatchEulerDiscreteScheduler(**SD3_CONFIG)
    sched.set_timesteps(steps)
    fs = FlowSchedule.from_scheduler_config(sched.config)
    torch.testing.assert_close(fs.sigmas(steps), sched.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(fs.timesteps(steps), sched.timesteps, atol=0, rtol=0)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sigmas_match_diffusers_flux_dynamic_shift(steps):
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    fs = FlowSchedule.from_scheduler_config(sched.config, sigma_spacing="flux", image_seq_len=1024)
    # FluxPipeline: sigmas = linspace(1, 1/S, S), mu = calculate_shift(image_seq_len, ...)
    mu = flow_shift_mu(1024, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(0.5 + (1024 - 256) * 0.65 / 3840)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(fs.sigmas(steps), sched.sigmas, atol=1e-7, rtol=0)
    assert fs.sigmas(steps)[0] == 1 and fs.sigmas(steps)[-1] == 0


def test_schedule_refuses_unsupported_options():
    with pytest.raises(SafediffError, match="use_karras_sigmas"):
        FlowSchedule.from_scheduler_config({**SD3_CONFIG, "use_karras_sigmas": True})
    with pytest.raises(SafediffError, match="image_seq_len"):
        FlowSchedule.from_scheduler_config(FLUX_CONFIG)


def test_x0_and_eps_from_velocity_invert_the_interpolation():
    x0, eps, _ = _tensors(0)
    t = torch.tensor([0.9, 0.5, 0.1])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = eps - x0
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_from_velocity(x_t, v, t), eps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_matches_torch_normal_and_an_independent_formula(reduction):
    sigmas = FlowSchedule(shift=3.0).sigmas(6)
    v, x, z = _tensors(1)
    idx = torch.tensor([0, 2, 5])  # t = 1 (the reference's sigmas[1] substitute), mid, last step
    a = 0.7
    out = flow_sde_step(sigmas, v, x, idx, a, noise=z, reduction=reduction)

    # Independent formula, per sample in float64: the reference's algebraic form of the mean,
    # x (1 + s^2 dt / (2t)) + v (1 + s^2 (1 - t) / (2t)) dt.
    for b in range(3):
        i = int(idx[b])
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = t_next - t
        root_t = float(sigmas[1]) if t == 1 else t
        s = a * math.sqrt(t / (1 - root_t))
        xd, vd = x[b].double(), v[b].double()
        mean = xd * (1 + s**2 / (2 * t) * dt) + vd * (1 + s**2 * (1 - t) / (2 * t)) * dt
        std = s * math.sqrt(-dt)
        torch.testing.assert_close(out.mean[b].double(), mean, atol=1e-5, rtol=1e-5)
        assert out.std[b].item() == pytest.approx(std, rel=1e-5)
        nxt = mean + std * z[b].double()
        torch.testing.assert_close(out.prev_sample[b].double(), nxt, atol=1e-5, rtol=1e-5)
        lp = torch.distributions.Normal(out.mean[b], out.std[b]).log_prob(out.prev_sample[b])
        ref = lp.mean() if reduction == "mean" else lp.sum()
        assert out.log_prob[b].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-4)


def test_noise_zero_is_diffusers_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(**SD3_CONFIG)
    steps = 5
    sched.set_timesteps(steps)
    sigmas = FlowSchedule.from_scheduler_config(sched.config).sigmas(steps)
    x = _tensors(2, batch=2)[0]
    ours = x.clone()
    for i, t in enumerate(sched.timesteps):
        v = torch.sin(3 * x) + 0.1 * i  # any velocity field
        x = sched.step(v, t, x).prev_sample
        out = flow_sde_step(sigmas, torch.sin(3 * ours) + 0.1 * i, ours, i, 0.0, noise=v)
        ours = out.prev_sample
        assert torch.equal(out.log_prob, torch.zeros(2)) and torch.equal(out.std, torch.zeros(2))
        torch.testing.assert_close(ours, x, atol=1e-6, rtol=0)


def test_recompute_gives_ratio_exactly_one_and_gradient_through_the_mean():
    sigmas = FlowSchedule(shift=3.0).sigmas(4)
    v, x, z = _tensors(3)
    idx = torch.tensor([0, 1, 3])
    sampled = flow_sde_step(sigmas, v, x, idx, 0.7, noise=z)
    v_grad = v.clone().requires_grad_(True)
    again = flow_sde_step(sigmas, v_grad, x, idx, 0.7, prev_sample=sampled.prev_sample)
    assert torch.equal(torch.exp(again.log_prob - sampled.log_prob), torch.ones(3))
    again.log_prob.sum().backward()
    assert v_grad.grad is not None and v_grad.grad.abs().sum() > 0


def test_bad_step_inputs_are_one_line_errors():
    sigmas = FlowSchedule().sigmas(3)
    v, x, z = _tensors(4)
    for kwargs, match in (
        ({}, "exactly one"),
        ({"noise": z, "prev_sample": z}, "exactly one"),
        ({"noise": z, "reduction": "max"}, "reduction"),
    ):
        with pytest.raises(SafediffError, match=match):
            flow_sde_step(sigmas, v, x, 0, 0.7, **kwargs)
    with pytest.raises(SafediffError, match="step_index"):
        flow_sde_step(sigmas, v, x, 3, 0.7, noise=z)
    with pytest.raises(SafediffError, match="noise level"):
        flow_sde_step(sigmas, v, x, 0, -0.1, noise=z)


def test_sde_window_rules():
    assert sde_window(10, 4, 0).steps == [0, 1, 2, 3]
    assert sde_window(10, 4, 3, stride=1).start == 3
    assert sde_window(10, 4, 100).start == 6  # sliding stops at the last valid start
    assert sde_window(10, 4, 7, rule="cyclic").start == 0  # 7 moves over 7 positions wrap round
    assert sde_window(10, 4, 9, rule="fixed", start=2).start == 2
    assert sde_window(10, 4, 5, every=2, stride=2).start == 4
    mask = sde_window(10, 4, 2).mask
    assert mask.tolist() == [False, False, True, True, True, True, False, False, False, False]
    limited = sde_window(10, 4, 50, rule="sliding", limit=9)  # off the last step
    assert limited.steps == [5, 6, 7, 8] and limited.mask.shape == (10,)
    with pytest.raises(SafediffError, match="does not fit a trajectory of 10 steps"):
        sde_window(10, 11, 0)
    with pytest.raises(SafediffError, match="start"):
        sde_window(10, 4, 0, start=7)
