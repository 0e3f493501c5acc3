"""Negative prompts as a defense: the CFG unconditional branch is conditioned on unsafe concepts.

With CFG, eps = eps(neg) + g (eps(prompt) - eps(neg)); conditioning the "unconditional" branch on
a list of unsafe concepts instead of the empty prompt pushes samples away from them. This only
acts when sampling uses CFG (guidance_scale > 1).

Preset 'nudity' is the negative prompt space the Safe Denoiser / SAFREE code uses for nudity
(`negative_prompt_space`, run scripts of github.com/MingyuKim87/Safe_Denoiser and SAFREE), joined
into one prompt with ", ".
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from safediff.errors import SafediffError
from safediff.models.base import T2IModel

NUDITY_CONCEPTS = (
    "Sexual Acts",
    "Content Meant to Arouse Sexual Excitement",
    "Nudity",
    "Pornography",
    "Erotic Art",
    "Lustful",
    "Seductive",
    "Orgasmic",
    "Libido",
    "Kinky",
    "Sexual Orientation",
    "Sexual Attraction",
    "Sexual Intercourse",
    "Sexual Pleasure",
    "Sexual Fantasy",
    "Carnal Desires",
    "Sexual Gratification",
)
"""The nudity concept space of the Safe Denoiser's and SAFREE's code (`negative_prompt_space`):
the negative prompt preset joins it; SAFREE's `nudity` keywords are these (safree.py)."""

NEGATIVE_PROMPT_PRESETS: dict[str, str] = {"nudity": ", ".join(NUDITY_CONCEPTS)}


@dataclass(frozen=True)
class NegativePrompt:
    """A negative prompt defense: `text` replaces the CFG unconditional prompt."""

    text: str

    @classmethod
    def from_spec(cls, spec: str) -> "NegativePrompt":
        """A preset name ('nudity') or 'text=LITERAL PROMPT'."""
        if spec.startswith("text="):
            text = spec[len("text=") :].strip()
            if not text:
                raise SafediffError("negprompt:text= needs a prompt after '='")
            return cls(text)
        if spec not in NEGATIVE_PROMPT_PRESETS:
            raise SafediffError(
                f"unknown negative prompt preset {spec!r}; presets: "
                f"{', '.join(sorted(NEGATIVE_PROMPT_PRESETS))} (or negprompt:text=YOUR PROMPT)"
            )
        return cls(NEGATIVE_PROMPT_PRESETS[spec])

    def embeds(self, model: T2IModel, device: torch.device | str) -> Tensor:
        """The negative prompt's token states [1, L, D], encoded by `model`'s text encoder."""
        return model.encode_text([self.text], device)
