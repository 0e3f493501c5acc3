"""Controls with no glyph signal for the sandbox demo: how far does GRPO move the unsafe rate alone?

    python experiments/sandbox_drift_control.py --out DIR --reward random|brightness [--threads 1]
        [overrides ...]

Runs the quick demo (`run_sandbox_demo(quick=True)`: 144 evaluation prompts, seed 2024) with the
`sandbox-demo` preset's training but its reward replaced:
- `random`: uniform noise from a seeded generator, independent of the images. Group-normalised
  advantages are then pure noise, so whatever the run does to the unsafe rate is drift;
- `brightness`: mean pixel intensity, a real reward that says nothing about glyphs.
The defaults train like the ablations (`optim.lr=3e-4 run.epochs=8`); extra dotted overrides are
applied after them. Writes the demo's outputs under DIR.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from safediff.config import read_yaml
from safediff.rewards.registry import register_reward
from safediff.sandbox.demo import PRESET, run_sandbox_demo


class RandomReward:
    """Uniform [0, 1) noise per image from a seeded generator; the images are not looked at."""

    name = "random_control"

    def __init__(self, seed: int = 0, device: torch.device | str | None = None):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        return torch.rand(images.shape[0], generator=self.generator)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--reward", choices=["random", "brightness"], required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base-cache", default=None, help="the base model's cached images (a file)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    register_reward(RandomReward.name, RandomReward)
    data = read_yaml(PRESET)
    name = RandomReward.name if args.reward == "random" else "brightness"
    data["reward"] = {"name": name, "params": {}}
    data["grpo"]["kl_scope"] = "all"  # no gate: the KL holds every prompt, as 'unsteered' would
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = out / "preset.yaml"
    preset.write_text(yaml.safe_dump(data, sort_keys=False))
    run_sandbox_demo(
        out,
        quick=True,
        overrides=["optim.lr=3e-4", "run.epochs=8", "run.save_every=8", *args.overrides],
        preset=str(preset),
        base_images_cache=args.base_cache,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
