"""Which image does the steering reward prefer for an unsafe prompt? A probe on clean renders.

    python experiments/sandbox_reward_probe.py [--n 150] [--anchors sandbox] [--clip FILE] [--threads 1]

For explicit prompts of the "grpo_train" split, renders four images with the sandbox renderer
(no diffusion model involved): the scene as prompted (glyph drawn), the same scene with the glyph
removed, the glyph replaced by a red circle of its size and place, and an empty background. Each
is scored by the steering reward (sandbox CLIP, translation, threshold gating) against the
prompt, for each alpha. Only prompts the gate steers are counted (an unsteered prompt keeps the
plain alignment reward, which prefers the glyph by construction). Prints the mean reward of each
image and how often removal beats the glyph. GRPO can only learn what some sample in a group
shows, so a refusal the reward prefers must also be one the policy can draw.

Then, for 1,500 prompts of the "grpo_train" split, the share the threshold gate steers (its text safety score s < t)
among unsafe-side prompts (explicit, implicit, synonym, keyword-minimal) and safe-side ones (benign
and negation), for each --thresholds value.
"""

import argparse
import dataclasses

import numpy as np
import torch

from safediff.rewards.clip_rewards import build_steering_reward
from safediff.sandbox.captions import sample_example
from safediff.sandbox.clip import load_sandbox_clip
from safediff.sandbox.render import render, to_tensor
from safediff.sandbox.scene import Obj, Scene
from safediff.seeding import derive_seed

VARIANTS = ("as prompted", "glyph removed", "glyph -> circle", "empty")


def variants(scene: Scene) -> list[Scene]:
    glyph = scene.glyphs[0]
    circle = Obj("circle", "red", glyph.x, glyph.y, glyph.size)
    return [
        scene,
        dataclasses.replace(scene, glyphs=()),
        dataclasses.replace(scene, glyphs=(), objects=(*scene.objects, circle)),
        Scene(),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=150, help="explicit prompts drawn")
    p.add_argument("--anchors", default="sandbox", help="anchor set name or YAML path")
    p.add_argument("--alphas", default="1,4", help="comma-separated alphas")
    p.add_argument("--thresholds", default="0,0.06", help="comma-separated gate thresholds")
    p.add_argument(
        "--clip", default=None, help="sandbox CLIP weight file (default: the shipped one)"
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = load_sandbox_clip(args.clip)
    rng = np.random.default_rng(derive_seed(0, "reward-probe"))
    examples = [sample_example(rng, "grpo_train", kind="explicit") for _ in range(args.n)]
    examples = [e for e in examples if e.scene.glyphs]
    images = to_tensor(np.stack([render(s) for e in examples for s in variants(e.scene)]))
    captions = [e.caption for e in examples for _ in VARIANTS]
    k = len(VARIANTS)
    print(f"{len(examples)} explicit prompts, anchors {args.anchors}")
    print("alpha  steered  " + "  ".join(f"{v:>15}" for v in VARIANTS) + "  removed > prompted")
    for alpha in (float(a) for a in args.alphas.split(",")):
        steer = build_steering_reward(
            clip, anchors=args.anchors, alpha=alpha, mode="translation", gating="threshold"
        )
        r = steer(images, captions).view(-1, k)
        steered = steer.prompt_targets([e.caption for e in examples])["weight"] > 0
        rs = r[steered.to(r.device)]
        means = "  ".join(f"{v:>15.3f}" for v in rs.mean(0).tolist())
        wins = (rs[:, 1] > rs[:, 0]).float().mean().item()
        print(f"{alpha:>5.1f}  {int(steered.sum()):>3}/{len(examples):<3}  {means}  {wins:>17.2f}")

    rng = np.random.default_rng(derive_seed(0, "reward-probe-gate"))
    mix = [sample_example(rng, "grpo_train") for _ in range(1500)]
    s = steer.prompt_targets([e.caption for e in mix])["text_safety"].cpu()
    unsafe = torch.tensor([e.metadata.get("family") is not None for e in mix])
    print(f"gate over {len(mix)} grpo_train prompts ({int(unsafe.sum())} unsafe-side)")
    for t in (float(x) for x in args.thresholds.split(",")):
        print(
            f"threshold {t:+.2f}: unsafe-side steered {(s[unsafe] < t).float().mean():.2f}, "
            f"safe-side steered {(s[~unsafe] < t).float().mean():.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
