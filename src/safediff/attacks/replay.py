"""Replaying another run's adversarial prompts against a new victim (transfer).

Black-box prompt attacks are evaluated this way in their papers: Ring-A-Bell's and
MMA-Diffusion's prompts are searched once against one text encoder, then fed to every defended
model. `replay` reads the adversarial prompt (and, for embedding attacks, the saved
`prompt_embeds`) of each target from a finished `safediff attack` run folder and returns it
unchanged; the runner then generates and judges as for any attack. A target missing from the
source run is a one-line error naming it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from safediff.attacks.base import AttackResult, AttackTarget, Victim
from safediff.attacks.targets import safe_id
from safediff.errors import SafediffError


@dataclass(frozen=True)
class ReplayConfig:
    """source: a `safediff attack` output folder (its targets/<id>.json are read)."""

    source: str = ""

    def __post_init__(self) -> None:
        if not self.source:
            raise SafediffError("attack replay needs source=FOLDER (a `safediff attack` --out)")


class ReplayAttack:
    """Registry name "replay": the adversarial prompt another run found for the same target."""

    name = "replay"
    white_box = False

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self.folder = Path(config.source).expanduser() / "targets"
        if not self.folder.is_dir():
            raise SafediffError(
                f"attack replay: {self.folder} not found; source= must be a `safediff attack` "
                "output folder"
            )

    def run(
        self,
        victim: Victim,
        target: AttackTarget,
        generator: torch.Generator,
        progress: bool = False,
    ) -> AttackResult:
        stem = safe_id(target.target_id)
        path = self.folder / f"{stem}.json"
        if not path.is_file():
            raise SafediffError(
                f"attack replay: target {target.target_id!r} is not in {self.folder} (run the "
                "source attack on the same targets first)"
            )
        record = json.loads(path.read_text(encoding="utf-8"))
        embeds = None
        if record.get("prompt_embeds"):
            embeds = load_file(str(self.folder / record["prompt_embeds"]))["prompt_embeds"]
        return AttackResult(
            target.target_id,
            record["adversarial_prompt"],
            prompt_embeds=embeds,
            info={"source_attack": record.get("key", {}).get("attack", "")},
        )
