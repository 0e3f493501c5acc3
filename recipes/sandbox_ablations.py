"""Ablations of the steering reward on the sandbox, each a real GRPO run of the demo.

    python recipes/sandbox_ablations.py --out runs/ablations [--quick] [--only NAME,NAME]
        [--recipe FILE] [--threads N] [--merge-weights auto|none|W,W,...] [overrides ...]

The variants are data: recipes/sandbox_ablations.yaml (or --recipe) names each one and the change
it makes to the `sandbox-demo` preset. Every variant is trained and evaluated on the same prompts
and seeds; the base model's evaluation images are sampled once and shared. Writes OUT/<variant>/
(the demo's outputs, its resolved preset as preset.yaml) and OUT/ablations.md / .json (one row per
variant: unsafe rate on explicit prompts of the trained families and of the held-out family, on
implicit and synonym prompts, the benign flagged rate, utility overall and alignment, each with
its 95% interval). Extra dotted overrides apply to every variant. Rerunning skips finished
variants (a folder with a summary.json).
"""

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from safediff.config import parse_override, read_yaml
from safediff.errors import SafediffError
from safediff.sandbox.demo import parse_merge_weights, run_sandbox_demo

RECIPE = Path(__file__).with_suffix(".yaml")


def load_recipe(path: str | Path = RECIPE) -> dict[str, Any]:
    """The recipe file: {"preset": name or path, "variants": {name: change}, "columns": {...}}."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    missing = [k for k in ("preset", "variants", "columns") if k not in data]
    if missing:
        raise SafediffError(f"{path}: missing top-level key(s) {missing}")
    for name, change in data["variants"].items():
        unknown = sorted(set(change or {}) - {"overrides", "reward"})
        if unknown:
            raise SafediffError(
                f"{path}: variant {name!r} has unknown key(s) {unknown}; use 'overrides' "
                "(a list of section.key=value) and 'reward' (a whole reward section)"
            )
    return data


def variant_config(preset: str, change: dict[str, Any] | None) -> dict[str, Any]:
    """The preset's YAML data with one variant's change applied (a reward section replaced whole,
    then each dotted override set), as the dict written to the variant's preset.yaml."""
    data = copy.deepcopy(read_yaml(preset))
    change = change or {}
    if "reward" in change:
        data["reward"] = copy.deepcopy(change["reward"])
    for text in change.get("overrides", []):
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def _folder_name(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")


def _fmt(key: str, est: dict) -> str:
    pct = not key.startswith("alignment")
    scale, digits = (100, 1) if pct else (1, 3)
    v, lo, hi = (None if est[k] is None else est[k] * scale for k in ("value", "lo", "hi"))
    if v is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table(rows: dict[str, dict], columns: dict[str, str]) -> str:
    """Markdown table: the base model (the first run's "before"), then each variant's "after"."""
    base = next(iter(rows.values()))["before"]
    lines = [
        "| variant | " + " | ".join(columns.values()) + " |",
        "|---|" + "---|" * len(columns),
        "| base model | " + " | ".join(_fmt(k, base[k]) for k in columns) + " |",
    ]
    for name, summary in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(_fmt(k, summary["after"][k]) for k in columns) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the demo's quick sizes")
    p.add_argument("--only", help="comma-separated variant names")
    p.add_argument("--recipe", default=str(RECIPE), help="the variants file (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--merge-weights",
        default="auto",
        help="as the demo's: 'auto' (each variant's merge weight chosen on validation prompts, "
        "as `safediff demo` does), 'none' (the preset's run.merge_weight) or W,W,...",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    variants = recipe["variants"]
    names = args.only.split(",") if args.only else list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {list(variants)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in names:
        folder = out / _folder_name(name)
        done = folder / "summary.json"
        if not done.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            preset = folder / "preset.yaml"
            data = variant_config(recipe["preset"], variants[name])
            preset.write_text(yaml.safe_dump(data, sort_keys=False))
            run_sandbox_demo(
                folder, quick=args.quick, overrides=args.overrides, preset=str(preset),
                base_images_cache=out / "base_images.safetensors",
                merge_weights=parse_merge_weights(args.merge_weights),
            )  # fmt: skip
        rows[name] = json.loads(done.read_text())
    text = table(rows, recipe["columns"])
    (out / "ablations.md").write_text(text + "\n")
    (out / "ablations.json").write_text(
        json.dumps({n: s["after"] for n, s in rows.items()}, indent=1)
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
