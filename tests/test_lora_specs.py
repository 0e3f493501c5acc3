"""LoRA checkpoints as models: `ModelConfig.lora_weights` merges a peft adapter into the UNet, and
model specs resolve trainer LoRA checkpoints, run folders and bare adapter folders to it."""

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from safediff.config import ModelConfig, load_config
from safediff.errors import SafediffError
from safediff.eval.generate import main as generate_main
from safediff.eval.model_spec import parse_model_spec
from safediff.models.loading import load_t2i_model, save_unet_safetensors
from safediff.rl.checkpoint import checkpoint_dir
from safediff.rl.trainer import train
from safediff.seeding import generator

LORA = ["lora.enabled=true", "lora.rank=2"]
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_grpo_overrides):
    """(run folder, the trainer's peft-wrapped UNet) of a 1-epoch LoRA run on tiny-sd."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    summary = train(load_config(None, [*tiny_grpo_overrides, *LORA, f"run.output_dir={run_dir}"]))
    return run_dir, summary["trainer"].bare_unet().eval()


def unet_inputs(seed: int = 0, channels: int = 4, size: int = 8, tokens: int = 77, dim: int = 32):
    g = generator(seed)
    x = torch.randn(2, channels, size, size, generator=g)
    c = torch.randn(2, tokens, dim, generator=g)
    return x, torch.tensor([10, 500]), c


def unet_out(unet, inputs) -> torch.Tensor:
    x, t, c = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def base_unet():
    return load_t2i_model(ModelConfig(pretrained="tiny-sd")).unet


def perturbed_copy(adapter: Path, dest: Path, seed: int = 1, scale: float = 0.05) -> Path:
    """A copy of an adapter folder with every tensor moved by seeded noise: after one tiny
    training step B is ~1e-3, too close to zero for a strong test."""
    shutil.copytree(adapter, dest)
    weights = load_file(str(dest / "adapter_model.safetensors"))
    g = generator(seed)
    moved = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sorted(weights.items())}
    save_file(moved, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dest


# ---------------------------------------------------------------------------------------------
# Loading = merging


def test_lora_checkpoint_loads_as_the_trained_unet(lora_run, monkeypatch):
    run_dir, trained = lora_run
    ckpt = checkpoint_dir(run_dir, 1)
    cfg = parse_model_spec(str(ckpt))
    assert cfg == ModelConfig(pretrained="tiny-sd", lora_weights=str(ckpt / "lora"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"peft asked the hub for {args}")

    for module, name in [
        ("peft.config", "hf_hub_download"),
        ("peft.utils.save_and_load", "hf_hub_download"),
        ("peft.utils.save_and_load", "file_exists"),
    ]:
        monkeypatch.setattr(sys.modules[module], name, no_network)
    model = load_t2i_model(cfg)
    assert type(model.unet) is UNet2DConditionModel  # merged: no peft wrapper, no lora layers
    assert not [n for n, _ in model.unet.named_parameters() if "lora" in n]
    assert model.source == f"tiny-sd + LoRA {ckpt / 'lora'}"
    assert all(p.requires_grad for p in model.unet.parameters())  # as a plain loaded UNet
    inputs = unet_inputs()
    merged = unet_out(model.unet, inputs)
    torch.testing.assert_close(merged, unet_out(trained, inputs), rtol=1e-5, atol=1e-5)
    assert (merged - unet_out(base_unet(), inputs)).abs().max() > 1e-3  # the adapter is active


def test_merged_weights_are_base_plus_scaled_lora_product(lora_run, tmp_path):
    run_dir, _ = lora_run
    adapter = perturbed_copy(checkpoint_dir(run_dir, 1) / "lora", tmp_path / "adapter")
    cfg = ModelConfig(pretrained="tiny-sd", lora_weights=str(adapter))
    merged = load_t2i_model(cfg).unet
    # independent of peft: W' = W + (alpha / r) B A
    meta = json.loads((adapter / "adapter_config.json").read_text())
    scaling = meta["lora_alpha"] / meta["r"]
    w = load_file(str(adapter / "adapter_model.safetensors"))
    a, b = (w[f"base_model.model.{TO_Q}.lora_{x}.weight"] for x in "AB")
    base = base_unet()
    expected = base.get_submodule(TO_Q).weight + scaling * b @ a
    torch.testing.assert_close(merged.get_submodule(TO_Q).weight, expected)
    # and the whole UNet equals peft's (unmerged) loading of the same files
    inputs = unet_inputs(seed=3)
    out = unet_out(merged, inputs)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(base_unet(), str(adapter)).eval()
    torch.testing.assert_close(out, unet_out(reference, inputs), rtol=1e-5, atol=1e-5)
    assert (out - unet_out(base, inputs)).abs().max() > 1e-2


def test_lora_on_top_of_unet_weights(lora_run, tmp_path):
    """A LoRA run started from a bare UNet: the adapter goes on that UNet, not on the base."""
    run_dir, _ = lora_run
    start = base_unet()
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.01)
    unet_file = save_unet_safetensors(start, tmp_path / "start.safetensors")
    adapter = perturbed_copy(checkpoint_dir(run_dir, 1) / "lora", tmp_path / "adapter")
    cfg = ModelConfig(pretrained="tiny-sd", unet_weights=str(unet_file), lora_weights=str(adapter))
    model = load_t2i_model(cfg)
    assert model.source == f"tiny-sd + {unet_file} + LoRA {adapter}"
    w = load_file(str(adapter / "adapter_model.safetensors"))
    a, b = (w[f"base_model.model.{TO_Q}.lora_{x}.weight"] for x in "AB")
    expected = start.get_submodule(TO_Q).weight + 4.0 * b @ a  # alpha 8 / rank 2
    torch.testing.assert_close(model.unet.get_submodule(TO_Q).weight, expected)


# ---------------------------------------------------------------------------------------------
# Specs


def test_run_folder_and_its_parts_resolve_to_the_newest_lora(lora_run, tmp_path, caplog):
    run_dir, _ = lora_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    newest = run / "checkpoints" / "checkpoint-00002"
    shutil.copytree(run / "checkpoints" / "checkpoint-00001", newest)
    expected = ModelConfig(pretrained="tiny-sd", lora_weights=str(newest / "lora"))
    assert parse_model_spec(str(run)) == expected
    assert parse_model_spec(str(newest)) == expected
    assert parse_model_spec(str(newest / "lora")) == expected  # the checkpoint's lora/ folder
    assert parse_model_spec(str(newest / "lora" / "adapter_model.safetensors")) == expected
    with caplog.at_level(logging.WARNING):
        other = parse_model_spec(str(run), base="tiny-sd-v")
    assert other == ModelConfig(pretrained="tiny-sd-v", lora_weights=str(newest / "lora"))
    assert "was trained on 'tiny-sd'" in caplog.text

    # a run started from a bare UNet keeps it under the adapter
    config = run / "config.yaml"
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("unet_weights: null", "unet_weights: /w/start.safetensors"))
    assert parse_model_spec(str(run)) == ModelConfig(
        pretrained="tiny-sd", unet_weights="/w/start.safetensors", lora_weights=str(newest / "lora")
    )
    config.write_text(text.replace("lora_weights: null", "lora_weights: /w/other-lora"))
    with pytest.raises(SafediffError, match=r"checkpoint-00002 was trained on a base that already"):
        parse_model_spec(str(run))
    config.unlink()
    with pytest.raises(SafediffError, match=r"checkpoint-00002: no run config\.yaml .*--base"):
        parse_model_spec(str(run))
    assert parse_model_spec(str(run), base="tiny-sd") == expected

    shutil.rmtree(newest / "lora")
    with pytest.raises(SafediffError, match=r"checkpoint-00002 has neither unet/.* nor lora/"):
        parse_model_spec(str(newest), base="tiny-sd")


def test_bare_adapter_folder_needs_base(lora_run, tmp_path):
    run_dir, trained = lora_run
    adapter = tmp_path / "my_adapter"
    shutil.copytree(checkpoint_dir(run_dir, 1) / "lora", adapter)
    with pytest.raises(
        SafediffError, match=rf"{re.escape(str(adapter))}: a LoRA adapter holds only .*--base"
    ):
        parse_model_spec(str(adapter))
    cfg = parse_model_spec(str(adapter), base="tiny-sd")
    assert cfg == ModelConfig(pretrained="tiny-sd", lora_weights=str(adapter))
    inputs = unet_inputs(seed=5)
    out = unet_out(load_t2i_model(cfg).unet, inputs)
    torch.testing.assert_close(out, unet_out(trained, inputs), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors


def load_error(adapter: Path | str) -> str:
    with pytest.raises(SafediffError) as info:
        load_t2i_model(ModelConfig(pretrained="tiny-sd", lora_weights=str(adapter)))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_adapter_of_another_unet_is_an_error(tmp_path):
    base = base_unet()
    config = dict(base.config)
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    wider = UNet2DConditionModel.from_config(config)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    get_peft_model(wider, lora).save_pretrained(tmp_path / "wider")
    message = load_error(tmp_path / "wider")
    assert re.search(r"wider does not fit this UNet: size mismatch for .*lora_A", message), message


def test_edited_adapters_are_errors(lora_run, tmp_path):
    source = checkpoint_dir(lora_run[0], 1) / "lora"

    renamed = tmp_path / "renamed"
    shutil.copytree(source, renamed)
    weights = load_file(str(renamed / "adapter_model.safetensors"))
    key = f"base_model.model.{TO_Q}.lora_A.weight"
    weights[key.replace("attn1", "attn9")] = weights.pop(key)
    save_file(weights, str(renamed / "adapter_model.safetensors"))
    message = load_error(renamed)
    assert "renamed does not fit this UNet: 1 missing key(s) [" in message
    assert "1 unexpected key(s) [base_model.model.down_blocks.0.attentions.0." in message

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(source, elsewhere)
    meta = json.loads((elsewhere / "adapter_config.json").read_text())
    meta["target_modules"] = ["not_a_layer"]
    (elsewhere / "adapter_config.json").write_text(json.dumps(meta))
    assert re.search(r"elsewhere does not fit this UNet: .*not_a_layer", load_error(elsewhere))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(source / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    message = load_error(pickled)
    assert re.search(r"pickled holds only a pickled adapter_model\.bin.*convert it to", message)

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(source / "adapter_model.safetensors", no_config)
    assert "no_config has no adapter_config.json" in load_error(no_config)
    assert f"LoRA adapter folder not found: {tmp_path / 'gone'}" in load_error(tmp_path / "gone")
    (tmp_path / "empty").mkdir()
    assert "empty has no adapter_model.safetensors" in load_error(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# The command line and the sandbox


def test_generate_cli_with_a_lora_run(lora_run, tmp_path, capsys):
    run_dir, _ = lora_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("lora"))
    perturbed_copy(checkpoint_dir(run_dir, 1) / "lora", checkpoint_dir(run, 1) / "lora")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue circle\n", encoding="utf-8")
    common = ["--prompts", str(prompts), "--steps", "2", "--device", "cpu", "--no-progress"]
    assert generate_main(["--model", str(run), "--out", str(tmp_path / "lora"), *common]) == 0
    assert generate_main(["--model", "tiny-sd", "--out", str(tmp_path / "base"), *common]) == 0
    assert "2 generated" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "lora" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "base" / "images").iterdir())
    assert len(names) == 2
    for name in names:  # same seeds and prompts: only the adapter differs
        lora_png = (tmp_path / "lora" / "images" / name).read_bytes()
        assert lora_png != (tmp_path / "base" / "images" / name).read_bytes()
    info = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert info["model"] == f"tiny-sd + LoRA {checkpoint_dir(run, 1) / 'lora'}"


def test_sandbox_model_with_a_lora_adapter(tmp_path):
    from safediff.sandbox.manifest import save_weights
    from safediff.sandbox.unet import (
        SANDBOX_SCHEDULER_CONFIG,
        TINY_SANDBOX_UNET_CONFIG,
        build_unet,
        model_metadata,
    )

    meta = model_metadata(TINY_SANDBOX_UNET_CONFIG, SANDBOX_SCHEDULER_CONFIG)
    file = save_weights(
        tmp_path / "diffusion.safetensors", build_unet(TINY_SANDBOX_UNET_CONFIG).state_dict(), meta
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # init_lora_weights=False: A and B both random, so B != 0
        reference = get_peft_model(build_unet(TINY_SANDBOX_UNET_CONFIG), lora).eval()
    reference.save_pretrained(tmp_path / "adapter")
    cfg = ModelConfig(pretrained=f"sandbox:{file}", lora_weights=str(tmp_path / "adapter"))
    model = load_t2i_model(cfg)
    assert type(model.unet) is UNet2DConditionModel
    assert model.source == f"sandbox:{file} + LoRA {tmp_path / 'adapter'}"
    inputs = unet_inputs(channels=3, size=32, tokens=20, dim=384)
    out = unet_out(model.unet, inputs)
    torch.testing.assert_close(out, unet_out(reference, inputs), rtol=1e-5, atol=1e-5)
    with reference.disable_adapter():
        assert (out - unet_out(reference, inputs)).abs().max() > 1e-3
