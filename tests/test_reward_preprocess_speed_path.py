"""The 8-bit resize of the reward preprocessing: PIL parity, chunking, non-finite images, grads."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from safediff.errors import SafediffError
from safediff.rewards.encoders import base
from safediff.rewards.encoders.base import check_images, resize

# (H, W) -> (h, w): downscales by 4 and by a non-integer factor, a non-square image, an upscale.
GEOMETRIES = [
    ((96, 96), (24, 24)),
    ((130, 130), (57, 57)),
    ((48, 40), (38, 32)),
    ((20, 20), (40, 40)),
]


def uint8_images(n: int, h: int, w: int, sharp: bool, seed: int) -> torch.Tensor:
    """Float images in [0, 1] that are exact multiples of 1/255: uniform noise (sharp edges
    everywhere, where bicubic overshoots) or a smooth upsampled field."""
    g = torch.Generator().manual_seed(seed)
    if sharp:
        x = torch.rand(n, 3, h, w, generator=g)
    else:
        x = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(h, w), mode="bilinear")
    return (x * 255).round() / 255


def pil_resize(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's bicubic resize of each image as a uint8 PIL image, back to float in [0, 1]."""
    out = []
    for img in images:
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        small = Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


@pytest.mark.parametrize("sharp", [False, True])
@pytest.mark.parametrize(("size_in", "size_out"), GEOMETRIES)
def test_resize_is_within_two_uint8_levels_of_pil(size_in, size_out, sharp):
    images = uint8_images(3, *size_in, sharp=sharp, seed=sum(size_in))
    want = pil_resize(images, *size_out)
    got = resize(images, *size_out)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal((got * 255).round() / 255, got)  # 8-bit output, as PIL's
    assert (got - want).abs().max() <= 2 / 255 + 1e-6
    assert (got == want).float().mean() > 0.98


def test_a_float_resize_is_far_from_pil_on_sharp_edges_and_ours_is_not():
    """Why the resize is 8-bit: PIL clips to [0, 255] between its row and column passes."""
    images = uint8_images(2, 48, 40, sharp=True, seed=0)
    want = pil_resize(images, 38, 32)
    float_resize = F.interpolate(images, size=(38, 32), mode="bicubic", antialias=True).clamp(0, 1)
    assert (float_resize - want).abs().max() > 5 / 255
    assert (resize(images, 38, 32) - want).abs().max() <= 2 / 255 + 1e-6


@pytest.mark.parametrize(("size_in", "size_out"), GEOMETRIES)
def test_the_float_emulation_used_off_the_cpu_agrees_with_the_uint8_kernel(size_in, size_out):
    images = uint8_images(3, *size_in, sharp=True, seed=1)
    emulated = base._resize_rounded(images, *size_out)
    assert torch.equal((emulated * 255).round() / 255, emulated)
    assert (emulated - resize(images, *size_out)).abs().max() <= 2 / 255 + 1e-6
    assert (emulated - pil_resize(images, *size_out)).abs().max() <= 2 / 255 + 1e-6


def test_chunking_does_not_change_the_result(monkeypatch):
    # 5 images of 3 x 30 x 30 = 2,700 pixels: 1,000 splits each image into 3 steps,
    # 10,000 resizes 3 whole images per call.
    images = uint8_images(5, 30, 30, sharp=True, seed=2) * 0.9 + 0.0123  # off the 1/255 grid
    whole = resize(images, 16, 16)
    one_by_one = torch.cat([resize(images[i : i + 1], 16, 16) for i in range(5)])
    assert torch.equal(whole, one_by_one)
    for chunk in (1_000, 10_000):
        monkeypatch.setattr(base, "_QUANT_CHUNK", chunk)
        assert torch.equal(resize(images, 16, 16), whole)


def test_inputs_are_rounded_to_the_nearest_uint8_level_first():
    images = uint8_images(2, 24, 24, sharp=True, seed=3)
    jitter = torch.rand(images.shape, generator=torch.Generator().manual_seed(9)) - 0.5
    nudged = images + jitter * (0.98 / 255)  # within half a level
    assert torch.equal(resize(nudged, 10, 10), resize(images, 10, 10))
    overshoot = images * 1.08 - 0.04  # decoder overshoot: saturates as PIL's uint8 does
    assert torch.equal(resize(overshoot, 10, 10), resize(overshoot.clamp(0, 1), 10, 10))


@pytest.mark.parametrize("chunk", [1 << 18, 700])
def test_images_with_a_non_finite_pixel_come_back_nan(monkeypatch, chunk):
    monkeypatch.setattr(base, "_QUANT_CHUNK", chunk)
    images = uint8_images(4, 20, 20, sharp=True, seed=4)
    clean = resize(images, 8, 8)
    bad = images.clone()
    bad[1, 2, 19, 19] = float("nan")  # the last pixel: the last step when chunked
    bad[2, 0, 0, 0] = float("inf")
    bad[3, 1, 10, 3] = -float("inf")
    for out in (resize(bad, 8, 8), base._resize_rounded(bad, 8, 8)):
        assert torch.isnan(out[1:]).all()
        assert torch.equal(out[0], clean[0])


def test_images_that_need_gradients_are_resized_in_float():
    images = uint8_images(2, 24, 24, sharp=False, seed=5).requires_grad_(True)
    out = resize(images, 10, 10)
    want = F.interpolate(images.detach(), size=(10, 10), mode="bicubic", antialias=True)
    torch.testing.assert_close(out.detach(), want.clamp(0, 1))
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_layouts_and_dtypes_give_the_same_result():
    images = uint8_images(3, 40, 36, sharp=True, seed=6)
    want = resize(images, 16, 16)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(resize(channels_last, 16, 16), want)
    padded = F.pad(images, (2, 2, 3, 3))[..., 3:-3, 2:-2]  # a non-contiguous view
    assert torch.equal(resize(padded, 16, 16), want)
    # k / 255 survives float16 and float64 to within a quarter level, so the rounding recovers k
    assert torch.equal(resize(images.half(), 16, 16), want)
    assert torch.equal(resize(images.double(), 16, 16), want)
    assert resize(images[:0], 16, 16).shape == (0, 3, 16, 16)


def test_resize_refuses_empty_sizes():
    with pytest.raises(SafediffError, match="cannot resize"):
        resize(torch.rand(1, 3, 8, 8), 0, 4)


def test_check_images_reads_a_band_of_rows_and_catches_wrong_conventions():
    g = torch.Generator().manual_seed(7)
    good = torch.rand(2, 3, 512, 512, generator=g)
    check_images(good, "t")
    check_images(good * 1.08 - 0.04, "t")  # decoder overshoot within the tolerance
    with pytest.raises(SafediffError, match=r"expected \[0, 1\]"):
        check_images(good * 2 - 1, "t")  # [-1, 1]
    with pytest.raises(SafediffError, match=r"expected \[0, 1\]"):
        check_images(good * 255, "t")  # [0, 255]
    band = slice(256 - 16, 256 + 16)  # the rows it reads
    non_finite = good.clone()
    non_finite[:, :, band] = float("nan")
    non_finite[0, 1, 250, 3] = float("inf")
    check_images(non_finite, "t")  # non-finite pixels are allowed
    non_finite[1, 2, 260, 7] = 3.0
    with pytest.raises(SafediffError, match=r"span \[.*, 3\]"):
        check_images(non_finite, "t")


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (48, 40), (20, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_preprocessing_normalises_in_place_only_what_it_owns(size, dtype):
    images = uint8_images(2, *size, sharp=True, seed=8).to(dtype)
    before = images.clone()
    got = base.resize_crop_normalize(images, 32, base.OPENAI_CLIP_MEAN, base.OPENAI_CLIP_STD)
    assert torch.equal(images, before)  # the caller's batch is never written
    x = base.center_crop(base.resize_shortest(images.float(), 32), 32, 32)
    mean = torch.tensor(base.OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(base.OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(got, (x - mean) / std)
