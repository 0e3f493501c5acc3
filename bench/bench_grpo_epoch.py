"""GRPO epoch on the tiny pipeline: batched transitions (ours) vs one timestep per backward.

The reference trainer loops `for each sample batch: for each timestep: forward, backward`, then
steps the optimizer, so one backward pass covers a few samples (4 in SafeDiffusion-R1's recipe,
`--ref-batch`) at one timestep. Ours shuffles every (sample, timestep) transition of the epoch and
trains them in micro-batches mixed across timesteps, stepping once per epoch here
(grpo.grad_accum=0). Whole epochs (rollout + reward + training) are compared by
`bench/gpu_suite.py --sections grpo_epoch` (`--size cpu` on a CPU). Both variants
run here on the same stored rollouts, the same model and the same reward; each runs in its own
subprocess so that peak memory (CUDA max allocated, or peak RSS on CPU) is measured per variant.

    python bench/bench_grpo_epoch.py [--device cpu] [--steps 10] [--samples 16] [--repeats 2]
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from accelerate import Accelerator

    from safediff.config import load_config
    from safediff.models.loading import load_t2i_model
    from safediff.prompts import load_prompts
    from safediff.rewards.brightness import BrightnessReward
    from safediff.rl.grpo import clipped_policy_loss, group_advantages
    from safediff.rl.trainer import EpochBatch, GRPOTrainer, peak_memory_mb

    torch.set_num_threads(args.threads)
    overrides = [
        f"model.pretrained={args.model}",
        f"sampling.num_steps={args.steps}",
        "sampling.guidance_scale=3.0",
        f"sampling.rollout_batch_size={args.samples}",
        "grpo.group_size=4",
        f"grpo.samples_per_process={args.samples}",
        "grpo.clip_range=0.2",
        f"grpo.micro_batch={args.micro_batch}",
        "grpo.grad_accum=0",  # one optimizer step per epoch in both variants
        "run.log_with=none",
    ]
    cfg = load_config(None, overrides)
    acc = Accelerator(cpu=args.device == "cpu")
    model = load_t2i_model(cfg.model, device=acc.device)
    trainer = GRPOTrainer(cfg, model, BrightnessReward(), load_prompts(cfg.prompts.file), acc)
    dev = acc.device
    traj, prompts, embeds, negative = trainer.rollout_epoch(0)
    _, rewards = trainer.score(traj, prompts)
    adv = group_advantages(
        rewards, torch.arange(len(rewards), device=rewards.device) // 4, eps=1e-4, clip=2.5
    )
    batch = EpochBatch(traj, embeds, negative, adv.advantages.float())
    n_steps = traj.log_probs.shape[1]
    transitions = args.samples * n_steps

    def ours() -> None:
        trainer.train_on(batch, epoch=0)

    def reference_style() -> None:
        # for each minibatch of `ref_batch` samples: for each timestep forward + backward, then
        # an optimizer step (the reference's loop)
        from safediff.sampling.rollout import transition_log_prob

        for start in range(0, args.samples, args.ref_batch):
            j = torch.arange(start, min(start + args.ref_batch, args.samples))
            for s in range(n_steps):
                out = transition_log_prob(
                    trainer.unet,
                    model.schedule,
                    traj.latents[j, s].to(dev),
                    traj.latents[j, s + 1].to(dev),
                    traj.timesteps[s].repeat(len(j)).to(dev),
                    traj.prev_timesteps[s].repeat(len(j)).to(dev),
                    embeds[j],
                    negative.expand(len(j), -1, -1),
                    cfg.sampling.guidance_scale,
                    cfg.sampling.eta,
                )
                loss, _ = clipped_policy_loss(
                    out.log_prob, traj.log_probs[j, s].to(dev), batch.advantages[j].to(dev), 0.2
                )
                acc.backward(loss.sum() / transitions)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

    fn = ours if args.variant == "ours" else reference_style
    fn()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.repeats
    return {
        "variant": args.variant,
        "train_s_per_epoch": dt,
        "transitions_per_s": transitions / dt,
        "samples_per_s": args.samples / dt,
        "peak_mem_mb": peak_memory_mb(dev),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=32, help="ours: transitions per backward")
    p.add_argument(
        "--ref-batch", type=int, default=4, help="reference: samples per backward (one timestep)"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("reference", "ours"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "variant"
        ]
        out = (
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        results[variant] = json.loads(out)
    ref, ours = results["reference"], results["ours"]
    print(
        f"GRPO training phase, {args.model}, {args.samples} samples x {args.steps} steps, device {args.device}"
    )
    print(f"{'variant':<34}{'transitions/s':>14}{'samples/s':>11}{'peak MiB':>10}")
    print(
        f"{'reference: 1 t/backward, ' + str(args.ref_batch) + ' smp/step':<34}{ref['transitions_per_s']:>14.1f}{ref['samples_per_s']:>11.2f}{ref['peak_mem_mb']:>10.0f}"
    )
    print(
        f"{'ours: ' + str(args.micro_batch) + ' mixed transitions/backward':<34}{ours['transitions_per_s']:>14.1f}{ours['samples_per_s']:>11.2f}{ours['peak_mem_mb']:>10.0f}"
    )
    print(
        f"speed ratio (ours / reference): {ours['transitions_per_s'] / ref['transitions_per_s']:.2f}x; "
        f"peak memory ratio: {ours['peak_mem_mb'] / ref['peak_mem_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
