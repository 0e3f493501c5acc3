"""Flow-matching models through safediff's one convention, on the offline tiny SD3 and FLUX (real
diffusers / transformers classes, random weights): the packed conditioning equals the pipelines'
own, the hooked transformer equals the diffusers call, sampling with noise level 0 equals
StableDiffusion3Pipeline / FluxPipeline from the same initial latents, batched == one at a time,
the sampled log-probs recompute exactly (ratio 1), folders round-trip, and bad inputs are one-line
errors (a FLUX checkpoint on an SD3 base, guidance to a model without a guidance input)."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from safediff.config import ModelConfig
from safediff.errors import SafediffError
from safediff.models.flow import flow_pipeline, pack_latents, unpack_latents, unpack_pooled
from safediff.models.loading import load_t2i_model
from safediff.models.tiny_flux import build_tiny_flux
from safediff.sampling.flow import (
    flow_rollout,
    flow_transition_log_prob,
    resolve_flow_guidance,
    sde_window,
)
from safediff.sampling.sample import SamplerSettings, sample
from safediff.seeding import generator

PROMPTS = ["a red cube", "a photo of a cat"]


@pytest.fixture(scope="module")
def sd3():
    return load_t2i_model(ModelConfig(pretrained="tiny-sd3"))


@pytest.fixture(scope="module")
def flux():
    return load_t2i_model(ModelConfig(pretrained="tiny-flux"))


def _gens(n, seed=0):
    return [generator(seed + i) for i in range(n)]


def _settings(steps=2, eta=0.0, scale=1.0, batch_size=8):
    return SamplerSettings(num_steps=steps, eta=eta, guidance_scale=scale, batch_size=batch_size)


def test_sd3_conditioning_and_call_match_the_pipeline(sd3):
    pipe = flow_pipeline(sd3.components, sd3.unet)
    length = sd3.components["max_sequence_length"]
    tokens, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=length
    )
    packed = sd3.encode_text(PROMPTS, "cpu")
    assert packed.shape == (2, 77 + length + 1, 64)
    ours_tokens, ours_pooled = unpack_pooled(packed, 64)
    torch.testing.assert_close(ours_tokens, tokens, atol=0, rtol=0)
    torch.testing.assert_close(ours_pooled, pooled, atol=0, rtol=0)
    x = torch.randn(2, *sd3.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0, 500.0])
    ours = sd3.unet(x, t, encoder_hidden_states=packed).sample
    theirs = sd3.unet(
        hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled
    ).sample
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_flux_packing_round_trips_and_call_matches_the_pipeline(flux):
    x = torch.randn(2, *flux.latent_shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_latents(pack_latents(x), *flux.latent_shape[1:]), x)
    pipe = flow_pipeline(flux.components, flux.unet)
    length = flux.components["max_sequence_length"]
    tokens, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=length)
    packed = flux.encode_text(PROMPTS, "cpu")
    ours_tokens, ours_pooled = unpack_pooled(packed, 32)
    torch.testing.assert_close(ours_tokens, tokens, atol=0, rtol=0)
    torch.testing.assert_close(ours_pooled, pooled, atol=0, rtol=0)
    t = torch.tensor([1000.0, 250.0])
    g = torch.tensor([3.5, 3.5])
    ours = flux.unet(x, t, encoder_hidden_states=packed, guidance=g).sample
    h, w = flux.latent_shape[1:]
    ids = pipe._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", tokens.dtype)
    theirs = flux.unet(
        hidden_states=pack_latents(x),
        timestep=t / 1000,
        guidance=g,
        pooled_projections=pooled,
        encoder_hidden_states=tokens,
        txt_ids=text_ids,
        img_ids=ids,
    ).sample
    torch.testing.assert_close(ours, unpack_latents(theirs, h, w), atol=0, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_sd3_noise_zero_equals_the_diffusers_pipeline(sd3, scale):
    steps = 3
    out = sample(sd3, PROMPTS, _gens(2), _settings(steps, 0.0, scale))
    x_t = out.trajectory.latents[:, 0]
    pipe = flow_pipeline(sd3.components, sd3.unet)
    side = sd3.latent_shape[1] * 2
    ref = pipe(
        PROMPTS,
        height=side,
        width=side,
        num_inference_steps=steps,
        guidance_scale=scale,
        latents=x_t.clone(),
        max_sequence_length=sd3.components["max_sequence_length"],
        output_type="latent",
    ).images
    torch.testing.assert_close(out.trajectory.latents[:, -1], ref, atol=1e-5, rtol=1e-5)
    images = sd3.decode(ref)
    torch.testing.assert_close(out.trajectory.images, images, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("latent_hw", [(8, 8), (4, 12)])
def test_flux_noise_zero_equals_the_diffusers_pipeline(flux, latent_hw):
    # Another image size changes FLUX's dynamic shift (mu from the number of image tokens).
    flux = dataclasses.replace(flux, latent_shape=(16, *latent_hw))
    steps = 3
    out = sample(flux, PROMPTS, _gens(2), _settings(steps, 0.0, 3.5))
    assert out.negative_embeds is None and out.trajectory.guidance == 3.5  # distilled, no CFG
    x_t = out.trajectory.latents[:, 0]
    pipe = flow_pipeline(flux.components, flux.unet)
    ref = pipe(
        PROMPTS,
        height=latent_hw[0] * 2,
        width=latent_hw[1] * 2,
        num_inference_steps=steps,
        guidance_scale=3.5,
        latents=pack_latents(x_t.clone()),
        max_sequence_length=flux.components["max_sequence_length"],
        output_type="latent",
    ).images
    ours = out.trajectory.latents[:, -1]
    torch.testing.assert_close(
        ours, unpack_latents(ref, *flux.latent_shape[1:]), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_sde_batched_equals_one_at_a_time_and_recompute_gives_ratio_one(name, request):
    model = request.getfixturevalue(name)
    scale = 4.5 if name == "sd3" else 3.5
    settings = _settings(3, 0.7, scale)
    window = sde_window(3, 2, 1)  # SDE on steps 1, 2; ODE on step 0
    batched = sample(model, PROMPTS, _gens(2, 7), settings, window=window)
    single = [
        sample(model, [p], [generator(7 + i)], settings, window=window)
        for i, p in enumerate(PROMPTS)
    ]
    traj = batched.trajectory
    for i, one in enumerate(single):
        torch.testing.assert_close(traj.latents[i], one.trajectory.latents[0], atol=1e-5, rtol=0)
    assert torch.equal(traj.log_probs[:, 0], torch.zeros(2))  # ODE step outside the window
    assert bool((traj.log_probs[:, 1:] != 0).all())
    # Re-score every trained transition at once (mixed steps), as the GRPO loss would.
    samples, steps = torch.meshgrid(torch.arange(2), torch.tensor(window.steps), indexing="ij")
    samples, steps = samples.reshape(-1), steps.reshape(-1)
    cfg_scale, guidance = resolve_flow_guidance(model.unet, scale, None)
    out = flow_transition_log_prob(
        model.unet,
        traj.sigmas,
        model.schedule.num_train_timesteps,
        traj.latents[samples, steps],
        traj.latents[samples, steps + 1],
        steps,
        batched.prompt_embeds[samples],
        batched.negative_embeds,
        cfg_scale,
        0.7,
        guidance=guidance,
    )
    ratio = torch.exp(out.log_prob - traj.log_probs[samples, steps])
    assert torch.equal(ratio, torch.ones_like(ratio))


@pytest.mark.slow  # writes and reads two pipeline folders (about 5 s)
def test_folders_round_trip(tmp_path, sd3, flux):
    for name, model in (("sd3", sd3), ("flux", flux)):
        folder = tmp_path / name
        flow_pipeline(model.components, model.unet).save_pretrained(folder)
        side = model.latent_shape[1] * 2  # a FLUX folder's default is FluxPipeline's 1024 px
        loaded = load_t2i_model(ModelConfig(pretrained=str(folder), resolution=side))
        assert loaded.latent_shape == model.latent_shape
        settings = _settings(2, 0.7, 2.0)
        a = sample(model, PROMPTS[:1], _gens(1), settings, decode=False).trajectory.latents
        b = sample(loaded, PROMPTS[:1], _gens(1), settings, decode=False).trajectory.latents
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_flux_checkpoint_on_sd3_base_is_a_one_line_error(tmp_path, flux):
    path = tmp_path / "flux_transformer.safetensors"
    save_file({k: v.contiguous() for k, v in flux.unet.state_dict().items()}, str(path))
    with pytest.raises(SafediffError, match="FLUX transformer but the base model's is an SD3") as e:
        load_t2i_model(ModelConfig(pretrained="tiny-sd3", unet_weights=str(path)))
    assert "\n" not in str(e.value)


def test_guidance_to_a_model_without_guidance_input_is_a_one_line_error(sd3):
    with pytest.raises(SafediffError, match="without a guidance input") as e:
        flow_rollout(
            sd3,
            sd3.encode_text(PROMPTS[:1], "cpu"),
            None,
            _gens(1),
            num_steps=1,
            noise_level=0.7,
            guidance_scale=1.0,
            batch_size=1,
            distilled_guidance=3.5,
        )
    assert "\n" not in str(e.value)
    schnell = build_tiny_flux(guidance_embeds=False)["transformer"]
    with pytest.raises(SafediffError, match="without a guidance input"):
        resolve_flow_guidance(schnell, 1.0, 2.0)


def test_window_larger_than_the_trajectory_is_refused():
    with pytest.raises(SafediffError, match="does not fit a trajectory of 3 steps"):
        sde_window(3, 4, 0)


def test_sd3_negative_prompt_and_defense_embeddings_steer_cfg(sd3):
    plain = _settings(2, 0.0, 4.5)
    negative = SamplerSettings(num_steps=2, eta=0.0, guidance_scale=4.5, negative_prompt="a cat")
    a = sample(sd3, PROMPTS[:1], _gens(1), plain, decode=False)
    b = sample(sd3, PROMPTS[:1], _gens(1), negative, decode=False)
    assert not torch.allclose(a.trajectory.latents[:, -1], b.trajectory.latents[:, -1])
    # a defense's negative embeddings replace the negative prompt's (the stack's contract)
    embeds = sd3.encode_text(["a cat"], "cpu")
    c = sample(sd3, PROMPTS[:1], _gens(1), plain, defense={"negative_embeds": embeds}, decode=False)
    torch.testing.assert_close(c.trajectory.latents, b.trajectory.latents, atol=0, rtol=0)
