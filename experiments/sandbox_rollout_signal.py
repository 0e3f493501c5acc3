"""Does a GRPO group carry a glyph signal? Rollouts of the GRPO training prompts, scored per group.

    python experiments/sandbox_rollout_signal.py [--model sandbox] [--cfg 4 2 1] [--group-size 8]
        [--prompts 32] [--threads 2]

GRPO learns only from differences inside a group of K rollouts of one prompt (advantages are
normalised per group). For the steering reward to teach the model to drop a glyph, a group of an
unsafe prompt must (a) hold images with and without the glyph, and the reward must prefer the
glyph-free ones, or (b) score the glyph's degree (its detector confidence) lower, continuously.
This script measures both on `--prompts` unsafe captions of the "grpo_train" split (explicit,
implicit, synonym, keyword-minimal; fixed draw), K rollouts each with the demo's sampler (DDIM 10
steps, eta 1) at each CFG scale, and prints per reward:

- flagged: the detector's rate for the prompt's family, per kind; mixed: groups with at least
  one flagged and one unflagged image (only these can carry signal (a));
- adv free / adv flagged: the mean advantage (the trainer's, clip 2.5) of the unflagged /
  flagged images of mixed groups; pair win: the share of (unflagged, flagged) pairs of one group where the
  unflagged image scores higher (0.5: no preference);
- rho: the mean within-group Spearman correlation of the reward with the detector's logit over
  all groups (signal (b); negative: the reward prefers fainter glyphs).
The statistics are `safediff.rl.group_signal`'s.

Rewards: the steering reward with the `sandbox` anchors (the preset's) and with `sandbox_scenes`
(threshold 0.06), both alpha 4, threshold gating; the plain alignment reward (the control);
brightness (mean pixel value).

`experiments/sandbox_reward_signal.py` sweeps steering settings (alpha, mode, gating) on the mixed
groups at CFG 4; this script compares rewards and CFG scales, and adds the degree signal (b).
"""

import argparse

import torch

from safediff.eval.model_spec import parse_model_spec
from safediff.models.loading import load_t2i_model
from safediff.rewards.clip_rewards import build_steering_reward
from safediff.rl.group_signal import mixed_group_stats, within_group_spearman
from safediff.sandbox.captions import UNSAFE_KINDS, make_split
from safediff.sandbox.clip import load_sandbox_clip
from safediff.sandbox.demo_eval import generate_images
from safediff.sandbox.detector import load_detector
from safediff.sandbox.scene import FAMILIES

PROMPT_SEED = 7
ROLLOUT_SEED = 11


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sandbox", help="sandbox, sandbox:PATH or a run folder")
    p.add_argument("--cfg", type=float, nargs="+", default=[4.0, 2.0, 1.0])
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    k = args.group_size
    unsafe = [e for e in make_split("grpo_train", 20 * args.prompts, PROMPT_SEED)
              if e.metadata["kind"] in UNSAFE_KINDS][: args.prompts]  # fmt: skip
    kinds = [e.metadata["kind"] for e in unsafe]
    print(f"{len(unsafe)} unsafe grpo_train prompts x K={k}: "
          + ", ".join(f"{kk} {kinds.count(kk)}" for kk in UNSAFE_KINDS))  # fmt: skip
    rollouts = [e for e in unsafe for _ in range(k)]
    captions = [e.caption for e in rollouts]
    family = torch.tensor([FAMILIES.index(e.metadata["family"]) for e in rollouts])
    model = load_t2i_model(parse_model_spec(args.model))
    detector, clip = load_detector(), load_sandbox_clip()
    steer = {
        "steer/sandbox": build_steering_reward(clip, anchors="sandbox", alpha=4.0,
                                               gating="threshold"),
        "steer/sandbox_scenes": build_steering_reward(clip, anchors="sandbox_scenes", alpha=4.0,
                                                      gating="threshold", threshold=0.06),
    }  # fmt: skip
    text = clip.encode_text(captions)
    for cfg in args.cfg:
        images = generate_images(
            model, rollouts, seed=ROLLOUT_SEED, num_steps=10, guidance_scale=cfg, eta=1.0,
            batch_size=64, progress=False,
        )  # fmt: skip
        prob = detector.probs(images)[torch.arange(len(rollouts)), family].clamp(1e-6, 1 - 1e-6)
        flagged = (prob >= 0.5).float().view(-1, k)
        logit = (prob.log() - (1 - prob).log()).view(-1, k)
        n = flagged.sum(1)
        mixed = int(((n > 0) & (n < k)).sum())
        per_kind = ", ".join(
            f"{kk} {flagged[[i for i, x in enumerate(kinds) if x == kk]].mean():.2f}"
            for kk in UNSAFE_KINDS if kk in kinds
        )  # fmt: skip
        print(f"\nCFG {cfg:g}: flagged {flagged.mean():.3f} ({per_kind}); "
              f"mixed groups {mixed}/{len(unsafe)}")  # fmt: skip
        rewards = {name: r(images, captions) for name, r in steer.items()}
        rewards["alignment"] = (clip.encode_images(images) * text).sum(1)
        rewards["brightness"] = images.mean((1, 2, 3))
        for name, r in rewards.items():
            r = r.view(-1, k)
            rho = within_group_spearman(r, logit).mean()
            stats = mixed_group_stats(r, flagged)
            line = f"  {name:22s} rho {rho:+.2f}"
            if stats:
                line += (f" | mixed: adv free {stats['adv_free']:+.2f}, flagged "
                         f"{stats['adv_flagged']:+.2f}, pair win {stats['pair_win']:.2f}")  # fmt: skip
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
