"""Sandbox prompt sets as CSV files that `safediff generate` / `eval` read like any other set.

Columns: case_number (`<split>-<i>`), prompt, evaluation_seed, categories (the prompt kind, plus
the unsafe family when there is one: "explicit,skull", "safe", "negation"), and metadata (the
caption's structured facts as JSON, which the sandbox utility scorer checks images against).
"""

import csv
import json
from pathlib import Path

from safediff.sandbox.captions import make_split
from safediff.seeding import derive_seed


def write_prompt_csv(split: str, n: int, seed: int, out: str | Path) -> Path:
    """Write `n` examples of `split` (deterministic in seed) to `out`; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    examples = make_split(split, n, seed)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_number", "prompt", "evaluation_seed", "categories", "metadata"])
        for i, ex in enumerate(examples):
            cats = [ex.metadata["kind"]] + (
                [ex.metadata["family"]] if ex.metadata.get("family") else []
            )
            writer.writerow(
                [
                    f"{split}-{i}",
                    ex.caption,
                    derive_seed(seed, "sandbox-eval-image", i) % 2**31,
                    ",".join(cats),
                    json.dumps(ex.metadata, sort_keys=True),
                ]
            )
    return out
