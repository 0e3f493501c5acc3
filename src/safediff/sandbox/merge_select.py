"""Choosing a post-trained sandbox model's merge weight on validation prompts.

The final model of a run is base + w * (trained - base) (`safediff.models.interpolate`). Which
w reaches a safety target while keeping utility near the base's differs from run to run: which
families a run learns to refuse, and how much benign drawing it disturbs, depend on its seed.
So the demo measures a few weights on validation prompts ("grpo_train" split,
`demo_eval.demo_validation_prompts`; never the evaluation prompts) and keeps one:

1. weights are tried in ascending order; each is scored on the validation prompts with the
   same seeds as the base model: the unsafe rate of its explicit prompts (trained families) and
   its utility (GenEval's overall: the mean of the task accuracies);
2. a weight whose utility falls more than `utility_margin` below the base's ends the search
   (it and every larger weight are out);
3. otherwise the weight is kept, and the search ends when it reaches the safety target: its
   unsafe rate at most (1 - target_cut) x the base's. The smallest weight that reaches the
   target is the least change that does the job;
4. no weight reaches the target: the largest kept weight (the safest within the margin); none
   kept (even the smallest misses the margin): the smallest, with a warning.

Utility usually falls as w grows, but not strictly (the validation estimate is noisy), which
is why the search stops at the first miss rather than looking past it.
"""

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from safediff.errors import SafediffError
from safediff.sandbox.verdicts import utility_overall

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeTrial:
    """One weight's validation scores (fractions in [0, 1]; utility_delta in [-1, 1])."""

    weight: float
    unsafe_rate: float  # explicit validation prompts whose image shows the prompt's family
    utility: float  # mean over tasks of the benign validation prompts' utility
    utility_delta: float  # utility - the base model's utility on the same prompts and seeds

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def validation_scores(records: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(unsafe rate of the explicit prompts, mean over tasks of the benign prompts' utility, as
    the evaluation's utility/overall) from `demo_eval.score_images` records. NaN where a group is
    empty."""
    explicit = [r["unsafe"] for r in records if r["kind"] == "explicit"]
    unsafe = sum(explicit) / len(explicit) if explicit else math.nan
    return unsafe, utility_overall(records)


def choose_merge_weight(
    weights: Sequence[float],
    score: Callable[[float], tuple[float, float]],
    base: tuple[float, float],
    target_cut: float,
    utility_margin: float,
) -> tuple[float, list[MergeTrial]]:
    """(chosen weight, the trials made, in order) by the rule of the module docstring.

    weights: candidate merge weights (each finite and > 0; sorted here, duplicates dropped).
    score: weight -> (unsafe rate, utility) of the merged model on the validation prompts.
    base: the base model's (unsafe rate, utility) on the same prompts and seeds.
    target_cut: the relative cut of the unsafe rate that ends the search (0.8: down by 80%).
    utility_margin: how far below the base's utility a weight's may fall (a fraction: 0.03 is
        3 points).
    """
    grid = sorted(set(float(w) for w in weights))
    if not grid:
        raise SafediffError("no merge weights to choose from")
    if any(not math.isfinite(w) or w <= 0 for w in grid):
        raise SafediffError(f"merge weights must be finite and > 0, got {list(weights)}")
    if not math.isfinite(utility_margin) or utility_margin < 0:
        raise SafediffError(f"utility margin must be finite and >= 0, got {utility_margin}")
    if not 0 <= target_cut <= 1:
        raise SafediffError(f"target cut must be in [0, 1], got {target_cut}")
    base_unsafe, base_utility = base
    if not (math.isfinite(base_unsafe) and math.isfinite(base_utility)):
        raise SafediffError(
            "the base model's validation scores are not finite (no benign or no explicit prompts?)"
        )
    trials: list[MergeTrial] = []
    chosen: float | None = None
    for w in grid:
        unsafe, utility = score(w)
        if not (math.isfinite(unsafe) and math.isfinite(utility)):
            raise SafediffError(f"merge weight {w:g}: validation scores are not finite")
        trials.append(MergeTrial(w, unsafe, utility, utility - base_utility))
        if utility - base_utility < -utility_margin:
            break
        chosen = w
        if unsafe <= (1.0 - target_cut) * base_unsafe:
            break
    if chosen is None:
        chosen = grid[0]
        logger.warning(
            "every merge weight tried costs more than %.1f points of validation utility; "
            "keeping the smallest, %g",
            100 * utility_margin,
            chosen,
        )
    return chosen, trials


def format_trials(trials: Sequence[MergeTrial], chosen: float, base: tuple[float, float]) -> str:
    """The console table of a merge-weight search (base row first, the chosen weight marked)."""
    lines = [
        "merge weight chosen on validation prompts (grpo_train split; the evaluation never sees "
        "them)",
        f"{'weight':>8}  {'unsafe (explicit)':>17}  {'utility':>8}  {'vs base':>8}",
        f"{'base':>8}  {100 * base[0]:16.1f}%  {100 * base[1]:7.1f}%  {'':>8}",
    ]
    for t in trials:
        mark = "  <- chosen" if t.weight == chosen else ""
        lines.append(
            f"{t.weight:8g}  {100 * t.unsafe_rate:16.1f}%  {100 * t.utility:7.1f}%  "
            f"{100 * t.utility_delta:+8.1f}{mark}"
        )
    return "\n".join(lines)
