"""The robustness table's recipe (recipes/sandbox_robustness.py): its data, its plan, its table,
and (slow) the CI smoke run end to end on the sandbox, resumed."""

import importlib.util
import json
from pathlib import Path

import pytest

from safediff.attacks.registry import ATTACKS, build_attack
from safediff.defenses.stack import canonical_kind
from safediff.errors import SafediffError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "sandbox_robustness.py"


def _module():
    spec = importlib.util.spec_from_file_location("_robustness_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_attack_of_the_recipe_builds_in_both_modes():
    m = _module()
    recipe = m.load_recipe()
    assert set(recipe["attacks"]) <= set(ATTACKS)
    for name in recipe["attacks"]:
        for mode in m.MODES:
            attack = build_attack(name, m.attack_options(recipe, name, mode))
            assert attack.name == name or name.startswith("p4d")


def test_every_row_names_known_defense_kinds():
    m = _module()
    for name, row in m.load_recipe()["rows"].items():
        for item in (row.get("defense") or "").split(","):
            if item.strip():
                canonical_kind(item.split(":", 1)[0], context=name)


def test_plan_encoder_groups_and_target_selection():
    m = _module()
    recipe = m.load_recipe()
    rows, attacks, settings = m.mode_plan(recipe, "smoke", None, None)
    assert rows == ["base", "negative prompt"] and "none" in attacks
    assert settings["per_family"] == 1
    assert m.encoder_group("des:/x,negprompt:text=a") == "des"
    assert m.encoder_group("negprompt:text=a") == m.encoder_group("") == "base"
    targets = m.select_targets("sandbox", 1).targets
    assert sorted(t.concept for t in targets) == ["drug", "fire", "skull", "weapon"]
    with pytest.raises(SafediffError, match="unknown row"):
        m.mode_plan(recipe, "full", ["no such row"], None)


def test_recipe_refuses_an_unknown_transfer(tmp_path):
    m = _module()
    bad = tmp_path / "r.yaml"
    bad.write_text(
        "rows: {base: {model: null, defense: ''}}\n"
        "attacks: {none: {transfer: always}}\nfull: {}\nsmoke: {}\n"
    )
    with pytest.raises(SafediffError, match="transfer"):
        m.load_recipe(bad)


def test_table_has_a_cell_per_row_and_attack(tmp_path):
    m = _module()
    est = {"value": 0.5, "lo": 0.25, "hi": 0.75, "n": 4}
    data = {
        "mode": "smoke", "protocol": "p", "targets": ["a", "b"], "attacks": ["none", "mma-text"],
        "cells": {"base": {"none": {"asr": est}, "mma-text": {"asr": est}}},
        "utility": {"base": {"value": 0.6, "lo": 0.5, "hi": 0.7}},
    }  # fmt: skip
    text = m.format_table(data, tmp_path)
    assert "| row | none | mma-text | utility |" in text
    assert "| base | 50% [25, 75] | 50% [25, 75] | 60% [50, 70] |" in text


def test_a_cell_that_does_not_apply_is_shown_with_its_reason(tmp_path):
    m = _module()
    est = {"value": 1.0, "lo": 0.5, "hi": 1.0, "n": 4}
    reason = "a defense of this stack (safree) filters the prompts' tokens"
    data = {
        "mode": "smoke", "protocol": "p", "targets": ["a"], "attacks": ["none", "textual-inversion"],
        "cells": {"SAFREE": {"none": {"asr": est},
                             "textual-inversion": {"asr": None, "not_applicable": reason}}},
        "utility": {},
    }  # fmt: skip
    text = m.format_table(data, tmp_path)
    assert "| SAFREE | 100% [50, 100] | n/a | - |" in text
    assert f"- SAFREE x textual-inversion: {reason}" in text


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_resumes(tmp_path, capsys):
    m = _module()
    out = tmp_path / "rob"
    argv = ["--out", str(out), "--smoke", "--threads", "1", "--no-progress"]
    assert m.main(argv) == 0
    first = json.loads((out / "robustness.json").read_text())
    assert set(first["cells"]) == {"base", "negative prompt"}
    for cells in first["cells"].values():
        assert set(cells) == {"none", "ring-a-bell", "unlearndiff"}
        for cell in cells.values():
            assert cell["asr"]["n"] == 4 and 0 <= cell["asr"]["value"] <= 1
    # Ring-A-Bell searched once, on the first row, and was replayed on the second
    assert first["cells"]["base"]["ring-a-bell"]["searched_on"] is None
    assert first["cells"]["negative prompt"]["ring-a-bell"]["searched_on"].endswith(
        "cells/base/ring-a-bell"
    )
    assert "| base |" in (out / "robustness.md").read_text()
    # a rerun attacks nothing again and writes the same cells
    assert m.main(argv) == 0
    second = json.loads((out / "robustness.json").read_text())
    strip = lambda d: {r: {a: c["asr"] for a, c in cs.items()} for r, cs in d["cells"].items()}  # noqa: E731
    assert strip(second) == strip(first)


def test_runs_are_named_and_grpo_run_is_the_run_named_grpo():
    m = _module()
    assert m.parse_runs(["grpo=a/train", "grpo-adv=b/round-1/train"], None) == {
        "grpo": "a/train",
        "grpo-adv": "b/round-1/train",
    }
    assert m.parse_runs(None, "a/train") == {"grpo": "a/train"}
    assert m.parse_runs(["grpo=a/train"], "a/train") == {"grpo": "a/train"}
    for bad, match in ((["grpo"], "NAME=DIR"), (["=x"], "NAME=DIR"), (["grpo=b"], "different")):
        with pytest.raises(SafediffError, match=match):
            m.parse_runs(bad, "a/train")
    rows = m.load_recipe()["rows"]
    assert rows["GRPO + steering + adversarial rounds"] == {"model": "grpo-adv", "defense": ""}


def test_recipe_refuses_a_row_model_that_names_no_run(tmp_path):
    m = _module()
    bad = tmp_path / "r.yaml"
    bad.write_text("rows: {x: {model: 3, defense: ''}}\nattacks: {}\nfull: {}\nsmoke: {}\n")
    with pytest.raises(SafediffError, match="run name"):
        m.load_recipe(bad)


def test_row_names_can_be_given_to_rows():
    """--rows splits on commas: no row name may hold one."""
    assert not [name for name in _module().load_recipe()["rows"] if "," in name]
