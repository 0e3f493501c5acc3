"""The baselines (ESD, UCE, RECE, SAFREE) on every tiny model family: ESD on tiny-sdxl, tiny-sd3
and tiny-flux (the loss against a hand computation through the plain diffusers pipelines, the
parameter groups one step moves, the saved folder in plain diffusers and as `esd:FOLDER`, resume);
each applicable baseline stacked with DES / negprompt / the Safe Denoiser / SLD with per-sample
seeds (batched == one at a time); the refusals are one-line errors naming why."""

import json

import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from safediff.config import ModelConfig
from safediff.defenses.des import DESConfig, train_des
from safediff.defenses.esd import (
    CHECKPOINT_DIR,
    META_FILE,
    ESDConfig,
    esd_parameter_names,
    run_esd,
    train_esd,
)
from safediff.defenses.safe_denoiser import NegationSet
from safediff.defenses.stack import apply_defenses
from safediff.defenses.text_encoder_adapter import adapter_for_model
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.flow import flow_components_to_t2i, flow_pipeline
from safediff.models.loading import load_t2i_model
from safediff.models.sdxl import sdxl_pipeline
from safediff.models.tiny_flux import build_tiny_flux
from safediff.sampling.sample import SamplerSettings, sample
from safediff.seeding import derive_seed, generator

FAMILIES = ("tiny-sdxl", "tiny-sd3", "tiny-flux")
DENOISER_CLASSES = {
    "tiny-sdxl": UNet2DConditionModel,
    "tiny-sd3": SD3Transformer2DModel,
    "tiny-flux": FluxTransformer2DModel,
}
CONCEPT = "a nude woman"
PROMPTS = ["a nude woman on a beach", "a red car"]


@pytest.fixture(scope="module")
def models() -> dict[str, T2IModel]:
    """One model per family for the module; the tests check that ESD leaves them untouched."""
    return {name: load_t2i_model(ModelConfig(pretrained=name)) for name in ("tiny-sd", *FAMILIES)}


def esd_cfg(tmp_path, **kw) -> ESDConfig:
    base = {
        "concept": CONCEPT,
        "steps": 1,
        "ddim_steps": 3,
        "lr": 1e-2,
        "negative_guidance": 2.0,
        "start_guidance": 3.0,
        "output_dir": str(tmp_path / "esd"),
        "save_every": 1,
    }
    return ESDConfig(**{**base, **kw})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ------------------------------------------------------------------ the loss, by hand in diffusers


def _sdxl_prediction(model: T2IModel, x, t, prompt: str, guidance) -> torch.Tensor:
    """The SDXL UNet called the diffusers way: StableDiffusionXLPipeline.encode_prompt's states
    and pooled embedding ('' as its CFG negative: zeros), time ids (R, R, 0, 0, R, R)."""
    pipe = sdxl_pipeline(model.components, model.unet)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        CONCEPT, device="cpu", do_classifier_free_guidance=True
    )
    tokens, pool = (neg, neg_pooled) if prompt == "" else (pos, pooled)
    side = model.latent_shape[-1] * pipe.vae_scale_factor
    ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=tokens.dtype)
    out = model.unet(
        x, t, encoder_hidden_states=tokens, added_cond_kwargs={"text_embeds": pool, "time_ids": ids}
    )
    return out.sample.float()


def _sd3_prediction(model: T2IModel, x, t, prompt: str, guidance) -> torch.Tensor:
    pipe = flow_pipeline(model.components, model.unet)
    length = model.components["max_sequence_length"]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, None, None, device="cpu", do_classifier_free_guidance=False,
        max_sequence_length=length,
    )  # fmt: skip
    out = model.unet(
        hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled
    )
    return out.sample.float()


def _flux_prediction(model: T2IModel, x, t, prompt: str, guidance) -> torch.Tensor:
    pipe = flow_pipeline(model.components, model.unet)
    length = model.components["max_sequence_length"]
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt, None, device="cpu", max_sequence_length=length
    )
    b, c, h, w = x.shape
    out = model.unet(
        hidden_states=FluxPipeline._pack_latents(x, b, c, h, w),
        timestep=t / 1000,
        guidance=torch.full((b,), float(guidance)),
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        txt_ids=text_ids,
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
    ).sample
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).float()


PREDICT = {
    "tiny-sdxl": _sdxl_prediction,
    "tiny-sd3": _sd3_prediction,
    "tiny-flux": _flux_prediction,
}


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_equals_a_hand_computation_of_the_target(models, tmp_path, name) -> None:
    model, cfg = models[name], esd_cfg(tmp_path, seed=0)
    result = train_esd(model, cfg)
    predict = PREDICT[name]
    # the step's draws, as the docstring specifies them: concept, k, then x_T
    g = generator(derive_seed(cfg.seed, "esd", 0))
    assert int(torch.randint(1, (1,), generator=g)) == 0
    k = int(torch.randint(cfg.ddim_steps, (1,), generator=g))
    assert k == 2  # this seed reaches x_t through two sampler steps
    x = torch.randn((1, *model.latent_shape), generator=g)
    with torch.no_grad():
        if name == "tiny-sdxl":  # k DDIM steps (eta 0) with CFG 3, by hand
            sched = model.schedule
            assert sched.prediction_type == "epsilon"
            ts, prev = sched.timesteps(cfg.ddim_steps)
            for i in range(k):
                u = predict(model, x, ts[i : i + 1], "", None)
                c = predict(model, x, ts[i : i + 1], CONCEPT, None)
                eps = u + 3.0 * (c - u)
                a, a_prev = sched.alphas_cumprod[ts[i]], sched.alphas_cumprod[prev[i]]
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            t, guide = ts[k : k + 1], None
        else:  # k Euler steps of the flow ODE: CFG 3 for SD3, guidance input 3 for FLUX-dev
            sigmas = model.schedule.for_latent(*model.latent_shape[1:]).sigmas(cfg.ddim_steps)
            n = model.schedule.num_train_timesteps
            for i in range(k):
                t_i = (sigmas[i] * n).reshape(1)
                if name == "tiny-sd3":
                    u = predict(model, x, t_i, "", None)
                    v = u + 3.0 * (predict(model, x, t_i, CONCEPT, None) - u)
                else:
                    v = predict(model, x, t_i, CONCEPT, 3.0)
                x = x + (sigmas[i + 1] - sigmas[i]) * v
            t, guide = (sigmas[k] * n).reshape(1), 1.0
        u = predict(model, x, t, "", guide)
        c = predict(model, x, t, CONCEPT, guide)
    target = u - 2.0 * (c - u)  # eta = 2; at step 0 the trained copy predicts c
    want = float(((c - target) ** 2).mean())
    assert result.losses[0] == pytest.approx(want, rel=1e-4)
    assert want == pytest.approx(9.0 * float(((c - u) ** 2).mean()), rel=1e-5)  # (1 + eta)^2


# ------------------------------------------------------------------------- parameter groups


def _text_stream_parameters(transformer: torch.nn.Module) -> set[str]:
    """Independently: the parameters of the modules a joint attention applies to the text stream
    (context projections and their qk-norms), found by module, not by name pattern."""
    out = set()
    for name, mod in transformer.named_modules():
        if not name.endswith(".attn"):
            continue
        for child in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            if isinstance(getattr(mod, child, None), torch.nn.Linear):
                out |= {f"{name}.{child}.{p}" for p, _ in getattr(mod, child).named_parameters()}
        for child in ("norm_added_q", "norm_added_k"):
            sub = getattr(mod, child, None)
            if isinstance(sub, torch.nn.Module):
                out |= {f"{name}.{child}.{p}" for p, _ in sub.named_parameters()}
    return out


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_flow_esd_x_is_the_text_stream_of_the_joint_attention(models, name) -> None:
    unet = models[name].unet
    x = esd_parameter_names(unet, "x")
    u = esd_parameter_names(unet, "u")
    assert set(x) == _text_stream_parameters(unet) and x
    assert sorted(x + u) == sorted(esd_parameter_names(unet, "full"))
    assert any(".attn.to_k." in n for n in u)  # the image tokens' projections are ESD-u
    assert not any(n.startswith("single_transformer_blocks.") for n in x)  # FLUX: mixed streams


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("variant", ["x", "u"])
def test_one_step_changes_exactly_the_variants_parameters(models, tmp_path, name, variant):
    model = models[name]
    before = state(model.unet)
    result = train_esd(model, esd_cfg(tmp_path, variant=variant))
    trained = set(esd_parameter_names(model.unet, variant))
    changed = {n for n, p in result.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trained, sorted(changed - trained)[:3]
    if variant == "x":  # what reads the text: every cross-attention / text key-value projection
        reads = {n for n in trained if ".to_k." in n or ".to_v." in n or "add_k_proj" in n}
        reads |= {n for n in trained if "add_v_proj" in n}
        assert reads and reads <= changed, sorted(reads - changed)[:3]
    else:  # some tensors get no gradient in one step (zero-initialised gates, unused outputs)
        assert len(changed) >= 0.5 * len(trained), (len(changed), len(trained))
    for k, v in model.unet.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k


def test_flux_without_guidance_input_reaches_x_t_with_cfg(tmp_path) -> None:
    """A FLUX-schnell-like transformer (no guidance input): no guidance is passed anywhere, x_t is
    reached with CFG as the flow sampler does, and one step trains only ESD-x."""
    model = flow_components_to_t2i(build_tiny_flux(seed=0, guidance_embeds=False), "schnell-like")
    calls = []
    hook = model.unet.register_forward_pre_hook(
        lambda m, a, kw: calls.append((len(kw["hidden_states"]), kw.get("guidance"))),
        with_kwargs=True,
    )
    cfg = esd_cfg(tmp_path, ddim_steps=2, seed=1)
    k = int(torch.randint(2, (1,), generator=_after_concept(cfg)))
    assert k == 1  # one reaching step, so the CFG call below is checked
    try:
        result = train_esd(model, cfg)
    finally:
        hook.remove()
    assert all(g is None for _, g in calls)
    assert [b for b, _ in calls[:k]] == [2] * k  # CFG: uncond and cond rows in one call
    trained = set(esd_parameter_names(model.unet, "x"))
    before = dict(model.unet.named_parameters())
    changed = {n for n, p in result.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained


def _after_concept(cfg: ESDConfig) -> torch.Generator:
    g = generator(derive_seed(cfg.seed, "esd", 0))
    torch.randint(1, (1,), generator=g)  # the concept draw
    return g


# --------------------------------------------------------------- saved folder, defense, resume


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_folder_loads_in_diffusers_and_as_the_esd_defense(models, tmp_path, name) -> None:
    model = models[name]
    out = run_esd(esd_cfg(tmp_path, model=name), model, progress=False)
    plain = DENOISER_CLASSES[name].from_pretrained(str(out))
    defended, kwargs = apply_defenses(model, f"esd:{out}")
    assert kwargs == {"guidance": []} and defended.unet is not model.unet
    for k, v in plain.state_dict().items():
        assert torch.equal(defended.unet.state_dict()[k], v), k
    meta = json.loads((out / META_FILE).read_text())
    assert meta["denoiser"] == DENOISER_CLASSES[name].__name__
    settings = SamplerSettings(num_steps=2, eta=0.0, guidance_scale=3.0)
    images = sample(defended, PROMPTS, [generator(0), generator(1)], settings).trajectory.images
    base = sample(model, PROMPTS, [generator(0), generator(1)], settings).trajectory.images
    assert torch.isfinite(images).all() and not torch.equal(images, base)
    other = "tiny-sd3" if name == "tiny-flux" else "tiny-flux"
    with pytest.raises(SafediffError, match="holds a") as err:
        apply_defenses(models[other], f"esd:{out}")
    one_line(err)


def test_flow_resume_equals_an_uninterrupted_run(models, tmp_path) -> None:
    model = models["tiny-flux"]
    cfg = esd_cfg(tmp_path, steps=3, save_every=2, lr=1e-3, output_dir=str(tmp_path / "a"))
    whole = train_esd(model, cfg)

    def crash(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    resumed_cfg = esd_cfg(tmp_path, steps=3, save_every=2, lr=1e-3, output_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        run_esd(resumed_cfg, model, progress=False, on_step=crash)
    assert (tmp_path / "b" / CHECKPOINT_DIR).is_dir()
    out = run_esd(resumed_cfg, model, progress=False)
    resumed = FluxTransformer2DModel.from_pretrained(str(out))
    for k, v in whole.unet.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert json.loads((out / META_FILE).read_text())["losses"] == whole.losses


# ------------------------------------------------------------------------------------ stacking


def _negset(model: T2IModel, tmp_path) -> str:
    latents = torch.randn(6, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    return str(NegationSet.from_tensor(latents).save(tmp_path / "negset.safetensors"))


def _des(model: T2IModel, tmp_path) -> str:
    cfg = DESConfig(epochs=1, batch_size=2, lr=1e-3)
    result = train_des(adapter_for_model(model), ["a dog"], ["a nude woman"], cfg)
    return str(result.adapter.save(tmp_path / "des"))


def _batched_equals_one_at_a_time(model: T2IModel, kwargs: dict) -> torch.Tensor:
    images = []
    for batch in (2, 1):
        settings = SamplerSettings(num_steps=2, eta=0.0, guidance_scale=3.0, batch_size=batch)
        gens = [generator(10), generator(11)]
        images.append(sample(model, PROMPTS, gens, settings, defense=kwargs).trajectory.images)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-5)
    assert torch.isfinite(images[0]).all() and not torch.equal(images[0][0], images[0][1])
    return images[0]


@pytest.mark.parametrize("weights", ["uce:text=nudity", "rece:text=nudity;rounds=1", "esd"])
def test_weight_edits_stack_on_sdxl(models, tmp_path, weights) -> None:
    model = models["tiny-sdxl"]
    if weights == "esd":
        weights = f"esd:{run_esd(esd_cfg(tmp_path), model, progress=False)}"
    spec = f"negprompt:nudity,{weights},sld:medium,safe-denoiser:{_negset(model, tmp_path)};t_min=0"
    defended, kwargs = apply_defenses(model, spec)
    assert defended.unet is not model.unet and len(kwargs["guidance"]) == 2
    assert kwargs["negative_embeds"].shape[1:] == model.encode_text([""], "cpu").shape[1:]
    _batched_equals_one_at_a_time(defended, kwargs)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_esd_stacks_on_flow_models(models, tmp_path, name) -> None:
    model = models[name]
    esd = run_esd(esd_cfg(tmp_path, model=name), model, progress=False)
    spec = f"des:{_des(model, tmp_path)},esd:{esd},safe-denoiser:{_negset(model, tmp_path)};t_min=0"
    if name == "tiny-sd3":  # FLUX-dev has no unconditional pass for a negative prompt
        spec += ",negprompt:nudity"
    defended, kwargs = apply_defenses(model, spec)
    assert defended.unet is not model.unet and len(kwargs["guidance"]) == 1
    assert defended.encode_text is not model.encode_text  # DES swapped the encoders
    _batched_equals_one_at_a_time(defended, kwargs)


# ------------------------------------------------------------------- the family matrix (docs)

KINDS = ("uce", "rece", "esd", "safree", "des", "negprompt", "sld", "safe-denoiser")
REFUSED = {
    ("tiny-sdxl", "safree"): "separate pooled channel",
    ("tiny-sd3", "uce"): "UCE/RECE do not apply",
    ("tiny-sd3", "rece"): "UCE/RECE do not apply",
    ("tiny-sd3", "safree"): "separate pooled channel",
    ("tiny-flux", "uce"): "UCE/RECE do not apply",
    ("tiny-flux", "rece"): "UCE/RECE do not apply",
    ("tiny-flux", "safree"): "separate pooled channel",
    ("tiny-flux", "sld"): "guidance-distilled FLUX",
    ("tiny-flux", "negprompt"): "guidance-distilled FLUX",
}
"""The cells of docs/results/defenses.md's family table that are refused, with why; every other
(family, defense) pair applies and samples."""


def _spec(kind: str, model: T2IModel, name: str, tmp_path) -> str:
    if kind == "esd":
        cfg = esd_cfg(tmp_path, model=name, concept="nudity")
        return f"esd:{run_esd(cfg, model, progress=False)}"
    if kind == "des":
        return f"des:{_des(model, tmp_path)}"
    if kind == "safe-denoiser":
        return f"safe-denoiser:{_negset(model, tmp_path)};t_min=0"
    fixed = {"uce": "text=nudity", "rece": "text=nudity;rounds=1", "safree": "nudity"}
    return f"{kind}:{fixed.get(kind, 'nudity' if kind != 'sld' else 'medium')}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ("tiny-sd", *FAMILIES))
def test_family_matrix(models, tmp_path, name, kind) -> None:
    model = models[name]
    settings = SamplerSettings(num_steps=2, eta=0.0, guidance_scale=3.0)
    gens = [generator(0), generator(1)]
    why = REFUSED.get((name, kind))
    if why is None:
        defended, kwargs = apply_defenses(model, _spec(kind, model, name, tmp_path))
        images = sample(defended, PROMPTS, gens, settings, defense=kwargs).trajectory.images
        assert images.shape[0] == 2 and torch.isfinite(images).all()
        return
    with pytest.raises(SafediffError, match=why) as err:
        defended, kwargs = apply_defenses(model, _spec(kind, model, name, tmp_path))
        sample(defended, PROMPTS, gens, settings, defense=kwargs)
    one_line(err)
