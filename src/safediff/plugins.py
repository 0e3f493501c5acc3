"""Plug-ins: what a model family, a world or a judge adds to safediff, looked up by name.

The library keeps plain tables from a name to a callable and never imports a plug-in. A plug-in
is a module with a function `register()` that fills the tables through the `add_*` functions
below; it is found through the entry-point group `safediff.plugins` of the installed
distributions (safediff's own sandbox world is one: `[project.entry-points."safediff.plugins"]`
in pyproject.toml). The command line calls `load_plugins()` once at start; a library lookup that
misses loads them too, so `load_t2i_model(ModelConfig("sandbox"))` works from Python with no
set-up. Names are turned into objects only by the lookups, at the edge of each library module.

Tables (what a name means -> what the plug-in gives):
- model families: a model spec 'NAME' or 'NAME:ARG' -> `ModelFamily` (the `T2IModel` loader and,
  for DES, the text-encoder adapter loader);
- prompt sources: a prompt spec 'NAME:ARG' -> captions with their kinds and concept families;
- scorers: `safediff score --NAME` -> a `Scorer` builder;
- anchor sets: an anchor set name -> its YAML file;
- encoder kinds: a reward encoder spec 'NAME:ARG' (`safediff.rewards.encoders`);
- commands: a `safediff NAME` subcommand (module, parser builder, one-line help);
- demo worlds: `safediff demo --world NAME` -> its options and its runner;
- attack targets: `safediff attack --targets NAME[:ARG]` -> a world's attack target set
  (`safediff.attacks.targets.TargetSet`: prompts, banned words, ASR protocol).

Each table refuses a name taken twice. `registered()` lists everything, by table.
"""

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from safediff.errors import SafediffError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "safediff.plugins"


@dataclass(frozen=True)
class ModelFamily:
    """A model family reached by the spec 'NAME' or 'NAME:ARG'.

    load(arg, device) -> T2IModel: arg is '' for the bare name. The UNet comes in float32 on
        `device`; a checkpoint or LoRA from the config is applied on top by the caller.
    text_encoder(arg, device) -> TextEncoderAdapter, or None when the family has no trainable
        text encoder (then DES cannot run on it).
    sampler: the family's own sampler (num_steps, eta, guidance_scale), what evaluation samples
        its models with unless told otherwise, or None for the evaluation protocol's defaults.
    """

    name: str
    load: Callable[[str, Any], Any]
    text_encoder: Callable[[str, Any], Any] | None = None
    help: str = ""
    sampler: Mapping[str, float] | None = None


@dataclass(frozen=True)
class PromptSource:
    """Prompt specs 'NAME:ARG' -> (captions, kinds, families), each a list of one entry per
    prompt (kind and family may be None)."""

    name: str
    load: Callable[[str], tuple[list[str], list[str | None], list[str | None]]]
    help: str = ""


@dataclass(frozen=True)
class ScorerPlugin:
    """`safediff score --NAME`: build(device) -> a `safediff.eval.scorers.base.Scorer`."""

    name: str
    build: Callable[[str], Any]
    help: str = ""


@dataclass(frozen=True)
class CommandPlugin:
    """`safediff NAME ...`: `module.builder(subparsers)` adds the parser; handlers return an
    exit code. The module is imported only when its command runs."""

    name: str
    module: str
    builder: str
    help: str = ""


@dataclass(frozen=True)
class AttackTargetSource:
    """`--targets NAME` or `NAME:ARG`: load(arg) -> `safediff.attacks.targets.TargetSet`."""

    name: str
    load: Callable[[str], Any]
    help: str = ""


@dataclass(frozen=True)
class DemoWorld:
    """`safediff demo --world NAME`: add_arguments(parser) adds the world's own options;
    run(args) -> exit code. `default` marks the world `safediff demo` runs with no --world."""

    name: str
    add_arguments: Callable[[Any], None]
    run: Callable[[Any], int]
    help: str = ""
    default: bool = False


_TABLES: dict[str, dict[str, Any]] = {
    "model family": {},
    "prompt source": {},
    "scorer": {},
    "anchor set": {},
    "encoder kind": {},
    "command": {},
    "demo world": {},
    "attack targets": {},
}
_loaded = False


def _add(table: str, name: str, value: Any) -> None:
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise SafediffError(f"{table} name must be a non-empty word without ':', got {name!r}")
    entries = _TABLES[table]
    if name in entries:
        raise SafediffError(f"{table} {name!r} is already registered; pick another name")
    entries[name] = value


def add_model_family(family: ModelFamily) -> None:
    _add("model family", family.name, family)


def add_prompt_source(source: PromptSource) -> None:
    _add("prompt source", source.name, source)


def add_scorer(scorer: ScorerPlugin) -> None:
    _add("scorer", scorer.name, scorer)


def add_anchor_set(name: str, path: Path | Any) -> None:
    """An anchor set YAML file (a path or an importlib.resources Traversable) under `name`."""
    _add("anchor set", name, path)


def add_encoder_kind(kind: str, loader: Callable[..., Any]) -> None:
    """Reward encoders 'KIND:ARG': loader(arg, device, dtype, precision) -> ImageTextEncoder."""
    _add("encoder kind", kind, loader)


def add_command(command: CommandPlugin) -> None:
    _add("command", command.name, command)


def add_demo_world(world: DemoWorld) -> None:
    _add("demo world", world.name, world)


def add_attack_targets(source: AttackTargetSource) -> None:
    _add("attack targets", source.name, source)


def load_plugins() -> None:
    """Call `register()` of every plug-in in the entry-point group, once per process.

    A plug-in that fails to load is a SafediffError naming it: a half-registered world would
    give confusing 'unknown model' errors later.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()()
        except SafediffError:
            raise
        except Exception as err:  # a broken third-party plug-in: say which
            raise SafediffError(
                f"plug-in {entry.name!r} ({entry.value}) failed to register: "
                f"{type(err).__name__}: {err}"
            ) from err
        logger.debug("loaded plug-in %s (%s)", entry.name, entry.value)


def _table(table: str) -> dict[str, Any]:
    load_plugins()
    return _TABLES[table]


def registered() -> dict[str, list[str]]:
    """Every table's names, after loading the plug-ins."""
    load_plugins()
    return {table: sorted(entries) for table, entries in _TABLES.items()}


def split_spec(spec: str) -> tuple[str, str]:
    """'NAME:ARG' -> (NAME, ARG); 'NAME' -> (NAME, '')."""
    name, _, arg = spec.partition(":")
    return name, arg


def model_family(spec: str) -> ModelFamily | None:
    """The family whose name starts the model spec ('NAME' or 'NAME:ARG'), or None."""
    return _table("model family").get(split_spec(spec)[0])


def prompt_source(spec: str) -> PromptSource | None:
    """The prompt source a spec 'NAME:ARG' names, or None (the spec is a file or builtin)."""
    name, sep, _ = spec.partition(":")
    return _table("prompt source").get(name) if sep else None


def scorers() -> dict[str, ScorerPlugin]:
    return dict(_table("scorer"))


def anchor_sets() -> dict[str, Any]:
    return dict(_table("anchor set"))


def encoder_kinds() -> dict[str, Callable[..., Any]]:
    return dict(_table("encoder kind"))


def commands() -> dict[str, CommandPlugin]:
    return dict(_table("command"))


def demo_worlds() -> dict[str, DemoWorld]:
    return dict(_table("demo world"))


def attack_target_sources() -> dict[str, AttackTargetSource]:
    return dict(_table("attack targets"))
