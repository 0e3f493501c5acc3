"""Evaluation schedulers: every catalogue entry on the tiny SD (deterministic, batch-invariant, its
noise per sample), equal to diffusers' StableDiffusionPipeline with that scheduler, DDIM through
the plain loop equal to safediff's DDIM, guidance hooks seeing the scheduler's own x0 (epsilon and
v prediction), SLD equal to diffusers' safe pipeline under LMS and Euler, and the name recorded
(run.json, report) or refused in one line."""

import dataclasses
import inspect
import json

import diffusers
import pytest
import torch
from PIL import Image

from safediff.defenses.sld import SLD_PRESETS, SafeLatentDiffusion
from safediff.errors import SafediffError
from safediff.eval.report import build_report
from safediff.models.base import T2IModel
from safediff.models.stable_diffusion import diffusers_pipeline, sd_components_to_t2i
from safediff.models.tiny_sd import SD_SCHEDULER_CONFIG, build_tiny_sd
from safediff.sampling.rollout import rollout
from safediff.sampling.sample import SamplerSettings, sample
from safediff.sampling.schedulers import (
    SCHEDULERS,
    betas_from_alpha_bars,
    build_scheduler,
    scheduler_rollout,
)

PROMPTS = ["a photo of a cat", "a red car", "a nude figure on a beach"]
STEPS = 4
GUIDANCE = 5.0
R1_NINE = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "kdpm2_a", "dpm++")
# schedulers whose step output carries its x0 estimate (pred_original_sample)
WITH_X0 = ("ddim", "ddpm", "lms", "euler", "euler_a", "heun", "kdpm2_a")


@pytest.fixture(scope="module")
def components() -> dict:
    return build_tiny_sd(seed=0)


@pytest.fixture(scope="module")
def model(components) -> T2IModel:
    return sd_components_to_t2i(components, "tiny-sd")


@pytest.fixture(scope="module")
def v_model() -> T2IModel:
    return sd_components_to_t2i(build_tiny_sd(seed=1, prediction_type="v_prediction"), "tiny-sd-v")


def gens(n: int, base: int = 100) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def images(model, name: str, batch_size: int = 3, base: int = 100, **kw) -> torch.Tensor:
    settings = SamplerSettings(STEPS, 0.0, GUIDANCE, batch_size=batch_size, scheduler=name)
    return sample(model, PROMPTS, gens(len(PROMPTS), base), settings, **kw).trajectory.images


def reference_scheduler(model_config: dict, name: str):
    """The scheduler a diffusers user swaps in: `Cls.from_config(pipe.scheduler.config)`."""
    spec = SCHEDULERS[name]
    return getattr(diffusers, spec.cls).from_config(model_config, **spec.kwargs)


# ---------------------------------------------------------------------------------------------
# The catalogue


def test_catalogue_covers_the_nine_of_safediffusion_r1() -> None:
    assert set(R1_NINE) <= set(SCHEDULERS)
    for name, spec in SCHEDULERS.items():
        assert hasattr(diffusers, spec.cls), name
    assert {n for n, s in SCHEDULERS.items() if s.stochastic} == {
        "ddpm",
        "euler_a",
        "kdpm2_a",
        "dpm++_sde",
    }


def test_betas_reproduce_the_alpha_bars(model) -> None:
    ac = model.schedule.alphas_cumprod
    again = torch.cumprod(1 - torch.tensor(betas_from_alpha_bars(ac)), 0)
    torch.testing.assert_close(again.float(), ac, rtol=1e-6, atol=0)
    for name in SCHEDULERS:
        sched = build_scheduler(name, model.schedule)
        torch.testing.assert_close(sched.alphas_cumprod, ac, rtol=1e-5, atol=0)


def test_unknown_scheduler_names_the_choices() -> None:
    with pytest.raises(SafediffError) as err:
        SamplerSettings(STEPS, 0.0, GUIDANCE, scheduler="dpm2")
    msg = str(err.value)
    assert "\n" not in msg and "'dpm2'" in msg and "--scheduler" in msg
    assert all(name in msg for name in SCHEDULERS)


def test_eta_belongs_to_ddim() -> None:
    with pytest.raises(SafediffError, match=r"eta 0.5 is DDIM's.*'lms'.*--scheduler ddim"):
        SamplerSettings(STEPS, 0.5, GUIDANCE, scheduler="lms")
    assert "lms" in SamplerSettings(STEPS, 0.0, GUIDANCE, scheduler="lms").describe()


# ---------------------------------------------------------------------------------------------
# Every scheduler: deterministic, batch-invariant, noise per sample, diffusers' numbers


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_deterministic_and_batched_equals_one_at_a_time(model, name: str) -> None:
    a = images(model, name, batch_size=3)
    assert torch.equal(a, images(model, name, batch_size=3))  # same seeds -> same images
    single = images(model, name, batch_size=1)
    torch.testing.assert_close(single, a, rtol=1e-5, atol=1e-5)
    # other seeds, other images (the comparisons above are not vacuous)
    assert (images(model, name, base=200) - a).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_step_noise_is_drawn_per_sample_only_by_stochastic_schedulers(model, name) -> None:
    """Same x_T, other generators: a stochastic scheduler's images change (its step noise comes
    from each sample's generator), a deterministic one's do not."""
    x_t = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(7))
    a = images(model, name, initial_noise=x_t)
    b = images(model, name, base=300, initial_noise=x_t)
    changed = (a - b).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert changed.all().item() == SCHEDULERS[name].stochastic, changed


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_matches_diffusers_pipeline(components, model, name: str) -> None:
    """StableDiffusionPipeline with the scheduler swapped in from the model's config and one
    generator per image: the same images (x_T and step noise from the same generators)."""
    pipe = diffusers_pipeline(components)
    pipe.scheduler = reference_scheduler(components["scheduler"].config, name)
    ref = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=gens(len(PROMPTS)),
        output_type="pt",
    ).images
    torch.testing.assert_close(images(model, name), ref, rtol=1e-5, atol=1e-5)


def test_ddim_through_the_plain_loop_equals_safediffs_ddim(model) -> None:
    cond = model.encode_text(PROMPTS, "cpu")
    uncond = model.encode_text([""], "cpu")
    kw = dict(num_steps=STEPS, guidance_scale=GUIDANCE, batch_size=3)
    plain = scheduler_rollout(model, cond, uncond, gens(3), "ddim", **kw)
    native = rollout(model, cond, uncond, gens(3), eta=0.0, **kw)
    torch.testing.assert_close(plain.latents, native.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.images, native.images, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.timesteps, native.timesteps)
    assert torch.equal(plain.prev_timesteps, native.prev_timesteps)
    assert not plain.log_probs.any()  # no log-probs off the DDIM path (documented zeros)


# ---------------------------------------------------------------------------------------------
# Guidance hooks (defenses) under other schedulers


class ProbeX0:
    """A hook that changes nothing and records the x0 it is shown at each UNet evaluation."""

    name = "probe"

    def __init__(self) -> None:
        self.x0: list[torch.Tensor] = []

    def init_state(self, n, latent_shape, device):
        return {}

    def __call__(self, step, state):
        self.x0.append(step.x0.clone())
        return step.eps, state


class ForceX0:
    """A hook that sets the clean-sample estimate to zero at every evaluation (eps_from_x0), as
    the Safe Denoiser sets its corrected x0."""

    name = "force-x0"

    def init_state(self, n, latent_shape, device):
        return {}

    def __call__(self, step, state):
        return step.eps_from_x0(torch.zeros_like(step.x0)), state


def diffusers_x0(model: T2IModel, config: dict, name: str) -> list[torch.Tensor]:
    """pred_original_sample of every step of diffusers' own loop (written out here)."""
    sched = reference_scheduler(config, name)
    sched.set_timesteps(STEPS)
    g = gens(len(PROMPTS))
    embeds = torch.cat(
        [model.encode_text([""] * len(PROMPTS), "cpu"), model.encode_text(PROMPTS, "cpu")]
    )
    x = torch.cat([torch.randn((1, *model.latent_shape), generator=gi) for gi in g])
    x = x * sched.init_noise_sigma
    out = []
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            u, c = model.unet(inp, t, encoder_hidden_states=embeds).sample.chunk(2)
            kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
            res = sched.step(u + GUIDANCE * (c - u), t, x, **kw)
            out.append(res.pred_original_sample)  # the scheduler's own v or eps -> x0
            x = res.prev_sample
    return out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", WITH_X0)
def test_hooks_see_the_schedulers_own_x0(model, v_model, name: str, prediction: str) -> None:
    """The x0 a guidance hook is shown (from the UNet input and a = 1 / (sigma^2 + 1), or
    alphas_cumprod[t]) is the x0 the scheduler steps with, in both sigma and DDPM spaces."""
    m = model if prediction == "epsilon" else v_model
    probe = ProbeX0()
    settings = SamplerSettings(STEPS, 0.0, GUIDANCE, batch_size=3, scheduler=name)
    if name == "ddim":  # sample() takes safediff's DDIM; probe the plain loop itself
        cond, uncond = m.encode_text(PROMPTS, "cpu"), m.encode_text([""], "cpu")
        scheduler_rollout(
            m, cond, uncond, gens(3), "ddim", num_steps=STEPS, guidance_scale=GUIDANCE,
            batch_size=3, guidance=[probe],
        )  # fmt: skip
    else:
        sample(m, PROMPTS, gens(3), settings, defense={"guidance": [probe]})
    config = {**SD_SCHEDULER_CONFIG, "prediction_type": prediction}
    theirs = diffusers_x0(m, config, name)
    assert len(probe.x0) == len(theirs)
    for ours, ref in zip(probe.x0, theirs, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ddpm", "lms", "euler", "heun", "dpm++"])
def test_a_corrected_x0_is_where_the_scheduler_goes(model, name: str) -> None:
    """A hook that corrects x0 to 0 at every step drives each scheduler to exactly 0 (each of
    these integrates a constant x0 exactly and ends at sigma 0 / alpha-bar 1)."""
    settings = SamplerSettings(STEPS, 0.0, GUIDANCE, batch_size=3, scheduler=name)
    traj = sample(model, PROMPTS, gens(3), settings, defense={"guidance": [ForceX0()]})
    assert traj.trajectory.latents[:, 0].abs().max() > 0.5
    assert traj.trajectory.latents[:, -1].abs().max() < 1e-4


@pytest.mark.parametrize("name", ["lms", "euler"])
def test_sld_matches_diffusers_safe_pipeline(components, model, name: str) -> None:
    """SLD under LMS / Euler == StableDiffusionPipelineSafe with that scheduler (same x_T; one
    sample per UNet batch on our side, as in test_sld.py)."""
    from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

    cfg = dataclasses.replace(SLD_PRESETS["medium"], sld_warmup_steps=1)
    hook = SafeLatentDiffusion(model.encode_text([cfg.concept], "cpu"), cfg)
    settings = SamplerSettings(STEPS, 0.0, GUIDANCE, batch_size=1, scheduler=name)
    ours = sample(model, PROMPTS, gens(3), settings, defense={"guidance": [hook]}).trajectory
    plain = sample(model, PROMPTS, gens(3), settings).trajectory
    pipe = StableDiffusionPipelineSafe(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=reference_scheduler(components["scheduler"].config, name),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    sld_args = {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("sld_")}
    for i, (prompt, g) in enumerate(zip(PROMPTS, gens(3), strict=True)):
        final: dict[int, torch.Tensor] = {}

        def keep(step: int, t, latents: torch.Tensor, final=final) -> None:
            final[step] = latents.clone()

        pipe(
            prompt,
            latents=torch.randn((1, *model.latent_shape), generator=g),  # scaled by the pipe
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            callback=keep,
            callback_steps=1,
            output_type="np",
            **sld_args,
        )
        theirs = torch.stack([final[step][0] for step in range(STEPS)])
        # sigma-space latents reach |x| ~ 15, and our betas agree with the config's to float32
        # rounding, which SLD's mask amplifies: 1e-4 (the DDIM comparison in test_sld is 1e-5)
        torch.testing.assert_close(ours.latents[i, 1:], theirs, rtol=1e-4, atol=1e-4)
        assert (ours.latents[i, -1] - plain.latents[i, -1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Recorded in every run


def test_report_shows_each_runs_sampler(tmp_path) -> None:
    for name, sampler in (("a", "ddim"), ("b", "lms")):
        run = tmp_path / name
        (run / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(run / "images" / "x_0.png")
        record = {"name": "x_0", "file": "images/x_0.png", "prompt": "a cat", "seed": 0}
        (run / "generation.jsonl").write_text(json.dumps(record) + "\n")
        summary = {"schema": "safediff.summary/1", "n_images": 1, "scores": {}}
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "run.json").write_text(json.dumps({"model": "tiny-sd", "sampler": sampler}))
    rep = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")
    assert [r["sampler"] for r in rep["runs"]] == ["ddim", "lms"]
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert "| sampler |" in md and "| lms |" in md
