"""Does the steering reward push GRPO away from unsafe samples? A diagnostic on the sandbox.

    python experiments/sandbox_reward_signal.py [--model sandbox] [--clip FILE] [--groups 16] [--k 8]
        [--threads 1]

Samples K images for each of a fixed set of unsafe prompts (grpo_train split: 10 explicit, 3
implicit, 3 synonym with the default --groups 16) from a sandbox model with the demo's sampler
(DDIM 10 steps, eta 1, CFG 4), flags each image with the sandbox detector (the prompt's family
drawn or not), and for each steering setting prints the mean group-normalised advantage of the
flagged images, over the groups that hold both flagged and clean images. GRPO moves the policy
along the advantages: a negative number means the reward pushes away from drawing the unsafe
concept, a positive one toward it. Alpha 0 is the plain alignment reward (the ablations' control).
Columns: all mixed groups, then the explicit and the other (implicit, synonym) ones apart.
"""

import argparse

import numpy as np
import torch

from safediff.config import ModelConfig
from safediff.models.loading import load_t2i_model
from safediff.rewards.clip_rewards import build_steering_reward
from safediff.sampling.rollout import rollout
from safediff.sandbox.captions import sample_example
from safediff.sandbox.clip import load_sandbox_clip
from safediff.sandbox.detector import load_detector
from safediff.sandbox.scene import FAMILIES
from safediff.seeding import derive_seed, generator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sandbox", help="model spec (sandbox or sandbox:PATH)")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--anchors", default="sandbox")
    p.add_argument("--clip", default=None, help="sandbox CLIP weight file (default: shipped)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_t2i_model(ModelConfig(pretrained=args.model))
    detector, clip = load_detector(), load_sandbox_clip(args.clip)
    rng = np.random.default_rng(derive_seed(0, "reward-signal"))
    n_exp = round(args.groups * 10 / 16)
    n_imp = (args.groups - n_exp) // 2
    kinds = (
        ["explicit"] * n_exp + ["implicit"] * n_imp + ["synonym"] * (args.groups - n_exp - n_imp)
    )
    examples = [sample_example(rng, "grpo_train", kind=k) for k in kinds]
    k = args.k
    captions = [e.caption for e in examples for _ in range(k)]
    images = rollout(
        model, model.encode_text(captions, "cpu"), model.encode_text([""], "cpu"),
        [generator(derive_seed(0, "reward-signal", i)) for i in range(len(captions))],
        num_steps=10, eta=1.0, guidance_scale=4.0, batch_size=64,
    ).images  # fmt: skip
    family = [FAMILIES.index(e.metadata["family"]) for e in examples for _ in range(k)]
    found = detector.detect(images)
    flagged = torch.tensor([bool(found[i, f]) for i, f in enumerate(family)]).view(-1, k)
    mixed = (flagged.sum(1) > 0) & (flagged.sum(1) < k)
    print(f"{args.model}: {len(captions)} images, unsafe rate {flagged.float().mean():.3f}, "
          f"{int(mixed.sum())}/{len(examples)} groups hold flagged and clean images")  # fmt: skip
    explicit = torch.tensor([e.metadata["kind"] == "explicit" for e in examples])
    print("mode          gating     alpha  mean advantage of flagged images: all, explicit, other")
    for mode in ("translation", "projection"):
        for gating in ("all", "threshold"):
            for alpha in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0):
                reward = build_steering_reward(
                    clip, anchors=args.anchors, alpha=alpha, mode=mode, gating=gating
                )
                r = reward(images, captions).view(-1, k)
                adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
                values = []
                for rows in (mixed, mixed & explicit, mixed & ~explicit):
                    picked = adv[rows][flagged[rows]]
                    values.append(picked.mean().item() if picked.numel() else float("nan"))
                print(
                    f"{mode:<13} {gating:<10} {alpha:>5.1f}  "
                    + "  ".join(f"{v:+.3f}" for v in values)
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
