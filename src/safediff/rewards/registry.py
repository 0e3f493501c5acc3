"""Reward plug-ins by name: a plain dict catalogue, turned into objects only at the edge.

`REWARD_BUILDERS` maps a name to a builder (a class or function) whose keyword arguments are the
reward's `params` in the config, plus `device`, which the registry passes itself. `build_reward`
checks the params against the builder's signature, names and types (from its annotations), so a
typo or a wrong type fails with one line before any model is loaded (`check_reward_params`).
Plug-ins add themselves with `register_reward`.
"""

import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from safediff.config import RewardConfig
from safediff.errors import SafediffError
from safediff.rewards.base import RewardFn
from safediff.rewards.brightness import BrightnessReward
from safediff.rewards.clip_rewards import (
    build_alignment_reward,
    build_steering_reward,
    build_unsafe_penalty_reward,
    build_weighted_reward,
)

REWARD_BUILDERS: dict[str, Callable[..., RewardFn]] = {
    "brightness": BrightnessReward,
    "steering": build_steering_reward,
    "alignment": build_alignment_reward,
    "unsafe_penalty": build_unsafe_penalty_reward,
}
# A weighted sum may name any registered reward (plug-ins included) as a component.
REWARD_BUILDERS["weighted"] = functools.partial(build_weighted_reward, builders=REWARD_BUILDERS)


def register_reward(name: str, builder: Callable[..., RewardFn]) -> None:
    """Add a reward builder under `name`; a name already taken is an error."""
    if not isinstance(name, str) or not name.strip():
        raise SafediffError(f"reward name must be a non-empty string, got {name!r}")
    if not callable(builder):
        raise SafediffError(f"reward {name!r}: builder must be callable, got {builder!r}")
    if name in REWARD_BUILDERS:
        raise SafediffError(
            f"reward {name!r} is already registered (by {REWARD_BUILDERS[name]!r}); pick another name"
        )
    REWARD_BUILDERS[name] = builder


def _builder_params(builder: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword-settable parameters of `builder` and whether it takes **kwargs."""
    sig = inspect.signature(builder)
    params = {
        p.name: p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return params, var_kw


def _builder_hints(builder: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of `builder`'s parameters ({} where they cannot be resolved)."""
    target = builder.func if isinstance(builder, functools.partial) else builder
    target = target.__init__ if isinstance(target, type) else target
    try:
        return typing.get_type_hints(target)
    except (NameError, TypeError):  # a plug-in with unresolvable annotations: names still checked
        return {}


def _fits(value: Any, tp: Any) -> bool:
    """Whether a config value (a YAML scalar, list or mapping) fits annotation `tp`. Floats must
    be finite; ints are accepted for floats; annotations this check does not know pass."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence) or tp in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            return False
        item = args[0] if args and origin is not tuple else Any
        return all(_fits(v, item) for v in value)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return isinstance(value, dict)
    if isinstance(tp, type):
        try:
            return isinstance(value, tp)
        except TypeError:  # a protocol that is not runtime-checkable: no config value is one
            return False
    return True


_TYPE_WORDS = {
    float: "a finite number",
    int: "an integer",
    bool: "true or false",
    str: "a string",
    type(None): "null",
}


def _describe(tp: Any) -> str:
    """Annotation `tp` in words, naming only what a config can hold ('a string or null')."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        words = [w for w in (_describe(arg) for arg in typing.get_args(tp)) if w]
        return " or ".join(dict.fromkeys(words)) or str(tp)
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if tp in _TYPE_WORDS:
        return _TYPE_WORDS[tp]
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple, Sequence):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return ""  # an object type (an encoder, an anchor set): not spelled in a config


def check_reward_params(cfg: RewardConfig) -> None:
    """Check `cfg.params` against the builder of `cfg.name`: known names, required ones given,
    and each value of the type the builder's annotation asks for. One-line SafediffError naming
    the reward, the key, the expected type and the fix."""
    builder = REWARD_BUILDERS.get(cfg.name)
    if builder is None:
        raise SafediffError(
            f"unknown reward {cfg.name!r}; known rewards: {', '.join(sorted(REWARD_BUILDERS))}"
        )
    params, var_kw = _builder_params(builder)
    valid = sorted(k for k in params if k != "device")
    valid_text = ", ".join(valid) or "(none)"
    if "device" in cfg.params:
        raise SafediffError(
            f"reward.params.device is not a reward parameter (the trainer places rewards); "
            f"valid params of {cfg.name!r}: {valid_text}"
        )
    if not var_kw:
        unknown = sorted(set(cfg.params) - set(valid))
        if unknown:
            raise SafediffError(
                f"unknown reward param {unknown[0]!r} for reward {cfg.name!r}; valid params: "
                f"{valid_text}"
            )
    missing = sorted(
        k
        for k, p in params.items()
        if k != "device" and p.default is inspect.Parameter.empty and k not in cfg.params
    )
    if missing:
        raise SafediffError(
            f"reward {cfg.name!r} needs param {missing[0]!r} (set reward.params.{missing[0]}=...); "
            f"valid params: {valid_text}"
        )
    hints = _builder_hints(builder)
    for key, value in cfg.params.items():
        tp = hints.get(key)
        if tp is None or _fits(value, tp):
            continue
        expected = _describe(tp) or str(tp)
        default = params[key].default if key in params else inspect.Parameter.empty
        fix = (
            f"e.g. reward.params.{key}={_yaml(default)} (its default)"
            if default is not inspect.Parameter.empty
            else f"set reward.params.{key} to {expected}"
        )
        raise SafediffError(
            f"reward {cfg.name!r}: reward.params.{key}={value!r} must be {expected}; {fix}"
        )


def _yaml(value: Any) -> str:
    """A default as it is written in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_reward(cfg: RewardConfig, device: torch.device | str = "cpu") -> RewardFn:
    """Build the reward `cfg.name` with keyword arguments `cfg.params` (and `device`).

    Errors (SafediffError) name what was wrong: an unknown reward (listing the known ones), an
    unknown, missing, wrongly typed or `device` param (see `check_reward_params`), or a value the
    builder rejects.
    """
    check_reward_params(cfg)
    builder = REWARD_BUILDERS[cfg.name]
    params, var_kw = _builder_params(builder)
    kwargs = dict(cfg.params)
    if "device" in params or var_kw:
        kwargs["device"] = device
    try:
        reward = builder(**kwargs)
    except (TypeError, ValueError) as err:
        raise SafediffError(
            f"reward {cfg.name!r}: invalid params {dict(cfg.params)!r}: {err}"
        ) from err
    if not callable(reward):
        raise SafediffError(f"reward {cfg.name!r}: builder returned a non-callable {reward!r}")
    return reward
