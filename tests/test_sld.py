"""SLD as a guidance hook: the equations by hand, diffusers' StableDiffusionPipelineSafe on the
tiny SD (same noise, eta 0), explicit per-sample momentum state, on-policy re-scoring."""

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from safediff.defenses.sld import SLD_PRESETS, SafeLatentDiffusion, SLDConfig, sld_guidance_term
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.stable_diffusion import sd_components_to_t2i
from safediff.models.tiny_sd import SD_SCHEDULER_CONFIG, build_tiny_sd
from safediff.sampling.rollout import rollout, transition_log_prob

PROMPTS = ["a photo of a cat", "a red car", "a nude figure on a beach"]
STEPS = 6
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def components() -> dict:
    return build_tiny_sd(seed=0)


@pytest.fixture(scope="module")
def model(components) -> T2IModel:
    return sd_components_to_t2i(components, "tiny-sd")


def gens(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


def sld_hook(model: T2IModel, cfg: SLDConfig) -> SafeLatentDiffusion:
    return SafeLatentDiffusion(model.encode_text([cfg.concept], "cpu"), cfg)


def sample(model: T2IModel, guidance=(), batch_size: int = 3, eta: float = 0.0, **kw):
    cond = model.encode_text(PROMPTS, "cpu")
    uncond = model.encode_text([""], "cpu")
    return rollout(
        model, cond, uncond, gens(len(PROMPTS)), num_steps=STEPS, eta=eta,
        guidance_scale=GUIDANCE, batch_size=batch_size, guidance=guidance, **kw,
    )  # fmt: skip


def test_presets_are_diffusers_safety_config() -> None:
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    for name, ref in [
        ("weak", SafetyConfig.WEAK),
        ("medium", SafetyConfig.MEDIUM),
        ("strong", SafetyConfig.STRONG),
        ("max", SafetyConfig.MAX),
    ]:
        ours = dataclasses.asdict(SLD_PRESETS[name])
        assert {k: ours[k] for k in ref} == pytest.approx(ref)


def test_guidance_term_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    c, u, s = (torch.randn(2, 3, generator=g) * 0.02 for _ in range(3))
    mom = torch.randn(2, 3, generator=g) * 0.01
    cfg = SLDConfig(300.0, 0, 0.005, 0.3, 0.4)
    gamma, new_mom = sld_guidance_term(c, u, s, mom, cfg)
    for i in range(2):
        for j in range(3):
            d = c[i, j].item() - s[i, j].item()
            mu = 0.0 if d >= 0.005 else min(abs(d) * 300.0, 1.0)
            want = mu * (s[i, j].item() - u[i, j].item()) + 0.3 * mom[i, j].item()
            assert gamma[i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-9)
            assert new_mom[i, j].item() == pytest.approx(
                0.4 * mom[i, j].item() + 0.6 * want, rel=1e-5, abs=1e-9
            )


@pytest.mark.parametrize(
    "preset,overrides",
    [("medium", {"sld_warmup_steps": 2}), ("strong", {"sld_warmup_steps": 3}), ("max", {})],
)
def test_matches_diffusers_pipeline(components, model, preset: str, overrides: dict) -> None:
    """Same noise, eta 0: our rollout with the SLD hook == StableDiffusionPipelineSafe.

    One sample per UNet batch on our side, so both evaluate [uncond, text, safety] in a batch of
    three. SLD's mask |eps_c - eps_s| * s_S amplifies any rounding difference by s_S (5000 for
    'max') and the trajectory carries it on, so only a batch-identical computation agrees.
    """
    from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

    cfg = dataclasses.replace(SLD_PRESETS[preset], **overrides)
    pipe = StableDiffusionPipelineSafe(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ours = sample(model, guidance=[sld_hook(model, cfg)], batch_size=1)
    plain = sample(model)
    sld_args = {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("sld_")}
    for i, prompt in enumerate(PROMPTS):
        final: dict[int, torch.Tensor] = {}

        def keep(step: int, t: int, latents: torch.Tensor, final=final) -> None:
            final[step] = latents.clone()

        pipe(
            prompt,
            latents=ours.latents[i : i + 1, 0].clone(),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            eta=0.0,
            callback=keep,
            callback_steps=1,
            output_type="np",
            **sld_args,
        )
        theirs = torch.stack([final[step][0] for step in range(STEPS)])
        torch.testing.assert_close(ours.latents[i, 1:], theirs, rtol=1e-5, atol=1e-5)
        # SLD changed this sample (after warm-up), so the agreement is not vacuous
        assert (ours.latents[i, -1] - plain.latents[i, -1]).abs().max() > 1e-3
        w = cfg.sld_warmup_steps  # during warm-up: plain CFG (up to the UNet's batch rounding)
        torch.testing.assert_close(
            ours.latents[i, : w + 1], plain.latents[i, : w + 1], rtol=1e-4, atol=1e-4
        )


def test_momentum_state_is_per_sample_and_rescored_on_policy(model: T2IModel) -> None:
    # a moderate s_S: large ones amplify the UNet's batch-size rounding (see the test above)
    cfg = dataclasses.replace(SLD_PRESETS["strong"], sld_warmup_steps=2, sld_guidance_scale=50.0)
    hook = sld_hook(model, cfg)
    traj = sample(model, guidance=[hook], batch_size=3, eta=1.0)
    one_by_one = sample(model, guidance=[hook], batch_size=1, eta=1.0)
    torch.testing.assert_close(traj.latents, one_by_one.latents, rtol=1e-4, atol=1e-4)
    (states,) = traj.guidance_states
    momentum = states["momentum"]
    assert momentum.shape == (3, STEPS, 4, 8, 8)
    assert torch.equal(momentum[:, 0], torch.zeros(3, 4, 8, 8))  # nu starts at 0
    assert momentum[:, 1:].abs().amax(dim=(2, 3, 4)).min() > 0  # and builds up from step 0
    torch.testing.assert_close(
        states["momentum"], one_by_one.guidance_states[0]["momentum"], rtol=1e-4, atol=1e-5
    )

    cond = model.encode_text(PROMPTS, "cpu")
    uncond = model.encode_text([""], "cpu")
    n_idx = torch.arange(3).repeat_interleave(STEPS)
    s_idx = torch.arange(STEPS).repeat(3)
    perm = torch.randperm(len(n_idx), generator=torch.Generator().manual_seed(0))
    n_idx, s_idx = n_idx[perm], s_idx[perm]
    args = (
        model.unet,
        model.schedule,
        traj.latents[n_idx, s_idx],
        traj.latents[n_idx, s_idx + 1],
        traj.timesteps[s_idx],
        traj.prev_timesteps[s_idx],
        cond[n_idx],
        uncond,
        GUIDANCE,
        1.0,
    )
    with torch.no_grad():
        out = transition_log_prob(
            *args,
            guidance=[hook],
            step_index=s_idx,
            guidance_states=traj.guidance_states_at(n_idx, s_idx),
        )
        zeros = [{"momentum": torch.zeros(len(s_idx), 4, 8, 8)}]  # ignoring the momentum
        stale = transition_log_prob(*args, guidance=[hook], step_index=s_idx, guidance_states=zeros)
    stored = traj.log_probs[n_idx, s_idx]
    torch.testing.assert_close(out.log_prob, stored, rtol=0, atol=1e-4)
    late = s_idx >= 2
    assert (stale.log_prob[late] - stored[late]).abs().max() > 1e-3  # the state matters
    with pytest.raises(SafediffError, match="carry state"):
        transition_log_prob(*args, guidance=[hook], step_index=s_idx)
    with pytest.raises(SafediffError, match="rows"):
        transition_log_prob(
            *args,
            guidance=[hook],
            step_index=s_idx,
            guidance_states=[{"momentum": torch.zeros(2, 4, 8, 8)}],
        )


def test_off_below_scale_one_and_needs_cfg(model: T2IModel) -> None:
    off = sld_hook(model, dataclasses.replace(SLD_PRESETS["max"], sld_guidance_scale=1.0))
    assert torch.equal(sample(model, guidance=[off]).latents, sample(model).latents)
    hook = sld_hook(model, SLD_PRESETS["max"])
    cond = model.encode_text(PROMPTS, "cpu")
    with pytest.raises(SafediffError, match="classifier-free guidance"):
        rollout(
            model, cond, None, gens(3), num_steps=2, eta=0.0, guidance_scale=1.0,
            batch_size=3, guidance=[hook],
        )  # fmt: skip
