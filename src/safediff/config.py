"""Typed run configuration: frozen dataclasses, YAML presets, dotted command-line overrides.

A config is built as: dataclass defaults <- preset YAML (optional) <- overrides `a.b=value`
(values parsed as YAML scalars/lists). Unknown keys and wrongly typed values are errors that name
the key and list the valid ones. The resolved config is written as `config.yaml` beside every
run's outputs, and loading that file gives the same config back.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from safediff.errors import SafediffError
from safediff.rl.lr_schedule import LR_SCHEDULES


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str = "tiny-sd"
    """Base model: 'tiny-sd' (built offline), a local diffusers folder, or a hub id."""
    unet_weights: str | None = None
    """Optional bare UNet .safetensors (e.g. checkpoint_epoch_N/diffusion_pytorch_model.safetensors)
    swapped into the base pipeline."""
    lora_weights: str | None = None
    """Optional peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g. a
    trainer checkpoint's lora/), merged into the UNet after `unet_weights` is applied."""
    revision: str | None = None
    """Hub revision of `pretrained` (ignored for folders)."""
    resolution: int | None = None
    """Image size in pixels; None keeps the model's default (UNet sample_size x VAE factor)."""


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = 50
    """DDIM steps per rollout."""
    eta: float = 1.0
    """DDIM stochasticity; training needs eta > 0 (a deterministic step has no log-prob)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale; 1.0 turns CFG off."""
    negative_prompt: str = ""
    """Unconditional prompt for CFG (the reference uses the empty prompt)."""
    rollout_batch_size: int = 8
    """Samples denoised together in one UNet call during rollouts (memory knob only)."""
    shared_noise: bool = False
    """Reference quirk: one noise tensor shared by every sample of a rollout batch."""


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 16
    """K: samples per prompt. Advantages are normalised within each group."""
    samples_per_process: int = 64
    """Samples each process generates per epoch; groups may span processes."""
    adv_clip: float = 2.5
    """A_max: advantages are clipped to [-A_max, A_max]."""
    adv_eps: float = 1e-4
    """Added to the std before dividing."""
    adv_scale: str = "group"
    """What the advantages are divided by: 'group' (GRPO's: each group's own reward std) or
    'pooled' (one within-group std pooled over the epoch's groups, so a group whose rewards differ
    by little gets small advantages instead of unit-spread ones)."""
    clip_range: float = 1e-4
    """PPO clip c on the ratio of per-element *mean* log-probs (see logprob_reduction)."""
    logprob_reduction: str = "mean"
    """'mean' (the reference's: c bounds the geometric-mean per-element ratio) or 'sum' (the true
    log-density of the whole latent; use a far larger c)."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference policy (0 turns it off and skips the reference pass)."""
    kl_scope: str = "all"
    """Which samples the KL term holds: 'all', or 'unsteered': each sample's KL is weighted by
    1 - w, w the reward's gate weight for its prompt (a reward with `prompt_targets`, i.e. the
    steering reward), so prompts the reward leaves unsteered stay near the reference while
    steered ones move freely."""
    pg_scope: str = "all"
    """Which samples the policy-gradient term trains: 'all' (GRPO's), or 'steered': each sample's
    advantage is multiplied by w, the reward's gate weight for its prompt (as for kl_scope), so
    prompts the reward does not steer get no policy gradient and, with kl_scope 'unsteered', are
    held by the KL term alone. A departure from the method, which also trains safe prompts on the
    plain alignment reward: where that reward is noise to the model (the sandbox's CLIP), its
    policy gradient is drift."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's denoising steps that are trained, drawn per sample."""
    train_last_step: bool = True
    """Reference quirk when False: the last denoising step is never trained."""
    min_step_std: float = 0.0
    """Steps whose sampling std sigma_t(eta) is at most this are not trained (nor KL-penalised).
    A deterministic step (std 0) never is. A near-deterministic last step (e.g. std 0.009 in the
    sandbox's 10-step schedule) has log-prob ratios and KL terms that explode for any change of its
    mean, so they drown the other steps' gradient after norm clipping."""
    train_cfg: bool = True
    """Recompute log-probs with CFG during training (as sampled). False trains the conditional
    branch alone."""
    inner_epochs: int = 1
    """Passes over each epoch's stored trajectories."""
    micro_batch: int = 8
    """Transitions (sample, timestep) per forward/backward pass."""
    grad_accum: int = 0
    """Micro-batches per optimizer step; 0 = one optimizer step per inner epoch."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 turns it off."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    lr_schedule: str = "constant"
    """'constant', or 'linear': epoch e of run.epochs trains at lr + (lr_final - lr) * e /
    run.epochs (set once per epoch; a run that uses it cannot be resumed with other run.epochs)."""
    lr_final: float = 0.0
    """Where the 'linear' schedule heads (the last epoch stops one epoch's step short of it)."""
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-4
    eps: float = 1e-8


@dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = False
    """Train a peft LoRA adapter on the UNet instead of every weight."""
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass(frozen=True)
class RewardConfig:
    name: str = "brightness"
    """Reward plug-in name (see safediff.rewards.registry)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward's builder; unknown ones are errors."""


@dataclass(frozen=True)
class PromptsConfig:
    file: str = "builtin:smoke"
    """Training prompts: a text file (one per line), a CSV with a 'prompt' column, or
    'builtin:NAME' for a prompt list shipped with safediff."""
    stratify: bool = False
    """Draw each epoch's prompts kind by kind, in the prompt list's own kind shares (a CSV's
    'kind' column; sandbox splits carry one), so every epoch holds the same mix of kinds at every
    seed; prompts within a kind are still drawn uniformly. False: uniform draws, whose mix of
    kinds varies from epoch to epoch and seed to seed."""
    stratify_by: str = "kind"
    """What `stratify` keeps in its shares: 'kind', or 'kind_family': each (kind, family) pair,
    the family being a sandbox caption's concept family or a CSV's categories, so each unsafe
    family also gets its share of every kind's prompts (prompts without a family stratify by
    kind alone)."""


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/safediff"
    """Everything the run writes goes under this folder."""
    seed: int = 0
    """Base seed; every draw derives its own seed from it (epoch, sample, ...)."""
    epochs: int = 300
    stop_after_epochs: int | None = None
    """End this session after this many epochs (e.g. a time-limited job slot); resume later."""
    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16' (autocast via accelerate)."""
    gradient_checkpointing: bool = False
    save_every: int = 10
    """Checkpoint every N epochs (the last epoch is always saved)."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted."""
    log_with: str = "auto"
    """'auto' (tensorboard when installed), 'tensorboard', 'wandb' or 'none'."""
    num_processes: int | None = None
    """World size the preset was tuned for; a different one is allowed but logged."""
    merge_weight: float = 1.0
    """The run's final model is base + merge_weight * (trained - base) (weight interpolation,
    `safediff.models.interpolate`), written to `merged/unet` when it is not 1; checkpoints keep
    the trained weights, so a finished run can be merged again with another weight."""


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks, each with a message that names the fields."""
    checks = [
        (cfg.sampling.num_steps >= 1, "sampling.num_steps must be >= 1"),
        (cfg.sampling.eta > 0, "sampling.eta must be > 0 for GRPO (eta = 0 has no log-prob)"),
        (cfg.sampling.guidance_scale >= 1.0, "sampling.guidance_scale must be >= 1.0"),
        (cfg.sampling.rollout_batch_size >= 1, "sampling.rollout_batch_size must be >= 1"),
        (cfg.grpo.group_size >= 2, "grpo.group_size must be >= 2 (a group of 1 has no spread)"),
        (cfg.grpo.samples_per_process >= 1, "grpo.samples_per_process must be >= 1"),
        (cfg.grpo.adv_clip > 0, "grpo.adv_clip must be > 0"),
        (
            cfg.grpo.adv_scale in ("group", "pooled"),
            "grpo.adv_scale must be 'group' or 'pooled'",
        ),
        (cfg.grpo.clip_range > 0, "grpo.clip_range must be > 0"),
        (
            cfg.optim.lr_schedule in LR_SCHEDULES,
            f"optim.lr_schedule must be one of {LR_SCHEDULES}",
        ),
        (cfg.optim.lr_final >= 0, "optim.lr_final must be >= 0"),
        (
            math.isfinite(cfg.run.merge_weight) and cfg.run.merge_weight >= 0,
            "run.merge_weight must be finite and >= 0 (1 keeps the trained weights)",
        ),
        (
            cfg.prompts.stratify_by in ("kind", "kind_family"),
            "prompts.stratify_by must be 'kind' or 'kind_family'",
        ),
        (
            cfg.grpo.logprob_reduction in ("mean", "sum"),
            "grpo.logprob_reduction must be 'mean' or 'sum'",
        ),
        (cfg.grpo.kl_coef >= 0, "grpo.kl_coef must be >= 0"),
        (
            cfg.grpo.kl_scope in ("all", "unsteered"),
            "grpo.kl_scope must be 'all' or 'unsteered'",
        ),
        (
            cfg.grpo.pg_scope in ("all", "steered"),
            "grpo.pg_scope must be 'all' or 'steered'",
        ),
        (0 < cfg.grpo.timestep_fraction <= 1, "grpo.timestep_fraction must be in (0, 1]"),
        (cfg.grpo.min_step_std >= 0, "grpo.min_step_std must be >= 0"),
        (cfg.grpo.inner_epochs >= 1, "grpo.inner_epochs must be >= 1"),
        (cfg.grpo.micro_batch >= 1, "grpo.micro_batch must be >= 1"),
        (cfg.grpo.grad_accum >= 0, "grpo.grad_accum must be >= 0"),
        (cfg.grpo.max_grad_norm >= 0, "grpo.max_grad_norm must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.lora.rank >= 1, "lora.rank must be >= 1"),
        (cfg.run.epochs >= 1, "run.epochs must be >= 1"),
        (cfg.run.save_every >= 1, "run.save_every must be >= 1"),
        (cfg.run.keep_last >= 1, "run.keep_last must be >= 1"),
        (
            cfg.run.mixed_precision in ("no", "fp16", "bf16"),
            "run.mixed_precision must be 'no', 'fp16' or 'bf16'",
        ),
        (
            cfg.run.log_with in ("auto", "tensorboard", "wandb", "none"),
            "run.log_with must be 'auto', 'tensorboard', 'wandb' or 'none'",
        ),
        (
            cfg.run.stop_after_epochs is None or cfg.run.stop_after_epochs >= 1,
            "run.stop_after_epochs must be >= 1",
        ),
        (cfg.prompts.file.strip() != "", "prompts.file must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise SafediffError(f"invalid config: {message}")


# ---------------------------------------------------------------------------------------------
# Building from dicts, presets and overrides


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` (allowing int -> float), or raise naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SafediffError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except SafediffError as err:
                errors.append(str(err))
        raise SafediffError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise SafediffError(f"config key {key!r} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise SafediffError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept any float literal.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise SafediffError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise SafediffError(f"config key {key!r} must be an integer, got {value!r}")
    if not isinstance(value, tp):
        raise SafediffError(f"config key {key!r} must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise SafediffError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(types_))}"
        )
    kwargs = {name: _coerce(value, types_[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (lists and dicts copied)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'grpo.group_size=4' -> (['grpo', 'group_size'], 4). Values are parsed as YAML."""
    if "=" not in text:
        raise SafediffError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SafediffError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise SafediffError(f"override {text!r}: value is not valid YAML ({err})") from None
    return parts, value


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in resources.files("safediff.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def read_yaml(path_or_preset: str) -> dict[str, Any]:
    """Load a preset by name (shipped with safediff) or a YAML file by path."""
    path = Path(path_or_preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SafediffError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files("safediff.configs") / f"{path_or_preset}.yaml"
        if not resource.is_file():
            raise SafediffError(
                f"unknown preset {path_or_preset!r}; presets: {', '.join(preset_names())} "
                "(or pass a path to a .yaml file)"
            )
        text = resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SafediffError(f"{path_or_preset}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise SafediffError(f"{path_or_preset}: top level must be a mapping")
    return data


def load_config(
    preset: str | None = None, overrides: list[str] | None = None, cls: type = TrainConfig
) -> Any:
    """defaults <- preset (name or path) <- overrides, validated."""
    data: dict[str, Any] = read_yaml(preset) if preset else {}
    for text in overrides or []:
        parts, value = parse_override(text)
        update: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            update = {part: update}
        data = _merge(data, update)
    return _build(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from safediff.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-validates (frozen configs are changed only by copy)."""
    return dataclasses.replace(cfg, **changes)
