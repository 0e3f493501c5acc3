"""Checkpoints load with plain diffusers / peft, writes are atomic, and old ones are pruned."""

import pytest
import torch

from safediff.config import load_config
from safediff.rl import checkpoint as ckpt
from safediff.rl.trainer import train

pytestmark = pytest.mark.slow


def test_full_checkpoint_loads_with_plain_diffusers(tiny_overrides, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = load_config(
        None, [*tiny_overrides, "run.epochs=3", "run.save_every=1", "run.keep_last=2"]
    )
    summary = train(cfg)
    run = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00002", "checkpoint-00003"]
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    loaded = UNet2DConditionModel.from_pretrained(ckpt.checkpoint_dir(run, 3) / "unet")
    trained = summary["trainer"].bare_unet().state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_lora_checkpoint_loads_with_peft(tiny_overrides, tmp_path):
    from peft import PeftModel

    from safediff.models.loading import load_t2i_model

    cfg = load_config(None, [*tiny_overrides, "lora.enabled=true", "lora.rank=2", "run.epochs=1"])
    summary = train(cfg)
    folder = ckpt.checkpoint_dir(tmp_path / "run", 1) / "lora"
    assert (folder / "adapter_model.safetensors").is_file() and (
        folder / "adapter_config.json"
    ).is_file()
    base = load_t2i_model(cfg.model).unet
    peft_unet = PeftModel.from_pretrained(base, folder)
    trained = summary["trainer"].bare_unet()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            peft_unet(x, t, encoder_hidden_states=c).sample,
            trained(x, t, encoder_hidden_states=c).sample,
        )
        with peft_unet.disable_adapter():
            plain = peft_unet(x, t, encoder_hidden_states=c).sample
    assert not torch.allclose(plain, trained(x, t, encoder_hidden_states=c).sample)


def test_crash_during_save_leaves_no_half_written_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    cfg = load_config(None, [*tiny_overrides, "run.epochs=2", "run.save_every=1"])

    calls = {"n": 0}
    real = ckpt.optimizer_to_tensors

    def failing(state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(state)

    monkeypatch.setattr(ckpt, "optimizer_to_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        train(cfg)
    run = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00001"]
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers, "the interrupted write should be in a temporary folder"
    monkeypatch.setattr(ckpt, "optimizer_to_tensors", real)
    summary = train(cfg, resume="auto")
    assert summary["start_epoch"] == 1
    assert [p.name for p in ckpt.list_checkpoints(run)][-1] == "checkpoint-00002"
