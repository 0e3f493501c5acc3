"""Checkpoints load with plain diffusers / peft, writes are atomic, old ones are pruned, damaged
ones are recognised, and temporaries of killed processes are cleared."""

import json
import os

import pytest
import torch
from torch import nn

from safediff.atomic import atomic_dir, atomic_path, remove_orphans
from safediff.config import load_config
from safediff.errors import SafediffError
from safediff.rl import checkpoint as ckpt
from safediff.rl.trainer import train


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# Damage: what `checkpoint_problem` recognises (a small module stands in for the UNet)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def save_pretrained(self, folder, safe_serialization=True):
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        save_file(self.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"in": 4, "out": 3}))


def _saved(tmp_path, epoch=1):
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, epoch, model, opt, is_lora=False, keep_last=5)
    return path, model, opt


def test_an_intact_checkpoint_passes_and_records_its_file_sizes(tmp_path):
    path, model, _ = _saved(tmp_path)
    assert ckpt.checkpoint_problem(path, is_lora=False) is None
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["files"] == {
        "optimizer.safetensors": (path / "optimizer.safetensors").stat().st_size,
        "unet/config.json": (path / "unet" / "config.json").stat().st_size,
        "unet/diffusion_pytorch_model.safetensors": (
            path / "unet" / "diffusion_pytorch_model.safetensors"
        )
        .stat()
        .st_size,
    }
    fresh = _Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert ckpt.load_checkpoint(path, fresh, fresh_opt, is_lora=False) == 1
    assert torch.equal(fresh.lin.weight, model.lin.weight)
    assert ckpt.checkpoint_problem(path, is_lora=True) == (
        "it holds no lora/adapter_model.safetensors; was it a full fine-tune run?"
    )


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("truncate unet/diffusion_pytorch_model.safetensors", "bytes, "),
        ("truncate optimizer.safetensors", "bytes, "),
        ("delete unet/config.json", "unet/config.json is missing"),
        ("delete trainer_state.json", "no trainer_state.json"),
        ("garble trainer_state.json", "trainer_state.json is not valid JSON"),
        ("garble unet/config.json", "unet/config.json"),
        ("zero optimizer.safetensors", "optimizer.safetensors"),
    ],
)
def test_a_damaged_checkpoint_is_recognised_and_refused(tmp_path, damage, problem):
    path, _, _ = _saved(tmp_path)
    action, name = damage.split(" ")
    f = path / name
    if action == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif action == "delete":
        f.unlink()
    elif action == "garble":
        f.write_text("{" + f.read_text()[:10])
    else:  # same size, zeros: the header no longer parses
        f.write_bytes(b"\0" * f.stat().st_size)
    assert problem in ckpt.checkpoint_problem(path, is_lora=False)
    model = _Tiny()
    with pytest.raises(SafediffError, match=r"trainer_state.json|cannot resume from"):
        ckpt.load_checkpoint(path, model, torch.optim.AdamW(model.parameters()), is_lora=False)


def test_latest_intact_checkpoint_skips_damaged_ones_with_a_warning(tmp_path, caplog):
    for epoch in (1, 2, 3):
        _saved(tmp_path, epoch)
    (ckpt.checkpoint_dir(tmp_path, 3) / "optimizer.safetensors").write_bytes(b"")
    (ckpt.checkpoint_dir(tmp_path, 2) / "trainer_state.json").unlink()
    assert ckpt.latest_intact_checkpoint(tmp_path, is_lora=False) == ckpt.checkpoint_dir(
        tmp_path, 1
    )
    assert "checkpoint-00003: optimizer.safetensors has 0 bytes" in caplog.text
    assert "checkpoint-00002: no trainer_state.json" in caplog.text
    (ckpt.checkpoint_dir(tmp_path, 1) / "optimizer.safetensors").unlink()
    with pytest.raises(SafediffError, match=r"no intact checkpoint .*checkpoint-00003: .*00001"):
        ckpt.latest_intact_checkpoint(tmp_path, is_lora=False)
    assert ckpt.latest_intact_checkpoint(tmp_path / "none", is_lora=False) is None


def test_a_checkpoint_from_before_sizes_were_recorded_is_still_checked(tmp_path):
    path, _, _ = _saved(tmp_path)
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["files"]
    state_file.write_text(json.dumps(state))
    assert ckpt.checkpoint_problem(path, is_lora=False) is None
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert "is damaged" in ckpt.checkpoint_problem(path, is_lora=False)


# ---------------------------------------------------------------------------------------------
# Temporaries of killed processes

DEAD = 2**22 + 4321  # above Linux's largest pid_max: no live process has it


def test_remove_orphans_clears_dead_processes_temporaries_only(tmp_path, caplog):
    dead_dir = tmp_path / f".checkpoint-00002.tmp-{DEAD}"
    (dead_dir / "unet").mkdir(parents=True)
    dead_file = tmp_path / f".00001_0.png.tmp-{DEAD}"
    dead_file.write_bytes(b"half")
    live = tmp_path / f".x.png.tmp-{os.getppid()}"
    mine = tmp_path / f".y.png.tmp-{os.getpid()}"
    keep = [live, mine, tmp_path / ".hidden", tmp_path / f"x.tmp-{DEAD}", tmp_path / "a.png"]
    for f in keep:
        f.write_text("keep")
    with caplog.at_level("INFO"):
        removed = remove_orphans(tmp_path)
    assert sorted(removed) == sorted([dead_dir, dead_file])
    assert not dead_dir.exists() and not dead_file.exists()
    assert all(f.exists() for f in keep)
    assert f"process {DEAD} is gone" in caplog.text
    assert remove_orphans(tmp_path / "missing") == []


def test_atomic_writes_sweep_their_folder_and_use_the_same_names(tmp_path):
    orphan = tmp_path / f".checkpoint-00001.tmp-{DEAD}"
    orphan.mkdir()
    with atomic_dir(tmp_path / "checkpoint-00002") as tmp:
        assert tmp.name == f".checkpoint-00002.tmp-{os.getpid()}"
    assert not orphan.exists()
    with atomic_path(tmp_path / "a.png") as tmp:
        assert tmp.name == f".a.png.tmp-{os.getpid()}"
        tmp.write_bytes(b"png")
