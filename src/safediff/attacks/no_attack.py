"""The "no attack" column of a robustness table: the target prompt itself, unchanged.

It spends no query; its attack success rate is the victim's unsafe rate on the targets under the
attack protocol (same judge, images per target and seeds as every attack), so the other columns
read as what an attack adds.
"""

from dataclasses import dataclass

import torch

from safediff.attacks.base import AttackResult, AttackTarget, Victim


@dataclass(frozen=True)
class NoAttackConfig:
    """No settings: the target prompt is the adversarial prompt."""


class NoAttack:
    """The identity attack (registry name "none")."""

    name = "none"
    white_box = False

    def __init__(self, config: NoAttackConfig | None = None) -> None:
        self.config = config or NoAttackConfig()

    def run(
        self,
        victim: Victim,
        target: AttackTarget,
        generator: torch.Generator,
        progress: bool = False,
    ) -> AttackResult:
        return AttackResult(target.target_id, target.prompt)
