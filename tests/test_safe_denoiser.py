"""The Safe Denoiser: kernel math against the direct N x M x D formulation, gate, window, no-op
when the negation set is far, on-policy log-probs through the hook, the cached negation set."""

import dataclasses
import math

import pytest
import torch

from safediff.defenses.safe_denoiser import (
    NegationSet,
    SafeDenoiser,
    SafeDenoiserConfig,
    build_sd_negation_set,
    calibrate_gate_threshold,
    encode_images,
    kernel_log_weights,
    load_image,
    log_posterior_odds,
    odds_beta,
    safe_clean_estimate,
    unsafe_posterior_mean,
)
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.stable_diffusion import sd_components_to_t2i
from safediff.models.tiny_sd import build_tiny_sd
from safediff.sampling.rollout import predict_noise, rollout, transition_log_prob

N, STEPS = 4, 6
LATENT = (4, 8, 8)


@pytest.fixture(scope="module")
def models() -> dict[str, T2IModel]:
    return {
        kind: sd_components_to_t2i(build_tiny_sd(seed=0, prediction_type=kind), "tiny-sd")
        for kind in ("epsilon", "v_prediction")
    }


@pytest.fixture(params=["epsilon", "v_prediction"])
def model(request, models) -> T2IModel:
    return models[request.param]


@pytest.fixture
def eps_model(models) -> T2IModel:
    return models["epsilon"]


def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(N, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)


def gens(base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(N)]


def sample(model: T2IModel, guidance=(), **kw):
    cond, uncond = embeds()
    args = dict(num_steps=STEPS, eta=1.0, guidance_scale=3.0, batch_size=N, decode=False)
    return rollout(model, cond, uncond, gens(), guidance=guidance, **{**args, **kw})


def direct(x: torch.Tensor, y: torch.Tensor, h: float, distance: str):
    """The reference formulation: an explicit [B, N, D] difference tensor, float64."""
    x, y = x.double(), y.double()
    diff = x[:, None, :] - y[None, :, :]  # [B, N, D]
    d = diff.pow(2).sum(-1)
    d = d.sqrt() if distance == "l2" else d
    k = torch.exp(-d / (2 * h**2))  # [B, N]
    e_unsafe = (k[:, :, None] * y[None]).sum(1) / k.sum(1, keepdim=True)  # [B, N, D] -> [B, D]
    return k, e_unsafe, k.sum(1)


@pytest.mark.parametrize("distance", ["l2", "sq_l2"])
def test_posterior_odds_equal_direct_density_ratio(distance: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 12, generator=g)
    u, s = torch.randn(6, 12, generator=g) + 0.4, torch.randn(9, 12, generator=g) - 0.2
    h = 1.5 if distance == "l2" else 2.5
    k_u, e_ref, _ = direct(x, u, h, distance)
    k_s, _, _ = direct(x, s, h, distance)
    want = math.log(0.2) + torch.log(k_u.mean(1)) - torch.log(k_s.mean(1))  # means: sizes differ
    log_odds, e_unsafe = log_posterior_odds(x, u, s, h, distance, prior_odds=0.2)
    torch.testing.assert_close(log_odds.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e_unsafe.double(), e_ref, rtol=1e-5, atol=1e-6)
    # precomputed norms give the same
    again, _ = log_posterior_odds(x, u, s, h, distance, 0.2, (u * u).sum(1), (s * s).sum(1))
    torch.testing.assert_close(again, log_odds)


def test_odds_beta_is_the_capped_ratio_without_overflow() -> None:
    log_odds = torch.tensor([-3.0, 0.0, math.log(2.5), 1e4, -1e4])
    torch.testing.assert_close(
        odds_beta(log_odds, 2.0), torch.tensor([math.exp(-3.0), 1.0, 2.0, 2.0, 0.0])
    )
    assert torch.equal(odds_beta(log_odds, 0.0), torch.zeros(5))


def test_odds_gate_acts_by_the_density_ratio() -> None:
    g = torch.Generator().manual_seed(2)
    unsafe = torch.randn(12, 3, 4, 4, generator=g) + 1.0
    safe = torch.randn(12, 3, 4, 4, generator=g) - 1.0
    x0 = torch.stack([unsafe[0] + 0.01, safe[0] + 0.01, unsafe[1]])
    t = torch.tensor([500, 500, 100])  # the third row is outside the window
    cfg = SafeDenoiserConfig(
        gate="odds", bandwidth=1.0, distance="sq_l2", scale=2.0, prior_odds=1.0,
        update="paper", t_min=200, t_max=800,
    )  # fmt: skip
    hook = SafeDenoiser(unsafe, cfg, reference=safe)
    x0_safe, active, log_odds = hook.correct(x0, t)
    assert active[0] and not active[2]  # row 1: active where its beta did not underflow to 0
    assert log_odds[0] > math.log(2.0) and log_odds[1] < -5 and log_odds[2] == -math.inf
    want_odds, e_u = log_posterior_odds(
        x0.flatten(1), unsafe.flatten(1), safe.flatten(1), 1.0, "sq_l2"
    )
    torch.testing.assert_close(log_odds[:2], want_odds[:2])
    beta = odds_beta(want_odds[:2], 2.0)
    assert beta[0] == 2.0 and beta[1] < 1e-2  # near unsafe: the cap; near safe: almost nothing
    assert bool(active[1]) == bool(beta[1] > 0)
    want = x0[:2] + beta.reshape(2, 1, 1, 1) * (x0[:2] - e_u[:2].reshape(2, 3, 4, 4))
    torch.testing.assert_close(x0_safe[:2], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(x0_safe[2], x0[2])


def test_odds_gate_needs_a_matching_reference_set() -> None:
    y = torch.randn(4, 3, 4, 4)
    with pytest.raises(SafediffError, match="reference set"):
        SafeDenoiser(y, SafeDenoiserConfig(gate="odds"))
    with pytest.raises(SafediffError, match="reference set"):
        SafeDenoiser(y, SafeDenoiserConfig(), reference=y)
    with pytest.raises(SafediffError, match="reference samples have shape"):
        SafeDenoiser(y, SafeDenoiserConfig(gate="odds"), reference=torch.randn(4, 3, 5, 5))
    for bad in ({"gate": "maybe"}, {"prior_odds": 0.0}):
        with pytest.raises(SafediffError, match="invalid Safe Denoiser config"):
            SafeDenoiserConfig(**bad)


@pytest.mark.parametrize("distance", ["l2", "sq_l2"])
def test_kernel_weights_equal_direct_formulation(distance: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 20, generator=g), torch.randn(7, 20, generator=g) + 0.3
    h = 2.0 if distance == "l2" else 3.0
    k, e_ref, mass_ref = direct(x, y, h, distance)
    log_k = kernel_log_weights(x, y, h, distance)
    assert log_k.shape == (3, 7)
    torch.testing.assert_close(log_k.exp().double(), k, rtol=1e-5, atol=1e-7)
    e_unsafe, log_mass = unsafe_posterior_mean(x, y, h, distance, y_sq_norms=(y * y).sum(1))
    torch.testing.assert_close(e_unsafe.double(), e_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_mass.exp().double(), mass_ref, rtol=1e-5, atol=1e-7)
    # leave-one-out calibration: mean over i of sum_{j != i} k(y_i, y_j), by a double loop
    loo = [
        sum(direct(y[i : i + 1], y[j : j + 1], h, distance)[2].item() for j in range(7) if j != i)
        for i in range(7)
    ]
    assert calibrate_gate_threshold(y, h, distance, chunk=3) == pytest.approx(
        sum(loo) / 7, rel=1e-5
    )


def test_posterior_mean_is_finite_when_every_kernel_underflows() -> None:
    x = torch.zeros(1, 16)
    y = torch.stack([torch.full((16,), 1e4), torch.full((16,), 2e4)])
    e_unsafe, log_mass = unsafe_posterior_mean(x, y, 1.0, "sq_l2")
    assert torch.isfinite(e_unsafe).all() and log_mass.item() < -1e6
    torch.testing.assert_close(e_unsafe, y[:1])  # all weight on the nearest sample


def test_update_forms() -> None:
    g = torch.Generator().manual_seed(1)
    x0, e = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    beta = torch.tensor([0.5, 0.0])
    paper = safe_clean_estimate(x0, e, beta, "paper")
    torch.testing.assert_close(paper[0], x0[0] + 0.5 * (x0[0] - e[0]))
    # the paper's form moves x0 away from E_unsafe: |x0' - E| = (1 + beta) |x0 - E|
    assert float((paper[0] - e[0]).norm()) == pytest.approx(
        1.5 * float((x0[0] - e[0]).norm()), rel=1e-5
    )
    released = safe_clean_estimate(x0, e, beta, "released")
    torch.testing.assert_close(released[0], x0[0] - 0.5 * e[0])
    assert torch.equal(paper[1], x0[1]) and torch.equal(released[1], x0[1])


def test_far_negation_set_leaves_sampling_unchanged(model: T2IModel) -> None:
    g = torch.Generator().manual_seed(2)
    far = 50 + 0.01 * torch.randn(16, *LATENT, generator=g)  # a tight cluster far from any x0
    cfg = SafeDenoiserConfig(t_min=0, t_max=1000)  # every step in the window
    hook = SafeDenoiser(far, cfg)
    assert hook.gate_threshold == pytest.approx(15, rel=3e-2)  # each sample sees 15 close ones
    plain = sample(model)
    defended = sample(model, guidance=[hook])
    assert torch.equal(defended.latents, plain.latents)
    assert torch.equal(defended.log_probs, plain.log_probs)
    # not vacuous: the same far set with the gate forced open does change the samples
    forced = SafeDenoiser(far, SafeDenoiserConfig(t_min=0, t_max=1000, gate_threshold=0.0))
    assert (
        sample(model, guidance=[forced]).latents[:, -1] - plain.latents[:, -1]
    ).abs().max() > 1e-2


def test_window_acts_only_on_configured_steps(eps_model: T2IModel) -> None:
    near = torch.randn(8, *LATENT, generator=torch.Generator().manual_seed(3))
    ts, _ = eps_model.schedule.timesteps(STEPS)  # 831, 665, 499, 333, 167, 1
    cfg = SafeDenoiserConfig(t_min=450, t_max=550, gate_threshold=0.0)  # gate always open
    (first,) = [i for i, t in enumerate(ts.tolist()) if 450 <= t <= 550]  # t = 499
    plain = sample(eps_model)
    defended = sample(eps_model, guidance=[SafeDenoiser(near, cfg)])
    # identical up to and including the input of the first windowed step, different after it
    assert torch.equal(defended.latents[:, : first + 1], plain.latents[:, : first + 1])
    assert torch.equal(defended.log_probs[:, :first], plain.log_probs[:, :first])
    assert (defended.latents[:, first + 1] - plain.latents[:, first + 1]).abs().max() > 1e-3
    # the reference window [780, 1000] acts on the 11 noisiest of 50 steps
    ts50, _ = eps_model.schedule.timesteps(50)
    hook = SafeDenoiser(near, SafeDenoiserConfig())
    assert int(hook.in_window(ts50).sum()) == 11 and bool(hook.in_window(ts50)[:11].all())


@pytest.mark.parametrize("update", ["released", "paper"])
def test_gate_opens_only_above_threshold(update: str) -> None:
    g = torch.Generator().manual_seed(4)
    y = torch.randn(10, 2, 3, 3, generator=g)
    x0 = torch.stack([y[0] + 0.05 * torch.randn(2, 3, 3, generator=g), y[0] + 8.0])
    t = torch.tensor([900, 900])
    cfg = SafeDenoiserConfig(bandwidth=1.0, scale=0.4, update=update, gate_margin=0.0)
    # masses by direct computation; the gate is mass > tau - margin
    _, e_ref, mass = direct(x0.flatten(1), y.flatten(1), 1.0, "l2")
    assert mass[0] > 1e-2 > 1e-6 > mass[1]
    for tau, expected in [(float(mass[1] * 10), [True, False]), (1e9, [False, False])]:
        hook = SafeDenoiser(y, dataclasses.replace(cfg, gate_threshold=tau))
        x0_safe, active, log_mass = hook.correct(x0, t)
        assert active.tolist() == expected
        torch.testing.assert_close(log_mass.exp().double(), mass, rtol=1e-5, atol=1e-12)
        assert torch.equal(x0_safe[1], x0[1])
    hook = SafeDenoiser(y, dataclasses.replace(cfg, gate_threshold=float(mass[0])))
    x0_safe, active, _ = hook.correct(x0, t)
    assert active.tolist() == [False, False]  # strictly above the threshold
    # open row: the documented update with E_unsafe of the direct formulation
    hook = SafeDenoiser(y, dataclasses.replace(cfg, gate_threshold=0.0))
    x0_safe, active, _ = hook.correct(x0, t)
    e0 = e_ref[0].float().reshape(2, 3, 3)
    want = x0[0] + 0.4 * (x0[0] - e0) if update == "paper" else x0[0] - 0.4 * e0
    torch.testing.assert_close(x0_safe[0], want, rtol=1e-5, atol=1e-5)
    # the calibrated threshold (margin 0) opens for the near row and not the far one
    calibrated = SafeDenoiser(y, cfg)
    assert calibrated.correct(x0, t)[1].tolist() == [mass[0] > calibrated.gate_threshold, False]


def test_hook_converts_corrected_x0_consistently(model: T2IModel) -> None:
    """The step taken with the hook is the DDIM step of the corrected x0 (both DDIM terms)."""
    near = torch.randn(8, *LATENT, generator=torch.Generator().manual_seed(6))
    hook = SafeDenoiser(near, SafeDenoiserConfig(t_min=0, t_max=1000, gate_threshold=0.0))
    traj = sample(model, guidance=[hook], num_steps=3, eta=0.0)
    plain = sample(model, num_steps=3, eta=0.0)
    a_t = model.schedule.alpha_bar(traj.timesteps[:1])
    a_p = model.schedule.alpha_bar(traj.prev_timesteps[:1])
    x_t = plain.latents[:, 0]
    with torch.no_grad():
        cond, uncond = embeds()
        out = predict_noise(model.unet, x_t, traj.timesteps[0].expand(N), cond, uncond, 3.0)
    if model.schedule.prediction_type == "epsilon":
        eps_unet = out
    else:  # v -> eps
        eps_unet = a_t**0.5 * out + (1 - a_t) ** 0.5 * x_t
    x0 = (x_t - (1 - a_t) ** 0.5 * eps_unet) / a_t**0.5
    x0_safe, active, _ = hook.correct(x0, traj.timesteps[0].expand(N))
    assert active.all()
    eps_safe = (x_t - a_t**0.5 * x0_safe) / (1 - a_t) ** 0.5
    want = a_p**0.5 * x0_safe + (1 - a_p) ** 0.5 * eps_safe
    torch.testing.assert_close(traj.latents[:, 1], want, rtol=1e-4, atol=1e-4)


def test_on_policy_log_probs_through_the_hook(model: T2IModel) -> None:
    near = torch.randn(8, *LATENT, generator=torch.Generator().manual_seed(7))
    hook = SafeDenoiser(near, SafeDenoiserConfig(t_min=0, t_max=1000, gate_threshold=0.0))
    traj = sample(model, guidance=[hook])
    cond, uncond = embeds()
    n_idx = torch.arange(N).repeat_interleave(STEPS)
    s_idx = torch.arange(STEPS).repeat(N)
    kw = dict(
        guidance=[hook], step_index=s_idx, guidance_states=traj.guidance_states_at(n_idx, s_idx)
    )
    with torch.no_grad():
        out = transition_log_prob(
            model.unet,
            model.schedule,
            traj.latents[n_idx, s_idx],
            traj.latents[n_idx, s_idx + 1],
            traj.timesteps[s_idx],
            traj.prev_timesteps[s_idx],
            cond[n_idx],
            uncond,
            3.0,
            1.0,
            **kw,
        )
        unguided = transition_log_prob(
            model.unet,
            model.schedule,
            traj.latents[n_idx, s_idx],
            traj.latents[n_idx, s_idx + 1],
            traj.timesteps[s_idx],
            traj.prev_timesteps[s_idx],
            cond[n_idx],
            uncond,
            3.0,
            1.0,
        )
    stored = traj.log_probs[n_idx, s_idx]
    torch.testing.assert_close(out.log_prob, stored, rtol=0, atol=1e-4)
    assert (unguided.log_prob - stored).abs().max() > 1e-2  # the hook matters for the log-prob
    # gradient reaches the UNet through the corrected mean
    model.unet.zero_grad()
    res = transition_log_prob(
        model.unet,
        model.schedule,
        traj.latents[:2, 0],
        traj.latents[:2, 1],
        traj.timesteps[:1].expand(2),
        traj.prev_timesteps[:1].expand(2),
        cond[:2],
        uncond,
        3.0,
        1.0,
        guidance=[hook],
        step_index=torch.zeros(2, dtype=torch.int64),
    )
    res.log_prob.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())
    model.unet.zero_grad()
    with pytest.raises(SafediffError, match="step_index"):
        transition_log_prob(
            model.unet, model.schedule, traj.latents[:1, 0], traj.latents[:1, 1],
            traj.timesteps[:1], traj.prev_timesteps[:1], cond[:1], uncond, 3.0, 1.0,
            guidance=[hook],
        )  # fmt: skip


def test_negation_set_shape_is_checked(eps_model: T2IModel) -> None:
    hook = SafeDenoiser(torch.randn(4, 4, 6, 6), SafeDenoiserConfig(t_min=0, gate_threshold=0.0))
    with pytest.raises(SafediffError, match="resolution"):
        sample(eps_model, guidance=[hook], num_steps=2)
    with pytest.raises(SafediffError, match="not found"):
        NegationSet.load("/nonexistent/negset.safetensors")


def test_sd_negation_set_is_cached_by_its_inputs(eps_model, tmp_path, monkeypatch) -> None:
    from PIL import Image

    folder = tmp_path / "unsafe"
    folder.mkdir()
    g = torch.Generator().manual_seed(8)
    for i in range(3):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    vae = eps_model.components["vae"]
    calls = []
    real_encode = vae.encode

    def counting_encode(x):
        calls.append(x.shape[0])
        return real_encode(x)

    monkeypatch.setattr(vae, "encode", counting_encode)
    path = build_sd_negation_set(vae, folder, 16, tmp_path / "cache")
    assert calls == [3]
    negset = NegationSet.load(path)
    assert negset.samples.shape == (3, 4, 8, 8) and negset.digest and negset.source
    images = torch.stack([load_image(p, 16) for p in sorted(folder.iterdir())])
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(negset.samples, encode_images(vae, images))
    # same inputs: the cached file, nothing encoded
    assert build_sd_negation_set(vae, folder, 16, tmp_path / "cache") == path
    assert calls == [3, 3]  # (the direct encode_images call above)
    # another image or another resolution: another key
    Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
        folder / "img0.png"
    )
    other = build_sd_negation_set(vae, folder, 16, tmp_path / "cache")
    assert other != path and not math.isnan(NegationSet.load(other).samples.sum().item())
    assert build_sd_negation_set(vae, folder, 32, tmp_path / "cache") not in (path, other)
