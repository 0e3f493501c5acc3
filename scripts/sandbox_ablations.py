"""Ablations of the steering reward on the sandbox, each a real GRPO run of the demo.

    python scripts/sandbox_ablations.py --out runs/ablations [--quick] [--only NAME,NAME]

Every variant is the `sandbox-demo` preset with one change (below), trained and evaluated on the
same prompts and seeds; the base model's evaluation images are sampled once and shared. Writes
OUT/<variant>/ (the demo's outputs) and OUT/ablations.md / .json (one row per variant: unsafe rate
on explicit prompts of the trained families and of the held-out family, on implicit and synonym
prompts, utility overall, alignment, each with its 95% interval). Rerunning skips finished
variants.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from safediff.config import read_yaml
from safediff.sandbox.demo import PRESET, parse_merge_weights, run_sandbox_demo


def _reward(**params) -> dict:
    return {"reward": {"params": params}}


def _replace_reward(name: str, **params) -> dict:
    return {
        "reward": {
            "name": name,
            "params": {"encoder": "sandbox:default", **params},
            "replace": True,
        }
    }


VARIANTS: dict[str, dict] = {
    "preset": {},
    "alpha=0": _reward(alpha=0.0),
    "alpha=0.3": _reward(alpha=0.3),
    "alpha=0.5": _reward(alpha=0.5),
    "alpha=0.7": _reward(alpha=0.7),
    "alpha=1.0": _reward(alpha=1.0),
    "projection": _reward(mode="projection"),
    "gating=all": _reward(gating="all"),
    "gating=threshold": _reward(gating="threshold"),
    "gating=soft": _reward(gating="soft", temperature=0.05),
    "anchors=sandbox_empty_positive": _reward(anchors="sandbox_empty_positive"),
    "anchors=compact": _reward(anchors="compact"),
    "anchors=sandbox": _reward(anchors="sandbox", threshold=0.0),
    "alignment (control)": _replace_reward("alignment"),
    "negative-only": _replace_reward("unsafe_penalty", anchors="sandbox_scenes"),
}

KEYS = [
    ("unsafe_rate/explicit/trained", "explicit, trained families"),
    ("unsafe_rate/explicit/drug", "explicit, held-out family"),
    ("unsafe_rate/implicit", "implicit"),
    ("unsafe_rate/synonym", "synonym"),
    ("flagged_rate/safe", "flagged benign"),
    ("utility/overall", "utility overall"),
    ("alignment", "alignment"),
]


def variant_config(change: dict) -> dict:
    data = read_yaml(PRESET)
    reward = change.get("reward")
    if reward and reward.get("replace"):
        data["reward"] = {"name": reward["name"], "params": reward["params"]}
        # A reward without a gate steers no prompt: the preset's KL on unsteered prompts is then a
        # KL on every prompt, which the trainer spells 'all' (it refuses 'unsteered' without a gate)
        data["grpo"]["kl_scope"] = "all"
    elif reward:
        data["reward"]["params"] = {**data["reward"]["params"], **reward["params"]}
    return data


def _fmt(key: str, est: dict) -> str:
    pct = not key.startswith("alignment")
    scale, digits = (100, 1) if pct else (1, 3)
    v, lo, hi = (None if est[k] is None else est[k] * scale for k in ("value", "lo", "hi"))
    if v is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the demo's quick sizes")
    p.add_argument("--only", help="comma-separated variant names")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--merge-weights",
        default="auto",
        help="as the demo's: 'auto' (each variant's merge weight chosen on validation prompts, "
        "as `safediff demo` does), 'none' (the preset's run.merge_weight) or W,W,...",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    rows = {}
    for name in names:
        folder = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")
        done = folder / "summary.json"
        if not done.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            preset = folder / "preset.yaml"
            preset.write_text(yaml.safe_dump(variant_config(VARIANTS[name]), sort_keys=False))
            run_sandbox_demo(
                folder, quick=args.quick, overrides=args.overrides, preset=str(preset),
                base_images_cache=out / "base_images.safetensors",
                merge_weights=parse_merge_weights(args.merge_weights),
            )  # fmt: skip
        summary = json.loads(done.read_text())
        rows[name] = summary
    base = next(iter(rows.values()))["before"]
    lines = [
        "| variant | " + " | ".join(label for _, label in KEYS) + " |",
        "|---|" + "---|" * len(KEYS),
        "| base model | " + " | ".join(_fmt(k, base[k]) for k, _ in KEYS) + " |",
    ]
    for name, summary in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(_fmt(k, summary["after"][k]) for k, _ in KEYS) + " |"
        )
    table = "\n".join(lines)
    (out / "ablations.md").write_text(table + "\n")
    (out / "ablations.json").write_text(
        json.dumps({n: s["after"] for n, s in rows.items()}, indent=1)
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
