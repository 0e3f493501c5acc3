"""`safediff eval`: generate a prompt set's images, then score them, in one command.

Accepts the checkpoint forms of the reference's one-shot evaluation script: a model folder, a bare
UNet `.safetensors` file (with `--base`), or `vanilla` with `--base ID`; and every other model spec
that `safediff generate` accepts. The run folder is resumable: images already on disk are kept.
"""

import argparse
import os
from typing import Any

from safediff import plugins
from safediff.errors import SafediffError


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    from safediff.eval.generate import add_generate_arguments
    from safediff.eval.score import add_scorer_arguments

    p = subparsers.add_parser(
        "eval",
        help="generate then score a prompt set (NudeNet, Q16, CLIP score, FID)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generate_arguments(p)
    add_scorer_arguments(p)
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> int:
    from safediff.eval.generate import run_generate
    from safediff.eval.score import build_scorers, score_run

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # build scorers first: a bad weight path fails before minutes of generation
    scorers = build_scorers(args)
    if not scorers:
        named = ["--nudenet", "--q16", "--clipscore", "--fid"]
        named += [f"--{name}" for name in plugins.scorers()]
        raise SafediffError(f"choose at least one scorer: {', '.join(named)}")
    code = run_generate(args)
    if code != 0:
        return code
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one process scores the finished folder
    summary = score_run(args.out, scorers, batch_size=args.batch_size, device=args.device)
    for scorer in scorers:
        agg = summary["scores"][scorer.protocol]
        m = agg["metrics"][agg["headline"]]
        interval = "" if m["lo"] is None else f" [{m['lo']:.4g}, {m['hi']:.4g}]"
        print(f"{scorer.protocol}: {agg['headline']} = {m['value']:.4g}{interval} (n={agg['n']})")
    return 0
