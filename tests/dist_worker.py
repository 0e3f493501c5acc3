"""Run one GRPO epoch under torchrun and save rewards, advantages and weights (rank 0).

python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT.safetensors KEY=VALUE...
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from safediff.config import load_config
from safediff.models.loading import load_t2i_model
from safediff.prompts import load_prompts
from safediff.rewards.brightness import BrightnessReward
from safediff.rl.trainer import GRPOTrainer


def run_one_epoch(overrides: list[str], accelerator: Accelerator) -> dict[str, torch.Tensor]:
    cfg = load_config(None, overrides)
    model = load_t2i_model(cfg.model, device=accelerator.device)
    trainer = GRPOTrainer(
        cfg, model, BrightnessReward(), load_prompts(cfg.prompts.file), accelerator
    )
    trainer.run_epoch(0)
    out = {"rewards": trainer.last_rewards, "advantages": trainer.last_advantages}
    for name, p in trainer.bare_unet().named_parameters():
        out[f"unet.{name}"] = p.detach().cpu().contiguous()
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    result = run_one_epoch(sys.argv[2:], acc)
    result["world_size"] = torch.tensor(acc.num_processes)
    if acc.is_main_process:
        save_file(result, sys.argv[1])
    acc.wait_for_everyone()
