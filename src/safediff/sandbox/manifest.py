"""The sandbox's shipped weights: self-describing safetensors files and a manifest of hashes.

Every sandbox weight file is a safetensors file whose metadata holds, under "safediff", the JSON
of its configuration ({"kind", "config", ...}), so a file alone rebuilds its model. The folder's
`manifest.json` lists each file with its sha256, size, configuration, measured accuracies, the
command that trained it and the date:

    {"format": 1, "updated": "...", "files": {"detector.safetensors": {"sha256": "...",
     "bytes": 123, "kind": "detector", "config": {...}, "metrics": {...}, "command": "...",
     "trained": "2025-...", "note": "..."}}}

Nothing here touches the network: `weight_file` checks a file against the manifest's hash
before it is used, and `verify` checks the whole folder (`safediff sandbox verify`).
"""

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safediff.atomic import atomic_path, write_text_atomic
from safediff.errors import SafediffError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the shipped weights live (package data)."""
MANIFEST = "manifest.json"
METADATA_KEY = "safediff"
FORMAT = 1


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `state` (float32, contiguous, on the CPU) with `meta` as metadata; atomic replace."""
    path = Path(path)
    tensors = {
        k: v.detach().to("cpu").contiguous() if not v.is_floating_point()
        else v.detach().to("cpu", torch.float32).contiguous()
        for k, v in state.items()
    }  # fmt: skip
    with atomic_path(path, mode=0o644) as tmp:  # package data: readable by everyone
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The "safediff" metadata of a sandbox safetensors file (SafediffError when absent)."""
    path = Path(path)
    if not path.is_file():
        raise SafediffError(f"no weight file at {path}; build it with `safediff sandbox build`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise SafediffError(f"{path} lacks safediff metadata; it is not a sandbox weight file")
    return json.loads(meta[METADATA_KEY])


def load_weights(
    path: str | Path, kind: str, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict on `device`, metadata) of a sandbox weight file that must be of `kind`."""
    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise SafediffError(f"{path} holds a {meta.get('kind')!r} model, expected a {kind!r} one")
    return load_file(str(path), device=str(device)), meta


def read_manifest(folder: str | Path | None = None) -> dict[str, Any]:
    """The manifest of `folder` (default: the shipped weights); an empty one if absent."""
    path = Path(folder or WEIGHTS_DIR) / MANIFEST
    if not path.is_file():
        return {"format": FORMAT, "files": {}}
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise SafediffError(f"{path} has manifest format {data.get('format')}, expected {FORMAT}")
    return data


def record_file(
    folder: str | Path,
    filename: str,
    *,
    config: dict[str, Any],
    metrics: dict[str, Any],
    command: str,
    note: str = "",
) -> dict[str, Any]:
    """Add or replace `filename`'s entry in `folder`'s manifest (hash and size measured now).

    The kind is read from the file's own metadata. Returns the entry.
    """
    folder = Path(folder)
    path = folder / filename
    manifest = read_manifest(folder)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    entry = {
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "kind": read_metadata(path)["kind"],
        "config": config,
        "metrics": metrics,
        "command": command,
        "trained": now,
    }
    if note:
        entry["note"] = note
    manifest["files"][filename] = entry
    manifest["updated"] = now
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return entry


def verify(folder: str | Path | None = None) -> list[str]:
    """Problems with `folder`'s weights (missing files, size or sha256 mismatches); [] if none."""
    folder = Path(folder or WEIGHTS_DIR)
    manifest = read_manifest(folder)
    if not manifest["files"]:
        return [f"{folder / MANIFEST} lists no weight files"]
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def weight_file(name: str, folder: str | Path | None = None) -> Path:
    """Path of weight file `name` ("detector" or "detector.safetensors") after checking its hash
    against the manifest of `folder` (default: the shipped weights)."""
    folder = Path(folder or WEIGHTS_DIR)
    filename = name if name.endswith(".safetensors") else f"{name}.safetensors"
    entry = read_manifest(folder)["files"].get(filename)
    path = folder / filename
    if entry is None:
        raise SafediffError(
            f"{filename} is not in {folder / MANIFEST}; build it with "
            f"`safediff sandbox build --only {filename.removesuffix('.safetensors')}`"
        )
    if not path.is_file():
        raise SafediffError(f"{path} is missing; rebuild it with `safediff sandbox build`")
    if sha256_file(path) != entry["sha256"]:
        raise SafediffError(
            f"{path} does not match its manifest hash; rebuild with `safediff sandbox build`"
        )
    return path


def manifest_entry(name: str, folder: str | Path | None = None) -> dict[str, Any]:
    """The manifest entry of weight file `name` (SafediffError if it is not listed)."""
    filename = name if name.endswith(".safetensors") else f"{name}.safetensors"
    entry = read_manifest(folder)["files"].get(filename)
    if entry is None:
        raise SafediffError(f"{filename} is not in the manifest of {folder or WEIGHTS_DIR}")
    return entry
