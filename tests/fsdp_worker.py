"""GRPO under FSDP2 on the CPU (gloo), for tests/test_fsdp.py.

accelerate enables FSDP only for processes on CUDA-like devices (on the CPU it ignores the plugin
and wraps the model in DDP), so this worker builds a CPU accelerator and then switches its state to
FSDP with safediff's plugin: `accelerator.prepare` then runs accelerate's real FSDP2 path
(`fsdp2_prepare_model` -> torch's `fully_shard`) over the gloo process group.

python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py epoch OUT KEY=VALUE...
    one epoch; rank 0 writes the rewards, advantages and gathered full weights to the file OUT (safetensors).
python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py train RESUME KEY=VALUE...
    `safediff.rl.trainer.train` (RESUME: "none", "auto" or a checkpoint folder).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from safediff.config import TrainConfig, load_config
from safediff.models.loading import load_t2i_model
from safediff.prompts import load_prompts
from safediff.rewards.brightness import BrightnessReward
from safediff.rl.fsdp import fsdp_plugin
from safediff.rl.trainer import GRPOTrainer, train


def cpu_fsdp_accelerator(cfg: TrainConfig) -> Accelerator:
    """A CPU accelerator whose state says FSDP, with the plugin `train` would build."""
    acc = Accelerator(cpu=True)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = fsdp_plugin(cfg.run.mixed_precision, cfg.run.fsdp_reshard_after_forward)
    return acc


def one_epoch(out: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    acc = cpu_fsdp_accelerator(cfg)
    model = load_t2i_model(cfg.model, device=acc.device)
    trainer = GRPOTrainer(cfg, model, BrightnessReward(), load_prompts(cfg.prompts.file), acc)
    assert trainer.fsdp
    trainer.run_epoch(0)
    unet, _ = trainer.checkpoint_state()  # gathers on every process
    if acc.is_main_process:
        result = {"rewards": trainer.last_rewards, "advantages": trainer.last_advantages}
        for name, p in unet.state_dict().items():
            result[f"unet.{name}"] = p.detach().cpu().contiguous()
        # each process holds a shard: its local numel is about 1/N of the whole
        local = sum(p.to_local().numel() for p in trainer.unet.parameters())
        result["local_numel"] = torch.tensor(local)
        result["world_size"] = torch.tensor(acc.num_processes)
        save_file(result, out)
    acc.wait_for_everyone()


def run_train(resume: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    acc = cpu_fsdp_accelerator(cfg)
    summary = train(
        cfg,
        resume=None if resume == "none" else resume,
        reward=BrightnessReward(),
        accelerator=acc,
    )
    assert summary["trainer"].fsdp


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, target, *rest = sys.argv[1:]
    if mode == "epoch":
        one_epoch(target, rest)
    else:
        run_train(target, rest)
