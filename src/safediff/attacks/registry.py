"""The attacks by name: a catalogue of 'module:Class' strings, imported only when built.

Each attack module holds one class (the `safediff.attacks.base.Attack` protocol) and its frozen
config dataclass; the config class is found as the class attribute `Config` when the attack has
one, else as the module's `<Class>Config` (P4D's two variants share `P4DConfig` and differ in its
`variant` field, which the registry sets).
"""

import dataclasses
import importlib
from typing import Any

from safediff.errors import SafediffError

ATTACKS: dict[str, str] = {
    "ring-a-bell": "safediff.attacks.ring_a_bell:RingABell",
    "mma-text": "safediff.attacks.mma_text:MMATextAttack",
    "unlearndiff": "safediff.attacks.unlearn_diff:UnlearnDiffAtk",
    "p4d-n": "safediff.attacks.p4d:P4D",
    "p4d-k": "safediff.attacks.p4d:P4D",
    "sneakyprompt": "safediff.attacks.sneaky_prompt:SneakyPrompt",
    "textual-inversion": "safediff.attacks.textual_inversion:TextualInversionAttack",
    "none": "safediff.attacks.no_attack:NoAttack",
    "replay": "safediff.attacks.replay:ReplayAttack",
}
"""Attack name -> 'module:Class' ("none": the target prompt itself; "replay": another run's
adversarial prompts, for transfer)."""

_FIXED_OPTIONS: dict[str, dict[str, Any]] = {"p4d-n": {"variant": "n"}, "p4d-k": {"variant": "k"}}
"""Config fields a registry name fixes (the user may not override them)."""


def attack_class(name: str) -> type:
    """The class `name` stands for (imported now); SafediffError naming the attacks otherwise."""
    if name not in ATTACKS:
        raise SafediffError(f"unknown attack {name!r}; attacks: {', '.join(ATTACKS)}")
    module_name, _, class_name = ATTACKS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise SafediffError(
            f"attack {name!r} is not installed in this version ({module_name} is missing); "
            f"attacks: {', '.join(ATTACKS)}"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise SafediffError(f"attack {name!r}: {module_name} has no class {class_name}")
    return cls


def config_class(name: str) -> type:
    """The frozen config dataclass of the attack `name`."""
    cls = attack_class(name)
    found = getattr(cls, "Config", None)
    if found is None:
        module = importlib.import_module(cls.__module__)
        found = getattr(module, f"{cls.__name__}Config", None)
        if found is None and cls.__name__.endswith(("Attack", "Atk")):
            stem = cls.__name__.removesuffix("Attack").removesuffix("Atk")
            found = getattr(module, f"{stem}Config", None)
    if found is None or not dataclasses.is_dataclass(found):
        raise SafediffError(f"attack {name!r}: no config dataclass found beside {cls.__name__}")
    return found


def build_attack(name: str, options: dict[str, str] | None = None) -> Any:
    """The attack `name` with its paper's defaults overridden by `options` (strings, parsed as
    YAML and type-checked: `safediff.defenses.stack.with_options`). Options of str fields are
    passed to the config's constructor as given (a config may require one, as replay's source)."""
    import typing

    from safediff.defenses.stack import with_options

    options = dict(options or {})
    fixed = _FIXED_OPTIONS.get(name, {})
    clash = sorted(set(fixed) & set(options))
    if clash:
        raise SafediffError(f"attack {name!r} fixes {', '.join(clash)}; drop that option")
    cls = attack_class(name)
    cfg_cls = config_class(name)
    hints = typing.get_type_hints(cfg_cls)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    text = {k: v for k, v in options.items() if k in names and hints.get(k) is str}
    cfg = cfg_cls(**fixed, **text)
    rest = {k: v for k, v in options.items() if k not in text}
    return cls(with_options(cfg, rest, f"attack {name}"))


def parse_options(items: list[str] | None) -> dict[str, str]:
    """['k=v', ...] (the CLI's --attack-option) -> {k: v}; a malformed or repeated key is an
    error."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SafediffError(f"attack option {item!r} must look like key=value")
        if key in out:
            raise SafediffError(f"attack option {key!r} given twice")
        out[key] = value.strip()
    return out
