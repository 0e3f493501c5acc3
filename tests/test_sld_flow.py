"""SLD on flow models (SD3): the velocity -> eps -> SLD -> velocity map against SLD's equations
written out by hand, a tiny-sd3 rollout against a hand-written Euler loop, per-sample seeds and
momentum (batched == one at a time), stacking with the Safe Denoiser, and FLUX-dev refused."""

import dataclasses

import pytest
import torch

from safediff.config import ModelConfig
from safediff.defenses.safe_denoiser import NegationSet
from safediff.defenses.sld import SLD_PRESETS, SafeLatentDiffusion, SLDConfig
from safediff.defenses.stack import apply_defenses
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.loading import load_t2i_model
from safediff.sampling.flow import FlowGuidanceStep, flow_rollout
from safediff.sampling.sample import SamplerSettings, sample
from safediff.seeding import generator

PROMPTS = ["a nude woman on a beach", "a red car"]
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def sd3() -> T2IModel:
    return load_t2i_model(ModelConfig(pretrained="tiny-sd3"))


def _hand_sld_eps(u, c, s, eps, mom, g, cfg: SLDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """SLD's eqs. 3, 4, 6-8 element by element in plain Python floats."""
    out, new_mom = torch.empty_like(eps), torch.empty_like(mom)
    for idx in range(eps.numel()):
        uu, cc, ss = u.view(-1)[idx].item(), c.view(-1)[idx].item(), s.view(-1)[idx].item()
        d = cc - ss
        mu = 0.0 if d >= cfg.sld_threshold else min(abs(d) * cfg.sld_guidance_scale, 1.0)
        gamma = mu * (ss - uu) + cfg.sld_momentum_scale * mom.view(-1)[idx].item()
        new_mom.view(-1)[idx] = (
            cfg.sld_mom_beta * mom.view(-1)[idx].item() + (1 - cfg.sld_mom_beta) * gamma
        )
        # eps carries earlier hooks' changes on top of plain CFG
        cfg_eps = uu + g * (cc - uu)
        out.view(-1)[idx] = uu + g * ((cc - uu) - gamma) + (eps.view(-1)[idx].item() - cfg_eps)
    return out, new_mom


def test_flow_form_is_sld_in_eps_mapped_back_to_a_velocity() -> None:
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 2, 2)
    x = torch.randn(shape, generator=g)
    v_u, v_c, v_s = (torch.randn(shape, generator=g) for _ in range(3))
    sigma = torch.tensor([0.9, 0.4, 1.0])  # the last row sits at sigma = 1 (the first step)
    earlier = torch.randn(shape, generator=g) * 0.1  # what an earlier hook added to v
    v_in = v_u + GUIDANCE * (v_c - v_u) + earlier
    mom = torch.randn(shape, generator=g) * 0.05
    cfg = SLDConfig(7.0, sld_warmup_steps=0, sld_threshold=0.02, sld_momentum_scale=0.3)
    hook = SafeLatentDiffusion(torch.zeros(1, 4, 8), cfg)
    step = FlowGuidanceStep(
        x_t=x, sigma=sigma, step=torch.tensor([0, 3, 0]), velocity=v_in, v_cond=v_c,
        v_uncond=v_u, guidance_scale=GUIDANCE, extra={"sld": v_s},
    )  # fmt: skip
    v_out, state = hook.flow_guidance(step, {"momentum": mom})

    # independently: eps = x_t + (1 - sigma) v of every branch, SLD by hand, v = (eps - x) / (1 - s)
    s4 = sigma.view(-1, 1, 1, 1)
    eps_of = lambda v: x + (1 - s4) * v  # noqa: E731
    want, want_mom = _hand_sld_eps(
        eps_of(v_u), eps_of(v_c), eps_of(v_s), eps_of(v_in), mom, GUIDANCE, cfg
    )
    want_v = (want - x) / (1 - s4)
    torch.testing.assert_close(v_out[:2], want_v[:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state["momentum"], want_mom, rtol=1e-5, atol=1e-6)
    assert torch.equal(v_out[2], v_in[2])  # sigma = 1: every eps difference is 0
    assert (v_out[:2] - v_in[:2]).abs().max() > 1e-2  # SLD acted on the other rows
    # in eps units the result is eq. 3 exactly: eps(v') = eps'
    torch.testing.assert_close(eps_of(v_out)[:2], want[:2], rtol=1e-5, atol=1e-5)

    # before warm-up: the very same velocity tensor, momentum still updated
    late = SafeLatentDiffusion(torch.zeros(1, 4, 8), dataclasses.replace(cfg, sld_warmup_steps=9))
    v_same, state = late.flow_guidance(step, {"momentum": mom})
    assert v_same is v_in
    torch.testing.assert_close(state["momentum"], want_mom, rtol=1e-5, atol=1e-6)


def test_rollout_equals_a_hand_written_euler_loop(sd3) -> None:
    """ODE (noise level 0), 3 steps, SLD 'max' (no warm-up): the transformer called by hand on
    [uncond, cond, concept], SLD in eps units, back to v, Euler x + (s' - s) v."""
    cfg = SLD_PRESETS["max"]
    concept = sd3.encode_text([cfg.concept], "cpu")
    hook = SafeLatentDiffusion(concept, cfg)
    cond, uncond = sd3.encode_text(PROMPTS[:1], "cpu"), sd3.encode_text([""], "cpu")
    gens = [torch.Generator().manual_seed(5)]
    traj = flow_rollout(
        sd3, cond, uncond, gens, num_steps=3, noise_level=0.0, guidance_scale=GUIDANCE,
        batch_size=1, decode=False, hooks=[hook],
    )  # fmt: skip
    plain = flow_rollout(
        sd3, cond, uncond, [torch.Generator().manual_seed(5)], num_steps=3, noise_level=0.0,
        guidance_scale=GUIDANCE, batch_size=1, decode=False,
    )  # fmt: skip
    sigmas = traj.sigmas
    x, mom = traj.latents[:, 0].clone(), torch.zeros_like(traj.latents[:, 0])
    with torch.no_grad():
        for i in range(3):
            t = (sigmas[i] * sd3.schedule.num_train_timesteps).reshape(1).repeat(3)
            out = sd3.unet(
                torch.cat([x] * 3), t, encoder_hidden_states=torch.cat([uncond, cond, concept])
            ).sample.float()
            s = sigmas[i]
            u, c, sc = (x + (1 - s) * o for o in out.chunk(3))
            v = out[0:1] + GUIDANCE * (out[1:2] - out[0:1])
            if s < 1:
                eps, mom = _hand_sld_eps(u, c, sc, x + (1 - s) * v, mom, GUIDANCE, cfg)
                v = (eps - x) / (1 - s)
            x = x + (sigmas[i + 1] - s) * v
            torch.testing.assert_close(traj.latents[:, i + 1], x, rtol=1e-4, atol=1e-4)
    assert (traj.latents[:, -1] - plain.latents[:, -1]).abs().max() > 1e-3


def _negset(model: T2IModel, tmp_path) -> str:
    latents = torch.randn(6, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    return str(NegationSet.from_tensor(latents).save(tmp_path / "negset.safetensors"))


@pytest.mark.parametrize("stack", ["sld:max", "sld:medium;sld_warmup_steps=0", "sld+sd+neg"])
def test_defended_sd3_samples_with_per_sample_seeds(sd3, tmp_path, stack) -> None:
    if stack == "sld+sd+neg":
        stack = f"sld:max,safe-denoiser:{_negset(sd3, tmp_path)};t_min=0,negprompt:nudity"
    defended, kwargs = apply_defenses(sd3, stack)
    images, trajs = [], []
    for batch in (2, 1):
        settings = SamplerSettings(num_steps=3, eta=0.0, guidance_scale=GUIDANCE, batch_size=batch)
        gens = [generator(10), generator(11)]
        out = sample(defended, PROMPTS, gens, settings, defense=kwargs).trajectory
        images.append(out.images)
        trajs.append(out.latents)
    torch.testing.assert_close(trajs[0], trajs[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-5)
    assert torch.isfinite(images[0]).all() and not torch.equal(images[0][0], images[0][1])
    settings = SamplerSettings(num_steps=3, eta=0.0, guidance_scale=GUIDANCE)
    base = sample(sd3, PROMPTS, [generator(10), generator(11)], settings).trajectory.latents
    assert (trajs[0][:, -1] - base[:, -1]).abs().max() > 1e-3  # the defense changed the samples


def test_sd3_without_cfg_and_flux_dev_are_refused_in_one_line(sd3) -> None:
    defended, kwargs = apply_defenses(sd3, "sld:max")
    settings = SamplerSettings(num_steps=2, eta=0.0, guidance_scale=1.0)
    with pytest.raises(SafediffError, match="classifier-free guidance") as err:
        sample(defended, PROMPTS, [generator(0), generator(1)], settings, defense=kwargs)
    assert "\n" not in str(err.value)
    flux = load_t2i_model(ModelConfig(pretrained="tiny-flux"))
    defended, kwargs = apply_defenses(flux, "sld:max")
    settings = SamplerSettings(num_steps=2, eta=0.0, guidance_scale=GUIDANCE)
    with pytest.raises(SafediffError, match="guidance-distilled FLUX") as err:
        sample(defended, PROMPTS, [generator(0), generator(1)], settings, defense=kwargs)
    assert "\n" not in str(err.value)


def test_flow_rollout_with_an_sld_hook_on_flux_dev(sd3) -> None:
    """Called directly (no `sample` refusal in front), an enabled SLD hook on FLUX-dev refuses in
    one line; a disabled one leaves the rollout, guidance input included, bitwise unchanged."""
    flux = load_t2i_model(ModelConfig(pretrained="tiny-flux"))
    cond = flux.encode_text(PROMPTS, "cpu")
    concept = flux.encode_text([SLD_PRESETS["max"].concept], "cpu")

    def roll(hooks):
        gens = [generator(0), generator(1)]
        return flow_rollout(
            flux, cond, None, gens, num_steps=2, noise_level=0.0, guidance_scale=GUIDANCE,
            batch_size=2, decode=False, hooks=hooks,
        )  # fmt: skip

    off = SafeLatentDiffusion(
        concept, dataclasses.replace(SLD_PRESETS["max"], sld_guidance_scale=1)
    )
    assert torch.equal(roll([off]).latents, roll([]).latents)
    with pytest.raises(SafediffError, match="no unconditional pass") as err:
        roll([SafeLatentDiffusion(concept, SLD_PRESETS["max"])])
    assert "\n" not in str(err.value)
