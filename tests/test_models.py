"""safediff.models: the offline CLIP tokenizer, the tiny SD, the SD adapter and the loaders.

References are independent of the code under test: open_clip's own tokenizer, diffusers'
StableDiffusionPipeline (encode_prompt, its VAE image post-processor), diffusers' DDIMScheduler and
the plain `from_pretrained` of each component class. No network: HF_HUB_OFFLINE is set.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import re
from pathlib import Path

import open_clip
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from open_clip.tokenizer import SimpleTokenizer

from safediff.config import ModelConfig
from safediff.errors import SafediffError
from safediff.models.clip_tokenizer import build_clip_tokenizer
from safediff.models.loading import load_t2i_model, load_unet_weights, save_unet_safetensors
from safediff.models.stable_diffusion import diffusers_pipeline, sd_components_to_t2i
from safediff.models.tiny_sd import build_tiny_sd, save_tiny_sd

PROMPTS = [
    "a photo of a cat",
    "A PHOTO of a Cat, sitting on the MAT!!",
    "don't stop-me now; it's 3:45pm... (really?) #yolo @home",
    "naïve café — ünïcödé 😀 <3",
    "  extra   spaces\tand\nnewlines  ",
    "",
]
LONG_PROMPT = " ".join(["a very long prompt with many words"] * 20)


def _unet_out(unet: torch.nn.Module, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.fixture(scope="module")
def tiny_model():
    return load_t2i_model(ModelConfig(pretrained="tiny-sd"))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_vocab_matches_open_clip(tokenizer):
    ref = SimpleTokenizer()
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == 49408
    assert (
        tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
        == [
            ref.sot_token_id,
            ref.eot_token_id,
        ]
        == [49406, 49407]
    )
    # Every ordinary token (bytes, end-of-word bytes, merges) has open_clip's id.
    ordinary = {t: i for t, i in ref.encoder.items() if i < 49406}
    assert len(ordinary) == 49406
    assert all(vocab[t] == i for t, i in ordinary.items())
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize("prompt", [*PROMPTS, LONG_PROMPT])
def test_tokenizer_ids_equal_open_clip(tokenizer, prompt):
    ref = open_clip.tokenize([prompt])[0].tolist()  # pads with 0 after <|endoftext|>
    ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(ids) == 77
    n = ref.index(49407) + 1  # text incl. both special tokens
    assert ids[:n] == ref[:n]
    assert ids[n:] == [49407] * (77 - n)  # SD 1.x pads with <|endoftext|>
    assert ref[n:] == [0] * (77 - n)


def test_long_prompt_is_truncated_like_open_clip(tokenizer):
    ids = tokenizer(LONG_PROMPT, padding="max_length", truncation=True, max_length=77).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and 49407 not in ids[1:-1]


# ---------------------------------------------------------------------------------------------
# Tiny SD


def test_tiny_sd_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_sd(seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG untouched
    b = build_tiny_sd(seed=0)
    c = build_tiny_sd(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_state(a[name], b[name])
        assert not torch.equal(
            next(iter(a[name].parameters())), next(iter(c[name].parameters()))
        ), name
    assert isinstance(a["scheduler"], DDIMScheduler)
    cfg = a["scheduler"].config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample) == (1, False, False)
    assert a["unet"].config.cross_attention_dim == a["text_encoder"].config.hidden_size == 32


def test_tiny_sd_adapter_shapes_and_schedule(tiny_model):
    m = tiny_model
    assert m.latent_shape == (4, 8, 8)
    assert m.source == "tiny-sd"
    ref = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False
    )
    assert torch.allclose(m.schedule.alphas_cumprod, ref.alphas_cumprod.float())
    assert m.schedule.final_alpha_cumprod == pytest.approx(float(ref.alphas_cumprod[0]))
    assert m.schedule.prediction_type == "epsilon"
    assert set(m.components) >= {"vae", "text_encoder", "tokenizer", "scheduler"}
    for name in ("vae", "text_encoder"):
        module = m.components[name]
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert all(p.requires_grad for p in m.unet.parameters())
    v = load_t2i_model(ModelConfig(pretrained="tiny-sd-v", resolution=32))
    assert v.schedule.prediction_type == "v_prediction"
    assert v.latent_shape == (4, 16, 16)


def test_bad_resolution_is_an_error():
    with pytest.raises(SafediffError, match="resolution 18"):
        sd_components_to_t2i(build_tiny_sd(), source="tiny-sd", resolution=18)


def test_encode_text_matches_diffusers_pipeline(tiny_model):
    m = tiny_model
    prompts = ["a red square", "A dog, running!!", ""]
    states = m.encode_text(prompts, torch.device("cpu"))
    assert states.shape == (3, 77, 32) and states.dtype == torch.float32
    assert not states.requires_grad
    assert torch.equal(states, m.encode_text(prompts, torch.device("cpu")))
    pipe = diffusers_pipeline(m.components, m.unet)
    ref, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(states, ref, rtol=0, atol=0)
    # Different prompts give different states (the encoder is not constant).
    assert not torch.allclose(states[0], states[1])


def test_decode_matches_diffusers_postprocessing(tiny_model):
    m = tiny_model
    latents = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0)) * 3
    images = m.decode(latents)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    vae = m.components["vae"]
    with torch.no_grad():
        raw = vae.decode(latents / vae.config.scaling_factor).sample
    pipe = diffusers_pipeline(m.components, m.unet)
    ref = pipe.image_processor.postprocess(raw, output_type="pt")
    torch.testing.assert_close(images, ref)


# ---------------------------------------------------------------------------------------------
# Folders, hub ids and bare UNet checkpoints


def test_saved_folder_round_trips(tiny_folder, tiny_model):
    loaded = load_t2i_model(ModelConfig(pretrained=str(tiny_folder)))
    assert loaded.source == str(tiny_folder)
    for name in ("vae", "text_encoder"):
        _assert_same_state(loaded.components[name], tiny_model.components[name])
    _assert_same_state(loaded.unet, tiny_model.unet)
    torch.testing.assert_close(_unet_out(loaded.unet), _unet_out(tiny_model.unet), rtol=0, atol=0)
    prompts = ["a blue circle", "two cats"]
    torch.testing.assert_close(
        loaded.encode_text(prompts, "cpu"), tiny_model.encode_text(prompts, "cpu"), rtol=0, atol=0
    )
    assert loaded.latent_shape == tiny_model.latent_shape
    assert torch.equal(loaded.schedule.alphas_cumprod, tiny_model.schedule.alphas_cumprod)
    # The folder is a plain diffusers folder: the UNet loads without safediff.
    plain = UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet")
    torch.testing.assert_close(_unet_out(plain), _unet_out(tiny_model.unet), rtol=0, atol=0)
    assert (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_dtype_applies_to_frozen_parts_only(tiny_folder):
    m = load_t2i_model(ModelConfig(pretrained=str(tiny_folder)), dtype=torch.bfloat16)
    assert next(m.unet.parameters()).dtype == torch.float32
    assert next(m.components["vae"].parameters()).dtype == torch.bfloat16
    assert next(m.components["text_encoder"].parameters()).dtype == torch.bfloat16
    assert m.encode_text(["a cat"], "cpu").dtype == torch.bfloat16
    assert m.decode(torch.zeros(1, *m.latent_shape)).dtype == torch.float32


def test_bare_unet_swap(tmp_path, tiny_model):
    other = build_tiny_sd(seed=1)["unet"]
    file = save_unet_safetensors(
        other, tmp_path / "checkpoint_epoch_3" / "diffusion_pytorch_model.safetensors"
    )
    assert not torch.equal(_unet_out(other), _unet_out(tiny_model.unet))
    for given in (file, file.parent):  # the file, or the checkpoint folder holding it
        m = load_t2i_model(ModelConfig(pretrained="tiny-sd", unet_weights=str(given)))
        _assert_same_state(m.unet, other)
        torch.testing.assert_close(_unet_out(m.unet), _unet_out(other), rtol=0, atol=0)
        # Only the UNet changed.
        _assert_same_state(m.components["text_encoder"], tiny_model.components["text_encoder"])
        assert str(file) in m.source


def test_missing_pipeline_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(SafediffError, match=re.escape(str(missing))):
        load_t2i_model(ModelConfig(pretrained=str(missing)))


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(SafediffError, match=f"{re.escape(str(tmp_path))}.*model_index.json"):
        load_t2i_model(ModelConfig(pretrained=str(tmp_path)))


def test_missing_unet_file(tmp_path):
    missing = tmp_path / "checkpoint_epoch_9" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(SafediffError, match=re.escape(str(missing))):
        load_t2i_model(ModelConfig(pretrained="tiny-sd", unet_weights=str(missing)))
    with pytest.raises(SafediffError, match=re.escape(str(tmp_path))):
        load_t2i_model(ModelConfig(pretrained="tiny-sd", unet_weights=str(tmp_path)))


def test_unet_file_with_wrong_keys_or_shapes(tmp_path):
    from safetensors.torch import save_file

    unet = build_tiny_sd()["unet"]
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    renamed = {("module." + k if k == "conv_in.weight" else k): v for k, v in state.items()}
    bad_keys = tmp_path / "renamed.safetensors"
    save_file(renamed, str(bad_keys))
    pattern = f"{re.escape(str(bad_keys))}.*1 missing key.*conv_in.weight.*module.conv_in.weight"
    with pytest.raises(SafediffError, match=pattern):
        load_unet_weights(unet, bad_keys)
    reshaped = dict(state, **{"conv_in.bias": torch.zeros(7)})
    bad_shape = tmp_path / "reshaped.safetensors"
    save_file(reshaped, str(bad_shape))
    with pytest.raises(SafediffError, match=f"{re.escape(str(bad_shape))}.*conv_in.bias"):
        load_unet_weights(unet, bad_shape)
    # A failed load leaves the UNet untouched.
    _assert_same_state(unet, build_tiny_sd()["unet"])


def test_unknown_hub_id_is_a_clear_error():
    with pytest.raises(
        SafediffError, match=r"could not load 'safediff-tests/no-such-model'.*cache"
    ):
        load_t2i_model(ModelConfig(pretrained="safediff-tests/no-such-model"))
