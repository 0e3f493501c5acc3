"""DES on SDXL (tiny-sdxl): each embedding space's losses against a hand computation, a step that
changes only the two text encoders (and in ViT-L only what SDXL reads), the saved folder in plain
diffusers (StableDiffusionXLPipeline) and as `des:FOLDER`, per-sample seeds and stacking."""

import math
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from safediff.config import ModelConfig
from safediff.defenses.des import DESConfig, train_des
from safediff.defenses.safe_denoiser import NegationSet
from safediff.defenses.stack import apply_defenses
from safediff.defenses.text_encoder_adapter import (
    SDXLTextEncodersAdapter,
    adapter_for_model,
    load_text_encoder_adapter,
)
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.loading import load_t2i_model
from safediff.models.sdxl import sdxl_pipeline, unpack_conditioning
from safediff.models.tiny_sdxl import save_tiny_sdxl
from safediff.sampling.sample import SamplerSettings, sample
from safediff.seeding import generator

SAFE = ["a dog in a park", "a bowl of fruit", "a red car"]
UNSAFE = ["a nude woman", "naked people on a beach"]
PROMPTS = ["a nude woman on a beach", "a red car"]
SPACES = ("text_encoder", "text_encoder_2", "text_embeds")


@pytest.fixture(scope="module")
def model() -> T2IModel:
    return load_t2i_model(ModelConfig(pretrained="tiny-sdxl"))


@pytest.fixture(scope="module")
def trained(model):
    """One DES step on tiny-sdxl with a large lr (every pair in the one batch)."""
    cfg = DESConfig(epochs=1, batch_size=len(SAFE), lr=1e-2, concept_scale=3.0)
    return train_des(adapter_for_model(model), SAFE, UNSAFE, cfg)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _flat(t: torch.Tensor) -> list[float]:
    return t.reshape(-1).double().tolist()


def _hand_space_loss(orig: dict[str, torch.Tensor], g: float, lam: float) -> float:
    """DES's objective in one space at step 0 (the trained copy still equals the original), from
    the original embeddings only, in Python floats: u, least-similar targets, the four terms."""
    e_empty, e_concept = _flat(orig[""]), _flat(orig["nudity"])
    diff = [c - e for c, e in zip(e_concept, e_empty, strict=True)]
    norm = math.sqrt(sum(d * d for d in diff))
    u = [d / norm for d in diff]
    safe = [_flat(orig[p]) for p in SAFE]
    pairs = [(UNSAFE[k % len(UNSAFE)], k % len(SAFE)) for k in range(len(SAFE))]
    unsafe = 0.0
    for prompt, _ in pairs:
        e = _flat(orig[prompt])
        j = min(range(len(SAFE)), key=lambda i: _cos(e, safe[i]))  # least similar safe entry
        target = [c - g * w for c, w in zip(safe[j], u, strict=True)]
        unsafe += (1 - _cos(e, target)) / len(pairs)
    # step 0: E_train(safe) = E_orig(safe), so the plain safe term is 0
    shifted = sum(
        1 - _cos([a + g * w for a, w in zip(safe[j], u, strict=True)], safe[j]) for _, j in pairs
    ) / len(pairs)
    concept = 1 - _cos(e_concept, e_empty)
    return lam * shifted + (1 - lam) * (unsafe + concept)


def test_each_space_loss_against_a_hand_computation(model, trained) -> None:
    adapter = adapter_for_model(model)
    assert isinstance(adapter, SDXLTextEncodersAdapter)
    with torch.no_grad():
        spaces = adapter.encode_spaces(["", "nudity", *SAFE, *UNSAFE])
    names = ["", "nudity", *SAFE, *UNSAFE]
    record = trained.history[0]
    total = 0.0
    for space in SPACES:
        assert spaces[space].shape[0] == len(names)
        orig = {p: spaces[space][i] for i, p in enumerate(names)}
        want = _hand_space_loss(orig, g=3.0, lam=0.3)
        assert record[f"total/{space}"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        total += want
    assert record["total"] == pytest.approx(total, rel=1e-4)
    assert record["safe"] == pytest.approx(0.0, abs=1e-5)
    # the spaces are the encoders' own outputs, the way the SDXL pipeline reads them
    pipe = sdxl_pipeline(model.components, model.unet)
    tokens, _, pooled, _ = pipe.encode_prompt(
        SAFE[0], device="cpu", do_classifier_free_guidance=False
    )
    d1 = spaces["text_encoder"].shape[-1]
    close = {"rtol": 1e-5, "atol": 1e-5}  # a batch of 7 prompts against one: rounding only
    torch.testing.assert_close(spaces["text_encoder"][2], tokens[0, :, :d1], **close)
    torch.testing.assert_close(spaces["text_encoder_2"][2], tokens[0, :, d1:], **close)
    torch.testing.assert_close(spaces["text_embeds"][2], pooled[0], **close)


def test_a_step_changes_only_the_two_text_encoders(model, trained) -> None:
    te1, te2 = model.components["text_encoder"], model.components["text_encoder_2"]
    new1, new2 = (
        trained.adapter.encoders["text_encoder"],
        trained.adapter.encoders["text_encoder_2"],
    )
    assert new1 is not te1 and new2 is not te2
    last = f"encoder.layers.{te1.config.num_hidden_layers - 1}."
    # SDXL reads ViT-L's penultimate layer: its last layer and final norm get no gradient
    unread = {
        n
        for n, _ in te1.named_parameters()
        if n.removeprefix("text_model.").startswith((last, "final_layer_norm."))
    }
    old1 = dict(te1.named_parameters())
    changed1 = {n for n, p in new1.named_parameters() if not torch.equal(p, old1[n])}
    assert unread and changed1 == {n for n in old1 if n not in unread}
    old2 = dict(te2.named_parameters())  # bigG feeds the pooled projection too: all of it
    assert all(not torch.equal(p, old2[n]) for n, p in new2.named_parameters())
    # the model is untouched: the swapped one shares its UNet and VAE, and encodes differently
    swapped = trained.adapter.swap_into(model)
    assert swapped.unet is model.unet and swapped.components["vae"] is model.components["vae"]
    assert model.components["text_encoder"] is te1 and model.encode_text.args[1] == (te1, te2)
    assert not torch.equal(swapped.encode_text(PROMPTS, "cpu"), model.encode_text(PROMPTS, "cpu"))
    # "" keeps the pipeline's zeros (force_zeros_for_empty_prompt) under the swapped encoders
    assert torch.equal(swapped.encode_text([""], "cpu")[:, :-1], torch.zeros_like(
        model.encode_text([""], "cpu")[:, :-1]
    ))  # fmt: skip


def test_saved_folder_loads_in_plain_diffusers_and_as_the_des_defense(model, trained, tmp_path):
    out = trained.adapter.save(tmp_path / "des")
    te1 = CLIPTextModel.from_pretrained(out / "text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")
    # dropped into an SDXL pipeline folder, plain diffusers loads them as its encoders
    pipe_dir = save_tiny_sdxl(tmp_path / "pipe")
    for name in ("text_encoder", "text_encoder_2"):
        shutil.rmtree(pipe_dir / name)
        shutil.copytree(out / name, pipe_dir / name)
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir)
    for ours, theirs in ((te1, pipe.text_encoder), (te2, pipe.text_encoder_2)):
        for k, v in ours.state_dict().items():
            assert torch.equal(theirs.state_dict()[k], v), k
    pipe.set_progress_bar_config(disable=True)
    tokens, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=False
    )
    # des:FOLDER on the model encodes exactly as that pipeline
    defended, kwargs = apply_defenses(model, f"des:{out}")
    assert kwargs == {"guidance": []} and defended.unet is model.unet
    packed = defended.encode_text(PROMPTS, "cpu")
    got_tokens, got_pooled, _ = unpack_conditioning(packed, pooled.shape[-1])
    torch.testing.assert_close(got_tokens, tokens, rtol=0, atol=0)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=0)
    # and the CLI's loader takes the tiny id and the pipeline folder
    for spec in ("tiny-sdxl", str(pipe_dir)):
        adapter = load_text_encoder_adapter(spec)
        assert isinstance(adapter, SDXLTextEncodersAdapter)
    assert torch.equal(adapter.encode(PROMPTS).detach(), packed)  # the folder's = DES's encoders


def test_an_sd_des_folder_is_refused_on_sdxl_in_one_line(model, tmp_path) -> None:
    sd = load_t2i_model(ModelConfig(pretrained="tiny-sd"))
    folder = tmp_path / "sd-des"
    sd.components["text_encoder"].save_pretrained(folder)
    with pytest.raises(SafediffError, match="no text_encoder/ text encoder folder") as err:
        apply_defenses(model, f"des:{folder}")
    assert "\n" not in str(err.value)


def _negset(model: T2IModel, tmp_path) -> str:
    latents = torch.randn(6, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    return str(NegationSet.from_tensor(latents).save(tmp_path / "negset.safetensors"))


@pytest.mark.parametrize("stack", ["des", "des+neg+sd"])
def test_defended_sdxl_samples_with_per_sample_seeds(model, trained, tmp_path, stack) -> None:
    spec = f"des:{trained.adapter.save(tmp_path / 'des')}"
    if stack != "des":
        spec += f",negprompt:nudity,safe-denoiser:{_negset(model, tmp_path)};t_min=0"
    defended, kwargs = apply_defenses(model, spec)
    runs = []
    for batch in (2, 1):
        settings = SamplerSettings(num_steps=3, eta=0.0, guidance_scale=3.0, batch_size=batch)
        gens = [generator(10), generator(11)]
        runs.append(sample(defended, PROMPTS, gens, settings, defense=kwargs).trajectory)
    torch.testing.assert_close(runs[0].latents, runs[1].latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(runs[0].images, runs[1].images, rtol=0, atol=1e-5)
    assert torch.isfinite(runs[0].images).all()
    settings = SamplerSettings(num_steps=3, eta=0.0, guidance_scale=3.0)
    base = sample(model, PROMPTS, [generator(10), generator(11)], settings).trajectory.latents
    assert (runs[0].latents[:, -1] - base[:, -1]).abs().max() > 1e-3
