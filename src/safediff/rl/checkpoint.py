"""Checkpoints that other tools load, plus the state for exact resume.

Layout of one checkpoint (written to a temporary folder, then renamed, so a crash never leaves a
half-written `checkpoint-N`):

    checkpoints/checkpoint-00010/
        unet/                  diffusers folder (full fine-tune): UNet2DConditionModel.from_pretrained
        lora/                  peft adapter (LoRA): PeftModel.from_pretrained(base_unet, ...)
        optimizer.safetensors  AdamW tensors (no pickle)
        trainer_state.json     completed epochs, optimizer param groups, format version, and the
                               size of every other file (written last: `checkpoint_problem`
                               checks a checkpoint against it before a resume)

Resume needs no RNG state: every random draw is seeded from (run seed, epoch, sample, ...).
"""

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from safediff.atomic import atomic_dir
from safediff.errors import SafediffError

FORMAT_VERSION = 1
MERGE_INFO = "merge.json"
"""Written beside a run's merged/unet (`run.merge_weight`): the weight and the epoch merged."""
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"

logger = logging.getLogger(__name__)


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
    optimizer: torch.optim.Optimizer | dict[str, Any],
    *,
    is_lora: bool,
    keep_last: int,
) -> Path:
    """Write checkpoint-<epoch> atomically and delete all but the newest `keep_last`.

    optimizer: the optimizer, or its state_dict (an FSDP run's full state, gathered first)."""
    final = checkpoint_dir(run_dir, epoch)
    with atomic_dir(final) as tmp:
        if is_lora:
            unet.save_pretrained(tmp / "lora")
        else:
            unet.save_pretrained(tmp / "unet", safe_serialization=True, **_one_file(unet))
        state_dict = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        tensors, groups = optimizer_to_tensors(state_dict)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        files = {
            f.relative_to(tmp).as_posix(): f.stat().st_size
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        state = {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "param_groups": groups,
            "files": files,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def _one_file(unet: nn.Module) -> dict[str, Any]:
    """save_pretrained's arguments that keep a diffusers model's weights in one file at any size:
    resume and `checkpoint_problem` read unet/diffusion_pytorch_model.safetensors, and FLUX's
    11.9 B float32 weights (48 GB) are past diffusers' 10 GB default shard size."""
    from diffusers import ModelMixin

    return {"max_shard_size": "1TB"} if isinstance(unet, ModelMixin) else {}


def _weights_file(is_lora: bool) -> str:
    return (
        "lora/adapter_model.safetensors" if is_lora else "unet/diffusion_pytorch_model.safetensors"
    )


def checkpoint_problem(path: Path, *, is_lora: bool) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is intact.

    Checks, without reading the weights: trainer_state.json parses and has this format; every
    file it lists is there with its recorded size (checkpoints written before sizes were
    recorded: the weights and optimizer files are there); every .json parses; every .safetensors
    header parses and covers the whole file (a truncated file fails here)."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE}"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{STATE_FILE} is not valid JSON ({err})"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    if state.get("format_version") != FORMAT_VERSION:
        return f"it has format {state.get('format_version')!r}, expected {FORMAT_VERSION}"
    if not isinstance(state.get("epoch"), int) or "param_groups" not in state:
        return f"{STATE_FILE} lacks the epoch or the optimizer's param groups"
    weights = _weights_file(is_lora)
    files = state.get("files") or {weights: None, "optimizer.safetensors": None}
    if weights not in files:
        return f"it holds no {weights}; was it a {'full fine-tune' if is_lora else 'LoRA'} run?"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for f in sorted(path.rglob("*")):
        problem = _file_problem(f)
        if problem:
            return f"{f.relative_to(path).as_posix()} {problem}"
    return None


def _file_problem(f: Path) -> str | None:
    """Why a .json or .safetensors file does not parse, or None (other files are not read)."""
    try:
        if f.suffix == ".json":
            json.loads(f.read_text(encoding="utf-8"))
        elif f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"does not parse ({err})"
    except SafetensorError as err:
        return f"is damaged ({err})"
    return None


def latest_intact_checkpoint(run_dir: Path, *, is_lora: bool) -> Path | None:
    """The newest checkpoint under run_dir that `checkpoint_problem` passes (None: there are no
    checkpoints). Damaged newer ones are skipped with a warning saying why; if every checkpoint
    is damaged, an error lists them."""
    found = list_checkpoints(run_dir)
    skipped = []
    for path in reversed(found):
        problem = checkpoint_problem(path, is_lora=is_lora)
        if problem is None:
            return path
        logger.warning("skipping damaged checkpoint %s: %s", path, problem)
        skipped.append(f"{path.name}: {problem}")
    if skipped:
        raise SafediffError(
            f"no intact checkpoint in {run_dir / 'checkpoints'} ({'; '.join(skipped)}); restore "
            "one, or move the folder away to start afresh"
        )
    return None


def read_checkpoint(
    path: Path, *, is_lora: bool
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(epoch, weights, optimizer state_dict) of the checkpoint at `path`, on the CPU: the UNet's
    full state dict or the LoRA adapter's tensors. A checkpoint that `checkpoint_problem` finds
    damaged is refused with its reason."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise SafediffError(f"not a safediff checkpoint (no {STATE_FILE}): {path}")
    problem = checkpoint_problem(path, is_lora=is_lora)
    if problem is not None:
        raise SafediffError(f"cannot resume from {path}: {problem}")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("format_version") != FORMAT_VERSION:
        raise SafediffError(
            f"checkpoint {path} has format {state.get('format_version')}, expected {FORMAT_VERSION}"
        )
    if is_lora:
        weights = load_file(str(path / "lora" / "adapter_model.safetensors"))
    else:
        weights_file = path / "unet" / "diffusion_pytorch_model.safetensors"
        if not weights_file.is_file():
            raise SafediffError(
                f"checkpoint {path} has no UNet weights ({weights_file}); was it a LoRA run?"
            )
        weights = load_file(str(weights_file))
    opt_state = optimizer_from_tensors(
        load_file(str(path / "optimizer.safetensors")), state["param_groups"]
    )
    return int(state["epoch"]), weights, opt_state


def load_checkpoint(
    path: Path, unet: nn.Module, optimizer: torch.optim.Optimizer, *, is_lora: bool
) -> int:
    """Load weights and optimizer state from `path` into the given objects; returns its epoch.
    A checkpoint that `checkpoint_problem` finds damaged is refused with its reason."""
    epoch, weights, opt_state = read_checkpoint(path, is_lora=is_lora)
    if is_lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(unet, weights)
        if getattr(result, "unexpected_keys", None):
            raise SafediffError(
                f"LoRA checkpoint {path} does not match this adapter: {result.unexpected_keys[:3]}"
            )
    else:
        unet.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(opt_state)
    return epoch
