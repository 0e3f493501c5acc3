"""Smoke tests of recipes/ and experiments/: each script imports and answers `--help`, each recipe
YAML loads and every one of its rows is a valid config of the library. Nothing is trained."""

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from safediff.config import load_config
from safediff.rewards.registry import REWARD_BUILDERS

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("recipes/*.py"), *ROOT.glob("experiments/*.py")])
RECIPE_FILES = sorted(ROOT.glob("recipes/*.yaml"))


def _import(path: Path) -> ModuleType:
    """Import a script by path under a private name (the folders are not packages)."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def test_folders_hold_scripts():
    names = {_id(p) for p in SCRIPTS}
    assert "recipes/sandbox_ablations.py" in names
    assert any(n.startswith("experiments/") for n in names)
    assert "recipes/sandbox_ablations.yaml" in {_id(p) for p in RECIPE_FILES}


@pytest.mark.parametrize("path", SCRIPTS, ids=_id)
def test_script_imports_and_answers_help(path, capsys):
    module = _import(path)
    doc = (module.__doc__ or "").strip()
    assert doc, f"{_id(path)} needs a module docstring whose first line says what it is for"
    purpose = doc.splitlines()[0]
    assert len(purpose) > 20, f"{_id(path)}: first docstring line {purpose!r} is not a purpose"
    params = inspect.signature(module.main).parameters
    assert list(params) == ["argv"], f"{_id(path)}: main must take (argv) and return an int"
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
    text = path.read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":\n    raise SystemExit(main())' in text
    assert "sys.path" not in text, f"{_id(path)} edits sys.path; import the installed package"


def test_recipe_runs_as_a_script():
    """The command the docs print, `python recipes/sandbox_ablations.py --help`, as a process."""
    script = ROOT / "recipes" / "sandbox_ablations.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--only" in done.stdout and "--quick" in done.stdout


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_id)
def test_recipe_rows_are_valid_configs(path, tmp_path):
    """Every row's overrides apply to the recipe's preset, the row's whole config (a replaced
    reward section included) loads and validates, and its reward takes every param it is given."""
    script = path.with_suffix(".py")
    assert script.is_file(), f"{_id(path)} has no script {script.name} beside it"
    module = _import(script)
    recipe = module.load_recipe(path)
    if not hasattr(module, "variant_config"):  # not a table of config variants (robustness)
        return
    assert recipe["variants"], f"{_id(path)} lists no variants"
    for name, change in recipe["variants"].items():
        load_config(recipe["preset"], list((change or {}).get("overrides", [])))
        config_file = tmp_path / f"{len(name)}-{abs(hash(name))}.yaml"
        config_file.write_text(yaml.safe_dump(module.variant_config(recipe["preset"], change)))
        cfg = load_config(str(config_file))
        builder = REWARD_BUILDERS[cfg.reward.name]
        accepted = inspect.signature(builder).parameters
        unknown = sorted(set(cfg.reward.params) - set(accepted))
        assert not unknown, f"{_id(path)} row {name!r}: {cfg.reward.name} takes no {unknown}"


def test_ablation_rows_change_what_they_name():
    """The ablation rows keep the preset except for their change (a spot check of the data)."""
    module = _import(ROOT / "recipes" / "sandbox_ablations.py")
    recipe = module.load_recipe()
    preset = load_config(recipe["preset"])
    variants = recipe["variants"]
    assert next(iter(variants)) == "preset" and not variants["preset"]

    def config(name):
        return module.variant_config(recipe["preset"], variants[name])

    assert config("preset")["reward"]["params"] == preset.reward.params
    assert config("alpha=0.5")["reward"]["params"] == {**preset.reward.params, "alpha": 0.5}
    control = config("alignment (control)")
    assert control["reward"] == {"name": "alignment", "params": {"encoder": "sandbox:default"}}
    assert control["grpo"]["kl_scope"] == "all"


def test_ablation_unknown_variant_is_refused(tmp_path, capsys):
    module = _import(ROOT / "recipes" / "sandbox_ablations.py")
    assert module.main(["--out", str(tmp_path), "--only", "no-such-row"]) == 2
    assert "unknown variant" in capsys.readouterr().err
