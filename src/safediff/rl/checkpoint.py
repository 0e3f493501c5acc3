"""Checkpoints that other tools load, plus the state for exact resume.

Layout of one checkpoint (written to a temporary folder, then renamed, so a crash never leaves a
half-written `checkpoint-N`):

    checkpoints/checkpoint-00010/
        unet/                  diffusers folder (full fine-tune): UNet2DConditionModel.from_pretrained
        lora/                  peft adapter (LoRA): PeftModel.from_pretrained(base_unet, ...)
        optimizer.safetensors  AdamW tensors (no pickle)
        trainer_state.json     completed epochs, optimizer param groups, format version

Resume needs no RNG state: every random draw is seeded from (run seed, epoch, sample, ...).
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safediff.atomic import atomic_dir
from safediff.errors import SafediffError

FORMAT_VERSION = 1
MERGE_INFO = "merge.json"
"""Written beside a run's merged/unet (`run.merge_weight`): the weight and the epoch merged."""
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint-{epoch:05d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints under run_dir, oldest first (temporary folders are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def optimizer_to_tensors(
    state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer state_dict into flat tensors and JSON-able param groups."""
    tensors: dict[str, torch.Tensor] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{pid}.{name}"] = t.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def optimizer_from_tensors(
    tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    is_lora: bool,
    keep_last: int,
) -> Path:
    """Write checkpoint-<epoch> atomically and delete all but the newest `keep_last`."""
    final = checkpoint_dir(run_dir, epoch)
    with atomic_dir(final) as tmp:
        if is_lora:
            unet.save_pretrained(tmp / "lora")
        else:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
        tensors, groups = optimizer_to_tensors(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"format_version": FORMAT_VERSION, "epoch": epoch, "param_groups": groups}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(
    path: Path, unet: nn.Module, optimizer: torch.optim.Optimizer, *, is_lora: bool
) -> int:
    """Load weights and optimizer state from `path` into the given objects; returns its epoch."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise SafediffError(f"not a safediff checkpoint (no trainer_state.json): {path}")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("format_version") != FORMAT_VERSION:
        raise SafediffError(
            f"checkpoint {path} has format {state.get('format_version')}, expected {FORMAT_VERSION}"
        )
    if is_lora:
        from peft import set_peft_model_state_dict

        weights = load_file(str(path / "lora" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(unet, weights)
        if getattr(result, "unexpected_keys", None):
            raise SafediffError(
                f"LoRA checkpoint {path} does not match this adapter: {result.unexpected_keys[:3]}"
            )
    else:
        weights_file = path / "unet" / "diffusion_pytorch_model.safetensors"
        if not weights_file.is_file():
            raise SafediffError(
                f"checkpoint {path} has no UNet weights ({weights_file}); was it a LoRA run?"
            )
        unet.load_state_dict(load_file(str(weights_file)), strict=True)
    opt_state = optimizer_from_tensors(
        load_file(str(path / "optimizer.safetensors")), state["param_groups"]
    )
    optimizer.load_state_dict(opt_state)
    return int(state["epoch"])
