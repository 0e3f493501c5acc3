"""Turn the `--model` argument of evaluation commands into a `ModelConfig`.

The reference's one-shot evaluation script accepts three checkpoint forms: a checkpoint folder, a
bare UNet file, and 'vanilla' with a base model id. All are accepted here, plus what
`load_t2i_model` loads directly:

- "tiny-sd" / "tiny-sd-v" / "tiny-sdxl": the offline tiny SD and SDXL (tests, smoke runs);
- "NAME" / "NAME:ARG": a plug-in's model family (`safediff.plugins`), e.g. "sandbox" (the sandbox
  world's shipped model) or "sandbox:PATH" (another sandbox diffusion file);
- "vanilla": the base model itself; needs `base` (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5);
- a local diffusers pipeline folder (model_index.json): loaded as is;
- a checkpoint folder written by safediff's trainer (checkpoints/checkpoint-N, holding unet/):
  its UNet on top of the base model named in the run's config.yaml two levels up (a `base` given
  explicitly wins, with a warning when they differ);
- a LoRA checkpoint of safediff's trainer (checkpoint-N holding lora/, or that lora/ folder): its
  peft adapter merged into the base model's UNet at load time (`ModelConfig.lora_weights`), the
  base found as above;
- a training run folder written by safediff's trainer (holding checkpoints/): its final model,
  i.e. its merged/ model when `run.merge_weight` wrote one from the newest checkpoint, else that
  checkpoint, as above;
- the merged/ folder of a run (unet/ + merge.json): its UNet on top of the run's base model;
- a bare UNet .safetensors file, or a folder holding diffusion_pytorch_model.safetensors (the
  reference's checkpoint_epoch_N/): needs `base`;
- a bare peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors): needs `base`;
- anything else that is not a path: a Hugging Face hub id.
No default base is assumed: evaluating a UNet on the wrong base gives silently wrong numbers, so a
missing `base` is an error that suggests one. Errors name the path.
"""

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from safediff import plugins
from safediff.config import ModelConfig
from safediff.errors import SafediffError
from safediff.models.loading import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    TINY_MODELS,
    UNET_WEIGHTS_NAME,
    is_plugin_spec,
)
from safediff.rl.checkpoint import MERGE_INFO, list_checkpoints

logger = logging.getLogger(__name__)

SUGGESTED_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def parse_model_spec(spec: str, base: str | None = None) -> ModelConfig:
    """The `ModelConfig` that `spec` (see the module docstring) names; nothing is loaded.

    base: the base pipeline (hub id or folder) for bare UNets and 'vanilla'; for a trainer
        checkpoint it overrides the run's config.yaml; ignored (with a warning) for full models.
    Raises SafediffError (one line, naming the path) when the spec cannot be resolved.
    """
    spec = spec.strip()
    if not spec:
        raise SafediffError(
            "empty model spec; pass 'tiny-sd', 'vanilla', a folder, a file or a hub id"
        )
    if spec in TINY_MODELS or is_plugin_spec(spec):
        _ignore_base(spec, base)
        return ModelConfig(pretrained=spec)
    if spec == "vanilla":
        return ModelConfig(pretrained=_need_base(spec, base, "'vanilla' means the base model"))

    path = Path(spec).expanduser()
    if path.is_file():
        return _from_file(path, base)
    if path.is_dir():
        return _from_folder(path, base)
    if _looks_like_path(spec):
        raise SafediffError(f"model not found: {path.resolve()} (no such file or folder)")
    _ignore_base(spec, base)
    return ModelConfig(pretrained=spec)  # a hub id, checked when loaded


def _from_file(path: Path, base: str | None) -> ModelConfig:
    where = path.resolve()
    if where.name == ADAPTER_WEIGHTS_NAME and (where.parent / ADAPTER_CONFIG_NAME).is_file():
        return _from_folder(where.parent, base)  # the weights file of a LoRA adapter folder
    if where.suffix != ".safetensors":
        raise SafediffError(
            f"model file {where} is not a .safetensors UNet (pickled .bin/.ckpt/.pt files are not "
            "loaded); convert it with safetensors.torch.save_file or pass a pipeline folder"
        )
    pretrained = _need_base(str(where), base, "a bare UNet file holds only the UNet")
    return ModelConfig(pretrained=pretrained, unet_weights=str(where))


def _from_folder(path: Path, base: str | None) -> ModelConfig:
    where = path.resolve()
    if (where / "model_index.json").is_file():
        _ignore_base(str(where), base)
        return ModelConfig(pretrained=str(where))
    if (where / MERGE_INFO).is_file() and (where / "unet" / UNET_WEIGHTS_NAME).is_file():
        return _from_checkpoint(where, base, where.parent / "config.yaml")  # a run's merged/
    if (where / "trainer_state.json").is_file() or (where / "unet" / UNET_WEIGHTS_NAME).is_file():
        return _from_checkpoint(where, base)
    if (where / "checkpoints").is_dir():  # a training run folder
        found = list_checkpoints(where)
        if not found:
            raise SafediffError(
                f"training run {where} has no complete checkpoint yet; let `safediff train` "
                "(or `safediff demo`) write one"
            )
        if _merged_from(where / "merged", found[-1]):
            return _from_checkpoint(where / "merged", base, where / "config.yaml")
        return _from_checkpoint(found[-1], base)
    if (where / UNET_WEIGHTS_NAME).is_file():
        if (where.parent / "trainer_state.json").is_file():  # the unet/ folder of a checkpoint
            return _from_checkpoint(where.parent, base)
        pretrained = _need_base(str(where), base, "a UNet weights folder holds only the UNet")
        return ModelConfig(pretrained=pretrained, unet_weights=str(where))
    if (where / ADAPTER_CONFIG_NAME).is_file():
        if (where.parent / "trainer_state.json").is_file():  # the lora/ folder of a checkpoint
            return _from_checkpoint(where.parent, base)
        pretrained = _need_base(str(where), base, "a LoRA adapter holds only the adapter")
        return ModelConfig(pretrained=pretrained, lora_weights=str(where))
    raise SafediffError(
        f"{where} is not a model folder: expected a diffusers pipeline (model_index.json), a "
        f"safediff checkpoint (unet/{UNET_WEIGHTS_NAME} or lora/), a bare UNet "
        f"({UNET_WEIGHTS_NAME}) or a LoRA adapter ({ADAPTER_CONFIG_NAME})"
    )


def _merged_from(merged: Path, checkpoint: Path) -> bool:
    """Whether the run's merged/ model was made from `checkpoint` (its newest); a merge of an
    older checkpoint is stale: the run trained on, so the checkpoint is used, with a warning."""
    info_file = merged / MERGE_INFO
    if not info_file.is_file() or not (merged / "unet" / UNET_WEIGHTS_NAME).is_file():
        return False
    epoch = json.loads(info_file.read_text(encoding="utf-8")).get("epoch")
    if epoch == int(checkpoint.name.rsplit("-", 1)[1]):
        return True
    logger.warning(
        "%s was merged from epoch %s, older than %s: using the checkpoint",
        merged,
        epoch,
        checkpoint,
    )
    return False


def _from_checkpoint(ckpt: Path, base: str | None, config_file: Path | None = None) -> ModelConfig:
    """A full checkpoint (unet/: all UNet weights) or a LoRA one (lora/: an adapter that goes on
    the run's base UNet, including the `model.unet_weights` the run started from, if any); a run's
    merged/ folder is a full one. config_file: the run's config.yaml (default: two levels up)."""
    unet_dir, lora_dir = ckpt / "unet", ckpt / "lora"
    is_lora = not (unet_dir / UNET_WEIGHTS_NAME).is_file()
    if is_lora and not (lora_dir / ADAPTER_CONFIG_NAME).is_file():
        raise SafediffError(
            f"checkpoint {ckpt} has neither unet/{UNET_WEIGHTS_NAME} nor lora/{ADAPTER_CONFIG_NAME}"
        )
    weights = {"lora_weights": str(lora_dir)} if is_lora else {"unet_weights": str(unet_dir)}
    config_file = config_file or ckpt.parent.parent / "config.yaml"
    run_model = _run_model_config(config_file)
    if is_lora and run_model is not None:
        if run_model.get("lora_weights"):
            raise SafediffError(
                f"LoRA checkpoint {ckpt} was trained on a base that already merges the adapter "
                f"{run_model['lora_weights']}; one adapter per model is loaded, so merge that one "
                "into a UNet file (unet_weights) first"
            )
        if run_model.get("unet_weights"):  # the adapter was trained on this UNet, keep it
            weights["unet_weights"] = run_model["unet_weights"]
    if base is None:
        if run_model is None:
            raise SafediffError(
                f"checkpoint {ckpt}: no run config.yaml ({config_file}) names its base model; "
                f"pass --base (e.g. --base {SUGGESTED_BASE})"
            )
        return ModelConfig(
            pretrained=run_model["pretrained"],
            revision=run_model.get("revision"),
            resolution=run_model.get("resolution"),
            **weights,
        )
    if run_model is not None and run_model["pretrained"] != base:
        logger.warning(
            "checkpoint %s was trained on %r; evaluating it on --base %r as asked",
            ckpt,
            run_model["pretrained"],
            base,
        )
    resolution = run_model.get("resolution") if run_model is not None else None
    return ModelConfig(pretrained=base, resolution=resolution, **weights)


def _run_model_config(config_file: Path) -> dict | None:
    """The `model` section of a run's config.yaml, or None when there is no such file."""
    if not config_file.is_file():
        return None
    try:
        data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SafediffError(f"{config_file}: not a readable YAML run config ({err})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("pretrained"), str):
        raise SafediffError(f"{config_file}: no model.pretrained in this run config")
    return model


GENERATION_DEFAULTS = {"num_steps": 50, "eta": 0.0, "guidance_scale": 7.5, "negative_prompt": ""}
"""The evaluation protocol's sampler for a model without a training config (the papers' scripts:
50 deterministic DDIM steps, CFG 7.5 against the empty prompt)."""


def training_config_file(spec: str) -> Path | None:
    """The config.yaml of the safediff run that `spec` comes from (a run folder, a checkpoint or
    its unet/ or lora/ folder, a run's merged/), or None for any other model."""
    path = Path(spec.strip()).expanduser()
    if not path.is_dir():
        return None
    where = path.resolve()
    if (where / "checkpoints").is_dir():
        candidate = where / "config.yaml"
    elif (where / MERGE_INFO).is_file():
        candidate = where.parent / "config.yaml"
    elif (where / "trainer_state.json").is_file():
        candidate = where.parent.parent / "config.yaml"
    elif (where.parent / "trainer_state.json").is_file():
        candidate = where.parent.parent.parent / "config.yaml"
    else:
        return None
    return candidate if candidate.is_file() else None


def sampler_defaults(spec: str, cfg: ModelConfig) -> tuple[dict[str, Any], str]:
    """(num_steps, eta, guidance_scale, negative_prompt; where they come from) for sampling the
    model `spec` names when the user sets none: the run's training sampler when it has a
    config.yaml, else its plug-in model family's own sampler, else GENERATION_DEFAULTS."""
    config_file = training_config_file(spec)
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise SafediffError(f"{config_file}: not a readable YAML run config ({err})") from None
        sampling = data.get("sampling") if isinstance(data, dict) else None
        if isinstance(sampling, dict):
            merged = {
                **GENERATION_DEFAULTS,
                **{k: sampling[k] for k in GENERATION_DEFAULTS if k in sampling},
            }
            return merged, f"the run's training sampler ({config_file})"
    family = plugins.model_family(cfg.pretrained)
    if family is not None and family.sampler:
        return {**GENERATION_DEFAULTS, **family.sampler}, f"the {family.name} model's sampler"
    return dict(GENERATION_DEFAULTS), "the evaluation protocol's defaults"


def _need_base(what: str, base: str | None, why: str) -> str:
    if base is None or not base.strip():
        raise SafediffError(
            f"{what}: {why}; pass the base model it belongs to with --base "
            f"(e.g. --base {SUGGESTED_BASE})"
        )
    return base.strip()


def _ignore_base(spec: str, base: str | None) -> None:
    if base is not None:
        logger.warning("--base %r is ignored: %s is a complete model", base, spec)


def _looks_like_path(text: str) -> bool:
    """A spec that cannot be a hub id ('org/name') is a path the user expected to exist."""
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith(("/", ".safetensors", ".bin", ".ckpt", ".pt"))
    )
