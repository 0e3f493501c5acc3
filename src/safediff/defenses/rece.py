"""RECE: UCE followed by rounds of closed-form adversarial embeddings, each erased in turn.

Paper: Gong, Chen, Wei, Chen & Jiang, "Reliable and Efficient Concept Erasure of Text-to-Image
Diffusion Models" (ECCV 2024); reference code github.com/CharlesGong12/RECE (train.py,
utils/embedding_calculation/close_form_emb.py, erase_methods/uce.py).

After a UCE edit (`safediff.defenses.uce`), the edited projections W_l (every cross-attention
to_k and to_v) may still map *some* embedding to what the original W_l^old made of the concept c.
RECE finds it in closed form, over all edited projections at once (one c' for the whole UNet):

    c' = argmin_x  sum_l ||W_l x - W_l^old c||^2 + reg ||x - a||^2
       = (sum_l W_l^T W_l + reg I)^-1 (sum_l W_l^T W_l^old c + reg a)      (`rece_embedding`)

row by row over the concept's L token rows (the full prompt encoding, start and padding rows
included, as the reference's close_form_emb does). The anchor a is 0 (the reference's
"close_regzero", its README's choice for nudity) or the guide's encoding ("close_standardreg").
Then c' is erased like a concept: UCE's closed form on the *current* weights, with c' [L, D] as
the erased rows, the guide's full encoding through the current weights as their targets, and
the preserved concepts' rows (erase_methods/uce.py, `edit_model_adversarial`). `rounds` times.

Defaults are the reference README's nudity run: UCE stage as `safediff.defenses.uce` (lamb 0.5,
erase_scale 1), then rounds 3, reg 0.1, round_lamb 0.1, preserve_scale 0.1.

Departures from the reference: the reference keeps the round with the lowest NudeNet / Q16 rate
on a validation prompt set (model selection by an evaluation run); this runs exactly `rounds`
rounds with no selection (pick `rounds` by evaluation yourself). The reference samples a random
subset of the preserved concepts (as many as erased ones) per run; here all preserved concepts
enter. Its "surrogate" regularisation and gradient-descent variants are left out. Rows are taken
in the key/value projections' input space as in uce.py (after the sandbox's encoder_hid_proj;
SDXL's packed row dropped), so c' is an input of the projections, not a text-encoder state.
Solves are in float64.

Model families: as uce.py (SD 1.x/2.x, the sandbox, SDXL; SD3 / FLUX refused there: their
joint attention has no key/value projection whose inputs a prompt fixes, so neither UCE's edit
nor RECE's closed-form embedding is defined).

Give `preserve`: each round erases c' over all L rows (start and padding rows too), which
also moves what every prompt shares; on the sandbox, RECE with only the empty prompt kept cost
about 35 points of utility, with the six shape words kept about 10 (UCE: none).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from safediff.defenses.uce import (
    EditRows,
    check_concepts,
    check_scales,
    concepts_from_arg,
    cross_attention_layers,
    edit_projections,
    edited_copy,
    guides_for,
    key_value_inputs,
    projection_pairs,
    split_list,
    uce_rows,
)
from safediff.errors import SafediffError
from safediff.models.base import T2IModel

ANCHORS = ("zero", "guide")


@dataclass(frozen=True)
class RECEConfig:
    """RECE's options (`rece:ARG;key=value`); defaults: the reference README's nudity run."""

    preserve: str = ""
    """Concepts to keep, separated by '|'; '' keeps only the empty prompt (as UCE)."""
    guide: str = ""
    """Target concept(s), '|'-separated: one for all, or one per erased concept; '' = erase."""
    erase_scale: float = 1.0
    """s_e >= 0: weight of the erased rows (UCE stage and rounds)."""
    preserve_scale: float = 0.1
    """s_p >= 0: weight of the preserved concepts' rows (UCE stage and rounds)."""
    lamb: float = 0.5
    """lamb > 0: the UCE stage's ridge term (uce.py)."""
    rounds: int = 3
    """Adversarial rounds after UCE, >= 0 (0 = plain UCE); the reference's --epochs."""
    reg: float = 0.1
    """reg > 0: the regulariser of the adversarial embedding (--regular_scale)."""
    round_lamb: float = 0.1
    """lamb > 0 of each round's edit (--lamb)."""
    anchor: str = "zero"
    """What reg pulls c' towards: 'zero' (close_regzero) or 'guide' (close_standardreg)."""

    def __post_init__(self) -> None:
        check_scales("rece", self.erase_scale, self.preserve_scale, self.lamb)
        check_scales("rece", self.erase_scale, self.preserve_scale, self.round_lamb)
        if self.rounds < 0:
            raise SafediffError("rece: rounds must be >= 0")
        if self.reg <= 0:
            raise SafediffError("rece: reg must be > 0 (it keeps the embedding's solve regular)")
        if self.anchor not in ANCHORS:
            raise SafediffError(f"rece: anchor must be one of {', '.join(ANCHORS)}")


def rece_embedding(
    current: Sequence[Tensor],
    original: Sequence[Tensor],
    concept: Tensor,
    reg: float,
    anchor: Tensor | None = None,
) -> Tensor:
    """The adversarial embedding (the paper's closed form; the reference's close_form_emb).

    current: edited weights W_l [O_l, D]; original: W_l^old [O_l, D], paired; concept: c [L, D]
    (rows); anchor: a [L, D] or None (= 0). Returns c' [L, D] in float32:
    (sum W_l^T W_l + reg I)^-1 (sum W_l^T W_l^old c + reg a), row by row, solved in float64.
    """
    if len(current) != len(original) or not current:
        raise SafediffError("rece_embedding needs as many original as current weights (>= 1)")
    dev = current[0].device
    d = current[0].shape[1]
    gram = reg * torch.eye(d, dtype=torch.float64, device=dev)
    cross = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for w, w_old in zip(current, original, strict=True):
        w = w.detach().to(dev, torch.float64)
        gram += w.T @ w
        cross += w.T @ w_old.detach().to(dev, torch.float64)
    rhs = cross @ concept.detach().to(dev, torch.float64).T  # [D, L]
    if anchor is not None:
        rhs = rhs + reg * anchor.detach().to(dev, torch.float64).T
    return torch.linalg.solve(gram, rhs).T.to(torch.float32)


def rece_edit(
    model: T2IModel,
    concepts: Sequence[str],
    cfg: RECEConfig = RECEConfig(),
    device: torch.device | str | None = None,
) -> T2IModel:
    """The RECE-edited model: UCE of `concepts`, then cfg.rounds adversarial rounds.

    The input model is not modified; the result has a new UNet and shares every other part.
    """
    cross_attention_layers(model)
    check_concepts(model, concepts, "rece")
    if device is None:
        device = next(model.unet.parameters()).device
    guides = guides_for(concepts, cfg.guide)
    preserve = split_list(cfg.preserve)
    rows = uce_rows(model, concepts, guides, preserve, device)
    out = edited_copy(model, f"rece({'|'.join(concepts)}; {cfg.rounds} rounds)")
    edit_projections(out.unet, rows, cfg.erase_scale, cfg.preserve_scale, cfg.lamb)

    original = [p.weight.detach().clone() for _, p in projection_pairs(model.unet)]
    full = key_value_inputs(model, list(concepts), device)  # [N, L, D], all rows
    targets = key_value_inputs(model, guides, device)  # [N, L, D]
    anchors = targets if cfg.anchor == "guide" else [None] * len(concepts)
    for _ in range(cfg.rounds):
        current = [p.weight for _, p in projection_pairs(out.unet)]
        adv = [
            rece_embedding(current, original, c, cfg.reg, a)
            for c, a in zip(full, anchors, strict=True)
        ]
        round_rows = EditRows(torch.cat(adv), targets.reshape(-1, targets.shape[-1]), rows.preserve)
        edit_projections(out.unet, round_rows, cfg.erase_scale, cfg.preserve_scale, cfg.round_lamb)
    return out


def apply_rece(
    model: T2IModel, spec: Any, device: torch.device | str | None
) -> tuple[T2IModel, dict[str, Any]]:
    """The stack's entry: `rece:ARG;key=value` (a DefenseSpec) -> (edited model, {}).

    ARG: as uce (text=A|B|C, a preset, FILE.txt); options: RECEConfig's fields.
    """
    from safediff.defenses.stack import with_options

    cfg = with_options(RECEConfig(), spec.options, "rece")
    return rece_edit(model, concepts_from_arg(spec.arg, "rece"), cfg, device), {}
