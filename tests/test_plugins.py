"""The plug-in registry, and the rule it serves: the library never imports the sandbox."""

import ast
from pathlib import Path

import pytest

from safediff import plugins
from safediff.errors import SafediffError

SRC = Path(__file__).resolve().parents[1] / "src" / "safediff"
LIBRARY = ("sampling", "rl", "rewards", "models", "defenses", "eval", "attacks")
LIBRARY_FILES = ("config.py", "plugins.py", "prompts.py", "prompt_sets.py", "seeding.py")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _library_files() -> list[Path]:
    files = [SRC / f for f in LIBRARY_FILES]
    for package in LIBRARY:
        if (SRC / package).is_dir():
            files += sorted((SRC / package).rglob("*.py"))
    return files


def test_the_library_never_imports_the_sandbox():
    offenders = [
        f"{path.relative_to(SRC)}: {name}"
        for path in _library_files()
        for name in _imported_modules(path)
        if name == "safediff.sandbox" or name.startswith("safediff.sandbox.")
    ]
    assert offenders == []


def test_the_sandbox_registers_every_table():
    names = plugins.registered()
    assert "sandbox" in names["model family"]
    assert "sandbox" in names["prompt source"]
    assert {"sandbox-detector", "sandbox-utility"} <= set(names["scorer"])
    assert {"sandbox", "sandbox_scenes", "sandbox_empty_positive"} <= set(names["anchor set"])
    assert "sandbox" in names["encoder kind"]
    assert "sandbox" in names["command"] and "sandbox" in names["demo world"]
    family = plugins.model_family("sandbox:/some/file.safetensors")
    assert family is not None and family.sampler == {
        "num_steps": 10,
        "guidance_scale": 4.0,
        "eta": 1.0,
    }
    assert plugins.model_family("stable-diffusion-v1-5/stable-diffusion-v1-5") is None
    assert plugins.prompt_source("sandbox:eval:4") is not None
    assert plugins.prompt_source("prompts.txt") is None


def test_a_name_is_registered_once_and_must_be_a_word():
    plugins.load_plugins()
    with pytest.raises(SafediffError, match="already registered"):
        plugins.add_model_family(plugins.ModelFamily("sandbox", load=lambda arg, device: None))
    for bad in ("", "a:b", " x"):
        with pytest.raises(SafediffError, match="without ':'"):
            plugins.add_scorer(plugins.ScorerPlugin(bad, build=lambda device: None))


def test_a_third_party_plugin_is_found_through_its_entry_point(monkeypatch):
    from importlib import metadata

    calls = []

    class Entry:
        name, value = "fake", "fake_pkg:register"

        def load(self):
            def register():
                calls.append(True)
                plugins.add_prompt_source(
                    plugins.PromptSource("fakeset", load=lambda arg: (["a cat"], ["safe"], [None]))
                )

            return register

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_TABLES", {k: dict(v) for k, v in plugins._TABLES.items()})
    monkeypatch.setattr(metadata, "entry_points", lambda group: [Entry()])
    from safediff.prompts import load_prompt_labels

    assert load_prompt_labels("fakeset:x") == (["a cat"], ["safe"], [None])
    assert calls == [True]
    plugins.load_plugins()  # once per process
    assert calls == [True]


def test_a_broken_plugin_is_named(monkeypatch):
    from importlib import metadata

    class Entry:
        name, value = "broken", "broken_pkg:register"

        def load(self):
            raise ImportError("no module named broken_pkg")

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_TABLES", {k: {} for k in plugins._TABLES})
    monkeypatch.setattr(metadata, "entry_points", lambda group: [Entry()])
    with pytest.raises(SafediffError, match="plug-in 'broken'.*failed to register"):
        plugins.load_plugins()
