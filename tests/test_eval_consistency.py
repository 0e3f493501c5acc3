"""`safediff eval --model sandbox` and the sandbox demo's scoring give the same numbers for the
same images: one definition of the unsafe rate and of utility (`safediff.sandbox.verdicts`)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from safediff.cli import main
from safediff.sandbox.captions import make_split
from safediff.sandbox.prompt_export import write_prompt_csv

N_PROMPTS = 36
SPLIT_SEED = 5


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """A `safediff eval` run of the shipped sandbox model on an exported eval split."""
    tmp = tmp_path_factory.mktemp("consistency")
    csv_path = write_prompt_csv("eval", N_PROMPTS, seed=SPLIT_SEED, out=tmp / "eval.csv")
    out = tmp / "run"
    argv = ["eval", "--model", "sandbox", "--prompts", str(csv_path), "--out", str(out),
            "--sandbox-detector", "--sandbox-utility", "--device", "cpu", "--no-progress",
            "--batch-size", "36"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_eval_samples_the_sandbox_with_its_own_sampler(eval_run):
    from safediff.sandbox.protocol import SAMPLER

    run = json.loads((eval_run / "run.json").read_text())
    assert run["num_steps"] == SAMPLER["num_steps"] and run["eta"] == SAMPLER["eta"]
    assert run["default_guidance"] == SAMPLER["guidance_scale"]


def test_eval_and_demo_scoring_agree_on_the_same_images(eval_run):
    from safediff.sandbox.clip import load_sandbox_clip
    from safediff.sandbox.demo_eval import score_images, summarize
    from safediff.sandbox.detector import load_detector
    from safediff.sandbox.reader import load_reader

    records = [json.loads(line) for line in (eval_run / "generation.jsonl").read_text().splitlines()]
    images = torch.stack([
        torch.from_numpy(np.asarray(Image.open(eval_run / r["file"]).convert("RGB")).copy())
        .permute(2, 0, 1).float() / 255.0
        for r in records
    ])  # fmt: skip
    examples = make_split("eval", N_PROMPTS, seed=SPLIT_SEED)
    assert [e.caption for e in examples] == [r["prompt"] for r in records]
    clip = load_sandbox_clip(None)
    scored = score_images(images, examples, load_detector(), load_reader(), clip)
    demo = summarize(scored, examples, clip, seed=0, frechet_resamples=2, n_resamples=200)
    summary = json.loads((eval_run / "summary.json").read_text())

    detector = summary["scores"]["sandbox-detector/families4@0.5"]
    demo_unsafe = [int(r["unsafe"]) for r in scored.records]
    assert detector["metrics"]["unsafe_rate"]["value"] == pytest.approx(np.mean(demo_unsafe))
    explicit = [int(r["unsafe"]) for r in scored.records if r["kind"] == "explicit"]
    assert explicit, "the split holds explicit prompts"
    assert detector["categories"]["explicit"]["value"] == pytest.approx(np.mean(explicit))
    for kind in ("safe", "negation"):
        key = f"flagged_rate/{kind}"
        if kind in detector["categories"]:
            assert detector["categories"][kind]["value"] == pytest.approx(demo[key].value)

    utility = summary["scores"]["sandbox-utility/geneval6"]
    assert utility["metrics"]["overall"]["value"] == pytest.approx(demo["utility/overall"].value)
    for key, est in demo.items():
        task = key.removeprefix("utility/")
        if key.startswith("utility/") and task != "overall" and not np.isnan(est.value):
            assert utility["metrics"][f"accuracy/{task}"]["value"] == pytest.approx(est.value)


def test_the_sandbox_sampler_has_one_value():
    """The demo trains with the preset's sampler and evaluates with the protocol's: one value."""
    from safediff.config import load_config
    from safediff.sandbox.defense_eval import demo_sampling
    from safediff.sandbox.protocol import PRESET, SAMPLER

    s = load_config(PRESET).sampling
    preset = {"num_steps": s.num_steps, "eta": s.eta, "guidance_scale": s.guidance_scale}
    assert preset == SAMPLER == demo_sampling()
    assert s.negative_prompt == ""
