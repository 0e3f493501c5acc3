"""DES training time on the tiny SD text encoder (CLIPTextModel, width 32, 2 layers).

Runs the DES objective with the paper's preset (batch 128 pairs, AdamW lr 1e-5, g = 200,
lambda = 0.3) on synthetic prompt lists and prints the setup time (codebook + targets) and the
measured time per optimizer step. Nothing is extrapolated to other encoders or devices.

    python bench/bench_des.py [--steps 8] [--safe 512] [--unsafe 256] [--threads 1]
"""

import argparse
import itertools
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safediff.defenses.des import DESConfig, train_des
from safediff.defenses.text_encoder_adapter import load_text_encoder_adapter

SUBJECTS = ["a woman", "a man", "two people", "a dancer", "a model", "an athlete", "a couple"]
PLACES = ["on a beach", "in a studio", "in a forest", "at a party", "in a bedroom", "on a street"]
SAFE_STYLES = ["wearing a coat", "in a red dress", "reading a book", "riding a bike", "smiling"]
UNSAFE_STYLES = ["nude", "naked", "topless", "undressed", "in explicit poses"]


def prompts(n: int, styles: list[str]) -> list[str]:
    out = []
    i = 0
    while len(out) < n:
        s, p, st = SUBJECTS[i % 7], PLACES[(i // 7) % 6], styles[(i // 42) % len(styles)]
        out.append(f"{s} {st} {p}, photo {i}")
        i += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--safe", type=int, default=512)
    parser.add_argument("--unsafe", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load_text_encoder_adapter("tiny-sd")
    n_params = sum(p.numel() for p in adapter.module.parameters())
    cfg = DESConfig()  # the paper's preset
    safe, unsafe = prompts(args.safe, SAFE_STYLES), prompts(args.unsafe, UNSAFE_STYLES)

    start = time.perf_counter()
    train_des(adapter, safe, unsafe, cfg, max_steps=0)  # codebook, targets, copy; no step
    setup = time.perf_counter() - start
    stamps: list[float] = []
    result = train_des(
        adapter, safe, unsafe, cfg, max_steps=args.steps + 1,
        on_step=lambda step, losses: stamps.append(time.perf_counter()),
    )  # fmt: skip
    per_step = [b - a for a, b in itertools.pairwise(stamps)]
    per_step.sort()
    median = per_step[len(per_step) // 2]
    print(
        f"DES on the tiny SD text encoder ({n_params / 1e6:.2f} M parameters, L = 77, D = 32), "
        f"CPU, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"preset: batch {cfg.batch_size} pairs, lr {cfg.lr}, g {cfg.concept_scale}, "
        f"lambda {cfg.lambda_safe}; {args.safe} safe / {args.unsafe} unsafe prompts"
    )
    print(
        f"setup (codebook of {args.safe} + targets of {args.unsafe} + encoder copy): {setup:.2f} s"
    )
    print(
        f"time per optimizer step (3 encoder passes with grad + 1 backward, {args.steps} steps "
        f"after a warm-up): median {median * 1e3:.0f} ms, min {per_step[0] * 1e3:.0f} ms, "
        f"max {per_step[-1] * 1e3:.0f} ms"
    )
    first, last = result.history[0]["total"], result.history[-1]["total"]
    print(f"loss over the {len(result.history)} steps: {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
