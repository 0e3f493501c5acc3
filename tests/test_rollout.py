"""Batched DDIM rollouts on a tiny real UNet: invariance, reproducibility, on-policy ratio == 1."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.sampling.ddim import ddim_step_with_logprob
from safediff.sampling.rollout import Trajectory, predict_noise, rollout, transition_log_prob
from safediff.sampling.schedule import DDIMSchedule

N, L, D = 6, 5, 16
LATENT = (4, 8, 8)
STEPS = 6


def tiny_model(prediction_type: str = "epsilon") -> T2IModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )

    def encode_text(prompts: list[str], device: torch.device) -> torch.Tensor:
        raise AssertionError("the sampler must not encode text")

    return T2IModel(
        unet=unet,
        encode_text=encode_text,
        decode=lambda x: (x[:, :3] / 2 + 0.5).clamp(0, 1),
        schedule=DDIMSchedule.from_scheduler_config(dict(scheduler.config)),
        latent_shape=LATENT,
        source="test-tiny",
    )


@pytest.fixture(scope="module")
def model() -> T2IModel:
    return tiny_model()


@pytest.fixture(scope="module")
def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(N, L, D, generator=g), torch.randn(1, L, D, generator=g)


def gens(base: int = 0, n: int = N) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def run(
    model: T2IModel,
    embeds: tuple[torch.Tensor, torch.Tensor],
    *,
    batch_size: int,
    cfg: bool = True,
    generators: list[torch.Generator] | None = None,
    **kw,
) -> Trajectory:
    """A rollout of the N test prompts (CFG 5 with the shared negative, or no CFG)."""
    cond, uncond = embeds
    args = {"num_steps": STEPS, "eta": 1.0, "guidance_scale": 5.0 if cfg else 1.0, **kw}
    return rollout(
        model,
        cond,
        uncond if cfg else None,
        generators if generators is not None else gens(),
        batch_size=batch_size,
        **args,
    )


def test_trajectory_shapes(model: T2IModel, embeds) -> None:
    traj = run(model, embeds, batch_size=4, progress=True)
    assert traj.latents.shape == (N, STEPS + 1, *LATENT)
    assert traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (N, STEPS) and traj.log_probs.dtype == torch.float32
    ts, prev = model.schedule.timesteps(STEPS)
    assert torch.equal(traj.timesteps, ts) and torch.equal(traj.prev_timesteps, prev)
    assert traj.timesteps.dtype == torch.int64
    assert traj.images is not None and traj.images.shape == (N, 3, 8, 8)
    assert traj.images.min() >= 0 and traj.images.max() <= 1
    assert torch.isfinite(traj.log_probs).all()
    # x_T is plain N(0, I) noise drawn first from each sample's generator (init_noise_sigma = 1)
    expected_xT = torch.stack([torch.randn(LATENT, generator=g) for g in gens()])
    assert torch.equal(traj.latents[:, 0], expected_xT)
    assert run(model, embeds, batch_size=4, decode=False).images is None


def test_batched_equals_one_at_a_time(model: T2IModel, embeds) -> None:
    batched = run(model, embeds, batch_size=4)
    single = run(model, embeds, batch_size=1)
    other = run(model, embeds, batch_size=N)
    for traj in (single, other):
        torch.testing.assert_close(traj.latents, batched.latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(traj.log_probs, batched.log_probs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(traj.images, batched.images, rtol=1e-4, atol=1e-4)
    # the samples really differ from each other (different noise and prompts)
    assert (batched.latents[0, -1] - batched.latents[1, -1]).abs().max() > 1e-2


def test_reseeded_rerun_is_bit_identical(model: T2IModel, embeds) -> None:
    a = run(model, embeds, batch_size=4)
    b = run(model, embeds, batch_size=4)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    c = run(model, embeds, batch_size=4, generators=gens(base=100))
    assert not torch.equal(a.latents[:, 0], c.latents[:, 0])


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recomputed_log_probs_equal_sampled(model: T2IModel, embeds, cfg: bool, reduction) -> None:
    """On-policy, re-scoring every stored transition gives the sampled log-prob: ratio == 1."""
    traj = run(model, embeds, batch_size=4, cfg=cfg, reduction=reduction)
    cond, uncond = embeds
    # all N * S transitions at once, in a shuffled order mixing timesteps
    idx_n = torch.arange(N).repeat_interleave(STEPS)
    idx_s = torch.arange(STEPS).repeat(N)
    perm = torch.randperm(N * STEPS, generator=torch.Generator().manual_seed(0))
    idx_n, idx_s = idx_n[perm], idx_s[perm]
    with torch.no_grad():
        out = transition_log_prob(
            model.unet,
            model.schedule,
            traj.latents[idx_n, idx_s],
            traj.latents[idx_n, idx_s + 1],
            traj.timesteps[idx_s],
            traj.prev_timesteps[idx_s],
            cond[idx_n],
            uncond if cfg else None,
            5.0 if cfg else 1.0,
            1.0,
            reduction=reduction,
        )
    stored = traj.log_probs[idx_n, idx_s]
    ratio = torch.exp(out.log_prob - stored)
    # the UNet sees other batch compositions here, so allow float32 rounding of its output only
    tol = 1e-4 if reduction == "mean" else 1e-2
    torch.testing.assert_close(out.log_prob, stored, rtol=0, atol=tol)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=tol)
    print(
        f"on-policy |log-prob drift| ({reduction}, cfg={cfg}): {(out.log_prob - stored).abs().max():.2e}"
    )

    # with the same batch composition as the rollout (one sample, one step) it is exact
    with torch.no_grad():
        first = transition_log_prob(
            model.unet,
            model.schedule,
            traj.latents[:4, 2],
            traj.latents[:4, 3],
            traj.timesteps[2].expand(4),
            traj.prev_timesteps[2].expand(4),
            cond[:4],
            uncond if cfg else None,
            5.0 if cfg else 1.0,
            1.0,
            reduction=reduction,
        )
    assert torch.equal(first.log_prob, traj.log_probs[:4, 2])


def test_transition_log_prob_has_gradient(model: T2IModel, embeds) -> None:
    traj = run(model, embeds, batch_size=N, decode=False)
    cond, uncond = embeds
    out = transition_log_prob(
        model.unet,
        model.schedule,
        traj.latents[:2, 1],
        traj.latents[:2, 2],
        traj.timesteps[1].expand(2),
        traj.prev_timesteps[1].expand(2),
        cond[:2],
        uncond,
        5.0,
        1.0,
    )
    model.unet.zero_grad()
    out.log_prob.sum().backward()
    grads = [p.grad for p in model.unet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.unet.zero_grad()


def test_predict_noise_cfg_formula(model: T2IModel, embeds) -> None:
    cond, uncond = embeds
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, *LATENT, generator=g)
    t = torch.tensor([901, 501, 1])
    with torch.no_grad():
        c = model.unet(x, t, encoder_hidden_states=cond[:3]).sample
        u = model.unet(x, t, encoder_hidden_states=uncond.expand(3, L, D)).sample
        out = predict_noise(model.unet, x, t, cond[:3], uncond, 5.0)
        plain = predict_noise(model.unet, x, t, cond[:3], uncond, 1.0)
    torch.testing.assert_close(out, u + 5.0 * (c - u), rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, c)


def test_initial_noise_shares_x_T_and_leaves_step_noise_per_sample(model: T2IModel, embeds):
    """The reference's shared noise: one x_T for every trajectory, each step's noise still the
    sample's own (the old quirk shared every z too, so one prompt's K samples were identical)."""
    cond, uncond = embeds
    x_T = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(99))
    same_prompt = cond[:1].expand(N, L, D)
    traj = rollout(
        model,
        same_prompt,
        uncond,
        gens(),
        num_steps=STEPS,
        eta=1.0,
        guidance_scale=5.0,
        batch_size=4,
        initial_noise=x_T,
    )
    for i in range(N):  # one x_T, whatever the batch
        assert torch.equal(traj.latents[i, 0], x_T[0])
    for i in range(1, N):  # same prompt, same x_T: only the per-sample step noise tells them apart
        assert not torch.allclose(traj.latents[i, 1], traj.latents[0, 1])
        assert not torch.allclose(traj.latents[i, -1], traj.latents[0, -1])
    # batch size is still only a memory knob
    one_by_one = rollout(
        model,
        same_prompt,
        uncond,
        gens(),
        num_steps=STEPS,
        eta=1.0,
        guidance_scale=5.0,
        batch_size=1,
        initial_noise=x_T,
    )
    torch.testing.assert_close(one_by_one.latents, traj.latents, rtol=1e-4, atol=1e-4)


def test_initial_noise_leaves_each_samples_step_noise_unchanged(model: T2IModel, embeds):
    """Each generator still draws its x_T first: given a rollout's own x_T per sample, the same
    generators reproduce that rollout exactly, so the option changes x_T and nothing else."""
    plain = run(model, embeds, batch_size=3)
    again = run(model, embeds, batch_size=3, initial_noise=plain.latents[:, 0].clone())
    assert torch.equal(again.latents, plain.latents)
    assert torch.equal(again.log_probs, plain.log_probs)


def test_initial_noise_of_the_wrong_shape_is_refused(model: T2IModel, embeds) -> None:
    with pytest.raises(SafediffError, match="initial_noise has shape"):
        run(model, embeds, batch_size=3, initial_noise=torch.zeros(2, *LATENT))
    with pytest.raises(SafediffError, match="initial_noise has shape"):
        run(model, embeds, batch_size=3, initial_noise=torch.zeros(1, 3, 8, 8))


def test_eta_zero_is_deterministic_ddim(model: T2IModel, embeds) -> None:
    """eta = 0 rollout equals diffusers' DDIMScheduler loop driven by the same UNet and CFG."""
    cond, uncond = embeds
    traj = run(model, embeds, batch_size=N, eta=0.0)
    assert torch.equal(traj.log_probs, torch.zeros(N, STEPS))
    scheduler = DDIMScheduler.from_config(
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            set_alpha_to_one=False,
            clip_sample=False,
        )
    )
    scheduler.set_timesteps(STEPS)
    x = traj.latents[:, 0].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            tt = t.expand(N)
            u = model.unet(x, tt, encoder_hidden_states=uncond.expand(N, L, D)).sample
            c = model.unet(x, tt, encoder_hidden_states=cond).sample
            x = scheduler.step(u + 5.0 * (c - u), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(traj.latents[:, -1], x, rtol=1e-4, atol=1e-4)


def test_rollout_errors(model: T2IModel, embeds) -> None:
    cond, uncond = embeds
    kw = dict(num_steps=2, eta=1.0, guidance_scale=5.0, batch_size=2)
    with pytest.raises(SafediffError, match="generators"):
        rollout(model, cond, uncond, gens(n=N - 1), **kw)
    with pytest.raises(SafediffError, match="negative_embeds"):
        rollout(model, cond, uncond.expand(2, L, D), gens(), **kw)
    with pytest.raises(SafediffError, match="batch_size"):
        rollout(model, cond, uncond, gens(), **{**kw, "batch_size": 0})


def test_rollout_log_prob_is_the_pure_steps(model: T2IModel) -> None:
    """rollout's per-step log-prob is the pure step's log-prob of the stored transition."""
    traj = run(model, (torch.zeros(N, L, D), torch.zeros(1, L, D)), batch_size=N, cfg=False)
    with torch.no_grad():
        eps = predict_noise(
            model.unet,
            traj.latents[:, 0],
            traj.timesteps[0].expand(N),
            torch.zeros(N, L, D),
            None,
            1.0,
        )
    out = ddim_step_with_logprob(
        model.schedule,
        eps,
        traj.timesteps[0].expand(N),
        traj.prev_timesteps[0].expand(N),
        traj.latents[:, 0],
        1.0,
        prev_sample=traj.latents[:, 1],
    )
    assert torch.equal(out.log_prob, traj.log_probs[:, 0])
