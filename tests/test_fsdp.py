"""Full fine-tuning under FSDP2 (`run.fsdp`, safediff.rl.fsdp): the plugin and its FSDP units on
the real diffusers transformers, the refusals, and (slow, 2 CPU processes with gloo) the same
update as one unsharded process with the doubled batch, exact resume and checkpoints that plain
diffusers loads.

accelerate enables FSDP only on CUDA-like devices; tests/fsdp_worker.py switches a CPU
accelerator's state to FSDP so `accelerator.prepare` runs accelerate's real FSDP2 path.
"""

import logging
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from safediff.config import ModelConfig, load_config
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model
from safediff.prompts import load_prompts
from safediff.rewards.brightness import BrightnessReward
from safediff.rl import checkpoint as ckpt
from safediff.rl.fsdp import FSDP_BLOCK_CLASSES, block_classes, fsdp_plugin
from safediff.rl.trainer import GRPOTrainer
from torchrun import run_two_processes

TESTS = Path(__file__).parent


def gradient_overrides(name: str, run_dir: Path) -> list[str]:
    """One group of 8 over both processes (4 samples each per rollout batch). Adam's first step
    with eps = 1 is ~ lr * g (|g| << 1), so the weight change measures the gradient itself. SD3
    clips the gradient norm to 1e-3, below its norm, so the update also checks that the norm adds
    up every process's shard; FLUX logs the unclipped norm. Both run the KL term's frozen copy."""
    flux = ["sampling.window_rule=cyclic"] if name == "tiny-flux" else []
    max_norm = "0" if name == "tiny-flux" else "1e-3"
    return [
        f"model.pretrained={name}",
        "sampling.num_steps=3",
        "sampling.eta=0.7",
        "sampling.guidance_scale=2.0",
        "sampling.rollout_batch_size=4",
        "sampling.window_size=2",
        *flux,
        "grpo.group_size=8",
        "grpo.clip_range=0.2",
        "grpo.micro_batch=4",
        f"grpo.max_grad_norm={max_norm}",
        "grpo.kl_coef=0.1",
        "optim.lr=1.0",
        "optim.eps=1.0",
        "optim.weight_decay=0",
        "prompts.file=builtin:smoke",
        "run.log_with=none",
        f"run.output_dir={run_dir}",
    ]


def launch(*args: str) -> None:
    """tests/fsdp_worker.py on 2 CPU processes (torchrun, gloo)."""
    run_two_processes(TESTS / "fsdp_worker.py", *args)


def update(weights: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight change of one run, flattened in the initial state dict's order."""
    return torch.cat([(weights[k] - v).flatten() for k, v in init.items()])


def assert_same_update(sharded: torch.Tensor, unsharded: torch.Tensor) -> None:
    """Equal within float summation order: FSDP reduce-scatters the two processes' gradient sums,
    one process sums all transitions at once. Measured differences are ~1e-5 of the largest
    change (float32 rounding of the sums); 1e-4 of it still fails any wrong or missing shard."""
    assert unsharded.abs().max() > 0
    tol = 1e-4 * float(unsharded.abs().max())
    torch.testing.assert_close(sharded, unsharded, rtol=1e-3, atol=tol)


def one_process_epoch(base: list[str]) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(TESTS))
    from dist_worker import run_one_epoch

    return run_one_epoch([*base, "grpo.samples_per_process=16"], Accelerator(cpu=True))


def initial_weights(name: str) -> dict[str, torch.Tensor]:
    """The transformer's parameters before training (what dist_worker reports; no buffers)."""
    model = load_t2i_model(ModelConfig(pretrained=name))
    return {k: v.detach().clone() for k, v in model.unet.named_parameters()}


# ----------------------------------------------------------------------------- fast


def test_the_plugin_is_fsdp2_sharding_by_transformer_blocks_with_float32_reductions():
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = fsdp_plugin("bf16", reshard_after_forward=False)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is False
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.mixed_precision_policy == MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32
    )
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    full = fsdp_plugin("no", reshard_after_forward=True)
    assert full.mixed_precision_policy is None and full.reshard_after_forward is True


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_each_transformer_block_of_the_real_diffusers_class_is_one_fsdp_unit(name):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    transformer = load_t2i_model(ModelConfig(pretrained=name)).unet
    names = block_classes(transformer)
    assert names == FSDP_BLOCK_CLASSES[type(transformer).__name__]
    assert sorted(names) == sorted(type(transformer)._no_split_modules)  # diffusers' own list
    plugin = fsdp_plugin("no", reshard_after_forward=True)
    plugin.transformer_cls_names_to_wrap = list(names)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, transformer)
    units = [m for m in transformer.modules() if policy(m)]
    blocks = [
        *transformer.transformer_blocks,
        *getattr(transformer, "single_transformer_blocks", []),
    ]
    assert len(units) == len(blocks) > 0
    assert {id(m) for m in units} == {id(m) for m in blocks}


def test_a_unet_is_refused_in_one_line():
    unet = load_t2i_model(ModelConfig(pretrained="tiny-sd")).unet
    with pytest.raises(SafediffError, match="run.fsdp shards SD3 / FLUX") as err:
        block_classes(unet)
    assert "\n" not in str(err.value) and "UNet2DConditionModel" in str(err.value)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["lora.enabled=true"], "LoRA"),
        (["run.merge_weight=0.5"], "run.merge_weight"),
        (["run.compile=aot_eager"], "run.compile"),
    ],
)
def test_the_config_refuses_what_fsdp_does_not_support(extra, words):
    with pytest.raises(SafediffError, match=words) as err:
        load_config(None, ["run.fsdp=true", *extra])
    assert "\n" not in str(err.value) and "run.fsdp" in str(err.value)


def _trainer(overrides: list[str], acc: Accelerator) -> GRPOTrainer:
    cfg = load_config(None, overrides)
    model = load_t2i_model(cfg.model)
    return GRPOTrainer(cfg, model, BrightnessReward(), load_prompts(cfg.prompts.file), acc)


def test_fsdp_on_one_cpu_process_trains_unsharded_with_a_warning(tmp_path, caplog):
    overrides = [*gradient_overrides("tiny-sd3", tmp_path), "run.fsdp=true"]
    with caplog.at_level(logging.WARNING, logger="safediff.rl.trainer"):
        trainer = _trainer(overrides, Accelerator(cpu=True))
    assert trainer.fsdp is False
    assert any("not FSDP" in r.getMessage() for r in caplog.records)


def test_the_trainer_refuses_a_unet_and_an_fsdp_launch_without_run_fsdp(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    with pytest.raises(SafediffError, match="UNet2DConditionModel"):
        _trainer(["model.pretrained=tiny-sd", "run.fsdp=true"], Accelerator(cpu=True))
    acc = Accelerator(cpu=True)
    monkeypatch.setattr(acc.state, "distributed_type", DistributedType.FSDP)
    with pytest.raises(SafediffError, match="set run.fsdp=true") as err:
        _trainer(gradient_overrides("tiny-sd3", tmp_path), acc)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two epochs of tiny SD3 under FSDP on 2 processes (8 samples each), a checkpoint each."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    base = gradient_overrides("tiny-sd3", run)
    fsdp = [*base, "run.fsdp=true", "grpo.samples_per_process=8", "run.epochs=2"]
    launch("train", "none", *fsdp, "run.save_every=1")
    return run, base


@pytest.mark.slow
def test_two_fsdp_processes_update_sd3_as_one_process_with_the_doubled_batch(fsdp_run):
    run, base = fsdp_run
    sharded = load_file(
        str(ckpt.checkpoint_dir(run, 1) / "unet/diffusion_pytorch_model.safetensors")
    )
    one = one_process_epoch([*base, f"run.output_dir={run.parent / 'one'}"])
    init = initial_weights("tiny-sd3")
    unsharded = {k[len("unet.") :]: v for k, v in one.items() if k.startswith("unet.")}
    assert set(init) <= set(sharded) and set(init) == set(unsharded)
    assert_same_update(update(sharded, init), update(unsharded, init))


@pytest.mark.slow
def test_two_fsdp_processes_update_flux_as_one_process_with_the_doubled_batch(tmp_path):
    base = gradient_overrides("tiny-flux", tmp_path / "run")
    out = tmp_path / "two.safetensors"
    launch("epoch", str(out), *base, "run.fsdp=true", "grpo.samples_per_process=8")
    two = load_file(str(out))
    init = initial_weights("tiny-flux")
    total = sum(v.numel() for v in init.values())
    # each process held its half of the weights (FSDP shards them; DDP would hold all)
    assert int(two["world_size"]) == 2 and int(two["local_numel"]) <= total // 2 + 64
    one = one_process_epoch(base)
    torch.testing.assert_close(two["rewards"], one["rewards"], rtol=0, atol=1e-6)
    torch.testing.assert_close(two["advantages"], one["advantages"], rtol=0, atol=1e-5)
    sharded = {k[len("unet.") :]: v for k, v in two.items() if k.startswith("unet.")}
    unsharded = {k[len("unet.") :]: v for k, v in one.items() if k.startswith("unet.")}
    assert_same_update(update(sharded, init), update(unsharded, init))


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_exactly_and_loads_in_plain_diffusers(fsdp_run, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from safediff.models.flow import flow_pipeline

    run, base = fsdp_run
    first, last = ckpt.checkpoint_dir(run, 1), ckpt.checkpoint_dir(run, 2)
    resumed = tmp_path / "resumed"
    again = [*base, f"run.output_dir={resumed}", "run.fsdp=true", "grpo.samples_per_process=8"]
    launch("train", str(first), *again, "run.epochs=2")
    for name in ("unet/diffusion_pytorch_model.safetensors", "optimizer.safetensors"):
        want, got = (
            load_file(str(last / name)),
            load_file(str(ckpt.checkpoint_dir(resumed, 2) / name)),
        )
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name  # bit for bit
    # the optimizer file is keyed as an unsharded run's: parameter index in parameters() order
    optim = load_file(str(last / "optimizer.safetensors"))
    params = list(load_t2i_model(ModelConfig(pretrained="tiny-sd3")).unet.parameters())
    assert {k.rsplit(".", 1)[0] for k in optim} == {f"state.{i}" for i in range(len(params))}
    assert all(optim[f"state.{i}.exp_avg"].shape == p.shape for i, p in enumerate(params))
    # the checkpoint's unet/ is a folder plain diffusers reads, and a pipeline over it round-trips
    loaded = SD3Transformer2DModel.from_pretrained(str(last / "unet"))
    weights = load_file(str(last / "unet/diffusion_pytorch_model.safetensors"))
    model = load_t2i_model(ModelConfig(pretrained="tiny-sd3"))
    flow_pipeline(model.components, transformer=loaded).save_pretrained(tmp_path / "pipe")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "pipe"))
    for state in (loaded.state_dict(), pipe.transformer.state_dict()):
        assert state.keys() == weights.keys()
        assert all(torch.equal(state[k], weights[k]) for k in weights)
