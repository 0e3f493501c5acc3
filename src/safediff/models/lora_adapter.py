"""Merge a peft LoRA adapter folder (what `PeftModel.save_pretrained` writes: adapter_config.json
+ adapter_model.safetensors, e.g. a trainer checkpoint's lora/) into a UNet's or a flow
transformer's weights, so the model runs with no adapter overhead.

Used by loading.py (SD / SDXL UNets) and flow.py (SD3 / FLUX transformers); it imports neither, so
the two loaders do not import each other through it.
"""

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from safediff.errors import SafediffError
from safediff.models.load_messages import describe_unet_kind, few_names, first_line
from safediff.models.sdxl import is_sdxl_unet_config

ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's save_pretrained names
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def resolve_lora_adapter(path: str | Path) -> Path:
    """The peft adapter folder `path` names (holding adapter_config.json and
    adapter_model.safetensors; the adapter_model.safetensors file itself is accepted too), or a
    SafediffError naming what was missing. Pickled adapter_model.bin files are refused."""
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.name == ADAPTER_WEIGHTS_NAME:
        p = p.parent
    if not p.exists():
        raise SafediffError(f"LoRA adapter folder not found: {p}")
    if not p.is_dir():
        raise SafediffError(
            f"LoRA adapter {p} is not a folder; pass the folder peft's save_pretrained wrote "
            f"({ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME})"
        )
    if not (p / ADAPTER_WEIGHTS_NAME).is_file():
        if (p / "adapter_model.bin").is_file():
            raise SafediffError(
                f"LoRA adapter {p} holds only a pickled adapter_model.bin, which is not loaded; "
                f"convert it to {ADAPTER_WEIGHTS_NAME} with safetensors.torch.save_file"
            )
        raise SafediffError(f"LoRA adapter folder {p} has no {ADAPTER_WEIGHTS_NAME}")
    if not (p / ADAPTER_CONFIG_NAME).is_file():
        raise SafediffError(
            f"LoRA adapter folder {p} has no {ADAPTER_CONFIG_NAME} (peft needs it to rebuild the "
            "adapter's layers)"
        )
    return p


def merge_lora_adapter(unet: nn.Module, path: str | Path) -> nn.Module:
    """`unet` with the peft LoRA adapter in folder `path` merged into its weights.

    Loads with `PeftModel.from_pretrained` (local files only: both files are checked first, so
    peft never turns to the hub) and returns `merge_and_unload()`: the same UNet class with no
    adapter layers left, whose output equals the adapter-wrapped UNet's (up to float rounding).
    Every adapter tensor must fit the UNet exactly (keys and shapes, like `load_unet_weights`);
    otherwise a SafediffError names the folder. `unet` is modified in place either way (a failed
    load leaves adapter layers in it); the parameters' requires_grad flags are kept.
    """
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model_state_dict
    from safetensors import SafetensorError, safe_open

    folder = resolve_lora_adapter(path)
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise SafediffError(
            f"LoRA adapter {folder}: unreadable {ADAPTER_CONFIG_NAME} ({first_line(err)})"
        ) from None
    if not isinstance(config, LoraConfig):
        raise SafediffError(
            f"adapter {folder} is a {config.peft_type} adapter; only LoRA adapters are loaded"
        )
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
            saved = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in saved if ".lora_A." in k}
    except (SafetensorError, OSError) as err:
        raise SafediffError(
            f"could not read LoRA adapter {folder / ADAPTER_WEIGHTS_NAME}: {first_line(err)}"
        ) from None
    _check_lora_fits(folder, config, shapes, unet)
    grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    device = next(unet.parameters()).device
    try:
        with warnings.catch_warnings():  # missing keys are an error below, not a warning
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_unet = PeftModel.from_pretrained(
                unet, str(folder), config=config, torch_device=str(device)
            )
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise SafediffError(
            f"LoRA adapter {folder} does not fit this UNet: {_load_error(err)}"
        ) from None
    expected = set(get_peft_model_state_dict(peft_unet))  # shapes were checked by the load
    missing = sorted(expected - saved)
    unexpected = sorted(saved - expected)
    if missing or unexpected:
        raise SafediffError(
            f"LoRA adapter {folder} does not fit this UNet: {len(missing)} missing key(s) "
            f"{few_names(missing)}, {len(unexpected)} unexpected key(s) "
            f"{few_names(unexpected)}; was it trained on this base model?"
        )
    try:
        merged = peft_unet.merge_and_unload(safe_merge=True)
    except ValueError as err:  # safe_merge: the merged weights hold NaN / inf
        raise SafediffError(f"LoRA adapter {folder} cannot be merged: {first_line(err)}") from None
    for name, p in merged.named_parameters():
        p.requires_grad_(grad.get(name, False))
    return merged


def _check_lora_fits(
    folder: Path, config: Any, lora_a_shapes: dict[str, tuple[int, ...]], unet: nn.Module
) -> None:
    """Refuse, in one line naming the fix, an adapter whose weights disagree with its own rank,
    that was trained on a UNet of another family (its attn2.to_k input width is the training
    UNet's cross_attention_dim), or whose target modules this UNet does not have."""
    ranks = {shape[0] for shape in lora_a_shapes.values()}
    if not getattr(config, "rank_pattern", None) and ranks and ranks != {int(config.r)}:
        raise SafediffError(
            f"LoRA adapter {folder} does not fit this UNet: {ADAPTER_CONFIG_NAME} says rank "
            f"r={config.r} but its weights have rank {', '.join(map(str, sorted(ranks)))}; the "
            "config belongs to another adapter: save the adapter again with peft "
            "(PeftModel.save_pretrained)"
        )
    base = getattr(unet, "config", None)
    if base is not None and isinstance(base.get("cross_attention_dim"), int):
        widths = {s[1] for k, s in lora_a_shapes.items() if "attn2.to_k.lora_A" in k}
        base_xl, base_cross = is_sdxl_unet_config(base), base["cross_attention_dim"]
        if widths and widths != {base_cross}:
            (width, *_) = sorted(widths)
            raise SafediffError(
                f"LoRA adapter {folder} does not fit this UNet: it was trained on a UNet with "
                f"cross_attention_dim {width} (2048: SDXL, 768: SD 1.x, 1024: SD 2.x), the base "
                f"model's is {describe_unet_kind(base_xl, base_cross)}; pass the base it was "
                "trained on as model.pretrained (--base)"
            )
    targets = config.target_modules
    if isinstance(targets, str) or not targets:
        return  # a regex: peft reports what it does not find
    names = [name for name, _ in unet.named_modules()]
    absent = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))
    if absent:
        raise SafediffError(
            f"LoRA adapter {folder} does not fit this UNet: it targets module(s) "
            f"{few_names(absent)} that the UNet does not have; was it trained on another model "
            "family? Pass its base as model.pretrained (--base)"
        )


def _load_error(err: BaseException) -> str:
    """The informative line of a peft / torch load error (torch puts 'size mismatch for KEY: ...'
    on the lines after a generic first line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith("size mismatch")]
    return (mismatch or lines or [type(err).__name__])[0]
