"""The brightness reward and the reward registry."""

import inspect

import pytest
import torch

from safediff.config import RewardConfig, load_config
from safediff.errors import SafediffError
from safediff.rewards import registry
from safediff.rewards.base import RewardFn
from safediff.rewards.brightness import BrightnessReward
from safediff.rewards.registry import REWARD_BUILDERS, build_reward, register_reward


def images(b: int = 3, h: int = 5, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# BrightnessReward


def test_brightness_is_mean_intensity():
    x = images()
    r = BrightnessReward()(x, ["a", "b", "c"])
    assert r.shape == (3,) and r.dtype == torch.float32
    expected = torch.stack([x[i].sum() / x[i].numel() for i in range(3)])
    torch.testing.assert_close(r, expected)


def test_brightness_constant_images_and_target():
    x = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.25, 1.0)])
    torch.testing.assert_close(BrightnessReward()(x, ["p"] * 3), torch.tensor([0.0, 0.25, 1.0]))
    r = BrightnessReward(target=0.25)(x, ["p"] * 3)
    torch.testing.assert_close(r, torch.tensor([-0.25, 0.0, -0.75]))
    assert int(r.argmax()) == 1  # the image at the target brightness scores best


def test_brightness_half_precision_input_and_nan():
    x = images().to(torch.bfloat16)
    r = BrightnessReward()(x, ["p"] * 3)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, x.float().mean(dim=(1, 2, 3)))
    y = images()
    y[1, 0, 0, 0] = float("nan")
    r = BrightnessReward()(y, ["p"] * 3)
    assert torch.isnan(r[1]) and torch.isfinite(r[[0, 2]]).all()


@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(3, 4, 4),  # no batch dim
        torch.rand(2, 1, 4, 4),  # grayscale
        torch.rand(2, 4, 4, 3),  # channels last
        torch.rand(2, 3, 4, 4) * 2 - 1,  # [-1, 1]
        torch.rand(2, 3, 4, 4) * 255,  # [0, 255]
    ],
)
def test_brightness_rejects_bad_images(bad):
    with pytest.raises(SafediffError, match="brightness"):
        BrightnessReward()(bad, ["p"] * bad.shape[0])


def test_brightness_tolerates_small_overshoot_and_checks_prompt_count():
    x = images().clamp(0, 1) * 1.02 - 0.01
    BrightnessReward()(x, ["p"] * 3)
    with pytest.raises(SafediffError, match="3 images but 2 prompts"):
        BrightnessReward()(x, ["p"] * 2)


@pytest.mark.parametrize("target", [1.5, -0.1, float("nan"), "bright", True])
def test_brightness_rejects_bad_target(target):
    with pytest.raises(SafediffError, match="target"):
        BrightnessReward(target=target)


def test_brightness_satisfies_protocol():
    reward: RewardFn = BrightnessReward()
    assert reward.name == "brightness"
    assert list(inspect.signature(reward.__call__).parameters) == ["images", "prompts", "metadata"]


# ---------------------------------------------------------------------------------------------
# registry


@pytest.fixture
def fresh_registry(monkeypatch):
    """A private copy of the catalogue, so registrations do not leak into other tests."""
    catalogue = dict(REWARD_BUILDERS)
    monkeypatch.setattr(registry, "REWARD_BUILDERS", catalogue)
    return catalogue


def test_build_default_reward_from_config():
    cfg = load_config(overrides=["reward.params={target: 0.5}"])
    reward = build_reward(cfg.reward, device="cpu")
    assert isinstance(reward, BrightnessReward) and reward.target == 0.5
    assert isinstance(build_reward(RewardConfig()), BrightnessReward)


def test_unknown_reward_lists_names():
    with pytest.raises(SafediffError, match=r"unknown reward 'nope'; known rewards: .*brightness"):
        build_reward(RewardConfig(name="nope"))


def test_unknown_param_names_key_and_valid_ones():
    with pytest.raises(SafediffError, match=r"'targt'.*valid params: target"):
        build_reward(RewardConfig(params={"targt": 0.5}))


def test_device_param_is_rejected():
    with pytest.raises(SafediffError, match="device"):
        build_reward(RewardConfig(params={"device": "cuda"}))


def test_invalid_param_value_is_a_safediff_error():
    with pytest.raises(SafediffError, match="target"):
        build_reward(RewardConfig(params={"target": 3.0}))


def test_register_plugin_device_passing_and_required_params(fresh_registry):
    seen = {}

    class Scaled:
        name = "scaled"

        def __init__(self, scale: float, *, device="cpu"):
            seen["device"] = device
            self.scale = scale

        def __call__(self, images, prompts, metadata=None):
            return images.mean(dim=(1, 2, 3)) * self.scale

    register_reward("scaled", Scaled)
    assert "scaled" in registry.REWARD_BUILDERS
    reward = build_reward(RewardConfig(name="scaled", params={"scale": 2.0}), device="meta")
    assert seen["device"] == "meta" and reward.scale == 2.0
    torch.testing.assert_close(reward(torch.ones(2, 3, 2, 2), ["a", "b"]), torch.full((2,), 2.0))

    with pytest.raises(SafediffError, match=r"needs param 'scale'"):
        build_reward(RewardConfig(name="scaled"))
    with pytest.raises(SafediffError, match="already registered"):
        register_reward("scaled", Scaled)
    with pytest.raises(SafediffError, match="already registered"):
        register_reward("brightness", Scaled)


def test_builder_without_device_and_with_kwargs(fresh_registry):
    def no_device(k: int = 1):
        return BrightnessReward(target=k / 10)

    def any_kwargs(**kwargs):
        any_kwargs.got = kwargs
        return BrightnessReward()

    register_reward("nodev", no_device)
    register_reward("kw", any_kwargs)
    assert build_reward(RewardConfig(name="nodev", params={"k": 3})).target == pytest.approx(0.3)
    build_reward(RewardConfig(name="kw", params={"anything": 1}), device="cpu")
    assert any_kwargs.got == {"anything": 1, "device": "cpu"}
    with pytest.raises(SafediffError, match=r"non-empty"):
        register_reward("", no_device)
    with pytest.raises(SafediffError, match=r"callable"):
        register_reward("x", 3)


# ---------------------------------------------------------------------------------------------
# The JPEG parity path


def test_jpeg_roundtrip_defaults_to_the_references_quality_75():
    """The reference saves with `pil.save(path.jpg)`: PIL's default quality, 75."""
    import io

    import numpy as np
    from PIL import Image

    from safediff.rewards.jpeg import REFERENCE_QUALITY, jpeg_roundtrip

    x = images(b=2, h=16, w=16, seed=5)
    # truncation to uint8, as the reference
    arrays = (x.numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    want = []
    for arr in arrays:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG")  # no quality given: PIL's default
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32)
        want.append(torch.from_numpy(back.transpose(2, 0, 1) / 255.0))
    assert REFERENCE_QUALITY == 75
    torch.testing.assert_close(jpeg_roundtrip(x), torch.stack(want), rtol=0, atol=0)
    assert not torch.equal(jpeg_roundtrip(x, quality=95), jpeg_roundtrip(x))
