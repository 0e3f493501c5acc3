"""Choosing the merge weight on validation prompts: the rule on scripted scores, and the demo's
search on the shipped sandbox model (a perturbed copy standing in for a trained UNet)."""

import json
import logging
import math

import pytest
import torch

from safediff.errors import SafediffError
from safediff.sandbox import demo as demo_module
from safediff.sandbox.merge_select import (
    MergeTrial,
    choose_merge_weight,
    format_trials,
    validation_scores,
)

torch.set_num_threads(1)


def scripted(table: dict[float, tuple[float, float]]):
    """A score function answering from a table, recording the weights asked for."""
    asked: list[float] = []

    def score(w: float) -> tuple[float, float]:
        asked.append(w)
        return table[w]

    return score, asked


def test_the_smallest_weight_reaching_the_target_is_chosen():
    # base: 90% unsafe; a cut of 80% needs <= 18%
    table = {0.5: (0.5, 0.70), 0.6: (0.3, 0.69), 0.7: (0.15, 0.68), 0.8: (0.05, 0.67)}
    score, asked = scripted(table)
    chosen, trials = choose_merge_weight([0.8, 0.5, 0.7, 0.6], score, (0.9, 0.70), 0.8, 0.03)
    assert chosen == 0.7 and asked == [0.5, 0.6, 0.7]  # ascending, stopped at the target
    assert [t.weight for t in trials] == asked
    assert trials[2] == MergeTrial(0.7, 0.15, 0.68, pytest.approx(-0.02))


def test_a_weight_past_the_utility_margin_ends_the_search_before_the_target():
    # 0.7 costs 4 points: it and 0.8 (which would be back inside the margin) are out
    table = {0.5: (0.5, 0.70), 0.6: (0.4, 0.69), 0.7: (0.1, 0.66), 0.8: (0.05, 0.70)}
    score, asked = scripted(table)
    chosen, trials = choose_merge_weight([0.5, 0.6, 0.7, 0.8], score, (0.9, 0.70), 0.8, 0.03)
    assert chosen == 0.6 and asked == [0.5, 0.6, 0.7]
    assert trials[-1].utility_delta == pytest.approx(-0.04)


def test_no_weight_reaching_the_target_gives_the_largest_within_the_margin():
    score, asked = scripted({0.5: (0.6, 0.8), 1.0: (0.3, 0.79)})
    assert choose_merge_weight([0.5, 1.0, 0.5], score, (0.9, 0.8), 0.8, 0.03)[0] == 1.0
    assert asked == [0.5, 1.0]  # duplicates tried once


def test_the_target_is_relative_to_the_base_rate():
    table = {0.5: (0.1, 0.8), 0.6: (0.0, 0.8)}
    # base 40% unsafe: 10% is a 75% cut, short of 80%; 0% reaches it
    assert choose_merge_weight([0.5, 0.6], table.get, (0.4, 0.8), 0.8, 0.03)[0] == 0.6
    assert choose_merge_weight([0.5, 0.6], table.get, (0.4, 0.8), 0.7, 0.03)[0] == 0.5


def test_no_weight_within_the_margin_keeps_the_smallest_with_a_warning(caplog):
    score, asked = scripted({0.3: (0.5, 0.5), 0.6: (0.2, 0.4)})
    with caplog.at_level(logging.WARNING, logger="safediff.sandbox.merge_select"):
        chosen, trials = choose_merge_weight([0.6, 0.3], score, (0.9, 0.7), 0.8, 0.05)
    assert chosen == 0.3 and asked == [0.3] and len(trials) == 1
    assert "keeping the smallest, 0.3" in caplog.text


@pytest.mark.parametrize(
    ("weights", "base", "target", "margin", "match"),
    [
        ([], (0.9, 0.7), 0.8, 0.03, "no merge weights"),
        ([0.5, 0.0], (0.9, 0.7), 0.8, 0.03, "finite and > 0"),
        ([0.5, math.inf], (0.9, 0.7), 0.8, 0.03, "finite and > 0"),
        ([0.5], (0.9, 0.7), 0.8, -0.01, "utility margin"),
        ([0.5], (0.9, 0.7), 1.5, 0.03, "target cut"),
        ([0.5], (0.9, math.nan), 0.8, 0.03, "base model's validation scores"),
        ([0.5], (math.nan, 0.7), 0.8, 0.03, "base model's validation scores"),
    ],
)
def test_bad_inputs_are_refused(weights, base, target, margin, match):
    with pytest.raises(SafediffError, match=match):
        choose_merge_weight(weights, lambda w: (0.0, 0.5), base, target, margin)


def test_non_finite_scores_are_refused():
    with pytest.raises(SafediffError, match="0.5: validation scores are not finite"):
        choose_merge_weight([0.5], lambda w: (math.nan, 0.5), (0.9, 0.5), 0.8, 0.03)


def test_validation_scores_average_the_tasks_not_the_prompts():
    records = [
        {"name": "00000", "kind": "explicit", "unsafe": True, "task": "unsafe", "utility": None},
        {"name": "00001", "kind": "explicit", "unsafe": False, "task": "unsafe", "utility": None},
        {"name": "00002", "kind": "explicit", "unsafe": False, "task": "unsafe", "utility": None},
        {"name": "00003", "kind": "safe", "unsafe": False, "task": "single", "utility": True},
        {"name": "00004", "kind": "safe", "unsafe": False, "task": "counting", "utility": True},
        {"name": "00005", "kind": "safe", "unsafe": False, "task": "counting", "utility": False},
        {"name": "00006", "kind": "safe", "unsafe": False, "task": "counting", "utility": False},
        {"name": "00007", "kind": "safe", "unsafe": False, "task": "counting", "utility": False},
    ]
    unsafe, utility = validation_scores(records)
    assert unsafe == pytest.approx(1 / 3)
    assert utility == pytest.approx((1.0 + 0.25) / 2)  # prompt-weighted would be 2/5
    assert all(math.isnan(v) for v in validation_scores([]))


def test_trials_table_marks_the_chosen_weight():
    trials = [MergeTrial(0.5, 0.3, 0.7, 0.0), MergeTrial(0.6, 0.2, 0.66, -0.04)]
    text = format_trials(trials, 0.5, (0.9, 0.7))
    rows = text.splitlines()
    assert rows[2].split() == ["base", "90.0%", "70.0%"]
    assert rows[3].endswith("<- chosen") and "-4.0" in rows[4] and "chosen" not in rows[4]


def test_candidates_default_to_the_grid_in_the_full_mode_only():
    grid = demo_module.MERGE_CANDIDATES
    assert demo_module.merge_candidates("auto", quick=False, overrides=[]) == grid
    assert demo_module.merge_candidates("auto", quick=True, overrides=[]) == ()
    assert demo_module.merge_candidates("auto", False, ["run.merge_weight=0.6"]) == ()
    assert demo_module.merge_candidates("auto", False, ["run.seed=3"]) == grid
    assert demo_module.merge_candidates(None, False, []) == ()
    assert demo_module.merge_candidates([0.7, 0.9], True, []) == (0.7, 0.9)
    with pytest.raises(SafediffError, match="merge_weights"):
        demo_module.merge_candidates("best", False, [])


class _TrainerStub:
    def __init__(self, unet):
        self.unet = unet

    def plain_trained_unet(self):
        return self.unet


def test_demo_search_on_the_sandbox_writes_the_chosen_merge_and_reuses_its_images(
    tmp_path, monkeypatch, te
):
    from diffusers import UNet2DConditionModel

    from safediff.config import ModelConfig
    from safediff.models.interpolate import interpolate_weights
    from safediff.models.loading import load_t2i_model
    from safediff.sandbox.clip import load_sandbox_clip
    from safediff.sandbox.detector import load_detector
    from safediff.sandbox.reader import load_reader

    monkeypatch.setattr(
        demo_module, "VALIDATION_SIZES", {"n_safe_per_task": 1, "n_unsafe_per_family": 2}
    )
    base = load_t2i_model(ModelConfig(pretrained="sandbox"), device="cpu")
    trained = load_t2i_model(ModelConfig(pretrained="sandbox"), device="cpu").unet
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g) * p.abs().mean())
    run_dir = tmp_path / "train"
    run_dir.mkdir()
    summary = {"trainer": _TrainerStub(trained), "run_dir": str(run_dir), "end_epoch": 3}
    sampling = {"seed": 7, "num_steps": 2, "guidance_scale": 4.0, "eta": 1.0,
                "batch_size": 16, "progress": False}  # fmt: skip
    judges = (load_detector(), load_reader(), load_sandbox_clip(None, text_encoder=te))
    base_state = {k: v.clone() for k, v in base.unet.state_dict().items()}

    unet, record = demo_module.select_merge_weight(
        base, summary, (0.5, 1.0), tmp_path, sampling, judges
    )
    trials = [MergeTrial(**t) for t in record["trials"]]
    assert 1 <= len(trials) <= 2 and record["n_validation_prompts"] == 6 + 2 * 3
    # the record follows the rule on its own numbers
    table = {t.weight: (t.unsafe_rate, t.utility) for t in trials}
    base_scores = (record["base"]["unsafe_rate"], record["base"]["utility"])
    assert all(t.utility_delta == pytest.approx(t.utility - base_scores[1]) for t in trials)
    rule = choose_merge_weight(
        [t.weight for t in trials], lambda w: table[w], base_scores, record["target_cut"],
        record["utility_margin"],
    )[0]  # fmt: skip
    assert record["merge_weight"] == rule
    # the returned and saved model is base + w * (trained - base); the base and trained untouched
    expected = interpolate_weights(base_state, trained.state_dict(), rule)
    for name, value in unet.state_dict().items():
        assert torch.allclose(value, expected[name])
    assert all(torch.equal(v, base_state[k]) for k, v in base.unet.state_dict().items())
    info = json.loads((run_dir / "merged" / "merge.json").read_text())
    assert (
        info["merge_weight"] == rule and info["epoch"] == 3 and len(info["trials"]) == len(trials)
    )
    saved = UNet2DConditionModel.from_pretrained(run_dir / "merged" / "unet")
    assert torch.allclose(saved.state_dict()["conv_in.weight"], expected["conv_in.weight"])
    cached = sorted(p.name for p in (tmp_path / "validation").iterdir())
    assert cached == ["base.safetensors"] + [f"merge-{t.weight:g}.safetensors" for t in trials]

    # a rerun samples nothing: every image comes from validation/
    def no_sampling(*args, **kwargs):
        raise AssertionError("validation images were sampled again")

    monkeypatch.setattr("safediff.sandbox.demo_eval.generate_images", no_sampling)
    _, again = demo_module.select_merge_weight(
        base, summary, (0.5, 1.0), tmp_path, sampling, judges
    )
    assert again["trials"] == record["trials"] and again["merge_weight"] == rule
