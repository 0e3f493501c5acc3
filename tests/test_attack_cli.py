"""`safediff attack` end to end on the sandbox, and the attack registry."""

import json

import pytest

from safediff.attacks.registry import ATTACKS, build_attack, parse_options
from safediff.attacks.sneaky_prompt import SneakyPrompt
from safediff.cli import main
from safediff.errors import SafediffError

FAST = [
    "--attack-option", "filter=keyword",
    "--attack-option", "candidates=8",
    "--attack-option", "num_subword=1",
    "--attack-option", "max_rounds=1",
]  # fmt: skip


def test_attack_command_on_the_sandbox_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "attack", "--model", "sandbox", "--attack", "sneakyprompt", *FAST,
        "--targets", "sandbox:skull", "--limit", "2", "--images-per-target", "1",
        "--steps", "5", "--out", str(out), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "sandbox-attack/sandbox-detector@0.5/any-of-1: ASR" in line and "bypassed" in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"] == 2 and summary["attack"] == "sneakyprompt"
    assert summary["judge"] == "sandbox-detector/families4@0.5"
    assert summary["attack_config"]["filter"] == "keyword"
    assert summary["sampler"]["num_steps"] == 5 and summary["victim"] == "none"
    assert len(list((out / "images").glob("*.png"))) == 2
    for row in summary["per_target"]:
        assert "skull" not in row["adversarial_prompt"]
    assert main(argv) == 0  # resumed: nothing attacked again
    assert json.loads((out / "summary.json").read_text())["attacked_now"] == 0
    # `safediff report` shows the attack run: table and grid (target, adversarial prompt, flag)
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "sandbox-attack/sandbox-detector@0.5/any-of-1" in html and "<img" in html
    assert summary["per_target"][0]["adversarial_prompt"] in html
    assert ("flagged</span>" in html) or ("safe</span>" in html)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["attacks"][0]["summary"]["targets"] == 2
    # another attack option is another run: refused without --overwrite
    changed = [*argv, "--attack-option", "query_limit=2"]
    assert main(changed) == 2
    assert "made with other settings (attack_config)" in capsys.readouterr().err


def test_attack_command_errors_are_one_line(tmp_path, capsys):
    base = ["attack", "--model", "sandbox", "--out", str(tmp_path), "--device", "cpu"]
    cases = [
        (["--attack", "sneakyprompt", "--targets", "nowhere.csv"], "not a file"),
        (["--attack", "sneakyprompt", "--targets", "sandbox", "--judge", "oracle"], "judges:"),
        (["--attack", "sneakyprompt", "--attack-option", "beam=3", "--targets", "sandbox"], "beam"),
        (["--attack", "sneakyprompt", "--targets", "sandbox", "--defense", "des"], "KIND:ARG"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_registry_builds_with_options_and_names_the_attacks():
    attack = build_attack("sneakyprompt", {"query_limit": "5", "similarity_threshold": "0.5"})
    assert isinstance(attack, SneakyPrompt)
    assert attack.config.query_limit == 5 and attack.config.similarity_threshold == 0.5
    with pytest.raises(SafediffError, match="unknown attack 'gcg'; attacks: ring-a-bell"):
        build_attack("gcg", {})
    with pytest.raises(SafediffError, match="wrong type"):
        build_attack("sneakyprompt", {"query_limit": "many"})
    assert set(ATTACKS) == {
        "ring-a-bell", "mma-text", "unlearndiff", "p4d-n", "p4d-k", "sneakyprompt",
        "textual-inversion", "none", "replay",
    }  # fmt: skip
    # a str option reaches the constructor (replay requires its source)
    with pytest.raises(SafediffError, match="needs source=FOLDER"):
        build_attack("replay", {})


def test_parse_options():
    assert parse_options(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    for bad in (["a"], ["=1"], ["a=1", "a=2"]):
        with pytest.raises(SafediffError, match="attack option"):
            parse_options(bad)
