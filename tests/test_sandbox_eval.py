"""The sandbox's evaluation protocol: exported prompt sets, utility and detector scorers on a run."""

import json

import numpy as np
import pytest
from PIL import Image

from safediff.eval.score import score_run
from safediff.prompt_sets import load_prompt_set
from safediff.sandbox.captions import make_split
from safediff.sandbox.detector_scorer import SandboxDetectorScorer
from safediff.sandbox.prompt_export import write_prompt_csv
from safediff.sandbox.render import render
from safediff.sandbox.utility_scorer import SandboxUtilityScorer


def make_run(tmp_path, name, n, shift=0):
    """A run folder whose images are the true renders of the exported prompts (rolled by shift)."""
    csv_path = write_prompt_csv("eval", n, seed=3, out=tmp_path / "eval.csv")
    rows = load_prompt_set(csv_path).rows
    scenes = [ex.scene for ex in make_split("eval", n, seed=3)]
    run = tmp_path / name
    (run / "images").mkdir(parents=True)
    lines = []
    for i, row in enumerate(rows):
        img = render(scenes[(i + shift) % n])
        Image.fromarray(img).save(run / "images" / f"{row.case_number}_0.png")
        record = {
            "name": f"{row.case_number}_0",
            "file": f"images/{row.case_number}_0.png",
            "prompt": row.prompt,
            "categories": list(row.categories),
            "extra": dict(row.extra),
        }
        lines.append(json.dumps(record))
    (run / "generation.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_true_renders_score_full_utility_and_are_flagged_by_family(tmp_path):
    run = make_run(tmp_path, "true", 80)
    summary = score_run(run, [SandboxUtilityScorer(), SandboxDetectorScorer()], batch_size=32)
    util = summary["scores"]["sandbox-utility/geneval6"]
    assert util["metrics"]["overall"]["value"] >= 0.95
    assert util["n"] > 20  # unsafe prompts carry no utility task and are not counted
    det = summary["scores"]["sandbox-detector/families4@0.5"]
    # every explicit prompt's render shows its family; per-kind rates come from the categories
    assert det["categories"]["explicit"]["value"] == 1.0
    assert det["categories"]["safe"]["value"] == 0.0


def test_mismatched_images_lose_utility(tmp_path):
    good = score_run(make_run(tmp_path, "good", 80), [SandboxUtilityScorer()])
    bad = score_run(make_run(tmp_path / "b", "bad", 80, shift=1), [SandboxUtilityScorer()])
    g = good["scores"]["sandbox-utility/geneval6"]["metrics"]["overall"]["value"]
    b = bad["scores"]["sandbox-utility/geneval6"]["metrics"]["overall"]["value"]
    assert b < g - 0.4
    assert np.isfinite(b)


@pytest.mark.slow
def test_generate_and_score_on_the_shipped_sandbox_model(tmp_path, capsys):
    """`safediff generate --model sandbox` on an exported prompt set, then the sandbox scorers:
    the whole protocol on the shipped base model, and the same seeds give the same images."""
    from safediff.cli import main

    csv_path = write_prompt_csv("eval", 6, seed=3, out=tmp_path / "eval.csv")
    argv = ["generate", "--model", "sandbox", "--prompts", str(csv_path), "--steps", "4",
            "--guidance", "4", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    a = sorted((tmp_path / "a" / "images").iterdir())
    b = sorted((tmp_path / "b" / "images").iterdir())
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 6
    for pa, pb in zip(a, b, strict=True):
        ia, ib = np.asarray(Image.open(pa)), np.asarray(Image.open(pb))
        assert ia.shape == (32, 32, 3)
        assert np.abs(ia.astype(int) - ib.astype(int)).max() <= 1
    summary = score_run(tmp_path / "a", [SandboxUtilityScorer(), SandboxDetectorScorer()])
    assert {"sandbox-utility/geneval6", "sandbox-detector/families4@0.5"} <= set(summary["scores"])
