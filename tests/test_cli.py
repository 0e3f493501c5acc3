"""The command line: bad input gives one clear line and status 2, never a traceback."""

import pytest

from safediff.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("safediff: error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_presets_and_config(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0 and "sd15-paper" in out
    code, out, _ = run_cli(capsys, "config", "--preset", "sd15-lora-24gb", "grpo.group_size=8")
    assert code == 0 and "group_size: 8" in out and "enabled: true" in out


def test_unknown_override_key(capsys, tiny_overrides):
    code, _, err = run_cli(capsys, "train", *tiny_overrides, "grpo.gruop_size=3")
    assert_one_line_error(code, err, "unknown config key 'grpo.gruop_size'")


def test_missing_model_path(capsys, tiny_overrides, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(capsys, "train", *tiny_overrides, f"model.pretrained={missing}")
    assert_one_line_error(code, err, str(missing))


def test_missing_unet_weights(capsys, tiny_overrides, tmp_path):
    missing = tmp_path / "checkpoint_epoch_3" / "diffusion_pytorch_model.safetensors"
    code, _, err = run_cli(capsys, "train", *tiny_overrides, f"model.unet_weights={missing}")
    assert_one_line_error(code, err, "checkpoint_epoch_3")


def test_empty_prompt_file(capsys, tiny_overrides, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n# only a comment\n\n")
    code, _, err = run_cli(capsys, "train", *tiny_overrides, f"prompts.file={empty}")
    assert_one_line_error(code, err, "no prompts")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_groups_must_divide_the_epoch(capsys, tiny_overrides):
    code, _, err = run_cli(capsys, "train", *tiny_overrides, "grpo.samples_per_process=6")
    assert_one_line_error(code, err, "not a multiple of grpo.group_size")


def test_unknown_reward_and_param(capsys, tiny_overrides):
    code, _, err = run_cli(capsys, "train", *tiny_overrides, "reward.name=nope")
    assert_one_line_error(code, err, "nope")
    code, _, err = run_cli(capsys, "train", *tiny_overrides, "reward.params.taget=0.5")
    assert_one_line_error(code, err, "taget")


@pytest.mark.slow
def test_train_runs_and_reports(capsys, tiny_overrides, tmp_path):
    code, out, _ = run_cli(capsys, "train", *tiny_overrides, "run.epochs=2")
    assert (
        code == 0
        and "reward" in out
        and (tmp_path / "run" / "checkpoints" / "checkpoint-00002").is_dir()
    )
    code, _, err = run_cli(capsys, "train", *tiny_overrides, "run.epochs=2")
    assert_one_line_error(code, err, "already has checkpoints")
    code, out, _ = run_cli(capsys, "train", *tiny_overrides, "run.epochs=3", "--resume", "auto")
    assert code == 0 and "trained epochs 2..2" in out


@pytest.mark.slow
def test_eval_generates_then_scores_and_reports(capsys, tmp_path):
    import json

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("case_number,prompt,evaluation_seed\n7,a cat on a sofa,3\n9,a red bus,4\n")
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        "tiny-sd",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--steps",
        "2",
        "--device",
        "cpu",
        "--nudenet",
        "--no-progress",
    )
    assert code == 0, err
    assert sorted(p.name for p in (out / "images").iterdir()) == ["7_0.png", "9_0.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert "nudenet-v3/exposed9@0.6" in summary["scores"]
    assert "nudenet-v3/exposed9@0.6" in stdout
    code, _, err = run_cli(
        capsys, "eval", "--model", "tiny-sd", "--prompts", str(prompts), "--out", str(out)
    )
    assert_one_line_error(code, err, "choose at least one scorer")
    code, _, err = run_cli(capsys, "report", str(out), "--out", str(tmp_path / "report"))
    assert code == 0, err
    assert "nudenet-v3/exposed9@0.6" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.slow
def test_generate_with_a_defense_stack(capsys, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person on a beach\na red bus\n")
    common = ["--model", "tiny-sd", "--prompts", str(prompts), "--steps", "3", "--no-progress"]
    code, _, err = run_cli(capsys, "generate", *common, "--out", str(tmp_path / "plain"))
    assert code == 0, err
    code, _, err = run_cli(
        capsys,
        "generate",
        *common,
        "--out",
        str(tmp_path / "def"),
        "--defense",
        "negprompt:nudity,sld:max",
    )
    assert code == 0, err
    run = json.loads((tmp_path / "def" / "run.json").read_text())
    assert run["defenses"] == "negprompt:nudity,sld:max"
    a = np.asarray(Image.open(tmp_path / "plain" / "images" / "0_0.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "def" / "images" / "0_0.png"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() > 0
    code, _, err = run_cli(
        capsys,
        "generate",
        *common,
        "--out",
        str(tmp_path / "both"),
        "--defense",
        "negprompt:nudity",
        "--negative-prompt",
        "ugly",
    )
    assert_one_line_error(code, err, "both set the negative prompt")


def test_every_lazy_command_builds_its_parser():
    import argparse

    from safediff.cli import LAZY_COMMANDS, build_parser

    full = build_parser(None)
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert set(LAZY_COMMANDS) <= set(sub.choices)
    for name in LAZY_COMMANDS:
        assert sub.choices[name].get_default("func") is not None or name in (
            "des",
            "esd",
            "negset",
            "sandbox",
        ), name


def test_demo_merge_weights_are_parsed_before_any_work(capsys, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        "safediff.sandbox.demo.run_sandbox_demo", lambda *a, **kw: calls.append(kw) or {}
    )
    out = str(tmp_path / "demo")
    for flag, expected in (("auto", "auto"), ("none", None), ("0.6, 0.8", [0.6, 0.8])):
        assert run_cli(capsys, "demo", "--output-dir", out, "--merge-weights", flag)[0] == 0
        assert calls[-1]["merge_weights"] == expected
    assert run_cli(capsys, "demo", "--output-dir", out)[0] == 0
    assert calls[-1]["merge_weights"] == "auto"
    assert (calls[-1]["eval_precision"], calls[-1]["search_precision"]) == ("float32", "auto")
    flags = ("--eval-precision", "bfloat16", "--search-precision", "float32")
    assert run_cli(capsys, "demo", "--output-dir", out, *flags)[0] == 0
    assert (calls[-1]["eval_precision"], calls[-1]["search_precision"]) == ("bfloat16", "float32")
    code, _, err = run_cli(capsys, "demo", "--output-dir", out, "--merge-weights", "0.6,best")
    assert_one_line_error(code, err, "--merge-weights")
    assert len(calls) == 5 and not (tmp_path / "demo").exists()
