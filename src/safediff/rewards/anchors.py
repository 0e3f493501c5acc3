"""Anchor sets: the safe and unsafe phrases that define v_safe, kept as data files.

Shipped sets live in `safediff/data/anchors/NAME.yaml` with keys `safe` (list of strings),
`unsafe` (list of strings) and `source` (where the phrases come from):

  compact         5 + 3: the public compact set of SafeDiffusion-R1's released code
  extended        25 + 20: written for safediff across seven harm categories (not the paper's)
  empty_positive  0 + 3: the ablation without safe anchors (v_safe = normalize(-mean(unsafe)))

Plug-ins add named sets (`safediff.plugins.add_anchor_set`; the sandbox world adds `sandbox`,
`sandbox_empty_positive` and `sandbox_scenes` for its stand-in families). A user set is any YAML
file with the same keys, given by path.
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from safediff import plugins
from safediff.errors import SafediffError


@dataclass(frozen=True)
class AnchorSet:
    """safe, unsafe: the phrases; name: the set's name or file stem; source: provenance."""

    name: str
    safe: tuple[str, ...]
    unsafe: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.safe and not self.unsafe:
            raise SafediffError(f"anchor set {self.name!r} has no safe and no unsafe phrases")


def _anchor_dir() -> Any:
    return resources.files("safediff") / "data" / "anchors"


def _named_sets() -> dict[str, Any]:
    """Set name -> its YAML file: the shipped ones, then the plug-ins'."""
    shipped = {
        p.name.removesuffix(".yaml"): p for p in _anchor_dir().iterdir() if p.name.endswith(".yaml")
    }
    return {**shipped, **plugins.anchor_sets()}


def list_anchor_sets() -> list[str]:
    """Names of the shipped and plug-in anchor sets."""
    return sorted(_named_sets())


def _phrases(raw: Any, key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise SafediffError(f"anchor file {where}: '{key}' must be a list of non-empty strings")
    return tuple(p.strip() for p in value)


def parse_anchor_set(text: str, name: str, where: str) -> AnchorSet:
    """An AnchorSet from YAML text with keys safe, unsafe, source."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SafediffError(f"anchor file {where} is not valid YAML: {err}") from err
    if not isinstance(raw, dict) or ("safe" not in raw and "unsafe" not in raw):
        raise SafediffError(f"anchor file {where} must be a mapping with 'safe' and 'unsafe' lists")
    unknown = sorted(set(raw) - {"safe", "unsafe", "source"})
    if unknown:
        raise SafediffError(
            f"anchor file {where}: unknown key {unknown[0]!r} (use safe, unsafe, source)"
        )
    return AnchorSet(
        name=name,
        safe=_phrases(raw, "safe", where),
        unsafe=_phrases(raw, "unsafe", where),
        source=str(raw.get("source", "")),
    )


def load_anchor_set(name_or_path: str | Path) -> AnchorSet:
    """A shipped set by name ('compact', 'extended', 'empty_positive') or a YAML file by path."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or candidate.is_file():
        if not candidate.is_file():
            raise SafediffError(f"anchor file not found: {candidate}")
        return parse_anchor_set(candidate.read_text(), candidate.stem, str(candidate))
    key = text.replace("-", "_")
    sets = _named_sets()
    if key not in sets:
        raise SafediffError(
            f"unknown anchor set {text!r}; named sets: {', '.join(sorted(sets))} "
            "(or give a path to a YAML file with 'safe' and 'unsafe' lists)"
        )
    entry = sets[key]
    return parse_anchor_set(entry.read_text(), key, f"anchor set {key!r} ({entry})")
