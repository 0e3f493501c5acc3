"""Exploration: retrain the sandbox CLIP with strong noise and tint augmentation (not shipped).

    python scripts/sandbox_robust_clip.py OUT.safetensors [--threads 1]

Same pool, steps, batch, lr and loss as `safediff sandbox build --only clip`, but each training
image gets a channel gain in [0.8, 1.2], an offset in [-0.15, 0.15] and Gaussian noise with std up
to 0.15 (the shipped CLIP: 0.9-1.1, +-0.03, 0.04). Use it as the demo's reward encoder with
`safediff demo --quick reward.params.encoder=sandbox:OUT.safetensors`: the question is whether
GRPO's drift towards tinted or noisy images (README, "The sandbox demo") comes from the CLIP's
blind spots. About 5 minutes on one thread.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import safediff.sandbox.clip as clip
from safediff.sandbox.build import BUILD_CONFIG
from safediff.sandbox.data import make_pool
from safediff.sandbox.text_encoder import load_text_encoder
from safediff.seeding import derive_seed


def strong_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x [B, 3, H, W] in [0, 1] -> same shape: gain, tint, light blur, noise (see module doc)."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    x = x * (0.8 + 0.4 * u(b, 3, 1, 1)) + (u(b, 3, 1, 1) - 0.5) * 0.3
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = 0.4 + 0.6 * u(b, 1, 1, 1)
    w = torch.where(u(b, 1, 1, 1) < 0.3, w, torch.ones_like(w))
    x = w * x + (1 - w) * blurred
    x = x + torch.randn(x.shape, generator=gen) * (0.15 * u(b, 1, 1, 1))
    return x.clamp(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to write the CLIP weights (.safetensors)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clip.augment = strong_augment  # train_clip looks `augment` up in its module
    t0 = time.perf_counter()
    pc, cfg = BUILD_CONFIG["pool"], BUILD_CONFIG["clip"]
    pool = make_pool(derive_seed(0, "train-pool"), pc["n_grammar"], pc["n_random"],
                     split=pc["split"], jitter=pc["jitter"])  # fmt: skip
    tower, losses = clip.train_clip(
        pool, load_text_encoder("cpu"), cfg["steps"], cfg["batch_size"], cfg["lr"],
        derive_seed(0, "clip"), "cpu", cfg["cos_weight"],
    )  # fmt: skip
    clip.save_clip(
        tower, args.out, {**cfg, "pool": pc, "augment": "scripts/sandbox_robust_clip.py"}
    )
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s; final loss {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
