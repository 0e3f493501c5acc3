"""The README's promises hold: its commands parse, its presets exist, its links resolve, it is short.

Fast: only argument parsers are built (the lazy commands import their modules, never a model).
"""

import re
import shlex
from pathlib import Path

import pytest

from safediff.cli import build_parser, main
from safediff.config import preset_names

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _bash_commands(text: str) -> list[str]:
    """Each command of the ```bash blocks, backslash continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def _safediff_argvs() -> list[list[str]]:
    """argv (after `safediff`) of every documented `safediff ...` and `... -m safediff ...` call."""
    argvs = []
    for tokens in _bash_commands(_readme()):
        if tokens[0] == "safediff":
            argvs.append(tokens[1:])
        elif "-m" in tokens and tokens[tokens.index("-m") + 1 : tokens.index("-m") + 2] == [
            "safediff"
        ]:
            argvs.append(tokens[tokens.index("-m") + 2 :])
    return argvs


ARGVS = _safediff_argvs()


def _listed_presets() -> list[str]:
    """The names in the README's "## Presets" section, one `- `name`: ...` item each."""
    section = _readme().split("\n## Presets\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `([^`]+)`", section, flags=re.M)


def test_readme_is_at_most_300_lines():
    n = len(_readme().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; move detail to docs/ (limit {MAX_LINES})"


def test_readme_documents_the_everyday_commands():
    commands = {argv[0] for argv in ARGVS}
    for command in ("train", "eval", "generate", "score", "report", "demo"):
        assert command in commands, f"README shows no `safediff {command}` example"
    assert any("--defense" in argv for argv in ARGVS), "README shows no --defense stack"


@pytest.mark.parametrize("argv", ARGVS, ids=[" ".join(a)[:60] for a in ARGVS])
def test_readme_command_parses(argv):
    """The documented arguments are accepted by the command's parser as written."""
    args = build_parser(argv[0]).parse_args(argv)
    assert args.command == argv[0]


@pytest.mark.parametrize("argv", ARGVS, ids=[" ".join(a)[:60] for a in ARGVS])
def test_readme_command_help_exits_0(argv, capsys):
    """`safediff COMMAND [SUBCOMMAND] --help` exits 0 for every documented command."""
    # Keep a leading positional: it names a nested command (`des train`, `negset build`) or is a
    # run folder, which --help ignores.
    head = argv[:2] if len(argv) > 1 and not argv[1].startswith("-") else argv[:1]
    with pytest.raises(SystemExit) as exc:
        main([*head, "--help"])
    assert exc.value.code == 0
    assert "usage: safediff" in capsys.readouterr().out


def test_readme_presets_exist():
    listed = _listed_presets()
    assert listed, "README's Presets section lists no preset"
    shipped = set(preset_names())
    missing = [name for name in listed if name not in shipped]
    assert not missing, f"README lists presets that do not exist: {missing}"
    unlisted = sorted(shipped - set(listed))
    assert not unlisted, f"shipped presets the README does not list: {unlisted}"


def test_readme_commands_use_existing_presets():
    for argv in ARGVS:
        if "--preset" in argv:
            name = argv[argv.index("--preset") + 1]
            assert name in preset_names(), f"`safediff {' '.join(argv)}`: no preset {name!r}"


def test_readme_links_resolve():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _readme())
    local = [t for t in targets if "://" not in t]
    assert local, "README links to no docs"
    broken = [t for t in local if not (ROOT / t).exists()]
    assert not broken, f"README links to missing files: {broken}"
