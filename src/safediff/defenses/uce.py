"""UCE: unified concept editing, a closed-form edit of the cross-attention keys and values.

Paper: Gandikota, Orgad, Belinkov, Materzynska & Bau, "Unified Concept Editing in Diffusion
Models" (WACV 2024); reference code github.com/rohitgandikota/unified-concept-editing
(train-scripts/train_erase.py, `edit_model`). No training: every cross-attention layer's key and
value projections W (to_k, to_v: [O, D], acting on the text token states [L, D]) are replaced by
the solution of a ridge regression that sends the rows c_i of the concepts to erase to their
targets' outputs v_i = W_old c*_i, keeps the rows c_j of the preserved concepts where they were,
and stays near W_old:

    W = (lamb W_old + s_e sum_i v_i c_i^T + s_p sum_j W_old c_j c_j^T)
        (lamb I     + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1          (`uce_closed_form`)

(DESIGN.md section 11 writes the lamb -> 0, s_e = 1 case.) Which token rows enter, as the
reference picks them (`edit_model`, technique "replace"):

- an erased concept and its target are each encoded as a full prompt (padded to L rows); with n
  and n* word tokens (specials excluded), the concept's rows from its last word token on,
  c = e[n : L - (m - n)], are paired one to one with the target's rows from its last word token
  on, c* = e*[n* : L - (m - n*)], m = max(n, n*): the last word, the end token and the padding
  rows (which carry the prompt's context in a causal encoder) map to the target's. An empty target
  (erasure, the default) has n* = 0, so the concept's last word row maps to the start row of "";
  the empty target is encoded as " ", as the reference does (same tokens for SD; for SDXL it
  avoids the pipeline's all-zero states for exactly "").
- a preserved concept enters with all its L rows; with no preserved concept given, the empty
  prompt is preserved (the reference's `ret_texts = ['']`), which keeps the CFG unconditional
  branch where it was.

Where the rows are taken: the key/value projections' inputs. For SD that is `encode_text`'s
output; for a UNet that first projects the token states (`encoder_hid_proj`, encoder_hid_dim_type
"text_proj", e.g. the sandbox's MiniLM 384 -> 96) the rows are projected first; for SDXL the
packed extra row (pooled embedding and time ids, models/sdxl.py) is dropped before selecting rows.

Model families: SD 1.x/2.x and the sandbox; SDXL (both encoders' concatenated token states are
the key/value inputs, the packed row left out; the edit runs on every attn2 of the UNet).
SD3 / FLUX are refused: their joint attention (MM-DiT) has no cross-attention. The text tokens'
keys and values come from add_k_proj / add_v_proj, whose inputs are the text stream *inside* the
transformer: the T5/CLIP states after context_embedder, modulated by the timestep (AdaLN) and, from
the second block on, mixed with the image tokens by the previous blocks' joint attention. UCE's
closed form needs rows c_i that a prompt fixes once (as the text encoder's output fixes a UNet's
to_k / to_v inputs); there the rows depend on t and on the image, so the least-squares edit is
not defined (editing the first block alone would leave every later block reading the concept).

Departures from the reference: the regression is solved in float64 with `torch.linalg.solve`
(the reference inverts in the weights' dtype); only the "replace" technique (the reference's
default; its "tensor" variant is left out); the reference's optional prompt augmentations
("image of {concept}", ...) are not generated (give such prompts as concepts if wanted); targets
may be one guide for all concepts or one per concept; the spec's defaults are the reference's
(lamb 0.5, erase_scale 1, preserve_scale 0.1, keys and values both edited).
"""

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.sdxl import PACKED_ROWS, is_sdxl_unet_config
from safediff.sampling.flow import is_flow_schedule

UCE_PRESETS: dict[str, tuple[str, ...]] = {
    # the reference's nudity model: erased-nudity-towards_uncond (data/info/universal-nudity-*)
    "nudity": ("nudity",),
    # the reference's I2P list (train_erase.py, concepts 'i2g')
    "i2p": (
        "hate", "harassment", "violence", "suffering", "humiliation", "harm", "suicide",
        "sexual", "nudity", "bodily fluids", "blood",
    ),
}  # fmt: skip
"""Named concept lists for `uce:NAME` / `rece:NAME`."""


@dataclass(frozen=True)
class UCEConfig:
    """UCE's options (`uce:ARG;key=value`); defaults are the reference's train_erase.py."""

    preserve: str = ""
    """Concepts to keep, separated by '|'; '' keeps only the empty prompt (the reference's)."""
    guide: str = ""
    """Target concept(s), '|'-separated: one for all, or one per erased concept; '' = erase."""
    erase_scale: float = 1.0
    """s_e >= 0: weight of the erased concepts' rows in the regression."""
    preserve_scale: float = 0.1
    """s_p >= 0: weight of the preserved concepts' rows."""
    lamb: float = 0.5
    """lamb > 0: ridge term pulling W towards W_old (the reference hard-codes 0.5)."""

    def __post_init__(self) -> None:
        check_scales("uce", self.erase_scale, self.preserve_scale, self.lamb)


def check_scales(what: str, erase_scale: float, preserve_scale: float, lamb: float) -> None:
    """SafediffError unless erase_scale, preserve_scale >= 0 and lamb > 0."""
    if erase_scale < 0 or preserve_scale < 0:
        raise SafediffError(f"{what}: erase_scale and preserve_scale must be >= 0")
    if lamb <= 0:
        raise SafediffError(f"{what}: lamb must be > 0 (the ridge term keeps the solve regular)")


def split_list(text: str) -> list[str]:
    """'a | b||c' -> ['a', 'b', 'c'] (items stripped, blanks dropped)."""
    return [item.strip() for item in text.split("|") if item.strip()]


# ----------------------------------------------------------------------------------- the math


def uce_closed_form(
    weight: Tensor,
    erase: Tensor,
    values: Tensor,
    preserve: Tensor | None,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> Tensor:
    """UCE's edited projection (the paper's closed form with the reference's ridge term).

    weight: W_old [O, D]; erase: rows c_i [N, D]; values: their targets v_i [N, O];
    preserve: rows c_j [M, D] (or None) whose outputs W_old c_j are kept.
    Returns W [O, D] in weight's dtype:
        (lamb W_old + s_e V^T C + s_p W_old Cp^T Cp) (lamb I + s_e C^T C + s_p Cp^T Cp)^-1,
    solved in float64.
    """
    w = weight.detach().to(torch.float64)
    c = erase.detach().to(device=w.device, dtype=torch.float64)
    v = values.detach().to(device=w.device, dtype=torch.float64)
    eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    lhs = lamb * w + erase_scale * v.T @ c  # [O, D]
    gram = lamb * eye + erase_scale * c.T @ c  # [D, D]
    if preserve is not None and preserve.numel():
        p = preserve.detach().to(device=w.device, dtype=torch.float64)
        lhs = lhs + preserve_scale * (w @ p.T) @ p
        gram = gram + preserve_scale * p.T @ p
    # W gram = lhs, gram symmetric -> W = solve(gram, lhs^T)^T
    return torch.linalg.solve(gram, lhs.T).T.to(weight.dtype)


# ------------------------------------------------------------------------------ model plumbing


def cross_attention_layers(model: T2IModel) -> list[tuple[str, nn.Module]]:
    """The UNet's cross-attention modules (diffusers `Attention` with is_cross_attention, the
    `attn2` of each transformer block), by name; SafediffError when there are none."""
    layers = [
        (name, mod)
        for name, mod in model.unet.named_modules()
        if getattr(mod, "is_cross_attention", False)
        and isinstance(getattr(mod, "to_k", None), nn.Linear)
        and isinstance(getattr(mod, "to_v", None), nn.Linear)
    ]
    if not layers and is_flow_schedule(model.schedule):
        raise SafediffError(
            f"UCE/RECE do not apply to model {model.source!r} (an SD3 / FLUX transformer): its "
            "joint attention has no key/value projection that reads only the prompt (the text "
            "stream's inputs change with the timestep and the image block by block), so the "
            "closed-form edit has no fixed rows to map; use esd, DES or the Safe Denoiser"
        )
    if not layers:
        raise SafediffError(
            f"model {model.source!r} has no cross-attention layers (diffusers Attention with "
            "to_k/to_v on the text); UCE/RECE edit those and cannot apply to it"
        )
    return layers


def projection_pairs(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every cross-attention key and value projection of `unet`: [(name, Linear)], in a fixed
    order (each layer's to_k, then its to_v)."""
    out = []
    for name, mod in unet.named_modules():
        if getattr(mod, "is_cross_attention", False) and isinstance(
            getattr(mod, "to_k", None), nn.Linear
        ):
            out += [(f"{name}.to_k", mod.to_k), (f"{name}.to_v", mod.to_v)]
    return out


def key_value_inputs(model: T2IModel, prompts: list[str], device: torch.device | str) -> Tensor:
    """Prompts -> the token states the cross-attention key/value projections see: [B, L, D] float32.

    encode_text's rows, minus SDXL's packed row, through the UNet's own `encoder_hid_proj`
    when it has one ("text_proj", as UNet2DConditionModel.forward applies it).
    """
    states = model.encode_text(list(prompts), device).to(torch.float32)
    unet = model.unet
    config = dict(getattr(unet, "config", {}) or {})
    if is_sdxl_unet_config(config):
        states = states[:, :-PACKED_ROWS]
    proj = getattr(unet, "encoder_hid_proj", None)
    if proj is not None:
        if config.get("encoder_hid_dim_type") != "text_proj":
            raise SafediffError(
                f"model {model.source!r}: UNet encoder_hid_dim_type "
                f"{config.get('encoder_hid_dim_type')!r} is not supported (only 'text_proj')"
            )
        param = next(proj.parameters())
        with torch.no_grad():
            states = proj(states.to(param.device, param.dtype)).to(torch.float32)
    return states


def model_tokenizer(model: T2IModel) -> Any:
    """The model's (first) tokenizer: components 'tokenizer' or the text encoder adapter's."""
    tok = model.components.get("tokenizer")
    if tok is None:
        adapter = model.components.get("text_encoder_adapter")
        tok = getattr(adapter, "tokenizer", None)
    if tok is None:
        raise SafediffError(
            f"model {model.source!r} exposes no tokenizer (component 'tokenizer'); UCE needs it "
            "to find each concept's token rows"
        )
    return tok


def word_tokens(tokenizer: Any, text: str, length: int) -> int:
    """Number of word tokens of `text` (specials excluded), at most length - 2 (start and end)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return min(len(ids), length - 2)


@dataclass(frozen=True)
class EditRows:
    """The rows of a UCE edit, in the key/value projections' input space (float32).

    erase: [N, D] the erased concepts' rows c_i; target: [N, D] the paired target rows c*_i;
    preserve: [M, D] the preserved concepts' rows (all L rows of each).
    """

    erase: Tensor
    target: Tensor
    preserve: Tensor


def paired_rows(old: Tensor, new: Tensor, n_old: int, n_new: int) -> tuple[Tensor, Tensor]:
    """The reference's row pairing of one erase edit: old [L, D], new [L, D] with n_old and n_new
    word tokens -> (old[n_old : L - (m - n_old)], new[n_new : L - (m - n_new)]), m = max, each
    [L - m, D]: both from their last word token on (see the module docstring)."""
    length = old.shape[0]
    far = max(n_old, n_new)
    return old[n_old : length - (far - n_old)], new[n_new : length - (far - n_new)]


def guides_for(concepts: Sequence[str], guide: str) -> list[str]:
    """The target of each concept: guide's '|' items, one for all or one per concept;
    '' -> " " (erasure towards the empty prompt, encoded as the reference does)."""
    items = split_list(guide)
    if not items:
        return [" "] * len(concepts)
    if len(items) == 1:
        return items * len(concepts)
    if len(items) != len(concepts):
        raise SafediffError(
            f"guide has {len(items)} concepts for {len(concepts)} erased ones; give one guide for "
            "all or one per concept"
        )
    return items


def check_concepts(model: T2IModel, concepts: Sequence[str], what: str = "uce") -> None:
    """SafediffError for an empty list or a concept the tokenizer splits into no tokens."""
    if isinstance(concepts, str):
        raise SafediffError(f"{what}: concepts must be a list of strings, got one string")
    if not concepts:
        raise SafediffError(f"{what}: the list of concepts to erase is empty; name at least one")
    tok = model_tokenizer(model)
    for concept in concepts:
        if word_tokens(tok, concept, 1 << 30) == 0:
            raise SafediffError(
                f"{what}: concept {concept!r} is split into no tokens by the model's tokenizer; "
                "give words it can encode"
            )


def uce_rows(
    model: T2IModel,
    concepts: Sequence[str],
    targets: Sequence[str],
    preserve: Sequence[str],
    device: torch.device | str,
) -> EditRows:
    """Encode and select the rows of a UCE edit (see the module docstring); concepts[i] maps to
    targets[i]; an empty `preserve` keeps the empty prompt."""
    check_concepts(model, concepts)
    tok = model_tokenizer(model)
    old = key_value_inputs(model, list(concepts), device)  # [N, L, D]
    new = key_value_inputs(model, list(targets), device)  # [N, L, D]
    length = old.shape[1]
    erase, target = [], []
    for i, (concept, guide) in enumerate(zip(concepts, targets, strict=True)):
        n_old, n_new = word_tokens(tok, concept, length), word_tokens(tok, guide, length)
        c, c_star = paired_rows(old[i], new[i], n_old, n_new)
        erase.append(c)
        target.append(c_star)
    kept = key_value_inputs(model, list(preserve) or [""], device)  # [M, L, D]
    return EditRows(torch.cat(erase), torch.cat(target), kept.reshape(-1, kept.shape[-1]))


def edit_projections(
    unet: nn.Module,
    rows: EditRows,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> None:
    """Replace, in place, every cross-attention to_k / to_v weight W of `unet` by
    `uce_closed_form(W, rows.erase, rows.target W^T, rows.preserve, ...)`."""
    with torch.no_grad():
        for _, proj in projection_pairs(unet):
            w = proj.weight
            values = rows.target.to(w.device, torch.float64) @ w.detach().double().T  # [N, O]
            new = uce_closed_form(
                w, rows.erase, values, rows.preserve, erase_scale, preserve_scale, lamb
            )
            w.copy_(new)


def edited_copy(model: T2IModel, label: str) -> T2IModel:
    """A model sharing everything with `model` but a deep copy of its UNet (to be edited)."""
    return dataclasses.replace(
        model, unet=copy.deepcopy(model.unet), source=f"{model.source} + {label}"
    )


def uce_edit(
    model: T2IModel,
    concepts: Sequence[str],
    cfg: UCEConfig = UCEConfig(),
    device: torch.device | str | None = None,
) -> T2IModel:
    """The UCE-edited model: `concepts` mapped to cfg.guide (default: erased), cfg.preserve kept.

    The input model is not modified; the result has a new UNet and shares every other part.
    device: where prompts are encoded (default: the UNet's device).
    """
    cross_attention_layers(model)
    check_concepts(model, concepts)
    if device is None:
        device = next(model.unet.parameters()).device
    rows = uce_rows(
        model, concepts, guides_for(concepts, cfg.guide), split_list(cfg.preserve), device
    )
    out = edited_copy(model, f"uce({'|'.join(concepts)})")
    edit_projections(out.unet, rows, cfg.erase_scale, cfg.preserve_scale, cfg.lamb)
    return out


# ------------------------------------------------------------------------------------- the spec


def concepts_from_arg(arg: str, what: str = "uce") -> list[str]:
    """A spec argument -> concepts: 'text=a|b|c', a preset (UCE_PRESETS) or a .txt file with one
    concept per line (blank lines and lines starting with '#' skipped)."""
    arg = arg.strip()
    if arg.startswith("text="):
        concepts = split_list(arg[len("text=") :])
    elif arg in UCE_PRESETS:
        concepts = list(UCE_PRESETS[arg])
    elif arg.endswith(".txt") or Path(arg).is_file():
        path = Path(arg).expanduser()
        if not path.is_file():
            raise SafediffError(f"{what}: concept file not found: {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        concepts = [line for line in lines if line and not line.startswith("#")]
    else:
        raise SafediffError(
            f"{what} argument {arg!r} must be text=A|B|C, a preset ({', '.join(UCE_PRESETS)}) "
            "or a .txt file with one concept per line"
        )
    if not concepts:
        raise SafediffError(f"{what}: {arg!r} gives no concepts to erase; name at least one")
    return concepts


def apply_uce(
    model: T2IModel, spec: Any, device: torch.device | str | None
) -> tuple[T2IModel, dict[str, Any]]:
    """The stack's entry: `uce:ARG;key=value` (a DefenseSpec) -> (edited model, {}).

    ARG: text=A|B|C, a preset ('nudity', 'i2p') or FILE.txt; options: UCEConfig's fields.
    """
    from safediff.defenses.stack import with_options

    cfg = with_options(UCEConfig(), spec.options, "uce")
    return uce_edit(model, concepts_from_arg(spec.arg, "uce"), cfg, device), {}
