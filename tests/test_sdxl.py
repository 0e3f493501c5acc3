"""SDXL through safediff's one convention, on the offline tiny SDXL (real classes, random weights):
the packed conditioning equals the pipeline's, sampling equals diffusers' StableDiffusionXLPipeline,
GRPO trains it (full and LoRA) and resumes exactly, checkpoints load in plain diffusers and peft,
defenses apply (DES trains both text encoders), and mismatched checkpoints are refused in one line."""

import copy
import json
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from safediff.config import ModelConfig, load_config
from safediff.defenses.safe_denoiser import SafeDenoiser, SafeDenoiserConfig
from safediff.defenses.stack import apply_defenses
from safediff.defenses.text_encoder_adapter import adapter_for_model, load_text_encoder_adapter
from safediff.errors import SafediffError
from safediff.eval.model_spec import parse_model_spec
from safediff.models.loading import load_t2i_model, save_unet_safetensors
from safediff.models.sdxl import decode_latents_xl, sdxl_pipeline, unpack_conditioning
from safediff.models.tiny_sd import save_tiny_sd
from safediff.models.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl
from safediff.rl import checkpoint as ckpt
from safediff.rl.trainer import train
from safediff.sampling.rollout import transition_log_prob
from safediff.sampling.sample import SamplerSettings, sample
from safediff.seeding import generator

PROMPTS = ["a red cube", "a photo of a cat on a sofa", "two blue spheres"]
POOLED = 32  # tiny SDXL's pooled projection width


@pytest.fixture(scope="module")
def model():
    return load_t2i_model(ModelConfig(pretrained="tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "pipe")


def _gens(n, seed=0):
    return [generator(seed + i) for i in range(n)]


def _inputs(model, prompts, t=500):
    torch.manual_seed(0)
    x = torch.randn(len(prompts), *model.latent_shape)
    return x, torch.full((len(prompts),), t), model.encode_text(prompts, "cpu")


def _diffusers_call(unet, x, t, packed):
    """The SDXL UNet called the diffusers way, with the packed row unpacked by hand."""
    tokens, pooled, time_ids = unpack_conditioning(packed, POOLED)
    extra = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=tokens, added_cond_kwargs=extra).sample


# ---------------------------------------------------------------------------------------------
# The model and its packed conditioning


def test_tiny_sdxl_is_built_from_real_sdxl_classes(model):
    comps = model.components
    assert isinstance(comps["text_encoder"], CLIPTextModel)
    assert isinstance(comps["text_encoder_2"], CLIPTextModelWithProjection)
    assert isinstance(model.unet, UNet2DConditionModel)
    assert model.unet.config.addition_embed_type == "text_time"
    assert comps["tokenizer"].pad_token_id == 49407 and comps["tokenizer_2"].pad_token_id == 0
    assert model.latent_shape == (4, 8, 8)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert not any(p.requires_grad for p in comps[name].parameters()), name


def test_encode_text_packs_what_the_sdxl_pipeline_computes(model):
    packed = model.encode_text([*PROMPTS, ""], "cpu")
    assert packed.shape == (4, 77 + 1, 64)
    tokens, pooled, time_ids = unpack_conditioning(packed, POOLED)
    pipe = sdxl_pipeline(model.components, model.unet)
    ref, neg, ref_pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True
    )
    torch.testing.assert_close(tokens[:3], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[:3], ref_pooled, rtol=0, atol=1e-6)
    # the empty prompt is SDXL's zero negative (force_zeros_for_empty_prompt, negative_prompt=None)
    assert torch.equal(tokens[3], neg[0]) and torch.equal(pooled[3], neg_pooled[0])
    assert not neg.any()
    # time ids: (original H, W, crop top, left, target H, W) at the model's 16 px
    assert time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 4
    assert not packed[:, -1, POOLED + 6 :].any()


def test_packed_call_equals_the_diffusers_call_also_under_peft(model):
    from peft import LoraConfig, get_peft_model

    x, t, packed = _inputs(model, PROMPTS)
    with torch.no_grad():
        ours = model.unet(x, t, encoder_hidden_states=packed).sample
        positional = model.unet(x, t, packed).sample
    assert torch.equal(ours, _diffusers_call(model.unet, x, t, packed))
    assert torch.equal(ours, positional)
    lora = LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    wrapped = get_peft_model(copy.deepcopy(model.unet), lora)  # B = 0: same function
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, encoder_hidden_states=packed).sample, ours)


def test_folder_round_trip_and_sd_folders_stay_sd(model, sdxl_folder, tmp_path):
    index = json.loads((sdxl_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    loaded = load_t2i_model(ModelConfig(pretrained=str(sdxl_folder)))
    assert "text_encoder_2" in loaded.components
    x, t, packed = _inputs(model, PROMPTS)
    assert torch.equal(loaded.encode_text(PROMPTS, "cpu"), packed)
    with torch.no_grad():
        a = model.unet(x, t, encoder_hidden_states=packed).sample
        b = loaded.unet(x, t, encoder_hidden_states=packed).sample
    assert torch.equal(a, b)
    half = load_t2i_model(ModelConfig(pretrained=str(sdxl_folder)), dtype=torch.float16)
    assert half.components["text_encoder_2"].dtype == torch.float16
    assert half.components["vae"].dtype == torch.float32  # force_upcast: SDXL's VAE overflows fp16
    assert half.unet.dtype == torch.float32
    sd = load_t2i_model(ModelConfig(pretrained=str(save_tiny_sd(tmp_path / "sd"))))
    assert "text_encoder_2" not in sd.components
    assert sd.encode_text(["a cat"], "cpu").shape == (1, 77, 32)


def test_decode_applies_the_vaes_latents_mean_and_std(model):
    vae = copy.deepcopy(model.components["vae"])
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    vae.register_to_config(latents_mean=mean, latents_std=std)
    z = torch.randn(2, *model.latent_shape, generator=generator(3))
    view = (1, 4, 1, 1)
    scaled = z * torch.tensor(std).view(view) / vae.config.scaling_factor
    with torch.no_grad():
        ref = vae.decode(scaled + torch.tensor(mean).view(view)).sample
    expected = (ref / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decode_latents_xl(vae, z), expected, rtol=1e-5, atol=1e-5)


def test_tiny_sdxl_is_a_model_spec_like_tiny_sd():
    assert parse_model_spec("tiny-sdxl") == ModelConfig(pretrained="tiny-sdxl")


# ---------------------------------------------------------------------------------------------
# Sampling


def _batched_and_single(model):
    run = [
        sample(model, PROMPTS, _gens(3), SamplerSettings(3, 1.0, 5.0, batch_size=b)).trajectory
        for b in (3, 1)
    ]
    assert run[0].images.shape == (3, 3, 16, 16)
    return run


def test_batched_generation_equals_one_at_a_time(model):
    """Bitwise in float64. In float32 a UNet call on a batch of 3 and on its rows one by one
    differ by ~1e-6 (the batched GEMMs round differently; tiny SD does the same), which the
    high-noise steps amplify by up to 1/sqrt(a_t) ~ 15: within 1e-4, test_rollout's tolerance."""
    exact = load_t2i_model(ModelConfig(pretrained="tiny-sdxl"), dtype=torch.float64)
    exact.unet.to(torch.float64)
    batched, single = _batched_and_single(exact)
    for key in ("latents", "log_probs", "images"):
        assert torch.equal(getattr(batched, key), getattr(single, key)), key
    batched, single = _batched_and_single(model)
    for key in ("latents", "log_probs", "images"):
        torch.testing.assert_close(getattr(batched, key), getattr(single, key), rtol=0, atol=1e-4)


def test_recomputed_log_probs_equal_the_sampled_ones(model):
    """The trainer's re-scoring: every stored transition, batched across timesteps, gives back
    its sampled log-prob (the GRPO ratio is 1 on-policy), conditioning packed as sampled."""
    settings = SamplerSettings(num_steps=3, eta=1.0, guidance_scale=5.0, batch_size=3)
    out = sample(model, PROMPTS, _gens(3), settings, decode=False)
    traj, n, s = out.trajectory, len(PROMPTS), 3
    sample_idx = torch.arange(n).repeat_interleave(s)
    step_idx = torch.arange(s).repeat(n)
    with torch.no_grad():
        again = transition_log_prob(
            model.unet,
            model.schedule,
            traj.latents[sample_idx, step_idx],
            traj.latents[sample_idx, step_idx + 1],
            traj.timesteps[step_idx],
            traj.prev_timesteps[step_idx],
            out.prompt_embeds[sample_idx],
            out.negative_embeds,
            5.0,
            1.0,
        ).log_prob
    torch.testing.assert_close(again, traj.log_probs[sample_idx, step_idx], rtol=0, atol=1e-4)


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_eta_zero_matches_diffusers_sdxl_pipeline_with_ddim(model, negative):
    steps, scale = 4, 5.0
    settings = SamplerSettings(
        num_steps=steps, eta=0.0, guidance_scale=scale, negative_prompt=negative, batch_size=3
    )
    ours = sample(model, PROMPTS, _gens(3), settings, decode=False).trajectory
    pipe = sdxl_pipeline(model.components, model.unet)
    pipe.scheduler = DDIMScheduler.from_config(model.components["scheduler"].config)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    with torch.no_grad():
        ref = pipe(
            PROMPTS,
            negative_prompt=negative or None,  # "" in safediff is the pipeline's default None
            num_inference_steps=steps,
            guidance_scale=scale,
            eta=0.0,
            latents=ours.latents[:, 0].clone(),
            height=16,
            width=16,
            output_type="latent",
        ).images
    assert (ours.latents[:, -1] - ours.latents[:, 0]).abs().max() > 0.1  # it did denoise
    torch.testing.assert_close(ours.latents[:, -1], ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Defenses


def test_negative_prompt_sld_and_safe_denoiser_act_on_sdxl(model):
    settings = SamplerSettings(num_steps=3, eta=0.0, guidance_scale=5.0, batch_size=3)
    plain = sample(model, PROMPTS, _gens(3), settings).trajectory.latents[:, -1]
    for spec in ("negprompt:nudity", "sld:max"):
        defended, kwargs = apply_defenses(model, spec)
        if spec.startswith("negprompt"):
            assert kwargs["negative_embeds"].shape == (1, 78, 64)
        out = sample(defended, PROMPTS, _gens(3), settings, defense=kwargs).trajectory
        assert torch.isfinite(out.latents).all()
        assert not torch.allclose(out.latents[:, -1], plain), f"{spec} changed nothing"
    # the Safe Denoiser acts on latents only: a negation set of SDXL latents, gate always open
    negset = torch.randn(5, *model.latent_shape, generator=generator(7))
    hook = SafeDenoiser(negset, SafeDenoiserConfig(gate_threshold=1.0, t_min=0))
    out = sample(model, PROMPTS, _gens(3), settings, defense={"guidance": [hook]}).trajectory
    assert torch.isfinite(out.latents).all()
    assert not torch.allclose(out.latents[:, -1], plain), "the Safe Denoiser changed nothing"


def test_des_takes_both_sdxl_text_encoders(model, sdxl_folder):
    """DES on SDXL trains both encoders (tests/test_des_sdxl.py has the rest)."""
    want = model.encode_text(PROMPTS, "cpu")
    for adapter in (
        load_text_encoder_adapter("tiny-sdxl"),
        load_text_encoder_adapter(str(sdxl_folder)),
        adapter_for_model(model),
    ):
        assert sorted(adapter.module.keys()) == ["text_encoder", "text_encoder_2"]
        with torch.no_grad():
            assert torch.equal(adapter.encode(PROMPTS), want)


# ---------------------------------------------------------------------------------------------
# Mismatched checkpoints


def test_unet_of_the_other_family_is_refused_naming_the_base(tmp_path):
    sdxl_file = save_unet_safetensors(
        build_tiny_sdxl()["unet"], tmp_path / "xl" / "unet.safetensors"
    )
    sd = load_t2i_model(ModelConfig(pretrained="tiny-sd"))
    sd_file = save_unet_safetensors(sd.unet, tmp_path / "sd" / "unet.safetensors")
    with pytest.raises(SafediffError, match=r"are an SDXL UNet .* pass an SDXL base") as err:
        load_t2i_model(ModelConfig(pretrained="tiny-sd", unet_weights=str(sdxl_file)))
    assert "\n" not in str(err.value)
    with pytest.raises(
        SafediffError, match=r"are an SD 1.x / 2.x UNet .* pass an SD 1.x / 2.x base"
    ):
        load_t2i_model(ModelConfig(pretrained="tiny-sdxl", unet_weights=str(sd_file)))
    # a diffusers unet/ folder is judged by its config.json
    folder = tmp_path / "xl-folder"
    build_tiny_sdxl()["unet"].save_pretrained(folder)
    cfg = parse_model_spec(str(folder), base="tiny-sd")
    with pytest.raises(SafediffError, match="SDXL base"):
        load_t2i_model(cfg)


def _tiny_sdxl_adapter(folder, rank=2):
    from peft import LoraConfig, get_peft_model

    unet = build_tiny_sdxl()["unet"]
    lora = LoraConfig(r=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    get_peft_model(unet, lora).save_pretrained(folder)
    return folder


def test_lora_adapter_that_does_not_fit_is_refused(tmp_path):
    adapter = _tiny_sdxl_adapter(tmp_path / "lora")
    with pytest.raises(SafediffError, match="cross_attention_dim 64") as err:
        load_t2i_model(ModelConfig(pretrained="tiny-sd", lora_weights=str(adapter)))
    assert "\n" not in str(err.value) and "--base" in str(err.value)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(SafediffError, match="says rank r=4 but its weights have rank 2"):
        load_t2i_model(ModelConfig(pretrained="tiny-sdxl", lora_weights=str(adapter)))
    config_file.write_text(json.dumps({**config, "target_modules": ["to_q", "qkv_proj"]}))
    with pytest.raises(SafediffError, match=r"targets module\(s\) \[qkv_proj\]"):
        load_t2i_model(ModelConfig(pretrained="tiny-sdxl", lora_weights=str(adapter)))


# ---------------------------------------------------------------------------------------------
# GRPO on tiny SDXL


def _overrides(tiny_overrides, *extra):
    return [*tiny_overrides, "model.pretrained=tiny-sdxl", *extra]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_trains_every_parameter_and_the_checkpoint_loads_in_diffusers(
    tiny_overrides, tmp_path, lora
):
    from accelerate import Accelerator
    from peft import PeftModel

    from safediff.prompts import load_prompts
    from safediff.rewards.brightness import BrightnessReward
    from safediff.rl.trainer import GRPOTrainer

    extra = ["lora.enabled=true", "lora.rank=2"] if lora else []
    cfg = load_config(None, _overrides(tiny_overrides, *extra))
    model = load_t2i_model(cfg.model)
    trainer = GRPOTrainer(
        cfg, model, BrightnessReward(), load_prompts(cfg.prompts.file), Accelerator(cpu=True)
    )
    unet = trainer.bare_unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    metrics = trainer.run_epoch(0)
    assert math.isfinite(metrics["reward_mean/all"]) and metrics["train/grad_norm"] > 0
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and (not lora or all("lora_" in n for n in trainable))
    for n, p in unet.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"parameter {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen weight {n} changed"

    # The checkpoint: plain diffusers / peft on the plain tiny SDXL UNet give safediff's output.
    folder = ckpt.save_checkpoint(tmp_path, 1, unet, trainer.optimizer, is_lora=lora, keep_last=1)
    x, t, packed = _inputs(model, PROMPTS)
    with torch.no_grad():
        ours = unet.eval()(x, t, encoder_hidden_states=packed).sample
    if lora:
        plain = PeftModel.from_pretrained(build_tiny_sdxl()["unet"], str(folder / "lora"))
    else:
        plain = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert not hasattr(plain, "_safediff_packed_conditioning")
    torch.testing.assert_close(_diffusers_call(plain.eval(), x, t, packed), ours, rtol=0, atol=1e-6)
    # and safediff loads it back (the LoRA merged into the UNet) as an evaluation model
    reloaded = load_t2i_model(parse_model_spec(str(folder), base="tiny-sdxl"))
    with torch.no_grad():
        again = reloaded.unet(x, t, encoder_hidden_states=packed).sample
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_equals_an_uninterrupted_run(tiny_overrides, tmp_path, lora):
    """A run stopped after epoch 1 and resumed ends bitwise equal to an uninterrupted one:
    weights, optimizer state and every logged number but the timings."""
    from safetensors.torch import load_file

    common = _overrides(
        [o for o in tiny_overrides if not o.startswith("run.")],
        "run.log_with=none",
        "run.epochs=2",
        "run.save_every=1",
        *(["lora.enabled=true", "lora.rank=2"] if lora else []),
    )
    # the LoRA init derives from run.seed, whatever torch's global RNG holds
    torch.manual_seed(0)
    train(load_config(None, [*common, f"run.output_dir={tmp_path / 'full'}"]))
    part = [*common, f"run.output_dir={tmp_path / 'part'}"]
    torch.manual_seed(1)
    assert train(load_config(None, [*part, "run.stop_after_epochs=1"]))["end_epoch"] == 1
    assert train(load_config(None, part), resume="auto")["start_epoch"] == 1
    weights = (
        "lora/adapter_model.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"
    )
    for name in (weights, "optimizer.safetensors"):
        a = load_file(str(ckpt.checkpoint_dir(tmp_path / "full", 2) / name))
        b = load_file(str(ckpt.checkpoint_dir(tmp_path / "part", 2) / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("full", "part")
    ]
    assert len(rows[0]) == len(rows[1]) == 2
    for ma, mb in zip(*rows, strict=True):
        for k in ma:
            if not k.startswith("perf/"):
                assert ma[k] == mb[k] or (math.isnan(ma[k]) and math.isnan(mb[k])), k
