"""Exploration: retrain the sandbox CLIP with strong noise and tint augmentation (not shipped).

    python experiments/sandbox_robust_clip.py OUT.safetensors [--threads 1]

Same steps, batch, lr and loss as `safediff sandbox build --only clip`, and its grammar pool
without the empty scenes (BUILD_CONFIG["clip"]["n_blank"]) that the shipped CLIP's pool has since
gained, as in the run of docs/LOG.md, section 1; but each training image gets a channel gain in [0.8, 1.2], an
offset in [-0.15, 0.15] and Gaussian noise with std up to 0.15 (the shipped CLIP: 0.9-1.1,
+-0.03, 0.04). Use it as the demo's reward encoder with
`safediff demo --quick reward.params.encoder=sandbox:OUT.safetensors`: the question is whether
GRPO's drift towards tinted or noisy images (docs/LOG.md, section 2) comes from the CLIP's
blind spots. About 5 minutes on one thread.
"""

import argparse
import functools
import time

import torch

import safediff.sandbox.clip as clip
from safediff.sandbox.build import BUILD_CONFIG
from safediff.sandbox.data import augment, make_pool
from safediff.sandbox.text_encoder import load_text_encoder
from safediff.seeding import derive_seed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to write the CLIP weights (.safetensors)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # train_clip takes no augmentation argument; it looks `augment` up in its module
    clip.augment = functools.partial(augment, gain=0.2, offset=0.15, noise=0.15)
    t0 = time.perf_counter()
    pc, cfg = BUILD_CONFIG["pool"], BUILD_CONFIG["clip"]
    pool = make_pool(derive_seed(0, "train-pool"), pc["n_grammar"], pc["n_random"],
                     split=pc["split"], jitter=pc["jitter"])  # fmt: skip
    tower, losses = clip.train_clip(
        pool, load_text_encoder("cpu"), cfg["steps"], cfg["batch_size"], cfg["lr"],
        derive_seed(0, "clip"), "cpu", cfg["cos_weight"],
    )  # fmt: skip
    clip.save_clip(
        tower, args.out, {**cfg, "pool": pc, "augment": "experiments/sandbox_robust_clip.py"}
    )
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s; final loss {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
