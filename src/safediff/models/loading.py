"""Load a Stable Diffusion-family model as a `T2IModel`: tiny SD, a local folder or a hub id,
optionally with a bare UNet checkpoint swapped in and a LoRA adapter merged in.

Where the weights come from (`ModelConfig.pretrained`):
- "tiny-sd" / "tiny-sd-v": the offline random tiny SD (epsilon / v-prediction), see tiny_sd.py;
- "tiny-sdxl": the offline random tiny SDXL, see tiny_sdxl.py;
- "tiny-sd3" / "tiny-flux" and SD3 / FLUX pipeline folders: flow-matching models, loaded by
  models/flow.py (`load_flow_t2i`; a bare transformer checkpoint as unet_weights);
- "NAME" / "NAME:ARG" of a plug-in's model family (`safediff.plugins`, e.g. the sandbox world's);
- a local diffusers pipeline folder (with model_index.json and the subfolders unet, vae,
  text_encoder, tokenizer, scheduler); a folder whose model_index.json names
  StableDiffusionXLPipeline (with text_encoder_2 and tokenizer_2) goes to the SDXL adapter
  (sdxl.py), any other to the SD 1.x / 2.x one;
- a Hugging Face hub id (with `revision`), read from the local cache only when HF_HUB_OFFLINE is
  set. Each component is loaded with its own class' `from_pretrained(..., subfolder=...)`, so no
  safety checker or feature extractor is ever downloaded.
`ModelConfig.unet_weights` then replaces every UNet weight with a bare UNet .safetensors (the
reference's `checkpoint_epoch_N/diffusion_pytorch_model.safetensors`), keys checked strictly; an
SDXL UNet on an SD 1.x / 2.x base (or the reverse) is refused from the file's header first.
`ModelConfig.lora_weights` then merges a peft LoRA adapter folder (what `PeftModel.save_pretrained`
writes: adapter_config.json + adapter_model.safetensors, e.g. a trainer checkpoint's lora/) into
the UNet's weights (lora_adapter.py), so the model runs as a plain UNet2DConditionModel with no
adapter overhead.

Precision: the frozen VAE and text encoder are cast to `dtype` (bf16/fp16 halves their memory and
they never see a gradient); the UNet always stays float32, because it is the trained policy and
mixed precision is autocast's job (accelerate), not the stored weights'. The scheduler class in a
folder does not matter: its beta fields are read into a DDIMScheduler (SD 1.5 ships PNDM's).
"""

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safediff import plugins
from safediff.config import ModelConfig
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.flow import is_flow_spec, load_flow_t2i
from safediff.models.load_messages import describe_unet_kind, few_names, first_line
from safediff.models.lora_adapter import (
    ADAPTER_CONFIG_NAME,  # noqa: F401  (eval/ and export read the adapter file names from here)
    ADAPTER_WEIGHTS_NAME,  # noqa: F401
    merge_lora_adapter,
    resolve_lora_adapter,
)
from safediff.models.sdxl import (
    SDXL_COMPONENTS,
    is_sdxl_pipeline_folder,
    is_sdxl_unet_config,
    read_model_index,
    sdxl_components_to_t2i,
)
from safediff.models.stable_diffusion import REQUIRED_COMPONENTS, sd_components_to_t2i
from safediff.models.tiny_sd import build_tiny_sd
from safediff.models.tiny_sdxl import build_tiny_sdxl

TINY_MODELS = {"tiny-sd": "epsilon", "tiny-sd-v": "v_prediction", "tiny-sdxl": "epsilon"}
"""Offline tiny model ids -> prediction type; those in TINY_SDXL_MODELS are SDXL."""
TINY_SDXL_MODELS = ("tiny-sdxl",)
SUGGESTED_SD_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SUGGESTED_SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
UNET_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def is_plugin_spec(pretrained: str) -> bool:
    """A model spec 'NAME' or 'NAME:ARG' of a plug-in's model family (`safediff.plugins`)."""
    return plugins.model_family(pretrained) is not None


def load_t2i_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> T2IModel:
    """Build the `T2IModel` that `cfg` names, on `device`.

    dtype: precision of the frozen VAE and text encoder; the UNet is always float32.
    Raises SafediffError (one line, naming the path or id) when the model cannot be found or a
    UNet checkpoint or LoRA adapter does not fit it.
    """
    # Find the UNet checkpoint and adapter before loading a (possibly large) base model.
    unet_file = resolve_unet_weights(cfg.unet_weights) if cfg.unet_weights else None
    lora_dir = resolve_lora_adapter(cfg.lora_weights) if cfg.lora_weights else None
    if is_flow_spec(cfg.pretrained):  # tiny-sd3, tiny-flux, SD3 / FLUX folders (models/flow.py)
        return load_flow_t2i(cfg.pretrained, device, dtype, cfg.resolution, unet_file, lora_dir)
    family = plugins.model_family(cfg.pretrained)
    if family is not None:
        model = family.load(plugins.split_spec(cfg.pretrained)[1], device)
        model.unet, model.source = _apply_checkpoints(model.unet, model.source, unet_file, lora_dir)
        return model
    components = load_sd_components(cfg.pretrained, revision=cfg.revision, dtype=dtype)
    components["unet"], source = _apply_checkpoints(
        components["unet"], cfg.pretrained, unet_file, lora_dir
    )
    model = components_to_t2i(components, source=source, resolution=cfg.resolution)
    # Dtypes were set at load time (a .to(dtype) after from_pretrained makes diffusers warn).
    model.unet.to(device)
    for comp in model.components.values():
        if isinstance(comp, nn.Module):
            comp.to(device)
    return model


def _apply_checkpoints(
    unet: nn.Module, source: str, unet_file: Path | None, lora_dir: Path | None
) -> tuple[nn.Module, str]:
    """(unet, source) with the bare UNet file loaded, then the LoRA adapter merged, each named in
    the source string."""
    if unet_file is not None:
        load_unet_weights(unet, unet_file)
        source = f"{source} + {unet_file}"
    if lora_dir is not None:
        unet = merge_lora_adapter(unet, lora_dir)
        source = f"{source} + LoRA {lora_dir}"
    return unet, source


# ---------------------------------------------------------------------------------------------
# Base pipelines


def is_sdxl_components(components: dict[str, Any]) -> bool:
    """Whether loaded components are an SDXL pipeline's (a second text encoder, or an SDXL UNet)."""
    unet = components.get("unet")
    return "text_encoder_2" in components or (unet is not None and is_sdxl_unet_config(unet.config))


def components_to_t2i(
    components: dict[str, Any], source: str, resolution: int | None = None
) -> T2IModel:
    """The `T2IModel` of SD 1.x / 2.x or SDXL components (diffusers names), by their family."""
    if is_sdxl_components(components):
        return sdxl_components_to_t2i(components, source=source, resolution=resolution)
    return sd_components_to_t2i(components, source=source, resolution=resolution)


def load_sd_components(
    pretrained: str, revision: str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """SD-family components by diffusers' names, on CPU: unet, vae, text_encoder, tokenizer,
    scheduler, and for SDXL also text_encoder_2, tokenizer_2 and force_zeros_for_empty_prompt
    (from model_index.json).

    pretrained: "tiny-sd", "tiny-sd-v", "tiny-sdxl", a local pipeline folder, or a hub id.
    The VAE and text encoders come in `dtype`, the UNet in float32.
    """
    if pretrained in TINY_SDXL_MODELS:
        components = build_tiny_sdxl(seed=0)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            if dtype != torch.float32:  # built in float32 (a no-op cast makes diffusers warn)
                components[name].to(dtype=dtype)
        return components
    if pretrained in TINY_MODELS:
        components = build_tiny_sd(seed=0, prediction_type=TINY_MODELS[pretrained])
        for name in ("vae", "text_encoder"):
            components[name].to(dtype=dtype)
        return components
    folder = Path(pretrained).expanduser()
    if folder.exists() or _looks_like_path(pretrained):
        return _load_folder(folder, dtype)
    return _load_hub(pretrained, revision, dtype)


def _looks_like_path(text: str) -> bool:
    """A string that cannot be a hub id ('org/name') is a path the user expected to exist."""
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


def _load_folder(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    where = folder.resolve()
    if not where.exists():
        raise SafediffError(
            f"model folder not found: {where}; pass 'tiny-sd', a diffusers pipeline folder or a "
            "hub id as model.pretrained"
        )
    if not (where / "model_index.json").is_file():
        hint = ""
        if (where / UNET_WEIGHTS_NAME).is_file():
            hint = " (it holds a bare UNet: pass it as model.unet_weights on top of a base model)"
        raise SafediffError(
            f"{where} is not a diffusers pipeline folder: expected model_index.json and the "
            f"subfolders {', '.join(REQUIRED_COMPONENTS)}{hint}"
        )
    index = read_model_index(where / "model_index.json")
    xl = is_sdxl_pipeline_folder(index)
    needed = SDXL_COMPONENTS if xl else REQUIRED_COMPONENTS
    missing = [name for name in needed if not (where / name).is_dir()]
    if missing:
        kind = "an SDXL" if xl else "a Stable Diffusion"
        raise SafediffError(
            f"pipeline folder {where} lacks the subfolder(s) {', '.join(missing)}; {kind} "
            f"pipeline needs {', '.join(needed)}"
        )
    try:
        if xl:
            return _from_pretrained_all_xl(str(where), dtype, index)
        return _from_pretrained_all(str(where), dtype)
    except (OSError, ValueError) as err:
        raise SafediffError(f"could not load pipeline folder {where}: {first_line(err)}") from None


def _load_hub(repo_id: str, revision: str | None, dtype: torch.dtype) -> dict[str, Any]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    offline = _hub_offline()
    hub_errors = (OSError, ValueError, EntryNotFoundError)
    try:
        index_file = hf_hub_download(
            repo_id, "model_index.json", revision=revision, local_files_only=offline
        )
    except hub_errors:
        raise SafediffError(
            f"could not load '{repo_id}': not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); pass a local diffusers folder or download it first"
        ) from None
    index = read_model_index(index_file)
    hub_kwargs = {"revision": revision, "local_files_only": offline}
    try:
        if is_sdxl_pipeline_folder(index):
            return _from_pretrained_all_xl(repo_id, dtype, index, **hub_kwargs)
        return _from_pretrained_all(repo_id, dtype, **hub_kwargs)
    except hub_errors as err:
        raise SafediffError(f"could not load '{repo_id}': {first_line(err)}") from None


def _from_pretrained_all(where: str, dtype: torch.dtype, **hub_kwargs: Any) -> dict[str, Any]:
    """Each SD component from `where` (folder or hub id) with its class' from_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "unet": UNet2DConditionModel.from_pretrained(
            where, subfolder="unet", torch_dtype=torch.float32, **hub_kwargs
        ),
        "vae": AutoencoderKL.from_pretrained(
            where, subfolder="vae", torch_dtype=dtype, **hub_kwargs
        ),
        "text_encoder": CLIPTextModel.from_pretrained(
            where, subfolder="text_encoder", dtype=dtype, **hub_kwargs
        ),
        "tokenizer": CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **hub_kwargs),
        # Any scheduler class's config (PNDM for SD 1.5) carries the same beta fields.
        "scheduler": DDIMScheduler.from_pretrained(where, subfolder="scheduler", **hub_kwargs),
    }


def _from_pretrained_all_xl(
    where: str, dtype: torch.dtype, index: dict[str, Any], **hub_kwargs: Any
) -> dict[str, Any]:
    """Each SDXL component from `where` (folder or hub id) with its class' from_pretrained.

    The VAE stays float32 when `dtype` is float16 and its config asks for it (force_upcast: SDXL
    base's VAE overflows in fp16, the pipeline upcasts it too); bf16 has float32's range.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vae_dtype = dtype
    if dtype == torch.float16:
        vae_config = AutoencoderKL.load_config(where, subfolder="vae", **hub_kwargs)
        vae_dtype = torch.float32 if vae_config.get("force_upcast", True) else dtype
    vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=vae_dtype, **hub_kwargs)
    te_kwargs = {"dtype": dtype, **hub_kwargs}
    return {
        "unet": UNet2DConditionModel.from_pretrained(
            where, subfolder="unet", torch_dtype=torch.float32, **hub_kwargs
        ),
        "vae": vae,
        "text_encoder": CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **te_kwargs),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            where, subfolder="text_encoder_2", **te_kwargs
        ),
        "tokenizer": CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **hub_kwargs),
        "tokenizer_2": CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2", **hub_kwargs),
        # SDXL base ships an Euler scheduler config; its beta fields are what DDIM reads.
        "scheduler": DDIMScheduler.from_pretrained(where, subfolder="scheduler", **hub_kwargs),
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
    }


# ---------------------------------------------------------------------------------------------
# Bare UNet checkpoints


def resolve_unet_weights(path: str | Path) -> Path:
    """The .safetensors file `path` names (a file, or a folder holding
    diffusion_pytorch_model.safetensors), or a SafediffError naming what was looked for."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        candidate = p / UNET_WEIGHTS_NAME
        if not candidate.is_file():
            raise SafediffError(
                f"UNet weights folder {p} has no {UNET_WEIGHTS_NAME}; pass the .safetensors file"
            )
        return candidate
    if not p.is_file():
        raise SafediffError(f"UNet weights not found: {p}")
    if p.suffix != ".safetensors":
        raise SafediffError(
            f"UNet weights {p} must be a .safetensors file (pickled .bin/.ckpt files are not "
            "loaded); convert it with safetensors.torch.save_file"
        )
    return p


def load_unet_weights(unet: nn.Module, path: str | Path) -> Path:
    """Replace every weight of `unet` (in place) with those of a bare UNet .safetensors file.

    Keys and shapes must match the UNet exactly (strict); otherwise a SafediffError names the file
    and a few missing / unexpected / mis-shaped keys. A UNet of another family (SDXL on an SD 1.x /
    2.x base or the reverse, or another cross_attention_dim) is refused from the file's header
    before any tensor is read. Returns the resolved file path.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = resolve_unet_weights(path)
    _check_unet_family(unet, p)
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError) as err:
        raise SafediffError(f"could not read UNet weights {p}: {first_line(err)}") from None
    own = unet.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise SafediffError(
            f"UNet weights {p} do not match the base UNet: {len(missing)} missing key(s) "
            f"{few_names(missing)}, {len(unexpected)} unexpected key(s) {few_names(unexpected)}; "
            "is it a UNet of the same base model (and not a LoRA or a wrapped module)?"
        )
    bad_shapes = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad_shapes:
        k = bad_shapes[0]
        raise SafediffError(
            f"UNet weights {p} do not match the base UNet: {len(bad_shapes)} tensor(s) of another "
            f"shape, e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        )
    unet.load_state_dict(state, strict=True)
    return p


def _base_fix(is_xl: bool) -> str:
    """How to name the base a UNet of this family belongs to."""
    if is_xl:
        return f"an SDXL base (e.g. {SUGGESTED_SDXL_BASE}, or tiny-sdxl)"
    return f"an SD 1.x / 2.x base (e.g. {SUGGESTED_SD_BASE}, or tiny-sd)"


def _file_unet_kind(p: Path) -> tuple[bool, int | None] | None:
    """(is SDXL, cross_attention_dim) of a bare UNet file, from the config.json beside it when
    there is one (a diffusers unet/ folder), else from the safetensors header (an add_embedding
    means SDXL's text_time conditioning; attn2.to_k's input width is cross_attention_dim). None
    when neither can be read (the full load reports why)."""
    from safetensors import SafetensorError, safe_open

    config_file = p.parent / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = None
        if isinstance(config, dict) and "cross_attention_dim" in config:
            cross = config["cross_attention_dim"]
            return is_sdxl_unet_config(config), cross if isinstance(cross, int) else None
    try:
        with safe_open(str(p), framework="pt") as fh:
            keys = list(fh.keys())
            to_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
            cross = int(fh.get_slice(to_k[0]).get_shape()[1]) if to_k else None
    except (SafetensorError, OSError):
        return None
    return any(k.startswith("add_embedding.") for k in keys), cross


def _check_unet_family(unet: nn.Module, p: Path) -> None:
    """Refuse a UNet file of another family than `unet` (one line naming the fix)."""
    config = getattr(unet, "config", None)
    found = _file_unet_kind(p)
    if config is None or found is None or "cross_attention_dim" not in config:
        return
    base_xl, base_cross = is_sdxl_unet_config(config), config["cross_attention_dim"]
    file_xl, file_cross = found
    cross_differs = isinstance(base_cross, int) and file_cross not in (None, base_cross)
    if file_xl != base_xl or cross_differs:
        raise SafediffError(
            f"UNet weights {p} are {describe_unet_kind(file_xl, file_cross)} but the base "
            f"model's is {describe_unet_kind(base_xl, base_cross)}; pass {_base_fix(file_xl)} as "
            "model.pretrained (--base), or the UNet trained on this base"
        )


def save_unet_safetensors(unet: nn.Module, path: str | Path) -> Path:
    """Write the UNet's state dict as a bare .safetensors file (the layout load_unet_weights reads)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
    save_file(state, str(path))
    return path
