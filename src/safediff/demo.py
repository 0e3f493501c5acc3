"""`safediff demo --world tiny-sd`: the one-minute engine smoke run.

The offline tiny Stable Diffusion (random weights) trained with the brightness reward: it shows
the GRPO engine climbing a reward, measured on fixed prompts and seeds before and after training.
Everything is written under `output_dir`. The default demo is a plug-in world's (the sandbox's).
"""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from safediff.config import load_config
from safediff.eval.stats import bootstrap_mean
from safediff.models.base import T2IModel
from safediff.prompts import load_prompts
from safediff.sampling.sample import SamplerSettings, sample
from safediff.seeding import derive_seed, generator

logger = logging.getLogger(__name__)

EVAL_SEED = 1234


def evaluate_reward(
    model: T2IModel, reward, prompts: list[str], seeds_per_prompt: int, cfg
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [P * S] and images of `model` on fixed prompts and seeds (same for any model)."""
    all_prompts = [p for p in prompts for _ in range(seeds_per_prompt)]
    gens = [generator(derive_seed(EVAL_SEED, i)) for i in range(len(all_prompts))]
    traj = sample(model, all_prompts, gens, SamplerSettings.from_config(cfg.sampling)).trajectory
    with torch.no_grad():
        rewards = reward(traj.images, all_prompts).float().cpu()
    return rewards, traj.images.cpu()


def mean_ci(x: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of x [N] and its 95% percentile-bootstrap interval (`stats.bootstrap_mean`, i.e.
    scipy.stats.bootstrap, resamples drawn from np.random.default_rng(seed))."""
    est = bootstrap_mean(x.double().cpu().numpy(), np.random.default_rng(seed), n_boot)
    return est.value, est.lo, est.hi


def save_grid(images: torch.Tensor, path: Path, ncol: int) -> None:
    from PIL import Image

    b, _, h, w = images.shape
    nrow = (b + ncol - 1) // ncol
    canvas = torch.zeros(3, nrow * (h + 2), ncol * (w + 2))
    for i in range(b):
        r, c = divmod(i, ncol)
        canvas[:, r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = images[i]
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4), Image.NEAREST).save(path)


def run_demo(output_dir: str, quick: bool = False, overrides: list[str] | None = None) -> int:
    from safediff.models.loading import load_t2i_model
    from safediff.rewards.registry import build_reward
    from safediff.rl.trainer import train

    out = Path(output_dir)
    base_overrides = [f"run.output_dir={out / 'train'}"]
    if quick:
        base_overrides += ["run.epochs=4", "run.save_every=4"]
    cfg = load_config("tiny-demo", base_overrides + list(overrides or []))
    torch.manual_seed(0)
    prompts = load_prompts(cfg.prompts.file)[:8]
    seeds = 2 if quick else 4
    device = torch.device("cpu")
    reward = build_reward(cfg.reward, device=device)

    base = load_t2i_model(cfg.model, device=device)
    before, before_imgs = evaluate_reward(base, reward, prompts, seeds, cfg)

    summary = train(
        cfg, resume="auto", model=load_t2i_model(cfg.model, device=device), reward=reward
    )
    trained = dataclasses.replace(base, unet=summary["final_unet"].eval())
    after, after_imgs = evaluate_reward(trained, reward, prompts, seeds, cfg)

    print()
    print(
        f"GRPO on {cfg.model.pretrained} with the {cfg.reward.name} reward "
        f"({cfg.run.epochs} epochs, {cfg.grpo.samples_per_process} samples/epoch, K={cfg.grpo.group_size})"
    )
    print(
        "training reward per epoch: "
        + " ".join(f"{m['reward_mean/all']:.3f}" for m in summary["history"])
    )
    print(
        f"{'model':<14}{'mean reward':>12}{'95% CI':>22}   ({len(before)} fixed prompt x seed pairs)"
    )
    for name, vals in (("base", before), ("post-trained", after)):
        m, lo, hi = mean_ci(vals)
        print(f"{name:<14}{m:>12.4f}{f'[{lo:.4f}, {hi:.4f}]':>22}")
    delta = after - before
    m, lo, hi = mean_ci(delta)
    print(f"{'paired delta':<14}{m:>+12.4f}{f'[{lo:+.4f}, {hi:+.4f}]':>22}")
    save_grid(torch.cat([before_imgs[:16], after_imgs[:16]]), out / "before_after.png", ncol=16)
    print(
        f"images: {out / 'before_after.png'} (top: base, bottom: post-trained); metrics: {out / 'train' / 'metrics.jsonl'}"
    )
    return 0
