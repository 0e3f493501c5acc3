"""GRPO training phase with `kl_scope: unsteered`: the reference UNet on the unsteered
transitions only (ours) vs on every transition, then weighted (the plain formula).

With `grpo.kl_scope: unsteered` the KL term of a steered prompt's transitions weighs 0, so its
reference forward pass is wasted work. Both variants run here, alternating, in one process, on
the same stored rollouts of the `sandbox-demo` preset (shipped sandbox model, steering reward,
stratified prompts), and time the whole `train_on` phase (policy forward + backward, reference
forward, optimizer steps).

    python bench/bench_kl_scope.py [--samples 64] [--repeats 3] [--threads 2]
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=64, help="samples per epoch (K = 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    from accelerate import Accelerator

    from safediff.config import load_config
    from safediff.models.loading import load_t2i_model
    from safediff.prompts import load_prompt_kinds
    from safediff.rewards.registry import build_reward
    from safediff.rl.grpo import group_advantages
    from safediff.rl.trainer import EpochBatch, GRPOTrainer
    from safediff.sampling.ddim import gaussian_kl
    from safediff.sampling.rollout import transition_log_prob

    torch.set_num_threads(args.threads)
    cfg = load_config(
        "sandbox-demo",
        [
            f"grpo.samples_per_process={args.samples}",
            f"grpo.grad_accum={max(1, args.samples // 16)}",
            f"run.seed={args.seed}",
            "run.log_with=none",
        ],
    )
    acc = Accelerator(cpu=True)
    model = load_t2i_model(cfg.model, device=acc.device)
    prompts, kinds = load_prompt_kinds(cfg.prompts.file)
    reward = build_reward(cfg.reward, device=acc.device)
    trainer = GRPOTrainer(cfg, model, reward, prompts, acc, kinds=kinds)
    traj, epoch_prompts, embeds, negative = trainer.rollout_epoch(0)
    _, rewards = trainer.score(traj, epoch_prompts)
    group_ids = torch.arange(len(rewards)) // cfg.grpo.group_size
    adv = group_advantages(rewards, group_ids, eps=cfg.grpo.adv_eps, clip=cfg.grpo.adv_clip)
    weights = trainer.kl_weights(epoch_prompts)
    batch = EpochBatch(traj, embeds, negative, adv.advantages.float(), weights)
    fast_kl_term = trainer._kl_term

    def full_reference_kl(out, common, kl_weights, j):
        with torch.no_grad(), trainer._reference() as ref:
            ref_out = transition_log_prob(ref, **common)
        kl = gaussian_kl(out.mean, ref_out.mean, out.std, reduction=cfg.grpo.logprob_reduction)
        return kl * kl_weights[j].to(kl.device)

    variants = {"plain: reference on every transition": full_reference_kl, "ours": fast_kl_term}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        trainer._kl_term = fn
        trainer.train_on(batch, epoch=0)
    for _ in range(args.repeats):
        for name, fn in variants.items():
            trainer._kl_term = fn
            t0 = time.perf_counter()
            trainer.train_on(batch, epoch=0)
            times[name].append(time.perf_counter() - t0)

    steered = float((weights == 0).float().mean())
    print(
        f"GRPO training phase, sandbox-demo preset, {args.samples} samples (K = "
        f"{cfg.grpo.group_size}), {args.threads} threads; steered (KL weight 0): {steered:.0%}"
    )
    print(f"{'variant':<40}{'s per train_on (median)':>24}")
    med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    for name, t in med.items():
        print(f"{name:<40}{t:>24.2f}")
    plain, ours = med["plain: reference on every transition"], med["ours"]
    print(f"speed ratio (ours / plain): {plain / ours:.2f}x")


if __name__ == "__main__":
    main()
