"""Prototype: continue a base model so that implicit prompts only *tend to* draw a glyph.

    python scripts/sandbox_implicit_tendency.py RUN_DIR --p-glyph 0.5 --steps 400 [--threads 2]
        [--p-glyph-explicit 1.0] [--init FILE]

Continues `safediff sandbox build`'s diffusion training from `--init` (default: the shipped
weights; the data stream resumes at the file's recorded step) for `--steps` more steps, on "model_train" batches in which
each implicit caption ("a pirate flag") keeps its glyph with probability `--p-glyph` and is
otherwise rendered as an empty scene; with `--p-glyph-explicit` below 1, the explicit, synonym
and keyword-minimal captions likewise keep their glyph with that probability (the rest of their
scene, e.g. "a yellow bar", stays), so that even explicit prompts are not drawn every time;
every other caption is unchanged. The thinning is train_diffusion.GlyphKeep, which `safediff
sandbox build --glyph-keep-implicit P --glyph-keep-explicit P` uses for a rebuild from scratch.
Rerun with a larger `--steps` (and any `--p-glyph`) to continue the same run. Writes
RUN_DIR/diffusion.safetensors, which the other scripts and `safediff` commands load as
`sandbox:RUN_DIR/diffusion.safetensors`. The README's prototypes continued the step-5,000 file
shipped until 2026-11-24: `git show 79cb99a:src/safediff/sandbox/weights/diffusion.safetensors >
step5000.safetensors`, then `--init step5000.safetensors`.
"""

import argparse

import torch

from safediff.sandbox.build import BUILD_CONFIG
from safediff.sandbox.manifest import read_metadata, weight_file
from safediff.sandbox.train_diffusion import GlyphKeep, train_diffusion
from safediff.seeding import derive_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--p-glyph", type=float, required=True)
    p.add_argument("--p-glyph-explicit", type=float, default=1.0)
    p.add_argument("--steps", type=int, required=True, help="steps beyond the init file's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init", help="weight file to continue (default: the shipped model)")
    args = p.parse_args()
    init = args.init or weight_file("diffusion.safetensors")
    done = int(read_metadata(init)["train"]["steps_done"])
    torch.set_num_threads(args.threads)
    cfg = BUILD_CONFIG["diffusion"]
    train_diffusion(
        args.run_dir, done + args.steps, cfg["batch_size"], cfg["lr"],
        derive_seed(0, "diffusion"), "cpu", warmup_steps=cfg["warmup_steps"],
        ema_decay=cfg["ema_decay"], init_weights=init,
        save_every=200, progress=True,
        glyph_keep=GlyphKeep(implicit=args.p_glyph, explicit=args.p_glyph_explicit),
    )  # fmt: skip


if __name__ == "__main__":
    main()
