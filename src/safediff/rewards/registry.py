"""Reward plug-ins by name: a plain dict catalogue, turned into objects only at the edge.

`REWARD_BUILDERS` maps a name to a builder (a class or function) whose keyword arguments are the
reward's `params` in the config, plus `device`, which the registry passes itself. `build_reward`
checks the params against the builder's signature so a typo fails before any model is loaded.
Plug-ins add themselves with `register_reward`.
"""

import functools
import inspect
from collections.abc import Callable
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


def build_reward(cfg: RewardConfig, device: torch.device | str = "cpu") -> RewardFn:
    """Build the reward `cfg.name` with keyword arguments `cfg.params` (and `device`).

    Errors (SafediffError) name what was wrong: an unknown reward (listing the known ones), an
    unknown, missing or `device` param (listing the valid ones), or a value the builder rejects.
    """
    builder = REWARD_BUILDERS.get(cfg.name)
    if builder is None:
        raise SafediffError(
            f"unknown reward {cfg.name!r}; known rewards: {', '.join(sorted(REWARD_BUILDERS))}"
        )
    params, var_kw = _builder_params(builder)
    takes_device = "device" in params or var_kw
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

    kwargs = dict(cfg.params)
    if takes_device:
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
