"""What every attack shares: a target, the victim it is pointed at, and its result.

An attack (DESIGN.md section 10) searches, within a stated budget, for an input that makes a
defended model produce an unsafe concept. It sees a `Victim` (the defended model, the sampling
arguments of its defense stack, the sampler, and for white-box attacks the undefended base model)
and one `AttackTarget`; it returns an `AttackResult`: the adversarial prompt (or, for embedding
attacks such as textual inversion, the conditioning itself) and what it spent. Whether the attack
succeeded is never decided here: the runner generates images from the result and a separate judge
(NudeNet, Q16, the sandbox detector) flags them.
"""

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from safediff.models.base import T2IModel
from safediff.sampling.sample import SamplerSettings


@dataclass(frozen=True)
class AttackTarget:
    """One target of an attack.

    target_id: unique within a target set (sanitised before it names a file).
    prompt: the unsafe prompt whose concept the attacker wants drawn.
    concept: what the prompt is about ("nudity", "weapon", ...), for per-concept tables.
    banned_words: words the adversarial prompt may not contain (compared case-insensitively, as
        whole words and as tokens of the attacked tokenizer); typically the concept's own words.
    seed: the target's seed (attack randomness and image seeds derive from it).
    """

    target_id: str
    prompt: str
    concept: str = ""
    banned_words: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class Victim:
    """What an attack is pointed at.

    model: the defended model (`safediff.defenses.stack.apply_defenses`' first result).
    defense: the sampling keyword arguments of its defense stack (`sample(..., defense=)`).
    settings: the sampler the victim generates images with.
    base: the undefended model (white-box attacks' reference: UnlearnDiffAtk's target image,
        P4D's teacher); None when not given.
    spec: the defense stack spec, for logs and results.
    """

    model: T2IModel
    defense: dict[str, Any]
    settings: SamplerSettings
    base: T2IModel | None = None
    spec: str = ""


@dataclass
class AttackResult:
    """What one attack found for one target.

    adversarial_prompt: the text fed to the victim (for an embedding attack, the prompt with its
        placeholder token, for display).
    prompt_embeds: [1, L, D] conditioning to sample with instead of encoding
        `adversarial_prompt` (embedding attacks such as textual inversion); None for text attacks.
    queries: victim queries spent (model or encoder calls counted as the attack's paper counts
        its budget); steps: optimisation or search steps; seconds: wall time.
    loss: the attack's final objective (lower is better for the attacker), None if it has none.
    info: JSON-able extras (loss history, candidates tried, SneakyPrompt's bypass/skip, ...).
    """

    target_id: str
    adversarial_prompt: str
    prompt_embeds: Tensor | None = None
    queries: int = 0
    steps: int = 0
    seconds: float = 0.0
    loss: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Attack(Protocol):
    """An attack: a config (frozen dataclass, the paper's defaults) and one method.

    name: the registry name ("ring-a-bell", ...). white_box: whether it needs gradients through
    the victim (then a victim without them is refused with a one-line error).
    """

    name: str
    white_box: bool

    def run(
        self,
        victim: Victim,
        target: AttackTarget,
        generator: torch.Generator,
        progress: bool = False,
    ) -> AttackResult:
        """Attack one target; all randomness from `generator`."""
        ...
