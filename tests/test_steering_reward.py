"""SteeringReward, AlignmentReward and WeightedReward: constructed embeddings, tiny real encoders,
batching, caching, JPEG parity and the builders."""

import inspect
import json
import math
from collections.abc import Sequence

import pytest
import torch

from safediff.errors import SafediffError
from safediff.rewards.alignment import AlignmentReward
from safediff.rewards.anchors import AnchorSet, load_anchor_set
from safediff.rewards.clip_rewards import (
    build_alignment_reward,
    build_steering_reward,
    build_unsafe_penalty_reward,
    build_weighted_reward,
    reward_builders,
)
from safediff.rewards.encoders.base import ImageTextEncoder
from safediff.rewards.encoders.tiny import (
    save_tiny_hf_clip,
    tiny_openclip_config,
    tiny_openclip_state_dict,
)
from safediff.rewards.jpeg import jpeg_roundtrip
from safediff.rewards.steering_reward import SteeringReward
from safediff.rewards.weighted import WeightedReward

# ---------------------------------------------------------------------------------------------
# A fake encoder whose embeddings we control.
# Axes: 0 = "safe", 1 = "unsafe", 2 = "content" (a person). Images are embedded by their
# channel means (R -> safe, G -> unsafe, B -> content), text by a lookup table.
# ---------------------------------------------------------------------------------------------

TEXT = {
    "a safe image": [1.0, 0.0, 0.0],
    "appropriate": [1.0, 0.0, 0.1],
    "explicit nudity": [0.0, 1.0, 0.0],
    "porn": [0.0, 1.0, 0.1],
    "a nude person": [0.0, 0.5, 1.0],  # unsafe prompt: content + unsafe
    "a person in a park": [0.3, 0.0, 1.0],  # safe prompt: content, slightly safe
}
ANCHORS = AnchorSet("fake", ("a safe image", "appropriate"), ("explicit nudity", "porn"), "test")


class FakeEncoder:
    """ImageTextEncoder with hand-set embeddings; counts text encodes."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.embed_dim = 3
        self.name = "fake"
        self.text_calls: list[list[str]] = []

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.float().mean(dim=(2, 3)), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        self.text_calls.append(list(texts))
        return torch.nn.functional.normalize(torch.tensor([TEXT[t] for t in texts]), dim=-1)


def solid(r: float, g: float, b: float, size: int = 8) -> torch.Tensor:
    return torch.tensor([r, g, b]).view(3, 1, 1).expand(3, size, size).clone()


SAFE_IMG = solid(0.8, 0.0, 0.8)  # a person, safe rendering -> (1, 0, 1) / sqrt 2
UNSAFE_IMG = solid(0.0, 0.8, 0.8)  # a person, unsafe rendering -> (0, 1, 1) / sqrt 2


def test_fake_encoder_satisfies_protocol():
    assert isinstance(FakeEncoder(), ImageTextEncoder)


@pytest.mark.parametrize("mode", ["translation", "projection"])
def test_steered_reward_prefers_safe_image_for_unsafe_prompt(mode):
    enc = FakeEncoder()
    images = torch.stack([SAFE_IMG, UNSAFE_IMG])
    prompts = ["a nude person"] * 2
    plain = AlignmentReward(enc)(images, prompts)
    steered = SteeringReward(enc, ANCHORS, alpha=0.5, mode=mode)(images, prompts)
    assert plain[1] > plain[0]  # unsteered alignment rewards the unsafe rendering
    assert steered[0] > steered[1]  # steering flips the preference to the safe rendering


def test_steered_reward_hand_computed():
    enc = FakeEncoder()
    reward = SteeringReward(enc, ANCHORS, alpha=0.5, mode="translation")
    # v_safe = normalize(mean(safe) - mean(unsafe)); safe rows (1,0,0), (1,0,.1)/|.|, ...
    n = math.sqrt(1.01)
    mean_safe = [(1 + 1 / n) / 2, 0.0, (0.1 / n) / 2]
    mean_unsafe = [0.0, (1 + 1 / n) / 2, (0.1 / n) / 2]
    d = [a - b for a, b in zip(mean_safe, mean_unsafe, strict=True)]
    v = [x / math.sqrt(sum(y * y for y in d)) for x in d]  # = (1, -1, 0) / sqrt 2
    assert torch.allclose(reward.v_safe, torch.tensor(v), atol=1e-6)
    z = [0.0, 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25)]
    s = sum(a * b for a, b in zip(z, v, strict=True))  # -0.316228
    assert s == pytest.approx(-0.3162278, abs=1e-6)
    zs = [a + 0.5 * b for a, b in zip(z, v, strict=True)]
    zs = [x / math.sqrt(sum(y * y for y in zs)) for x in zs]
    img = [1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)]
    want = sum(a * b for a, b in zip(img, zs, strict=True))
    out = reward.score(SAFE_IMG[None], ["a nude person"])
    assert out["text_safety"].item() == pytest.approx(s, abs=1e-6)
    assert out["reward"].item() == pytest.approx(want, abs=1e-6)
    assert out["weight"].item() == 1.0
    assert out["image_safety"].item() == pytest.approx(0.5, abs=1e-6)


def test_threshold_gating_leaves_safe_prompts_alone():
    enc = FakeEncoder()
    images = torch.stack([SAFE_IMG, UNSAFE_IMG, SAFE_IMG])
    prompts = ["a person in a park", "a person in a park", "a nude person"]
    gated = SteeringReward(enc, ANCHORS, alpha=0.5, gating="threshold", threshold=0.0)
    plain = AlignmentReward(enc)(images, prompts)
    out = gated.score(images, prompts)
    assert out["weight"].tolist() == [0.0, 0.0, 1.0]
    assert torch.allclose(out["reward"][:2], plain[:2], atol=1e-6)  # safe prompt: plain alignment
    full = SteeringReward(enc, ANCHORS, alpha=0.5)(images, prompts)
    assert torch.allclose(out["reward"][2], full[2])  # unsafe prompt: fully steered
    soft = SteeringReward(enc, ANCHORS, alpha=0.5, gating="soft", temperature=0.1)
    w = soft.score(images, prompts)["weight"]
    assert 0 < w[0] < 0.5 < w[2] < 1


def test_empty_positive_anchors_end_to_end():
    enc = FakeEncoder()
    anchors = AnchorSet("ep", (), ("explicit nudity", "porn"), "test")
    reward = SteeringReward(enc, anchors, alpha=0.5)
    mean_unsafe = enc.encode_text(["explicit nudity", "porn"]).mean(0)
    assert torch.allclose(reward.v_safe, torch.nn.functional.normalize(-mean_unsafe, dim=0))
    r = reward(torch.stack([SAFE_IMG, UNSAFE_IMG]), ["a nude person"] * 2)
    assert r[0] > r[1]


def test_each_distinct_prompt_encoded_once_until_cleared():
    enc = FakeEncoder()
    reward = SteeringReward(enc, ANCHORS)
    enc.text_calls.clear()
    images = torch.stack([SAFE_IMG, UNSAFE_IMG] * 2)
    prompts = ["a nude person", "a nude person", "a person in a park", "a nude person"]
    r1 = reward(images, prompts)
    r2 = reward(images, prompts[::-1])
    assert enc.text_calls == [["a nude person", "a person in a park"]]
    assert torch.equal(r2, reward(images, prompts[::-1]))
    assert reward.cache.calls == 1 and reward.cache.misses == 2
    reward.clear_cache()
    assert torch.equal(reward(images, prompts), r1)
    assert enc.text_calls == [["a nude person", "a person in a park"]] * 2


def test_reward_input_errors():
    reward = SteeringReward(FakeEncoder(), ANCHORS)
    with pytest.raises(SafediffError, match="2 images but 1 prompts"):
        reward(torch.stack([SAFE_IMG, UNSAFE_IMG]), ["a nude person"])
    with pytest.raises(SafediffError, match=r"expected \[0, 1\]"):
        reward(SAFE_IMG[None] * 255, ["a nude person"])
    with pytest.raises(SafediffError, match="steering mode"):
        SteeringReward(FakeEncoder(), ANCHORS, mode="rotate")
    with pytest.raises(SafediffError, match="gating"):
        SteeringReward(FakeEncoder(), ANCHORS, gating="maybe")


# ---------------------------------------------------------------------------------------------
# JPEG parity
# ---------------------------------------------------------------------------------------------


def test_jpeg_roundtrip_matches_pil_by_hand():
    import io

    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 24, generator=g)
    out = jpeg_roundtrip(images, quality=95)
    assert out.shape == images.shape and out.dtype == torch.float32
    arr = (images[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # the reference's truncation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    want = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255)
    assert torch.equal(out[1], want.permute(2, 0, 1))
    assert not torch.equal(out, images)
    assert jpeg_roundtrip(images, resize_to=20).shape == (2, 3, 20, 20)


def test_jpeg_parity_switch_scores_roundtripped_images():
    enc = FakeEncoder()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 16, 16, generator=g)
    prompts = ["a nude person"] * 3
    parity = SteeringReward(enc, ANCHORS, jpeg_parity=True, jpeg_quality=80)(images, prompts)
    plain = SteeringReward(enc, ANCHORS)
    assert torch.allclose(parity, plain(jpeg_roundtrip(images, quality=80), prompts), atol=1e-6)
    # the reference's exact settings: PIL resize to S x S, then PIL's default quality 75
    ref = SteeringReward(enc, ANCHORS, jpeg_parity=True, jpeg_quality=75, jpeg_resize=24)
    want = plain(jpeg_roundtrip(images, quality=75, resize_to=24), prompts)
    assert torch.allclose(ref(images, prompts), want, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Tiny real encoders end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openclip_spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("oc")
    cfg = tiny_openclip_config()
    (d / "tiny.json").write_text(json.dumps(cfg))
    torch.save({"state_dict": tiny_openclip_state_dict(cfg, seed=0)}, d / "tiny.pt")
    return f"openclip:{d / 'tiny.json'}:{d / 'tiny.pt'}"


@pytest.fixture(scope="module")
def hf_spec(tmp_path_factory):
    return f"hf-clip:{save_tiny_hf_clip(tmp_path_factory.mktemp('hf') / 'clip', seed=2)}"


PROMPTS = ["a cat", "a nude person", "a cat", "a dog in a park", "a nude person", "a cat"]


@pytest.mark.parametrize("which", ["openclip", "hf"])
@pytest.mark.parametrize("mode", ["translation", "projection"])
def test_batched_equals_one_at_a_time(which, mode, openclip_spec, hf_spec):
    spec = openclip_spec if which == "openclip" else hf_spec
    reward = build_steering_reward(spec, anchors="compact", alpha=0.5, mode=mode, gating="soft")
    g = torch.Generator().manual_seed(3)
    images = torch.rand(len(PROMPTS), 3, 40, 48, generator=g)
    batched = reward(images, PROMPTS)
    assert batched.shape == (6,) and batched.dtype == torch.float32
    assert torch.all(batched.abs() <= 1.0 + 1e-5)
    reward.clear_cache()
    single = torch.cat([reward(images[i : i + 1], [p]) for i, p in enumerate(PROMPTS)])
    assert torch.allclose(batched, single, atol=1e-5)
    chunked = build_steering_reward(spec, mode=mode, gating="soft", chunk_size=4)
    assert torch.allclose(chunked(images, PROMPTS), batched, atol=1e-5)


def test_tiny_openclip_end_to_end_hand_check(openclip_spec):
    reward = build_steering_reward(openclip_spec, anchors="extended", alpha=0.4, mode="projection")
    enc = reward.encoder
    images = torch.rand(2, 3, 32, 32)
    prompts = ["a nude person", "a cat"]
    anchors = load_anchor_set("extended")
    v = torch.nn.functional.normalize(
        enc.encode_text(list(anchors.safe)).mean(0) - enc.encode_text(list(anchors.unsafe)).mean(0),
        dim=0,
    )
    z = enc.encode_text(prompts)
    s = z @ v
    z_star = torch.nn.functional.normalize(z - s[:, None] * v + 0.4 * v, dim=-1)
    want = (enc.encode_images(images) * z_star).sum(-1)
    assert torch.allclose(reward(images, prompts), want, atol=1e-5)


def test_autocast_bf16_close_to_fp32(openclip_spec):
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a cat", "a nude person", "a cat"]
    fp32 = build_steering_reward(openclip_spec)(images, prompts)
    bf16 = build_steering_reward(openclip_spec, autocast="bfloat16")(images, prompts)
    assert bf16.dtype == torch.float32
    assert torch.allclose(fp32, bf16, atol=0.05)


def test_weighted_reward_and_shared_encoder(openclip_spec):
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a cat", "a nude person", "a cat"]
    weighted = build_weighted_reward(
        [
            {"name": "steering", "weight": 0.7, "params": {"encoder": openclip_spec}},
            {
                "name": "alignment",
                "weight": 0.3,
                "params": {"encoder": openclip_spec, "scale": 2.0},
            },
        ]
    )
    assert isinstance(weighted, WeightedReward)
    (w1, steer_r), (w2, align_r) = weighted.components
    assert (w1, w2) == (0.7, 0.3)
    assert steer_r.encoder is align_r.encoder  # one encoder loaded for both components
    out = weighted.score(images, prompts)
    want = 0.7 * steer_r(images, prompts) + 0.3 * align_r(images, prompts)
    assert torch.allclose(out["reward"], want, atol=1e-6)
    assert torch.allclose(weighted(images, prompts), want, atol=1e-6)
    assert set(out) == {"steering", "alignment", "reward"}
    with pytest.raises(SafediffError, match="unknown reward 'nope'"):
        build_weighted_reward([{"name": "nope"}])
    with pytest.raises(SafediffError, match="unknown key 'wieght'"):
        build_weighted_reward([{"name": "steering", "wieght": 1}])


def test_alignment_reward_is_cosine(hf_spec):
    reward = build_alignment_reward(hf_spec, scale=100.0)
    enc = reward.encoder
    images = torch.rand(2, 3, 32, 32)
    prompts = ["a cat", "a dog"]
    want = 100 * (enc.encode_images(images) * enc.encode_text(prompts)).sum(-1)
    assert torch.allclose(reward(images, prompts), want, atol=1e-4)


def test_reward_builders_table():
    table = reward_builders()
    assert set(table) == {"steering", "alignment", "weighted", "unsafe_penalty"}
    for builder in table.values():
        assert "device" in inspect.signature(builder).parameters
    with pytest.raises(SafediffError, match="alpha must be a finite number"):
        build_steering_reward(FakeEncoder(), anchors=ANCHORS, alpha=float("nan"))
    with pytest.raises(SafediffError, match="unknown anchor set"):
        build_steering_reward(FakeEncoder(), anchors="nope")


def test_negative_only_reward_penalises_the_unsafe_mean_and_ignores_prompts():
    reward = build_unsafe_penalty_reward(FakeEncoder(), anchors=ANCHORS)
    images = torch.stack([SAFE_IMG, UNSAFE_IMG])
    u = torch.nn.functional.normalize(
        torch.nn.functional.normalize(
            torch.tensor([TEXT["explicit nudity"], TEXT["porn"]]), dim=-1
        ).mean(0),
        dim=0,
    )
    img = torch.nn.functional.normalize(images.mean(dim=(2, 3)), dim=-1)
    got = reward(images, ["a nude person", "a nude person"])
    assert torch.allclose(got, -(img @ u), atol=1e-6)
    assert got[0] > got[1]  # the safe rendering scores higher
    assert torch.equal(got, reward(images, ["a person in a park", "a safe image"]))
    with pytest.raises(SafediffError, match="no unsafe phrases"):
        build_unsafe_penalty_reward(
            FakeEncoder(), anchors=AnchorSet("s", ("a safe image",), (), "t")
        )
