"""Does a steering reward prefer the glyph-free version of an unsafe prompt's scene? Rendered checks.

    python experiments/sandbox_reward_preference.py [--anchors sandbox_scenes] [--threshold 0.06]
        [--alphas 1,2,4] [--n 200] [--clip FILE] [--threads 1]

For N unsafe prompts of each kind of the `grpo_train` split (explicit, implicit, synonym,
keyword-minimal), renders the prompt's own scene twice, as prompted and with its glyph removed
(what a refusal looks like in the sandbox: an empty background, or only the benign companion
object), and scores both with the steering reward (translation, threshold gating) at each alpha.
No diffusion model is involved: this checks the reward alone. It prints, per kind:

- gated: the share of prompts the gate steers (text safety score below the threshold);
- removed wins: the share of prompts whose glyph-free render scores above the render as prompted,
  over all prompts and over those with a companion object (where the glyph-free render is not
  empty);

then the share of benign (`safe`) and negation prompts the gate steers, and the AUC with which the
text safety score separates benign from unsafe prompts. A reward that GRPO can learn a refusal
from wins on nearly every gated prompt and gates no benign prompt.
"""

import argparse
import dataclasses

import numpy as np
import torch

from safediff.rewards.clip_rewards import build_steering_reward
from safediff.sandbox.captions import UNSAFE_KINDS, sample_example
from safediff.sandbox.clip import load_sandbox_clip
from safediff.sandbox.render import render, to_tensor
from safediff.seeding import derive_seed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchors", default="sandbox_scenes", help="anchor set name or YAML path")
    p.add_argument("--threshold", type=float, default=0.06, help="gate: steer if s < threshold")
    p.add_argument("--alphas", default="1,2,4")
    p.add_argument("--n", type=int, default=200, help="prompts per kind")
    p.add_argument("--clip", default=None, help="sandbox CLIP weight file (default: shipped)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = load_sandbox_clip(args.clip)
    rng = np.random.default_rng(derive_seed(0, "reward-preference"))
    unsafe = {}
    for kind in UNSAFE_KINDS:
        examples = [sample_example(rng, "grpo_train", kind=kind) for _ in range(args.n)]
        as_prompted = [render(e.scene) for e in examples]
        removed = [render(dataclasses.replace(e.scene, glyphs=())) for e in examples]
        companion = torch.tensor([len(e.scene.objects) > 0 for e in examples])
        unsafe[kind] = (
            [e.caption for e in examples],
            to_tensor(np.stack(as_prompted)),
            to_tensor(np.stack(removed)),
            companion,
        )
    benign = [sample_example(rng, "grpo_train", kind="safe").caption for _ in range(args.n)]
    negation = [sample_example(rng, "grpo_train", kind="negation").caption for _ in range(args.n)]

    print(f"anchors {args.anchors}, threshold {args.threshold}, {args.n} prompts per kind")
    for alpha in (float(a) for a in args.alphas.split(",")):
        reward = build_steering_reward(
            clip, anchors=args.anchors, alpha=alpha, mode="translation", gating="threshold",
            threshold=args.threshold,
        )  # fmt: skip
        parts = []
        for kind, (captions, image, bare, companion) in unsafe.items():
            prompted = reward.score(image, captions)
            wins = (reward.score(bare, captions)["reward"] > prompted["reward"]).float()
            with_obj = f"{wins[companion].mean():.2f}" if companion.any() else "-"
            parts.append(
                f"{kind}: gated {prompted['weight'].mean():.2f}, removed wins {wins.mean():.2f}"
                f" (with companion {with_obj})"
            )
        print(f"alpha {alpha:g}\n  " + "\n  ".join(parts))

    gate = build_steering_reward(
        clip, anchors=args.anchors, alpha=1.0, gating="threshold", threshold=args.threshold
    )
    on_benign, on_negation = gate.prompt_targets(benign), gate.prompt_targets(negation)
    s_unsafe = gate.prompt_targets([c for v in unsafe.values() for c in v[0]])["text_safety"]
    auc = (s_unsafe[:, None] < on_benign["text_safety"][None, :]).float().mean().item()
    print(
        f"benign prompts gated {on_benign['weight'].mean():.2f}, "
        f"negation prompts gated {on_negation['weight'].mean():.2f}; "
        f"text safety AUC benign vs unsafe {auc:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
