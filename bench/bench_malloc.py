"""CPU speed with glibc's malloc tuned (`safediff.malloc_tuning`, what the `safediff` command
does at start) vs glibc's defaults, on the sandbox: DDIM generation of the demo's evaluation
prompts, and one GRPO epoch of the `sandbox-demo` preset (rollout, reward, training phase).

Each variant runs in its own subprocess (the thresholds are process-wide), the two alternating
`--repeats` times; the ratio of medians is printed.

    python bench/bench_malloc.py [--threads 2] [--prompts 128] [--samples 32] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_variant(args: argparse.Namespace) -> dict:
    from safediff.malloc_tuning import tune_malloc

    tuned = tune_malloc() if args.variant == "tuned" else False
    import torch
    from accelerate import Accelerator

    from safediff.config import load_config
    from safediff.models.loading import load_t2i_model
    from safediff.prompts import load_prompt_kinds
    from safediff.rewards.registry import build_reward
    from safediff.rl.trainer import GRPOTrainer
    from safediff.sandbox.demo_eval import demo_eval_prompts, generate_images

    torch.set_num_threads(args.threads)
    cfg = load_config(
        "sandbox-demo",
        [
            f"grpo.samples_per_process={args.samples}",
            f"grpo.grad_accum={max(1, args.samples // 16)}",
            "run.log_with=none",
        ],
    )
    model = load_t2i_model(cfg.model, device=torch.device("cpu"))
    examples = demo_eval_prompts(
        n_safe_per_task=40, n_unsafe_per_family=50, n_other_per_kind=40, seed=2024
    )[: args.prompts]
    t0 = time.perf_counter()
    generate_images(
        model,
        examples,
        seed=2024,
        num_steps=10,
        guidance_scale=4.0,
        eta=1.0,
        batch_size=64,
        progress=False,
    )
    t_generate = time.perf_counter() - t0
    prompts, kinds = load_prompt_kinds(cfg.prompts.file)
    trainer = GRPOTrainer(
        cfg,
        model,
        build_reward(cfg.reward, device=torch.device("cpu")),
        prompts,
        Accelerator(cpu=True),
        kinds=kinds,
    )
    t0 = time.perf_counter()
    trainer.run_epoch(0)
    t_epoch = time.perf_counter() - t0
    return {"variant": args.variant, "tuned": tuned, "generate_s": t_generate, "epoch_s": t_epoch}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=128, help="evaluation prompts generated")
    p.add_argument("--samples", type=int, default=32, help="GRPO samples in the epoch (K = 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(args.repeats):
        for variant in runs:
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k}={v}" for k, v in vars(args).items() if k != "variant"
            ]
            env = {**os.environ, "SAFEDIFF_MALLOC_TUNING": "1"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not all(r["tuned"] for r in runs["tuned"]):
        print("note: mallopt was refused or unavailable here; both variants ran with defaults")

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    print(
        f"sandbox, {args.threads} threads: generation of {args.prompts} evaluation prompts "
        f"(10 DDIM steps, CFG) and one GRPO epoch of {args.samples} samples; median of "
        f"{args.repeats} runs per variant, each its own process"
    )
    print(f"{'variant':<28}{'generate s':>12}{'GRPO epoch s':>14}")
    for variant, label in (("default", "glibc defaults"), ("tuned", "tuned (safediff command)")):
        print(
            f"{label:<28}{median(variant, 'generate_s'):>12.1f}{median(variant, 'epoch_s'):>14.1f}"
        )
    print(
        "speed ratio (tuned / default): generation "
        f"{median('default', 'generate_s') / median('tuned', 'generate_s'):.2f}x, GRPO epoch "
        f"{median('default', 'epoch_s') / median('tuned', 'epoch_s'):.2f}x"
    )


if __name__ == "__main__":
    main()
