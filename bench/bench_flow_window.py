"""Training cost per epoch of windowed (MixGRPO) vs full-SDE (Flow-GRPO) GRPO on a flow model.

Runs the same GRPO configuration twice on a flow model (default the offline tiny SD3), once with
every step an SDE step and trained (`sampling.window_size=0`) and once with an SDE window of W
steps (`sampling.window_size=W`, rule cyclic), and prints side by side per epoch: rollout time,
update time (epoch - rollout), transitions trained, the training reward; then the ratio of the
update (and whole-epoch) time, windowed / full, and each run's reward on fixed prompts and seeds
before and after training with the paired 95% interval of the change (`safediff.demo.mean_ci`),
the evidence that the reward still rises with the window. Times are measured, not extrapolated;
the first epoch of each run is a warm-up and left out of the means.

    python bench/bench_flow_window.py [--model tiny-sd3] [--steps 8] [--window 2] [--epochs 6]
        [--samples 16] [--device cpu] [--threads 1]
"""

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safediff.config import load_config
from safediff.demo import evaluate_reward, mean_ci
from safediff.models.loading import load_t2i_model
from safediff.prompts import load_prompts
from safediff.rewards.brightness import BrightnessReward
from safediff.rl.trainer import train


def overrides(args: argparse.Namespace, window: int, out: Path) -> list[str]:
    return [
        f"model.pretrained={args.model}",
        f"sampling.num_steps={args.steps}",
        "sampling.eta=0.7",
        f"sampling.guidance_scale={args.guidance}",
        f"sampling.rollout_batch_size={args.samples}",
        f"sampling.window_size={window}",
        "sampling.window_rule=cyclic",
        "grpo.group_size=4",
        f"grpo.samples_per_process={args.samples}",
        "grpo.clip_range=0.2",
        f"grpo.micro_batch={args.micro_batch}",
        "grpo.train_last_step=false",
        "optim.lr=3e-3",
        "prompts.file=builtin:smoke",
        "run.log_with=none",
        f"run.epochs={args.epochs}",
        f"run.save_every={args.epochs}",
        f"run.output_dir={out}",
    ]


def run(args: argparse.Namespace, window: int, out: Path) -> dict:
    cfg = load_config(None, overrides(args, window, out))
    device = torch.device(args.device)
    reward = BrightnessReward()
    prompts = load_prompts(cfg.prompts.file)[:8]
    base = load_t2i_model(cfg.model, device=device)
    before, _ = evaluate_reward(base, reward, prompts, 2, cfg)
    start = time.perf_counter()
    summary = train(cfg, model=load_t2i_model(cfg.model, device=device), reward=reward)
    wall = time.perf_counter() - start
    trained = dataclasses.replace(base, unet=summary["final_unet"].eval())
    after, _ = evaluate_reward(trained, reward, prompts, 2, cfg)
    return {
        "history": summary["history"],
        "wall": wall,
        "before": mean_ci(before),
        "after": mean_ci(after),
        "delta": mean_ci(after - before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd3", help="tiny-sd3, tiny-flux or a folder")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps S")
    parser.add_argument("--window", type=int, default=2, help="SDE window W (< S)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=16, help="samples per epoch (K = 4)")
    parser.add_argument("--micro-batch", type=int, default=16, help="transitions per backward")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_flow_window_"))
    try:
        full = run(args, 0, tmp / "full")
        windowed = run(args, args.window, tmp / "window")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nGRPO on {args.model}, {args.steps} steps, {args.samples} samples/epoch, "
        f"{args.epochs} epochs, device {args.device}, {args.threads} thread(s); "
        f"full SDE vs a cyclic window of {args.window} steps (last step untrained in both)"
    )
    cols = f" {'rollout s':>9} {'update s':>9} {'trans':>6} {'reward':>7} |"
    print(f"{'':>5} | {'full SDE':^35}| {f'window W={args.window}':^35}|")
    print(f"{'epoch':>5} |" + cols + cols)
    upd: dict[str, list[float]] = {"full": [], "window": []}
    tot: dict[str, list[float]] = {"full": [], "window": []}
    for e, (a, b) in enumerate(zip(full["history"], windowed["history"], strict=True)):
        row = f"{e:>5} |"
        for key, m in (("full", a), ("window", b)):
            update = m["perf/epoch_s"] - m["perf/rollout_s"]
            if e > 0:  # epoch 0 warms up
                upd[key].append(update)
                tot[key].append(m["perf/epoch_s"])
            row += (
                f" {m['perf/rollout_s']:>9.3f} {update:>9.3f} "
                f"{m['train/transitions_per_inner_epoch']:>6.0f} {m['reward_mean/all']:>7.4f} |"
            )
        print(row)
    mu = {k: statistics.mean(v) for k, v in upd.items()}
    mt = {k: statistics.mean(v) for k, v in tot.items()}
    print(
        f"mean update time per epoch (epochs 1..{args.epochs - 1}): full {mu['full']:.3f} s, "
        f"window {mu['window']:.3f} s -> ratio window/full {mu['window'] / mu['full']:.3f} "
        f"(transitions {args.window}/{args.steps - 1} = {args.window / (args.steps - 1):.3f})"
    )
    print(
        f"mean epoch time (rollout + update): full {mt['full']:.3f} s, window "
        f"{mt['window']:.3f} s -> ratio {mt['window'] / mt['full']:.3f}"
    )
    for key, r in (("full SDE", full), (f"window W={args.window}", windowed)):
        (b, *_), (a, *_), (d, lo, hi) = r["before"], r["after"], r["delta"]
        print(
            f"{key:<12} fixed-prompt reward {b:.4f} -> {a:.4f}, paired delta {d:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] (95%, 16 prompt x seed pairs)"
        )


if __name__ == "__main__":
    main()
