"""`safediff steer`: look at the steering geometry before training with it.

For a list of prompts it prints each prompt's text safety score s = E(p) . v_safe, its gate weight
and whether the steering reward would steer it, then saves a plot of the alpha sweep: for alpha
from 0 to 1, the cosine of the steered target z*(alpha) to the original prompt embedding E(p)
(how much of the prompt the reward still asks for) and to v_safe (how safe the target is), as
mean and min-max band over the safe-side and the unsafe-side prompts (s >= threshold vs s <
threshold).

  safediff steer --encoder hpsv2:/ckpt/HPS_v2.1_compressed.pt --anchors compact \
      --prompts prompts.txt --mode projection --gating threshold --plot steer.png
"""

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from safediff.errors import SafediffError
from safediff.rewards.anchors import load_anchor_set
from safediff.rewards.encoders import load_encoder
from safediff.rewards.encoders.base import autocast_context, parse_dtype
from safediff.rewards.steering import (
    GATING_MODES,
    STEER_MODES,
    gate_weights,
    safety_direction,
    safety_score,
    steer,
)

MAX_SWEEP_POINTS = 10_000
"""The most alpha values the sweep plots (each is one steering pass over every prompt)."""


def add_steer_parser(subparsers: Any) -> None:
    """Register the `steer` subcommand on an argparse subparsers object (sets func=run_steer)."""
    p = subparsers.add_parser(
        "steer",
        help="print prompts' safety scores and plot the steering alpha sweep",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--encoder",
        required=True,
        help="encoder spec: hpsv2:CKPT, openclip:MODEL:CKPT or hf-clip:FOLDER",
    )
    p.add_argument("--anchors", default="compact", help="anchor set name or YAML file")
    p.add_argument(
        "--prompts",
        default=None,
        help="prompt file (.txt one a line, a prompt-set .csv) or builtin:NAME",
    )
    p.add_argument(
        "--prompt", action="append", default=[], help="a prompt (repeatable; added to --prompts)"
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, help="steering strength for the table (finite)"
    )
    p.add_argument("--mode", choices=STEER_MODES, default="translation")
    p.add_argument("--gating", choices=GATING_MODES, default="all")
    p.add_argument("--threshold", type=float, default=0.0, help="gating threshold on s (finite)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.05,
        help="soft gating temperature (finite; > 0 for soft gating)",
    )
    p.add_argument(
        "--sweep-points",
        type=int,
        default=21,
        help=f"alpha values in [0, 1] (2 to {MAX_SWEEP_POINTS})",
    )
    p.add_argument("--plot", default="steer_sweep.png", help="output PNG of the alpha sweep")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="encoder weight dtype")
    p.add_argument("--autocast", default=None, help="autocast dtype (float16/bfloat16) or none")
    p.set_defaults(func=run_steer)


def read_prompts(path: str | None, extra: list[str]) -> list[str]:
    """Prompts from a file or builtin list (`safediff.prompts.load_prompts`), plus `extra`."""
    from safediff.prompts import load_prompts

    prompts = load_prompts(path) if path is not None else []
    prompts += [p for p in extra if p.strip()]
    if not prompts:
        raise SafediffError("no prompts: pass --prompts FILE and/or --prompt TEXT")
    return prompts


def alpha_sweep(
    z: torch.Tensor,
    v_safe: torch.Tensor,
    alphas: torch.Tensor,
    mode: str,
    weight: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """For each alpha [A]: cos(z*, z) and cos(z*, v_safe) per prompt, each [A, P].

    z [P, D] unit prompt embeddings, v_safe [D], weight [P] gate weights.
    """
    to_prompt, to_safe = [], []
    for a in alphas.tolist():
        z_star = steer(z, v_safe, a, mode, weight)  # [P, D]
        to_prompt.append((z_star * z).sum(-1))
        to_safe.append(z_star @ v_safe)
    return {"cos_prompt": torch.stack(to_prompt), "cos_safe": torch.stack(to_safe)}


def _plot(
    path: Path,
    alphas: torch.Tensor,
    sweep: dict[str, torch.Tensor],
    unsafe_mask: torch.Tensor,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    a = alphas.numpy()
    panels = [
        ("cos_prompt", "cos(z*, E(prompt))"),
        ("cos_safe", "cos(z*, v_safe)"),
    ]
    groups = [
        ("safe-side prompts", ~unsafe_mask, "tab:blue"),
        ("unsafe-side prompts", unsafe_mask, "tab:red"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = sweep[key]  # [A, P]
        for name, mask, color in groups:
            if not bool(mask.any()):
                continue
            v = values[:, mask]
            ax.plot(a, v.mean(1).numpy(), color=color, label=f"{name} (n={int(mask.sum())}), mean")
            ax.fill_between(
                a, v.min(1).values.numpy(), v.max(1).values.numpy(), color=color, alpha=0.2
            )
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_steer(args: argparse.Namespace) -> int:
    """Print the safety table and save the alpha-sweep plot; returns the exit status (0)."""
    for flag, value in (
        ("--alpha", args.alpha),
        ("--threshold", args.threshold),
        ("--temperature", args.temperature),
    ):
        if not math.isfinite(value):
            raise SafediffError(f"{flag} must be a finite number, got {value}")
    if not 2 <= args.sweep_points <= MAX_SWEEP_POINTS:
        raise SafediffError(
            f"--sweep-points must be in [2, {MAX_SWEEP_POINTS}], got {args.sweep_points}"
        )
    if args.gating == "soft" and not args.temperature > 0:
        raise SafediffError(f"--temperature must be > 0 for soft gating, got {args.temperature}")
    prompts = read_prompts(args.prompts, list(args.prompt))
    anchors = load_anchor_set(args.anchors)
    encoder = load_encoder(args.encoder, device=args.device, dtype=args.dtype)
    ac = None if args.autocast in (None, "none") else parse_dtype(args.autocast)
    with autocast_context(encoder.device, ac):
        safe = encoder.encode_text(list(anchors.safe)) if anchors.safe else None
        unsafe = encoder.encode_text(list(anchors.unsafe)) if anchors.unsafe else None
        z = encoder.encode_text(prompts).float()
    v_safe = safety_direction(safe, unsafe)
    s = safety_score(z, v_safe).cpu()
    w = gate_weights(s, args.gating, args.threshold, args.temperature)
    z, v_safe = z.cpu(), v_safe.cpu()
    z_star = steer(z, v_safe, args.alpha, args.mode, w)

    print(f"encoder: {getattr(encoder, 'name', args.encoder)}")
    print(
        f"anchors: {anchors.name} ({len(anchors.safe)} safe + {len(anchors.unsafe)} unsafe); "
        f"source: {anchors.source or 'n/a'}"
    )
    print(
        f"mode={args.mode} alpha={args.alpha} gating={args.gating} threshold={args.threshold}"
        + (f" temperature={args.temperature}" if args.gating == "soft" else "")
    )
    print(f"{'s':>8}  {'weight':>6}  {'steered':>7}  {'cos(z*,z)':>9}  prompt")
    for i, prompt in enumerate(prompts):
        wi = float(w[i])
        steered = "yes" if wi >= 0.999 else ("no" if wi <= 1e-3 else "partly")
        cos_zz = float((z_star[i] * z[i]).sum())
        print(f"{float(s[i]):+8.4f}  {wi:6.3f}  {steered:>7}  {cos_zz:9.4f}  {prompt}")

    alphas = torch.linspace(0.0, 1.0, args.sweep_points)
    sweep = alpha_sweep(z, v_safe, alphas, args.mode, w)
    unsafe_mask = s < args.threshold
    plot_path = Path(args.plot).expanduser()
    title = (
        f"{anchors.name} anchors, {args.mode} steering, gating={args.gating}"
        f" (threshold {args.threshold:g}); {getattr(encoder, 'name', args.encoder)}"
    )
    _plot(plot_path, alphas, sweep, unsafe_mask, title)
    print(
        f"{int(unsafe_mask.sum())} of {len(prompts)} prompts on the unsafe side (s < "
        f"{args.threshold:g}); alpha sweep plot: {plot_path}"
    )
    return 0
