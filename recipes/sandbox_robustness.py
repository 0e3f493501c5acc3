"""The robustness table on the sandbox: every attack against every defense row, ASR with intervals.

    python recipes/sandbox_robustness.py --out runs/robustness [--run grpo=DEMO/train]
        [--run grpo-adv=ADV/round-1/train] [--smoke] [--rows NAME,NAME] [--attacks NAME,NAME]
        [--per-family N] [--recipe FILE] [--threads N] [--device cpu]

`--grpo-run DIR` is `--run grpo=DIR`. Rows whose model names a run (`grpo`, `grpo-adv`, ...)
are left out unless that run is given.

Rows (defended models) and columns (attacks) are data: recipes/sandbox_robustness.yaml. Every cell
is one `safediff attack` run (`safediff.attacks.run.run_attack`) of its attack against its row, on
the same targets (the sandbox's explicit prompts of every family, the held-out drug family
included, each family's words banned from the adversarial prompt), judged by the sandbox detector
with the same seeds: ASR with its Wilson interval. Attacks marked `transfer` (text-encoder-only
searches) run once (or once per text encoder) and are replayed on the other rows. With
`utility` set, each row's GenEval-style utility comes from `safediff sandbox defenses`'
evaluation (`evaluate_defenses`, same rows). Everything is resumable: rerunning skips finished
targets and reuses prepared defenses and generated images.

Writes OUT/robustness.md and OUT/robustness.json, OUT/cells/<row>/<attack>/ (the attack runs),
OUT/defenses/ (the prepared DES encoder, negation sets) and OUT/utility/.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from safediff.errors import SafediffError

RECIPE = Path(__file__).with_suffix(".yaml")
MODES = ("full", "smoke")
TRANSFER = (False, "once", "per-encoder")


def load_recipe(path: str | Path = RECIPE) -> dict[str, Any]:
    """The recipe file: {"rows": {...}, "attacks": {...}, "full": {...}, "smoke": {...}}."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    missing = [k for k in ("rows", "attacks", *MODES) if k not in data]
    if missing:
        raise SafediffError(f"{path}: missing top-level key(s) {missing}")
    for name, row in data["rows"].items():
        unknown = sorted(set(row or {}) - {"model", "defense"})
        model = (row or {}).get("model")
        if unknown or not (model is None or (isinstance(model, str) and model.strip())):
            raise SafediffError(
                f"{path}: row {name!r} must hold model (null or a run name such as grpo) and "
                "defense only"
            )
    for name, attack in data["attacks"].items():
        unknown = sorted(set(attack or {}) - {"transfer", "options", "smoke"})
        if unknown or (attack or {}).get("transfer", False) not in TRANSFER:
            raise SafediffError(
                f"{path}: attack {name!r} must hold transfer ({', '.join(map(str, TRANSFER))}), "
                "options and smoke only"
            )
    return data


def mode_plan(recipe: dict[str, Any], mode: str, rows: list[str] | None, attacks: list[str] | None):
    """(rows, attacks, settings) of a run: the mode's rows/attacks unless given."""
    settings = dict(recipe[mode])
    mode_rows, mode_attacks = settings.pop("rows", None), settings.pop("attacks", None)
    row_names = rows or mode_rows or list(recipe["rows"])
    attack_names = attacks or mode_attacks or list(recipe["attacks"])
    for what, names, known in (("row", row_names, recipe["rows"]),
                               ("attack", attack_names, recipe["attacks"])):  # fmt: skip
        bad = [n for n in names if n not in known]
        if bad:
            raise SafediffError(f"unknown {what}(s) {bad}; the recipe has {list(known)}")
    return row_names, attack_names, settings


def attack_options(recipe: dict[str, Any], name: str, mode: str) -> dict[str, str]:
    """The attack's option strings in this mode (full options, then the smoke overrides)."""
    entry = recipe["attacks"][name] or {}
    options = dict(entry.get("options") or {})
    if mode == "smoke":
        options.update(entry.get("smoke") or {})
    return {k: str(v) for k, v in options.items()}


def encoder_group(defense: str) -> str:
    """Which text encoder a row's prompts go through: "des" when its stack has DES, else "base"
    (a GRPO run trains the UNet only)."""
    kinds = [item.split(":", 1)[0].strip().lower() for item in defense.split(",") if item.strip()]
    return "des" if "des" in kinds else "base"


def select_targets(spec: str, per_family: int | None):
    """The target set with at most `per_family` targets of each concept (in set order)."""
    from dataclasses import replace

    from safediff.attacks.targets import load_targets

    target_set = load_targets(spec)
    if per_family is None:
        return target_set
    kept, count = [], {}
    for t in target_set.targets:
        if count.get(t.concept, 0) < per_family:
            kept.append(t)
            count[t.concept] = count.get(t.concept, 0) + 1
    return replace(target_set, targets=tuple(kept))


def parse_runs(items: list[str] | None, grpo_run: str | None) -> dict[str, str]:
    """{run name: model spec} of `--run NAME=DIR` flags and `--grpo-run DIR` (= `--run grpo=DIR`)."""
    runs: dict[str, str] = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise SafediffError(f"--run takes NAME=DIR (e.g. grpo=runs/demo/train); got {item!r}")
        runs[name.strip()] = spec.strip()
    if grpo_run is not None:
        if runs.get("grpo", grpo_run) != grpo_run:
            raise SafediffError("--grpo-run and --run grpo=... name different runs; give one")
        runs["grpo"] = grpo_run
    return runs


def slug(name: str) -> str:
    from safediff.sandbox.defense_eval import slug as row_slug

    return row_slug(name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every cell, then the utility of every row; returns robustness.json's content."""
    from safediff.attacks.base import Victim
    from safediff.attacks.cli import build_judge
    from safediff.attacks.registry import build_attack
    from safediff.attacks.run import run_attack
    from safediff.defenses.stack import apply_defenses
    from safediff.models.loading import load_t2i_model
    from safediff.sampling.sample import SamplerSettings
    from safediff.sandbox.defense_eval import (
        demo_sampling,
        evaluate_defenses,
        resolve_model,
        sandbox_defense_stack,
    )
    from safediff.sandbox.protocol import eval_sizes

    recipe = load_recipe(args.recipe)
    mode = "smoke" if args.smoke else "full"
    rows, attacks, settings = mode_plan(recipe, mode, args.rows, args.attacks)
    runs = parse_runs(args.run, args.grpo_run)
    rows = [r for r in rows if recipe["rows"][r].get("model") in (None, *runs)]

    def model_of(row: str) -> str | None:
        """The row's model spec: None (the base model) or the run its model names."""
        name = recipe["rows"][row].get("model")
        return None if name is None else runs[name]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_family = args.per_family if args.per_family else settings.get("per_family")
    target_set = select_targets(settings["targets"], per_family)
    protocol = target_set.protocol.with_overrides(None, settings.get("images_per_target"))
    judge = build_judge(protocol.judge, protocol.threshold, args.device)
    sampling = demo_sampling()
    sampler = SamplerSettings(
        int(sampling["num_steps"]), float(sampling["eta"]), float(sampling["guidance_scale"]), ""
    )
    progress = not args.no_progress
    base_cfg = resolve_model(None)
    specs = {
        r: sandbox_defense_stack(recipe["rows"][r].get("defense") or "", out,
                                 device=args.device, progress=progress)
        for r in rows
    }  # fmt: skip
    cells: dict[str, dict[str, Any]] = {r: {} for r in rows}
    sources: dict[tuple[str, str], Path] = {}  # (attack, encoder group) -> the searched run
    for row in rows:
        model_spec = model_of(row)
        base = load_t2i_model(resolve_model(model_spec), device=args.device)
        model, defense = apply_defenses(base, specs[row], device=args.device)
        victim = Victim(model, defense, sampler, base=base, spec=specs[row] or "none")
        for name in attacks:
            folder = out / "cells" / slug(row) / name
            options = attack_options(recipe, name, mode)
            transfer = (recipe["attacks"][name] or {}).get("transfer") or False
            group = (name, "all" if transfer == "once" else encoder_group(specs[row]))
            if transfer and group in sources:
                attack = build_attack("replay", {"source": str(sources[group])})
            else:
                attack = build_attack(name, options)
                if transfer:
                    sources[group] = folder
            t0 = time.perf_counter()
            try:
                summary = run_attack(
                    victim, attack, target_set.targets, judge, folder, protocol,
                    run_key={"row": row, "model": model_spec, "recipe_attack": name},
                    progress=progress,
                )  # fmt: skip
            except SafediffError as err:
                # A pairing the library refuses (e.g. an embedding attack against a defense that
                # filters prompt tokens) is a cell that does not apply, not a failed table.
                cells[row][name] = {"asr": None, "not_applicable": str(err)}
                print(f"{row} x {name}: does not apply: {err}", file=sys.stderr)
                continue
            cells[row][name] = {
                "asr": summary["asr"],
                "searched_on": None if attack.name != "replay" else str(sources[group]),
                "queries": summary["queries"],
                "attack_seconds": summary["attack_seconds"],
                "seconds": time.perf_counter() - t0,
            }
            print(f"{row} x {name}: ASR {summary['asr']['value']:.3f}", file=sys.stderr)
    utility = {}
    if settings.get("utility"):
        evaluated = evaluate_defenses(
            out / "utility",
            {r: (model_of(r), specs[r]) for r in rows},
            sizes=eval_sizes(settings["utility"] == "quick"),
            base=base_cfg.pretrained, device=args.device, progress=progress,
        )  # fmt: skip
        utility = {r: evaluated["rows"][r]["metrics"].get("utility/overall") for r in rows}
    data = {
        "mode": mode,
        "protocol": protocol.name,
        "targets": [t.target_id for t in target_set.targets],
        "sampler": sampler.to_dict(),
        "rows": {
            r: {"defense": specs[r], "model": recipe["rows"][r].get("model"), "run": model_of(r)}
            for r in rows
        },
        "attacks": attacks,
        "cells": cells,
        "utility": utility,
    }
    (out / "robustness.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "robustness.md").write_text(format_table(data, out), encoding="utf-8")
    return data


def _cell(est: dict[str, Any] | None) -> str:
    if not est or est.get("value") is None:
        return "-"
    head = f"{100 * est['value']:.0f}%"
    if est.get("lo") is None:
        return head
    return f"{head} [{100 * est['lo']:.0f}, {100 * est['hi']:.0f}]"


def format_table(data: dict[str, Any], out: Path) -> str:
    """robustness.md: rows x attacks (ASR [95% Wilson]) and each row's utility."""
    attacks = data["attacks"]
    header = ["row", *attacks, "utility"]
    lines = [
        f"## Robustness on the sandbox ({data['mode']}: {len(data['targets'])} targets, "
        f"protocol `{data['protocol']}`)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row, cells in data["cells"].items():
        util = _cell(data["utility"].get(row)) if data["utility"] else "-"
        shown = ["n/a" if "not_applicable" in cells[a] else _cell(cells[a]["asr"]) for a in attacks]
        lines.append("| " + " | ".join([row, *shown, util]) + " |")
    skipped = [
        f"- {row} x {a}: {cells[a]['not_applicable']}"
        for row, cells in data["cells"].items()
        for a in attacks
        if "not_applicable" in cells[a]
    ]
    if skipped:
        lines += ["", "n/a: the pairing does not apply:", *skipped]
    lines += [
        "",
        "Attacks marked transfer in the recipe searched once per text encoder and were replayed "
        "on the rows sharing it; every cell used the same targets, seeds and judge.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grpo-run", help="a `safediff train` run folder for the GRPO rows")
    p.add_argument(
        "--run",
        action="append",
        metavar="NAME=DIR",
        help="a run folder for the rows whose model is NAME (repeatable; grpo=DIR is --grpo-run)",
    )
    p.add_argument("--smoke", action="store_true", help="the CI smoke run (a few targets)")
    p.add_argument("--rows", help="comma-separated row names (default: the mode's)")
    p.add_argument("--attacks", help="comma-separated attack names (default: the mode's)")
    p.add_argument("--per-family", type=int, help="targets per family (default: the mode's)")
    p.add_argument("--recipe", default=str(RECIPE), help="the recipe file (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.rows = args.rows.split(",") if args.rows else None
    args.attacks = args.attacks.split(",") if args.attacks else None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = run(args)
    except SafediffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(data, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
