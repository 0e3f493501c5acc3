"""Full fine-tuning of an SD3 / FLUX transformer sharded across processes (`run.fsdp`).

The sharding is PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) driven by accelerate's
`FullyShardedDataParallelPlugin(fsdp_version=2)`; safediff only builds the plugin, names the
blocks to shard and moves whole state dicts in and out of the sharded model:

- `fsdp_plugin`: one FSDP unit per transformer block (SD3: JointTransformerBlock; FLUX:
  FluxTransformerBlock and FluxSingleTransformerBlock, `FSDP_BLOCK_CLASSES`), the rest (embedders,
  norms, projections) in the root unit. Under bf16 / fp16 autocast the gathered weights are in
  that dtype while gradients are reduced in float32, as the unsharded (DDP) run reduces them.
- `full_state` (collective: every process calls it): the full weights and the full AdamW state
  gathered to the main process on the CPU, the optimizer state keyed by parameter index as a plain
  `optimizer.state_dict()` is, so an FSDP checkpoint has the same files as an unsharded one and
  either run can resume the other's.
- `load_full_state` (collective): a checkpoint's full weights and optimizer state into the shards.
- `plain_copy`: a plain module of the transformer's diffusers class holding the gathered weights
  (built on the meta device and assigned, so no second copy), which `save_pretrained` writes as
  a folder plain diffusers loads.

accelerate enables FSDP only for processes on CUDA-like devices: on the CPU it trains with DDP and
ignores the plugin (docs/training.md). The CPU tests force accelerate's state into FSDP to run
these paths with the gloo backend.
"""

from typing import Any

import torch
from torch import nn

from safediff.errors import SafediffError

FSDP_BLOCK_CLASSES: dict[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": ("JointTransformerBlock",),
    "FluxTransformer2DModel": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
}
"""Transformer class -> the block classes each made one FSDP unit (diffusers' _no_split_modules)."""

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_plugin(mixed_precision: str, reshard_after_forward: bool) -> Any:
    """accelerate's FSDP2 plugin for a transformer full fine-tune; the block classes are named
    later, by `shard_blocks_of`, once the model is loaded.

    mixed_precision: run.mixed_precision ('no', 'bf16', 'fp16'): the dtype the gathered weights
    compute in; gradients are reduced in float32 either way.
    """
    from accelerate import FullyShardedDataParallelPlugin

    policy = None
    if mixed_precision in _AUTOCAST_DTYPES:
        policy = {"param_dtype": _AUTOCAST_DTYPES[mixed_precision], "reduce_dtype": torch.float32}
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=reshard_after_forward,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT",
        mixed_precision_policy=policy,
    )


def block_classes(transformer: nn.Module) -> tuple[str, ...]:
    """The block class names `transformer` is sharded by; a model FSDP does not shard here (a
    UNet) is a one-line error."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in FSDP_BLOCK_CLASSES:
            return FSDP_BLOCK_CLASSES[cls.__name__]
    raise SafediffError(
        f"run.fsdp shards SD3 / FLUX transformers ({', '.join(FSDP_BLOCK_CLASSES)}) by their "
        f"blocks; this model's denoiser is a {type(transformer).__name__}: set run.fsdp=false "
        "(data-parallel training)"
    )


def shard_blocks_of(plugin: Any, transformer: nn.Module) -> None:
    """Name `transformer`'s block classes as the plugin's FSDP units (before accelerate.prepare)."""
    plugin.transformer_cls_names_to_wrap = list(block_classes(transformer))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the optimizer's order (its state_dict indices)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Gather the sharded model's full state dict and the optimizer's full state to the main
    process, on the CPU. Collective: every process must call it; the others get empty dicts.

    The optimizer state comes back as `optimizer.state_dict()` of an unsharded run would be:
    {"state": {index: {...}}, "param_groups": [{..., "params": [index, ...]}]}.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:  # not the main process
        return weights, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return weights, {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load full weights (keys checked strictly) and a full optimizer state keyed by parameter
    index (as `full_state` returns it) into the sharded model and optimizer; each process keeps
    its shard. Collective; every process passes the full state (each reads the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, weights, options=options)
    names = _param_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]}
            for group in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def plain_copy(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) module of `model`'s diffusers class and config holding `weights` (the
    tensors themselves, not copies): what a checkpoint's `save_pretrained` writes."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls.from_config(model.config)
    plain.load_state_dict(weights, strict=True, assign=True)
    return plain
