"""bench/bench_real_size.py at sizes the suite affords: the published configs (checked on the meta
device, no memory), the bench's GRPO + generation path on those configs with every width / 8, and
`preset_memory` against a hand computation."""

import importlib.util
from pathlib import Path

import pytest
import torch

from safediff.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_real_size.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_real_size", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_published_configs_give_the_published_parameter_counts(bench, arch):
    with torch.device("meta"):  # shapes only: 3.5 B parameters cost no memory here
        components = bench.build_components(bench.scaled_arch(arch, 1))
    assert bench.count_parameters(components) == bench.PUBLISHED_PARAMS[arch]
    targets = list(bench.LORA_IN_OUT[arch])
    assert bench.lora_in_out(components["unet"], targets) == bench.LORA_IN_OUT[arch]
    # the LoRA presets' r = 16 adapters: 3.2 M (SD 1.5) and 23.2 M (SDXL) parameters
    n_lora = 16 * sum(bench.LORA_IN_OUT[arch].values())
    assert n_lora == {"sd15": 3_188_736, "sdxl": 23_224_320}[arch]


def test_scaled_sd15_lora_trains_generates_and_measures(bench, tmp_path):
    r = bench.run_model(
        "sd15", lora=True, resolution=64, factor=8, measure_resolution=64, out_dir=str(tmp_path)
    )
    assert r["params"]["unet"] == 13_481_084  # widths / 8: [40, 80, 160, 160]
    assert r["trainable_params"] == 16 * sum(r["lora_in_out"].values())
    moved, watched = map(int, r["watched_tensors_moved"].split("/"))
    assert watched > 0 and moved == watched
    assert r["image_shape"] == [1, 3, 64, 64] and r["image_finite"]
    assert len(r["rewards"]) == 2 and r["rewards"][0] != r["rewards"][1]
    act = r["activations"]
    # checkpointing keeps far less per pixel; bf16 autocast keeps about half of float32's
    assert 0 < act["bf16-ckpt"]["per_pixel"] < act["bf16"]["per_pixel"] < act["fp32"]["per_pixel"]
    # autocast's bf16 weight copies (2 bytes per UNet parameter) are kept for backward
    assert act["bf16"]["fixed"] == pytest.approx(2 * r["params"]["unet"], rel=0.1)


def test_scaled_sd15_full_fine_tune_moves_the_unet(bench, tmp_path):
    r = bench.run_model("sd15", lora=False, resolution=64, factor=8, out_dir=str(tmp_path))
    assert r["trainable_params"] == r["params"]["unet"]
    moved, watched = map(int, r["watched_tensors_moved"].split("/"))
    assert watched >= 8 and moved == watched
    assert not r["gradient_checkpointing"]


def test_scaled_sdxl_lora_trains_and_generates(bench, tmp_path):
    r = bench.run_model("sdxl", lora=True, resolution=64, factor=8, out_dir=str(tmp_path))
    assert set(r["params"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert r["trainable_params"] == 16 * sum(r["lora_in_out"].values())
    moved, watched = map(int, r["watched_tensors_moved"].split("/"))
    assert watched > 0 and moved == watched
    assert r["image_shape"] == [1, 3, 64, 64] and r["image_finite"]


PROFILE = {
    "fp32": {"fixed": 0.0, "per_sample": 3e6, "per_pixel": 8e5},
    "bf16": {"fixed": 1.7e9, "per_sample": 1e6, "per_pixel": 4e5},
    "bf16-ckpt": {"fixed": 2e7, "per_sample": 1e4, "per_pixel": 3e4},
}


def test_preset_memory_sd15_paper_by_hand(bench):
    m = bench.preset_memory(load_config("sd15-paper"), PROFILE)
    unet, vae, clip_l, vit_h = 859_520_964, 83_653_863, 123_060_480, 986_109_441
    assert m["unet_weights"] == 4 * unet
    assert m["frozen_weights"] == 4 * (vae + clip_l)
    assert m["gradients"] == 4 * unet and m["optimizer"] == 8 * unet
    assert m["lora_weights"] == 0 and m["reference_copy"] == 0
    assert m["reward_encoder"] == 4 * vit_h
    # 64 samples x 51 latents of 4 x 64 x 64, 64 x 50 log-probs, 64 images of 3 x 512 x 512
    assert m["rollout_store"] == 4 * (64 * 51 * 4 * 64 * 64 + 64 * 50 + 64 * 3 * 512 * 512)
    # one backward: 4 samples (micro_batch) x 2 CFG branches, bf16 autocast, no checkpointing
    assert m["unet_batch"] == 8
    assert m["activations"] == pytest.approx(1.7e9 + 8 * (1e6 + 4e5 * 64 * 64))
    parts = [k for k in m if k not in ("total", "trainable_params", "unet_batch")]
    assert m["total"] == pytest.approx(sum(m[k] for k in parts))


def test_preset_memory_sdxl_lora_by_hand(bench):
    m = bench.preset_memory(load_config("sdxl-lora"), PROFILE)
    n_lora = 16 * (332_800 + 392_960 + 392_960 + 332_800)
    assert m["trainable_params"] == n_lora
    assert m["unet_weights"] == 4 * 2_567_463_684
    assert m["frozen_weights"] == 4 * (83_653_863 + 123_060_480 + 694_659_840)
    assert (m["lora_weights"], m["gradients"], m["optimizer"]) == (
        4 * n_lora,
        4 * n_lora,
        8 * n_lora,
    )
    # gradient checkpointing at 1024 px: latents 128 x 128, UNet batch 4 x 2
    assert m["activations"] == pytest.approx(2e7 + 8 * (1e4 + 3e4 * 128 * 128))


def test_preset_memory_counts_the_kl_reference_copy_only_for_full_fine_tunes(bench):
    full = bench.preset_memory(load_config("sd15-paper", ["grpo.kl_coef=0.1"]), PROFILE)
    lora = bench.preset_memory(load_config("sd15-lora-24gb", ["grpo.kl_coef=0.1"]), PROFILE)
    assert full["reference_copy"] == 4 * 859_520_964
    assert lora["reference_copy"] == 0  # the adapter switched off is the reference


def test_memory_table_has_every_preset(bench):
    table = bench.memory_table({"sd15": PROFILE, "sdxl": PROFILE})
    header = table.splitlines()[0]
    assert all(name in header for name in bench.PRESETS)
    assert "nan" not in table
