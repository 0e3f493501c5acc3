"""GRPO on flow transformers (tiny SD3 and tiny FLUX): what a step changes, LoRA, the SDE window,
checkpoints diffusers loads, resume, 2 processes, and a reward that rises (rl/flow_policy.py)."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from safediff.config import ModelConfig, load_config
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model
from safediff.prompts import load_prompts
from safediff.rewards.brightness import BrightnessReward
from safediff.rl import checkpoint as ckpt
from safediff.rl import flow_policy
from safediff.rl.trainer import GRPOTrainer, train, update_shape
from safediff.sampling.flow import FlowSchedule, flow_transition_log_prob, sde_window
from safediff.sampling.sample import SamplerSettings
from torchrun import run_two_processes

FLOWS = ("tiny-sd3", "tiny-flux")
LORA = [
    "lora.enabled=true",
    "lora.rank=2",
    f"lora.target_modules=[{','.join(flow_policy.FLOW_LORA_TARGETS)}]",
]


def flow_overrides(name: str, run_dir: Path) -> list[str]:
    """A seconds-long GRPO run on a tiny flow model (CFG 2 for SD3; FLUX-dev's guidance input)."""
    return [
        f"model.pretrained={name}",
        "sampling.num_steps=3",
        "sampling.eta=0.7",
        "sampling.guidance_scale=2.0",
        "sampling.rollout_batch_size=8",
        "grpo.group_size=4",
        "grpo.samples_per_process=8",
        "grpo.clip_range=0.2",
        "grpo.micro_batch=8",
        "optim.lr=1e-3",
        "prompts.file=builtin:smoke",
        "run.log_with=none",
        "run.epochs=1",
        f"run.output_dir={run_dir}",
    ]


def make_trainer(overrides, reward=None):
    cfg = load_config(None, overrides)
    model = load_t2i_model(cfg.model, device="cpu")
    frozen = {
        name: {k: v.clone() for k, v in comp.state_dict().items()}
        for name, comp in model.components.items()
        if isinstance(comp, torch.nn.Module)
    }
    trainer = GRPOTrainer(
        cfg,
        model,
        reward or BrightnessReward(),
        load_prompts(cfg.prompts.file),
        Accelerator(cpu=True),
    )
    return trainer, model, frozen


def idle_prefixes(unet: torch.nn.Module) -> tuple[str, ...]:
    """Parameters without a gradient by construction: a joint block whose text stream ends in it
    (context_pre_only: SD3's last block) discards its text queries, so its add_q_proj gets none
    (its keys and values still reach the image tokens)."""
    return tuple(
        f"{name}.add_q_proj."
        for name, m in unet.named_modules()
        if getattr(m, "context_pre_only", False) and getattr(m, "add_q_proj", None) is not None
    )


@pytest.mark.parametrize("name", FLOWS)
def test_one_step_changes_every_trainable_parameter_and_nothing_else(name, tmp_path):
    # no weight decay: every change comes from the gradient
    overrides = [*flow_overrides(name, tmp_path / "run"), "optim.weight_decay=0"]
    trainer, model, frozen = make_trainer(overrides)
    assert trainer.is_flow and len(frozen) >= 3  # VAE and the text encoders
    before = {n: p.detach().clone() for n, p in trainer.bare_unet().named_parameters()}
    metrics = trainer.run_epoch(0)
    assert metrics["groups/zero_spread_skipped"] == 0
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    # on-policy: the first micro-batch re-scores the rollout's transitions exactly
    assert metrics["train/ratio_drift_first_batch"] == 0
    assert metrics["train/transitions_per_inner_epoch"] == 8 * 3
    unchanged = [n for n, p in trainer.bare_unet().named_parameters() if torch.equal(p, before[n])]
    idle = idle_prefixes(trainer.bare_unet())
    assert [n for n in unchanged if not n.startswith(idle)] == [], unchanged[:5]
    assert len(unchanged) == 2 * len(idle)  # add_q_proj's weight and bias there
    for comp, state in frozen.items():
        for k, v in model.components[comp].state_dict().items():
            assert torch.equal(v, state[k]), f"{comp}.{k} changed"


@pytest.mark.parametrize("name", FLOWS)
def test_lora_step_leaves_the_base_untouched_and_the_kl_is_finite(name, tmp_path):
    overrides = [*flow_overrides(name, tmp_path / "run"), *LORA, "grpo.kl_coef=0.1"]
    trainer, _, _ = make_trainer(overrides)
    unet = trainer.bare_unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    # the joint attention's text-stream projections are adapted too
    for module in ("to_q", "to_out.0", "add_q_proj", "add_k_proj"):
        assert any(f".{module}.lora_A" in n for n in before), module
    trainer.run_epoch(0)
    metrics = trainer.run_epoch(1)
    assert math.isfinite(metrics["train/kl"]) and metrics["train/kl"] >= 0
    idle = idle_prefixes(unet)
    for n, p in unet.named_parameters():
        if "lora_" in n and n.startswith(idle):
            assert p.requires_grad
        elif "lora_" in n:
            assert p.requires_grad and not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert not p.requires_grad and torch.equal(p, before[n]), f"base weight {n} changed"


class GatedBrightness(BrightnessReward):
    """Brightness with a steering-style gate: weight 1 for the prompts in `steered`, else 0."""

    name = "gated-brightness"

    def __init__(self, steered=()):
        super().__init__()
        self.steered = set(steered)

    def prompt_targets(self, prompts):
        return {"weight": torch.tensor([float(p in self.steered) for p in prompts])}


def test_unsteered_kl_runs_the_reference_only_on_its_rows_and_equals_the_plain_formula(tmp_path):
    overrides = [
        *flow_overrides("tiny-sd3", tmp_path / "run"),
        "reward.name=gated_brightness",
        "grpo.kl_coef=0.1",
        "grpo.kl_scope=unsteered",
        "grpo.inner_epochs=2",
    ]
    trainer, _, _ = make_trainer(overrides, reward=GatedBrightness())
    drawn = [trainer.prompts[i] for i in trainer.sample_prompt_indices(0)]
    trainer.reward.steered = {drawn[0]}  # the first group steered (KL weight 0), the other not
    compared = []
    fast_kl_term = trainer._kl_term

    def both(out, common, kl_weights, j):
        fast = fast_kl_term(out, common, kl_weights, j)
        with torch.no_grad(), trainer._reference() as ref:
            ref_out = flow_policy.stored_log_prob(ref, **common)
        plain = flow_policy.flow_kl(out, ref_out, "mean") * kl_weights[j]
        compared.append((fast.detach(), plain, kl_weights[j]))
        return fast

    trainer._kl_term = both
    metrics = trainer.run_epoch(0)
    assert metrics["train/kl"] > 0 and compared
    for fast, plain, w in compared:
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
        assert torch.all(fast[w == 0] == 0)
    assert any(bool((w == 0).any()) and bool((w > 0).any()) for *_, w in compared)


def test_sde_window_samples_and_trains_only_its_steps(tmp_path):
    overrides = [
        *flow_overrides("tiny-sd3", tmp_path / "run"),
        "sampling.num_steps=4",
        "sampling.window_size=2",
        "sampling.window_rule=sliding",
    ]
    trainer, model, _ = make_trainer(overrides)
    for epoch, start in ((0, 0), (1, 1), (5, 2)):  # sliding; stops at S - W = 2
        window = trainer.sde_window(epoch)
        assert (window.start, window.size) == (start, 2)
    traj, *_ = trainer.rollout_epoch(1)
    assert traj.sde_mask.tolist() == [False, True, True, False]
    assert (traj.log_probs[:, [0, 3]] == 0).all() and (traj.log_probs[:, 1:3] != 0).all()
    # ODE steps outside the window: x_next = x_t + dt v exactly (a = 0)
    steps = flow_policy.flow_trainable_steps(
        traj.sigmas, traj.sde_mask, 0.7, train_last_step=True, min_step_std=0.0
    )
    assert steps == [1, 2]
    shape = update_shape(trainer.cfg, model.schedule, model.latent_shape)
    metrics = trainer.run_epoch(1)
    assert shape.trained_steps == 2
    assert metrics["train/transitions_per_inner_epoch"] == 8 * shape.trained_steps


def test_stored_transitions_are_rescored_as_the_sampler_scored_them(tmp_path):
    trainer, model, _ = make_trainer(flow_overrides("tiny-sd3", tmp_path / "run"))
    traj, _, cond, uncond = trainer.rollout_epoch(0)
    j, s = torch.tensor([0, 3, 5]), torch.tensor([0, 1, 2])
    scale = flow_policy.train_cfg_scale(model.unet, 2.0)
    args = flow_policy.transition_args(
        traj,
        j,
        s,
        cond[j],
        uncond.expand(3, -1, -1),
        num_train_timesteps=1000,
        guidance_scale=scale,
        reduction="mean",
        device="cpu",
    )
    out = flow_policy.stored_log_prob(trainer.unet, **args)
    torch.testing.assert_close(out.log_prob, traj.log_probs[j, s], rtol=0, atol=1e-5)
    direct = flow_transition_log_prob(
        model.unet, traj.sigmas, 1000, traj.latents[j, s], traj.latents[j, s + 1], s,
        cond[j], uncond, 2.0, 0.7, "mean",
    )  # fmt: skip
    torch.testing.assert_close(out.log_prob, direct.log_prob)
    # the KL to itself is 0; to a shifted mean it is (shift^2) / (2 std^2) per element
    assert torch.equal(flow_policy.flow_kl(out, out, "mean"), torch.zeros(3))
    shifted = dataclasses.replace(out, mean=out.mean + 0.01)
    torch.testing.assert_close(
        flow_policy.flow_kl(out, shifted, "mean"), 0.01**2 / (2 * out.std**2), rtol=1e-3, atol=0
    )


def test_flux_dev_trains_without_cfg_and_window_rules_are_checked(tmp_path):
    flux = load_t2i_model(ModelConfig(pretrained="tiny-flux"))
    assert flow_policy.train_cfg_scale(flux.unet, 3.5) == 1.0  # guidance is an input
    settings = SamplerSettings(num_steps=4, eta=0.7, guidance_scale=3.5)
    assert settings.describe(flux).startswith("4 flow SDE steps, noise level 0.7, guidance 3.5")
    assert "DDIM" in settings.describe()
    from safediff.defenses.stack import apply_defenses
    from safediff.sampling.sample import sample

    _, kwargs = apply_defenses(flux, "negprompt:nudity")
    with pytest.raises(SafediffError, match="do not apply to guidance-distilled FLUX"):
        sample(flux, ["a cat"], [torch.Generator()], settings, defense=kwargs)
    sd = load_t2i_model(ModelConfig(pretrained="tiny-sd"))
    cfg = load_config(None, ["sampling.window_size=2", "sampling.num_steps=4"])
    with pytest.raises(SafediffError, match="flow models"):
        flow_policy.check_flow_training(sd, cfg.sampling)
    with pytest.raises(SafediffError, match="invalid config: sampling.window_rule"):
        load_config(None, ["sampling.window_rule=random"])
    # the window stays off the last step when it is not trained
    cfg = load_config(None, ["sampling.window_size=2", "sampling.num_steps=4"])
    assert flow_policy.rollout_window(cfg.sampling, 9, train_last_step=False).steps == [1, 2]
    assert flow_policy.rollout_window(cfg.sampling, 9, train_last_step=True).steps == [2, 3]
    assert flow_policy.rollout_window(load_config(None, []).sampling, 0) is None
    sigmas = FlowSchedule(shift=3.0).sigmas(4)
    assert flow_policy.flow_trainable_steps(
        sigmas, sde_window(4, 4, 0).mask, 0.7, train_last_step=False, min_step_std=0.0
    ) == [0, 1, 2]


def test_presets_train_the_reference_counts_on_their_hub_models():
    from safediff.models.flow import is_flow_spec

    sd35, flux = load_config("sd35-medium-lora"), load_config("flux-dev-lora")
    assert is_flow_spec(sd35.model.pretrained) and is_flow_spec(flux.model.pretrained)
    assert set(sd35.lora.target_modules) == set(flow_policy.FLOW_LORA_TARGETS)
    # SD3.5-M: 10 SDE steps, 9 trained (Flow-GRPO), 2 optimizer steps per epoch
    shape = update_shape(sd35, FlowSchedule(shift=3.0), (16, 64, 64))
    assert (shape.trained_steps, shape.optimizer_steps_per_epoch) == (9, 2)
    # FLUX-dev: FluxPipeline's dynamic shift at 512 px; a window of 4 of 16 steps is trained
    schedule = FlowSchedule(use_dynamic_shifting=True, sigma_spacing="flux", image_seq_len=1)
    shape = update_shape(flux, schedule, (16, 64, 64))
    assert (shape.trained_steps, shape.optimizer_steps_per_epoch) == (4, 2)
    assert flow_policy.rollout_window(flux.sampling, 10 * 12, train_last_step=False).start == 0
    assert flow_policy.rollout_window(flux.sampling, 10 * 11, train_last_step=False).start == 11


@pytest.mark.parametrize("name, lora", [("tiny-sd3", False), ("tiny-flux", True)])
def test_checkpoints_load_in_plain_diffusers_and_back_in_safediff(name, lora, tmp_path):
    from diffusers import (
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from safediff.models.flow import flow_pipeline

    run = tmp_path / "run"
    overrides = [*flow_overrides(name, run), *(LORA if lora else [])]
    out = train(load_config(None, overrides), reward=BrightnessReward())
    trained = out["trainer"].plain_trained_unet()
    folder = ckpt.checkpoint_dir(run, 1)
    if lora:  # FLUX + LoRA: peft's adapter folder on the plain diffusers transformer
        from peft import PeftModel

        from safediff.models.tiny_flux import build_tiny_flux

        base = build_tiny_flux(seed=0)["transformer"]
        assert isinstance(base, FluxTransformer2DModel)
        loaded = PeftModel.from_pretrained(base, str(folder / "lora")).merge_and_unload()
        model = load_t2i_model(ModelConfig(pretrained=name, lora_weights=str(folder / "lora")))
        pipeline_class, call = FluxPipeline, {"guidance_scale": 3.5}
    else:  # SD3, full fine-tune: the transformer folder diffusers writes and reads
        loaded = SD3Transformer2DModel.from_pretrained(str(folder / "unet"))
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        model = load_t2i_model(ModelConfig(pretrained=name, unet_weights=str(weights)))
        pipeline_class, call = StableDiffusion3Pipeline, {}
    want = trained.state_dict()
    for state in (loaded.state_dict(), model.unet.state_dict()):
        assert state.keys() == want.keys()
        for k, v in want.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6)
    pipe = flow_pipeline(model.components, transformer=loaded)  # diffusers runs it as usual
    assert isinstance(pipe, pipeline_class)
    side = model.latent_shape[1] * pipe.vae_scale_factor  # the model's own resolution
    image = pipe(
        "a red car", num_inference_steps=2, height=side, width=side, output_type="pt", **call
    ).images
    assert image.shape == (1, 3, side, side) and torch.isfinite(image).all()


# ------------------------------------------------------------------------------- flow defenses


def test_safe_denoiser_corrects_x0_in_the_flow_parameterisation(tmp_path):
    """sample() with the safe-denoiser stack on tiny SD3 == an Euler loop written out with the
    paper's update x0_safe = x0 + beta (x0 - E_unsafe), x0 = x_t - sigma v, v' = (x_t - x0_safe)
    / sigma; and SLD, an epsilon-space hook, is a one-line error on a flow model."""
    from safediff.defenses.safe_denoiser import NegationSet
    from safediff.defenses.stack import apply_defenses
    from safediff.sampling.flow import flow_velocity
    from safediff.sampling.sample import sample

    model = load_t2i_model(ModelConfig(pretrained="tiny-sd3"))
    shape = tuple(model.latent_shape)
    gen = torch.Generator().manual_seed(7)
    negset = torch.randn((5, *shape), generator=gen)
    path = NegationSet.from_tensor(negset).save(tmp_path / "negset.safetensors")
    h, beta = 6.0, 0.5
    spec = (
        f"safe-denoiser:{path};update=paper;distance=sq_l2;bandwidth={h};scale={beta};"
        "gate_threshold=0;gate_margin=0;t_min=0;t_max=1000"
    )
    defended, kwargs = apply_defenses(model, spec)
    prompts = ["a red car", "a dark night"]
    x_T = torch.randn((2, *shape), generator=gen)
    settings = SamplerSettings(num_steps=3, eta=0.0, guidance_scale=2.0)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = sample(defended, prompts, gens, settings, defense=kwargs, initial_noise=x_T)
    plain = sample(model, prompts, gens, settings, initial_noise=x_T)

    cond = model.encode_text(prompts, "cpu")
    uncond = model.encode_text([""], "cpu")
    sigmas = model.schedule.for_latent(*shape[1:]).sigmas(3)
    y = negset.reshape(5, -1).double()
    x = x_T.double()
    with torch.no_grad():
        for i in range(3):
            s = float(sigmas[i])
            t = torch.full((2,), s * 1000)
            v = flow_velocity(model.unet, x.float(), t, cond, uncond, 2.0).double()
            x0 = x - s * v
            d2 = torch.cdist(x0.reshape(2, -1), y) ** 2  # [2, 5]
            w = torch.softmax(-d2 / (2 * h**2), dim=1)
            e_unsafe = (w @ y).reshape(x.shape)
            x0_safe = x0 + beta * (x0 - e_unsafe)
            x = x + (float(sigmas[i + 1]) - s) * (x - x0_safe) / s
    torch.testing.assert_close(out.trajectory.latents[:, -1].double(), x, rtol=1e-4, atol=1e-4)
    assert (out.trajectory.latents[:, -1] - plain.trajectory.latents[:, -1]).abs().max() > 1e-2
    ddpm_only = type("DDPMOnlyHook", (), {"name": "ddpm-only"})()  # a hook with no flow form
    with pytest.raises(SafediffError, match="do not support flow models") as err:
        sample(model, prompts, gens, settings, defense={"guidance": [ddpm_only]}, initial_noise=x_T)
    assert "\n" not in str(err.value)


def test_des_trains_every_text_encoder_of_sd3_and_only_them_and_loads_back(tmp_path):
    from safediff.defenses.des import DESConfig, train_des
    from safediff.defenses.stack import apply_defenses
    from safediff.defenses.text_encoder_adapter import FlowTextEncodersAdapter, adapter_for_model

    model = load_t2i_model(ModelConfig(pretrained="tiny-sd3"))
    adapter = adapter_for_model(model)
    assert isinstance(adapter, FlowTextEncodersAdapter)
    assert list(adapter.module.keys()) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    prompts = ["a red car", "a dog in the sea"]
    torch.testing.assert_close(adapter.encode(prompts), model.encode_text(prompts, "cpu"))
    frozen = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in (("transformer", model.unet), ("vae", model.components["vae"]))
    }
    before = {k: v.clone() for k, v in adapter.module.state_dict().items()}
    cfg = DESConfig(model="tiny-sd3", concept="nude", batch_size=4, lr=1e-3, concept_scale=2.0)
    safe = ["a cat on a street", "a tree at night", "a blue house", "a child with a dog"]
    unsafe = ["a nude person", "a nude woman on the sea"]
    trained = train_des(adapter, safe, unsafe, cfg, max_steps=2).adapter
    # every encoder (CLIP-L, CLIP-G, T5) moved; the original adapter and the rest did not
    original = adapter.module.state_dict()
    assert all(torch.equal(original[k], v) for k, v in before.items())
    after = trained.module.state_dict()
    changed = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    for name, module in (("transformer", model.unet), ("vae", model.components["vae"])):
        for k, v in module.state_dict().items():
            assert torch.equal(v, frozen[name][k]), f"{name}.{k} changed"
    folder = trained.save(tmp_path / "des")
    assert sorted(p.name for p in folder.iterdir()) == [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    ]
    defended, _ = apply_defenses(model, f"des:{folder}")
    torch.testing.assert_close(defended.encode_text(prompts, "cpu"), trained.encode(prompts))
    assert not torch.equal(defended.encode_text(prompts, "cpu"), model.encode_text(prompts, "cpu"))


# ------------------------------------------------------------------------------- slow tier


def _perf_free(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in rows]


@pytest.mark.slow
def test_resume_with_a_moving_window_matches_an_uninterrupted_run(tmp_path):
    common = [
        o
        for o in flow_overrides("tiny-flux", tmp_path / "unused")
        if not o.startswith(("run.output_dir", "run.epochs"))
    ]
    common += [
        "sampling.num_steps=4",
        "sampling.window_size=2",
        "sampling.window_rule=cyclic",
        "run.epochs=4",
        "run.save_every=1",
        *LORA,
    ]
    train(load_config(None, [*common, f"run.output_dir={tmp_path / 'full'}"]))
    part = [*common, f"run.output_dir={tmp_path / 'part'}"]
    assert train(load_config(None, [*part, "run.stop_after_epochs=2"]))["end_epoch"] == 2
    assert train(load_config(None, part), resume="auto")["start_epoch"] == 2
    name = "lora/adapter_model.safetensors"
    a = load_file(str(ckpt.checkpoint_dir(tmp_path / "full", 4) / name))
    b = load_file(str(ckpt.checkpoint_dir(tmp_path / "part", 4) / name))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la, lb = (
        _perf_free(tmp_path / "full" / "metrics.jsonl"),
        _perf_free(tmp_path / "part" / "metrics.jsonl"),
    )
    assert len(la) == len(lb) == 4
    for ma, mb in zip(la, lb, strict=True):
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-7, nan_ok=True), k


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from dist_worker import run_one_epoch

    base = [
        o
        for o in flow_overrides("tiny-sd3", tmp_path / "run")
        if not o.startswith(("grpo.", "sampling.rollout_batch_size"))
    ]
    base += [
        "grpo.group_size=8",
        "grpo.clip_range=0.2",
        "grpo.micro_batch=4",
        "sampling.rollout_batch_size=4",
        "sampling.window_size=2",
        # Adam's first step with eps = 1 is ~ lr * g: the weight change measures the gradient
        "optim.lr=1.0",
        "optim.eps=1.0",
        "optim.weight_decay=0",
        "grpo.max_grad_norm=0",
    ]
    out = tmp_path / "two.safetensors"
    run_two_processes(
        Path(__file__).parent / "dist_worker.py",
        str(out),
        *base,
        "grpo.samples_per_process=8",
    )
    two = load_file(str(out))
    assert int(two["world_size"]) == 2
    one = run_one_epoch([*base, "grpo.samples_per_process=16"], Accelerator(cpu=True))
    torch.testing.assert_close(one["rewards"], two["rewards"], rtol=0, atol=1e-6)
    torch.testing.assert_close(one["advantages"], two["advantages"], rtol=0, atol=1e-5)
    init = dict(load_t2i_model(load_config(None, base).model).unet.named_parameters())
    d_one = torch.cat([(one[f"unet.{n}"] - p.detach()).flatten() for n, p in init.items()])
    d_two = torch.cat([(two[f"unet.{n}"] - p.detach()).flatten() for n, p in init.items()])
    assert d_one.abs().max() > 0
    torch.testing.assert_close(d_two, d_one, rtol=1e-3, atol=1e-4 * float(d_one.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra",
    [("tiny-sd3", []), ("tiny-flux", ["sampling.window_size=2", "sampling.window_rule=cyclic"])],
)
def test_a_short_run_raises_the_reward_with_a_paired_interval_above_zero(name, extra, tmp_path):
    from safediff.demo import evaluate_reward, mean_ci

    overrides = [
        o
        for o in flow_overrides(name, tmp_path / "run")
        if not o.startswith(("run.epochs", "sampling.num_steps", "grpo.samples", "grpo.micro"))
    ]
    overrides += [
        "sampling.num_steps=4",
        "grpo.samples_per_process=16",
        "grpo.micro_batch=16",
        "optim.lr=3e-3",
        "run.epochs=6",
        "run.save_every=6",
        *extra,
    ]
    cfg = load_config(None, overrides)
    reward = BrightnessReward()
    prompts = load_prompts(cfg.prompts.file)[:8]
    base = load_t2i_model(cfg.model)
    before, _ = evaluate_reward(base, reward, prompts, 2, cfg)
    out = train(cfg, model=load_t2i_model(cfg.model), reward=reward)
    trained = dataclasses.replace(base, unet=out["final_unet"].eval())
    after, _ = evaluate_reward(trained, reward, prompts, 2, cfg)
    delta, lo, _hi = mean_ci(after - before)
    assert delta > 0 and lo > 0, f"paired delta {delta:.4g}, 95% interval from {lo:.4g}"
