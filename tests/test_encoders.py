"""CLIP-family encoders: tiny OpenCLIP, HPSv2 loader, tiny transformers CLIP, preprocessing."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from safediff.errors import SafediffError
from safediff.rewards.encoders import load_encoder, register_encoder_kind
from safediff.rewards.encoders.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PromptCache,
    check_images,
    encode_images_chunked,
    parse_dtype,
    resize_crop_normalize,
)
from safediff.rewards.encoders.hf_clip import load_hf_clip_encoder
from safediff.rewards.encoders.hpsv2 import HPSV2_ARCH, load_hpsv2_encoder
from safediff.rewards.encoders.openclip import load_openclip_encoder
from safediff.rewards.encoders.tiny import (
    save_tiny_hf_clip,
    tiny_openclip_config,
    tiny_openclip_state_dict,
)

PROMPTS = ["a photo of a cat", "a red car on a long empty road at night", "x"]


def quantized_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random images whose values are exact multiples of 1/255 (uint8-representable)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tiny_cfg():
    return tiny_openclip_config()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_cfg):
    """A tiny open_clip checkpoint in the HPS_v2.1 layout: {'state_dict': open_clip CLIP keys}."""
    d = tmp_path_factory.mktemp("oc")
    state = tiny_openclip_state_dict(tiny_cfg, seed=3)
    path = d / "HPS_v2.1_tiny.pt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    return path, state


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_hf_clip(tmp_path_factory.mktemp("hf") / "tiny-clip", seed=1)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def test_preprocess_same_size_equals_open_clip_transform_exactly():
    images = quantized_images(2, 32, 32, seed=0)
    ours = resize_crop_normalize(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    ref_tf = open_clip.image_transform(32, is_train=False)
    ref = torch.stack([ref_tf(to_pil(im)) for im in images])
    assert torch.equal(ours, ref)


def test_preprocess_resize_and_crop_close_to_open_clip_transform():
    images = quantized_images(3, 48, 40, seed=1)  # H 48, W 40: short side 40 -> 32, crop H 38 -> 32
    ours = resize_crop_normalize(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    ref_tf = open_clip.image_transform(32, is_train=False)
    ref = torch.stack([ref_tf(to_pil(im)) for im in images])
    assert ours.shape == ref.shape == (3, 3, 32, 32)
    diff = (ours - ref).abs()
    # Both resize the same uint8 image in 8 bits; fixed-point rounding differs at a few pixels.
    pixel_diff = (ours - ref) * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255
    assert pixel_diff.abs().max() < 1.1 and diff.mean() < 5e-4
    assert (pixel_diff.abs() < 0.01).float().mean() > 0.98


def test_preprocess_modes_shapes():
    x = torch.rand(2, 3, 20, 40)
    assert resize_crop_normalize(x, 16, (0,) * 3, (1,) * 3, "squash").shape == (2, 3, 16, 16)
    longest = resize_crop_normalize(x, 16, (0,) * 3, (1,) * 3, "longest", fill=0.0)
    assert longest.shape == (2, 3, 16, 16)
    # 20x40 -> 8x16, padded by 4 rows above and below
    assert torch.all(longest[:, :, :4] == 0) and torch.all(longest[:, :, 12:] == 0)
    with pytest.raises(SafediffError, match="resize_mode"):
        resize_crop_normalize(x, 16, (0,) * 3, (1,) * 3, "stretch")


def test_check_images():
    check_images(torch.rand(2, 3, 8, 8), "t")
    with pytest.raises(SafediffError, match=r"\[B, 3, H, W\]"):
        check_images(torch.rand(3, 8, 8), "t")
    with pytest.raises(SafediffError, match="float"):
        check_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "t")
    with pytest.raises(SafediffError, match=r"expected \[0, 1\]"):
        check_images(torch.rand(1, 3, 8, 8) * 2 - 1, "t")


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype(None) is torch.float32
    with pytest.raises(SafediffError, match="unknown dtype"):
        parse_dtype("int8")


def test_prompt_cache_counts_and_clear():
    cache = PromptCache()
    calls = []

    def compute(ps):
        calls.append(list(ps))
        return (torch.tensor([[float(len(p))] for p in ps]),)

    (a,) = cache.get_many(["aa", "b", "aa"], compute)
    assert calls == [["aa", "b"]] and a.squeeze(1).tolist() == [2.0, 1.0, 2.0]
    (b,) = cache.get_many(["b", "ccc"], compute)
    assert calls[-1] == ["ccc"] and b.squeeze(1).tolist() == [1.0, 3.0]
    assert (cache.calls, cache.misses, cache.hits) == (2, 3, 1)  # hits: found already cached
    cache.clear()
    cache.get_many(["b"], compute)
    assert calls[-1] == ["b"] and len(cache) == 1


# ---------------------------------------------------------------------------------------------
# OpenCLIP
# ---------------------------------------------------------------------------------------------


def test_openclip_registered_config_matches_open_clip(tmp_path, tiny_cfg, tiny_ckpt):
    """A tiny config registered with open_clip.add_model_config, loaded by name."""
    ckpt, _state = tiny_ckpt
    cfg_path = tmp_path / "safediff-tiny-test.json"
    cfg_path.write_text(json.dumps(tiny_cfg))
    open_clip.add_model_config(cfg_path)
    enc = load_openclip_encoder("safediff-tiny-test", ckpt)
    assert enc.embed_dim == 16 and enc.image_size == (32, 32)

    # Reference: the same model through open_clip's own API and PIL transform.
    ref = open_clip.create_model("safediff-tiny-test", pretrained=str(ckpt)).eval()
    tok = open_clip.get_tokenizer("safediff-tiny-test")
    images = quantized_images(3, 32, 32, seed=2)
    tf = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        ref_img = ref.encode_image(torch.stack([tf(to_pil(i)) for i in images]), normalize=True)
        ref_txt = ref.encode_text(tok(PROMPTS), normalize=True)
    assert torch.allclose(enc.encode_images(images), ref_img, atol=1e-5)
    assert torch.allclose(enc.encode_text(PROMPTS), ref_txt, atol=1e-5)


def test_openclip_dict_config_and_safetensors(tmp_path, tiny_cfg, tiny_ckpt):
    _, state = tiny_ckpt
    st = tmp_path / "w.safetensors"
    save_file(state, str(st))
    enc = load_openclip_encoder("tiny", st, model_cfg=tiny_cfg)
    images = torch.rand(5, 3, 40, 36)
    emb = enc.encode_images(images)
    txt = enc.encode_text(PROMPTS)
    assert emb.shape == (5, 16) and txt.shape == (3, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    # batched == one image at a time; text batch == one prompt at a time
    single = torch.cat([enc.encode_images(images[i : i + 1]) for i in range(5)])
    assert torch.allclose(emb, single, atol=1e-5)
    assert torch.allclose(encode_images_chunked(enc, images, 2), emb, atol=1e-5)
    assert torch.allclose(txt, torch.cat([enc.encode_text([p]) for p in PROMPTS]), atol=1e-5)


def test_openclip_json_config_spec(tmp_path, tiny_cfg, tiny_ckpt):
    ckpt, _ = tiny_ckpt
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps({"model_cfg": tiny_cfg}))
    enc = load_encoder(f"openclip:{cfg_path}:{ckpt}")
    direct = load_openclip_encoder("tiny", ckpt, model_cfg=tiny_cfg)
    assert torch.allclose(enc.encode_text(PROMPTS), direct.encode_text(PROMPTS))


def test_openclip_bf16_weights_close_to_fp32(tiny_cfg, tiny_ckpt):
    ckpt, _ = tiny_ckpt
    fp32 = load_openclip_encoder("tiny", ckpt, model_cfg=tiny_cfg)
    bf16 = load_openclip_encoder("tiny", ckpt, model_cfg=tiny_cfg, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    images = torch.rand(2, 3, 32, 32)
    cos = (fp32.encode_images(images) * bf16.encode_images(images)).sum(-1)
    assert torch.all(cos > 0.98)
    with pytest.raises(SafediffError, match="autocast"):
        load_openclip_encoder("tiny", ckpt, model_cfg=tiny_cfg, precision="amp")


def test_openclip_unknown_name():
    with pytest.raises(SafediffError, match="no model config named 'ViT-Q-99'"):
        load_openclip_encoder("ViT-Q-99", None)


# ---------------------------------------------------------------------------------------------
# HPSv2 loader
# ---------------------------------------------------------------------------------------------


def test_hpsv2_key_layout_matches_vit_h_14():
    """The keys our loader expects for ViT-H-14 are those of the released HPS_v2.1 checkpoint."""
    cfg = open_clip.get_model_config(HPSV2_ARCH)
    with torch.device("meta"):
        model = open_clip.CLIP(**cfg)
    keys = set(model.state_dict())
    known = {  # a sample of the HPS_v2.1 checkpoint's 'state_dict' keys (open_clip CLIP layout)
        "logit_scale",
        "positional_embedding",
        "text_projection",
        "token_embedding.weight",
        "ln_final.weight",
        "transformer.resblocks.23.attn.in_proj_weight",
        "transformer.resblocks.23.mlp.c_proj.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "visual.conv1.weight",
        "visual.ln_pre.weight",
        "visual.ln_post.bias",
        "visual.transformer.resblocks.31.attn.out_proj.weight",
        "visual.transformer.resblocks.31.mlp.c_fc.bias",
    }
    assert known <= keys
    assert "transformer.resblocks.24.attn.in_proj_weight" not in keys  # 24 text layers
    assert model.state_dict()["visual.proj"].shape == (1280, 1024)


def test_hpsv2_loader_on_tiny_state_dict(tiny_cfg, tiny_ckpt):
    ckpt, state = tiny_ckpt
    enc = load_hpsv2_encoder(ckpt, model_name="tiny", model_cfg=tiny_cfg)
    assert enc.name.startswith("hpsv2:")
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    ref = open_clip.CLIP(**tiny_cfg)
    ref.load_state_dict(state)
    ref.eval()
    images = quantized_images(2, 32, 32, seed=5)
    tf = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        want = ref.encode_image(torch.stack([tf(to_pil(i)) for i in images]), normalize=True)
    assert torch.allclose(enc.encode_images(images), want, atol=1e-5)


def test_hpsv2_module_prefix_is_stripped(tmp_path, tiny_cfg, tiny_ckpt):
    _, state = tiny_ckpt
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    enc = load_hpsv2_encoder(path, model_name="tiny", model_cfg=tiny_cfg)
    assert torch.equal(enc.model.state_dict()["visual.proj"], state["visual.proj"])


def test_hpsv2_missing_checkpoint_names_path(tmp_path, tiny_cfg):
    missing = tmp_path / "nowhere" / "HPS_v2.1_compressed.pt"
    with pytest.raises(SafediffError, match=r"checkpoint not found: .*HPS_v2\.1_compressed\.pt"):
        load_hpsv2_encoder(missing, model_name="tiny", model_cfg=tiny_cfg)
    with pytest.raises(SafediffError, match="nowhere"):
        load_encoder(f"hpsv2:{missing}")


def test_hpsv2_wrong_keys_name_path(tmp_path, tiny_cfg, tiny_ckpt):
    _, state = tiny_ckpt
    renamed = {k.replace("visual.", "vision."): v for k, v in state.items()}
    path = tmp_path / "wrong.pt"
    torch.save({"state_dict": renamed}, path)
    with pytest.raises(SafediffError) as err:
        load_hpsv2_encoder(path, model_name="tiny", model_cfg=tiny_cfg)
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "visual." in msg and "vision." in msg

    bigger = tiny_openclip_state_dict(tiny_openclip_config(embed_dim=24))
    path2 = tmp_path / "shape.pt"
    torch.save({"state_dict": bigger}, path2)
    with pytest.raises(SafediffError, match=r"wrong shapes .*shape\.pt|shape\.pt.*wrong shapes"):
        load_hpsv2_encoder(path2, model_name="tiny", model_cfg=tiny_cfg)


def test_hpsv2_refuses_pickled_objects(tmp_path, tiny_cfg):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": PromptCache()}, path)
    with pytest.raises(SafediffError, match=r"evil\.pt.*weights-only"):
        load_hpsv2_encoder(path, model_name="tiny", model_cfg=tiny_cfg)


# ---------------------------------------------------------------------------------------------
# transformers CLIP
# ---------------------------------------------------------------------------------------------


def test_hf_clip_matches_transformers_pipeline(hf_folder):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    enc = load_hf_clip_encoder(hf_folder)
    assert enc.embed_dim == 16
    model = CLIPModel.from_pretrained(hf_folder).eval()
    tok = CLIPTokenizer.from_pretrained(hf_folder)
    proc = CLIPImageProcessor.from_pretrained(hf_folder)
    images = quantized_images(3, 32, 32, seed=7)
    pixel = proc(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
    ids = tok(PROMPTS, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixel)
        txt = model.get_text_features(**ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    want_img = torch.nn.functional.normalize(img, dim=-1)
    want_txt = torch.nn.functional.normalize(txt, dim=-1)
    assert torch.allclose(enc.encode_images(images), want_img, atol=1e-5)
    # ours pads to the longest prompt, the reference to max_length: CLIP's causal pooling agrees
    assert torch.allclose(enc.encode_text(PROMPTS), want_txt, atol=1e-5)


def test_hf_clip_batched_equals_single_and_spec(hf_folder):
    enc = load_encoder(f"hf-clip:{hf_folder}")
    images = torch.rand(4, 3, 36, 44)
    emb = enc.encode_images(images)
    single = torch.cat([enc.encode_images(images[i : i + 1]) for i in range(4)])
    assert emb.shape == (4, 16) and torch.allclose(emb, single, atol=1e-5)
    txt = enc.encode_text(PROMPTS)
    assert torch.allclose(txt, torch.cat([enc.encode_text([p]) for p in PROMPTS]), atol=1e-5)


def test_hf_clip_errors(tmp_path, hf_folder):
    with pytest.raises(SafediffError, match="folder not found"):
        load_hf_clip_encoder(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SafediffError, match="no config.json"):
        load_hf_clip_encoder(empty)
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((hf_folder / name).read_bytes())
    with pytest.raises(SafediffError, match="no CLIP tokenizer"):
        load_hf_clip_encoder(no_tok)


# ---------------------------------------------------------------------------------------------
# Spec strings
# ---------------------------------------------------------------------------------------------


def test_spec_errors():
    with pytest.raises(SafediffError, match="KIND:ARG"):
        load_encoder("ViT-B-32")
    with pytest.raises(SafediffError, match="unknown encoder kind 'clip'"):
        load_encoder("clip:/x")
    with pytest.raises(SafediffError, match="MODEL:CHECKPOINT"):
        load_encoder("openclip:ViT-B-32")
    with pytest.raises(SafediffError, match="already registered"):
        register_encoder_kind("hpsv2", lambda *a: None)
