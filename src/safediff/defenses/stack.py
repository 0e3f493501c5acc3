"""Composing defenses: a `DefenseStack` built from a spec string, applied to any `T2IModel`.

Spec: comma-separated `KIND:ARG[;key=value...]` items, e.g.

    des:/runs/des,safe-denoiser:/negsets/negset-1234.safetensors,sld:medium,negprompt:nudity

KIND          ARG                                   options (`;key=value`)
des           folder written by `safediff des train`  -
esd           folder written by `safediff esd train`  - (esd.py)
uce           concepts: text=A|B, a preset, FILE.txt  see uce.py (preserve=A|B, guide=...)
rece          as uce                                  see rece.py (rounds=...)
negprompt     preset ('nudity') or text=PROMPT       -
safree        concepts: text=A|B or a preset          see safree.py
sld           preset: weak | medium | strong | max   any SLDConfig field, e.g. sld_threshold=0.02
safe-denoiser a negation set .safetensors            preset=nudity|nudity-paper, any
                                                      SafeDenoiserConfig field, e.g. scale=0.5;
                                                      reference=SAFE.safetensors (gate=odds)

Each kind may appear once. Whatever the order in the spec, they are applied in one canonical
order (`KINDS`), because later ones depend on earlier ones:

1. des: the text encoder is swapped at the model level (`swap_text_encoder`), so every prompt
   below, and the caller's own prompts, are encoded by the defended encoder;
2. esd, uce, rece: the UNet's weights are replaced or edited (on a copy; uce and rece encode
   their concepts with the encoder of 1.);
3. negprompt: the CFG unconditional embeddings become the negative prompt's (encoded by 1.);
4. safree: the prompt embeddings are filtered away from the concept's subspace;
5. sld: a guidance hook on the CFG combination (its concept encoded by 1.);
6. safe-denoiser: a guidance hook on the final clean-sample estimate (after SLD).

`apply_defenses(model, stack)` returns the (possibly swapped) model and keyword arguments for
`safediff.sampling.rollout.rollout`: always "guidance" (a list, possibly empty) and, with a
negative prompt, "negative_embeds" ([1, L, D]; it replaces the caller's negative embeddings, so
merge as `{"negative_embeds": own, **rollout_kwargs}`). Negative prompts and SLD only act with
CFG (guidance_scale > 1); SLD raises without it. Any model works: a base model, a GRPO-trained
UNet, a model whose encoder is already DES-trained.

Model families: not every kind applies to every family (SD 1.x / sandbox, SDXL, SD3, FLUX); one
that does not (UCE / RECE on SD3 and FLUX, SAFREE beyond SD 1.x, SLD and negprompt on FLUX-dev) raises a one-line SafediffError saying why, when applied or when sampled.
The table, and the reasons, are in docs/results/defenses.md ("Which defense applies to which
model family"; tests/test_baselines_families.py checks every cell).
"""

import contextlib
import dataclasses
import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from safediff.defenses.negative_prompt import NegativePrompt
from safediff.defenses.safe_denoiser import (
    SAFE_DENOISER_PRESETS,
    NegationSet,
    SafeDenoiser,
    SafeDenoiserConfig,
)
from safediff.defenses.sld import SLD_PRESETS, SafeLatentDiffusion, SLDConfig
from safediff.defenses.text_encoder_adapter import swap_text_encoder
from safediff.errors import SafediffError
from safediff.models.base import T2IModel

KINDS = ("des", "esd", "uce", "rece", "negprompt", "safree", "sld", "safe-denoiser")
"""The defense kinds, in the order they are applied."""
_ALIASES = {
    "safe_denoiser": "safe-denoiser",
    "safedenoiser": "safe-denoiser",
    "negative-prompt": "negprompt",
    "negative_prompt": "negprompt",
}


@dataclass(frozen=True)
class DefenseSpec:
    """One defense: its kind (see KINDS), argument and `key=value` options (strings)."""

    kind: str
    arg: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "".join(f";{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{self.arg}{opts}"


def canonical_kind(name: str, context: str | None = None) -> str:
    """A defense kind's canonical name ('Negative_Prompt' -> 'negprompt'); SafediffError naming
    the kinds for an unknown one (`context`: the spec it came from, quoted in the error)."""
    kind = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if kind not in KINDS:
        where = f" in {context!r}" if context is not None else ""
        raise SafediffError(f"unknown defense kind {kind!r}{where}; kinds: {', '.join(KINDS)}")
    return kind


def parse_defense_spec(text: str) -> DefenseSpec:
    """'sld:medium;sld_threshold=0.02' -> DefenseSpec('sld', 'medium', {'sld_threshold': '0.02'})."""
    text = text.strip()
    if ":" not in text:
        raise SafediffError(
            f"defense {text!r} must look like KIND:ARG (kinds: {', '.join(KINDS)}), e.g. sld:medium"
        )
    kind, rest = text.split(":", 1)
    kind = canonical_kind(kind, context=text)
    arg, *opts = rest.split(";")
    options = {}
    for opt in opts:
        if "=" not in opt:
            raise SafediffError(f"defense option {opt!r} in {text!r} must look like key=value")
        key, value = opt.split("=", 1)
        options[key.strip()] = value.strip()
    if not arg.strip():
        raise SafediffError(f"defense {text!r} has an empty argument after '{kind}:'")
    return DefenseSpec(kind, arg.strip(), options)


@dataclass(frozen=True)
class DefenseStack:
    """An ordered set of defenses (at most one per kind), in canonical order."""

    specs: tuple[DefenseSpec, ...] = ()

    def __post_init__(self) -> None:
        kinds = [s.kind for s in self.specs]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise SafediffError(f"defense kind(s) {', '.join(dup)} given more than once")
        ordered = tuple(sorted(self.specs, key=lambda s: KINDS.index(s.kind)))
        object.__setattr__(self, "specs", ordered)

    @classmethod
    def parse(cls, text: str | None) -> "DefenseStack":
        """A stack from a comma-separated spec ('' or None: no defense)."""
        if not text or not text.strip():
            return cls()
        return cls(tuple(parse_defense_spec(item) for item in text.split(",") if item.strip()))

    def get(self, kind: str) -> DefenseSpec | None:
        return next((s for s in self.specs if s.kind == kind), None)

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.specs) or "none"


def with_options(cfg: Any, options: dict[str, str], what: str) -> Any:
    """dataclasses.replace(cfg, **options) with values parsed as YAML and type-checked (a
    tuple-typed field takes a YAML list; the config's own checks see its elements)."""
    if not options:
        return cfg
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, raw in options.items():
        if key not in names:
            raise SafediffError(
                f"unknown {what} option {key!r}; options: {', '.join(sorted(names))}"
            )
        value = yaml.safe_load(raw) if raw else ""
        tp = hints[key]
        if typing.get_origin(tp) is tuple:  # a YAML list, e.g. pairs=[[a, b], [c, d]]
            if not isinstance(value, list):
                raise SafediffError(f"{what} option {key}={raw!r} must be a YAML list ({tp})")
            changes[key] = _as_tuples(value)
            continue
        allowed = typing.get_args(tp) or (tp,)
        if isinstance(value, int) and not isinstance(value, bool) and float in allowed:
            value = float(value)
        if isinstance(value, str) and float in allowed:
            with contextlib.suppress(ValueError):  # YAML reads "3e-4" as a string
                value = float(value)
        if not isinstance(value, tuple(a for a in allowed if isinstance(a, type))):
            raise SafediffError(f"{what} option {key}={raw!r} has the wrong type (expected {tp})")
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def _as_tuples(value: Any) -> Any:
    """Nested YAML lists as nested tuples (frozen configs hold tuples)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def sld_config(spec: DefenseSpec) -> SLDConfig:
    if spec.arg not in SLD_PRESETS:
        raise SafediffError(
            f"unknown SLD preset {spec.arg!r}; presets: {', '.join(SLD_PRESETS)} (diffusers' SafetyConfig)"
        )
    return with_options(SLD_PRESETS[spec.arg], spec.options, "sld")


def safe_denoiser_files(spec: DefenseSpec) -> list[str]:
    """The files a safe-denoiser spec reads: its negation set and, if given, its reference set."""
    return [spec.arg] + ([spec.options["reference"]] if "reference" in spec.options else [])


def safe_denoiser_hook(spec: DefenseSpec, device: torch.device | str | None) -> SafeDenoiser:
    """The Safe Denoiser of a spec: its config, negation set and optional reference set."""
    reference = spec.options.get("reference")
    return SafeDenoiser(
        NegationSet.load(spec.arg),
        safe_denoiser_config(spec),
        device,
        reference=NegationSet.load(reference) if reference else None,
    )


def safe_denoiser_config(spec: DefenseSpec) -> SafeDenoiserConfig:
    """The SafeDenoiserConfig of a spec: its preset with its options (the reference file aside)."""
    options = dict(spec.options)
    options.pop("reference", None)
    preset = options.pop("preset", "nudity")
    if preset not in SAFE_DENOISER_PRESETS:
        raise SafediffError(
            f"unknown Safe Denoiser preset {preset!r}; presets: {', '.join(SAFE_DENOISER_PRESETS)}"
        )
    return with_options(SAFE_DENOISER_PRESETS[preset], options, "safe-denoiser")


Applier = Callable[[T2IModel, DefenseSpec, torch.device], tuple[T2IModel, dict[str, Any]]]
"""A defense's application: (model, spec, device) -> (defended model, sampling keyword arguments).
It never modifies the model it is given (weight edits work on a copy of the UNet)."""


def _apply_des(model: T2IModel, spec: DefenseSpec, device: torch.device):
    return swap_text_encoder(model, spec.arg), {}


def _apply_negprompt(model: T2IModel, spec: DefenseSpec, device: torch.device):
    return model, {"negative_embeds": NegativePrompt.from_spec(spec.arg).embeds(model, device)}


def _apply_sld(model: T2IModel, spec: DefenseSpec, device: torch.device):
    cfg = sld_config(spec)
    concept = model.encode_text([cfg.concept], device).to(torch.float32)
    return model, {"guidance": [SafeLatentDiffusion(concept, cfg)]}


def _apply_safe_denoiser(model: T2IModel, spec: DefenseSpec, device: torch.device):
    return model, {"guidance": [safe_denoiser_hook(spec, device)]}


APPLIERS: dict[str, Applier | str] = {
    "des": _apply_des,
    "esd": "safediff.defenses.esd:apply_esd",
    "uce": "safediff.defenses.uce:apply_uce",
    "rece": "safediff.defenses.rece:apply_rece",
    "negprompt": _apply_negprompt,
    "safree": "safediff.defenses.safree:apply_safree",
    "sld": _apply_sld,
    "safe-denoiser": _apply_safe_denoiser,
}
"""Each kind's applier, or "module:function" imported when first used (the baselines pull in
their own dependencies only when asked for)."""

_NO_OPTIONS = ("des", "esd", "negprompt")


def applier(kind: str) -> Applier:
    """The applier of a canonical kind."""
    entry = APPLIERS[kind]
    if isinstance(entry, str):
        module, name = entry.split(":")
        entry = getattr(importlib.import_module(module), name)
    return entry


def apply_defenses(
    model: T2IModel,
    stack: DefenseStack | str | None,
    device: torch.device | str | None = None,
) -> tuple[T2IModel, dict[str, Any]]:
    """Apply a defense stack: (defended model, keyword arguments for `rollout`).

    device: where embeddings and the negation set go (default: the UNet's device).
    The input model is not modified; the returned one shares its modules except those a defense
    replaced (a swapped text encoder, an edited copy of the UNet). Guidance hooks of successive
    defenses are chained in canonical order; any other sampling argument may come from one
    defense only.
    """
    if not isinstance(stack, DefenseStack):
        stack = DefenseStack.parse(stack)
    device = torch.device(device) if device is not None else next(model.unet.parameters()).device
    kwargs: dict[str, Any] = {"guidance": []}
    for spec in stack.specs:
        if spec.options and spec.kind in _NO_OPTIONS:
            raise SafediffError(f"defense {spec.kind} takes no options, got {spec}")
        model, extra = applier(spec.kind)(model, spec, device)
        for key, value in extra.items():
            if key == "guidance":
                kwargs["guidance"].extend(value)
            elif key in kwargs:
                raise SafediffError(
                    f"defense {spec.kind} sets the sampling argument {key!r}, which an earlier "
                    "defense of the stack already set; drop one of them"
                )
            else:
                kwargs[key] = value
    return model, kwargs
