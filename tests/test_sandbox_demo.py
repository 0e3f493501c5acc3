"""The quick sandbox demo on the shipped weights: a real GRPO run, evaluated end to end.

It checks that the base model draws the unsafe concepts it is asked for (so the unsafe rate means
something), that GRPO with the steering reward lowers the trained families' explicit unsafe rate
on the demo's fixed prompts and seeds (the paired 95% interval of the change lies below zero;
with one thread, as in the suite, a quick run of the preset gave 87.5% -> 54.2%, -33.3 pp
[-47.9, -18.8], as on two threads; docs/results/sandbox-demo.md), that the table covers
every family (the held-out one included) and task, that the finished run's merge weight can be
chosen on validation prompts afterwards (the full mode's default; a few prompts here), and that
the demo writes only under its output folder. Utility is not asserted here: a quick run's 48
benign prompts cannot resolve the 3-point band (docs/results/sandbox-demo.md).
"""

import json

import pytest

from safediff.errors import SafediffError
from safediff.sampling.precision import resolve_unet_dtype
from safediff.sandbox import demo as demo_module
from safediff.sandbox.demo import run_sandbox_demo
from safediff.sandbox.scene import FAMILIES


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_writes_only_under_its_folder(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_sandbox_demo(out, quick=True, progress=False)

    before, after = result["before"], result["after"]
    assert before["unsafe_rate/explicit/trained"].value >= 0.5, "the base model must draw them"
    for family in FAMILIES:
        assert f"unsafe_rate/explicit/{family}" in after
        assert family in result["table"]
    trained = result["deltas"]["unsafe_rate/explicit/trained"]
    assert (
        after["unsafe_rate/explicit/trained"].value < before["unsafe_rate/explicit/trained"].value
    )
    assert trained.hi < 0, f"GRPO did not lower the unsafe rate: {trained}"
    assert 0.0 <= after["utility/overall"].value <= 1.0
    assert (
        result["deltas"]["unsafe_rate/explicit/trained"].n
        == before["unsafe_rate/explicit/trained"].n
    )

    assert list(elsewhere.iterdir()) == []
    assert (out / "report.html").is_file() and (out / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "quick" and len(summary["history"]) == 4
    assert summary["eval_unet_dtype"] == "float32" and summary["search_unet_dtype"] is None
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html

    # a rerun on the same folder reuses the base model's images and the finished training run
    again = run_sandbox_demo(out, quick=True, progress=False)
    assert (
        again["after"]["unsafe_rate/explicit/trained"].value
        == after["unsafe_rate/explicit/trained"].value
    )
    assert summary["merge_weight"] == 1.0 and summary["merge_selection"] is None
    assert not (out / "train" / "merged").exists()  # the quick mode does not merge

    # the finished run again, its merge weight chosen on (a few) validation prompts
    monkeypatch.setattr(
        demo_module, "VALIDATION_SIZES", {"n_safe_per_task": 2, "n_unsafe_per_family": 2}
    )
    chosen = run_sandbox_demo(out, quick=True, progress=False, merge_weights=[0.5, 1.0])
    selection = chosen["merge_selection"]
    assert chosen["merge_weight"] == selection["merge_weight"] in (0.5, 1.0)
    assert 1 <= len(selection["trials"]) <= 2 and selection["n_validation_prompts"] == 12 + 6
    info = json.loads((out / "train" / "merged" / "merge.json").read_text())
    assert info["merge_weight"] == selection["merge_weight"] and info["epoch"] == 4
    assert "chosen on validation prompts" in (out / "report.html").read_text()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["merge_selection"]["trials"] == selection["trials"]
    # the search sampled in bf16 where the CPU computes it natively (safediff.sampling.precision)
    assert saved["search_unet_dtype"] == resolve_unet_dtype("auto", "cpu")
    assert info["validation_unet_dtype"] == saved["search_unet_dtype"]
    assert list(elsewhere.iterdir()) == []


def test_cached_images_reused_only_for_the_same_key(tmp_path):
    import torch

    from safediff.sandbox.image_cache import cached_images

    path = tmp_path / "base_images.safetensors"
    calls = []

    def make(value):
        def run():
            calls.append(value)
            return torch.full((2, 3, 4, 4), value)

        return run

    first = cached_images(path, {"unet": "a", "steps": 10}, make(0.25))
    again = cached_images(path, {"steps": 10, "unet": "a"}, make(0.75))  # same key, other order
    assert torch.equal(first, again) and calls == [0.25]
    other = cached_images(path, {"unet": "b", "steps": 10}, make(0.75))  # new weights: resampled
    assert calls == [0.25, 0.75] and torch.equal(other, torch.full((2, 3, 4, 4), 0.75))


@pytest.mark.slow
def test_demo_defends_the_post_trained_model_with_a_stack(tmp_path, monkeypatch):
    """`--defense`: the base images stay undefended, the post-trained model is sampled with the
    stack (here the sandbox's negative prompt and SLD, which need no preparation)."""
    from safediff.sandbox import demo

    monkeypatch.setitem(
        demo.EVAL_SIZES,
        "quick",
        {"n_safe_per_task": 1, "n_unsafe_per_family": 1, "n_other_per_kind": 1},
    )
    tiny = [
        "sampling.num_steps=4", "sampling.rollout_batch_size=8", "grpo.samples_per_process=8",
        "grpo.micro_batch=8", "grpo.grad_accum=1", "run.epochs=1", "run.save_every=1",
    ]  # fmt: skip
    out = tmp_path / "demo"
    plain = run_sandbox_demo(out, quick=True, overrides=tiny, progress=False)
    defended = run_sandbox_demo(
        out, quick=True, overrides=tiny, progress=False, defenses="negprompt,sld"
    )
    assert plain["defenses"] == "" and "negprompt:text=" in defended["defenses"]
    assert "sld:max" in defended["defenses"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defenses"] == defended["defenses"]
    assert "GRPO + defenses negprompt,sld" in (out / "report.html").read_text()
    # same base images (cached, undefended); other post-trained images under the stack
    assert plain["before"]["alignment"].value == defended["before"]["alignment"].value
    assert plain["after"]["alignment"].value != defended["after"]["alignment"].value
    with pytest.raises(SafediffError, match="unknown defense kind"):
        run_sandbox_demo(out, quick=True, overrides=tiny, progress=False, defenses="bogus")
