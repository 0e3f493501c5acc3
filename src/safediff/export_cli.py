"""`safediff export RUN --out DIR`: a trained model as a diffusers pipeline folder + model card,
optionally pushed to the Hugging Face hub (see `safediff.export`)."""

import argparse
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `safediff export` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "export",
        help="write a diffusers pipeline folder + model card",
        description="Write a trained model as a complete diffusers pipeline folder (the base "
        "model's components and the trained UNet, a LoRA merged in) with a model card carrying "
        "the training config, metrics and evaluation summaries; loadable with "
        "StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained(DIR).",
    )
    p.add_argument(
        "model",
        metavar="RUN",
        help="a training run folder (its merged/ model, else its newest checkpoint), a full or "
        "LoRA checkpoint, a run's merged/ folder, or a bare UNet / LoRA adapter with --base",
    )
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument(
        "--base",
        help="base pipeline (hub id or folder) for a bare UNet or adapter; overrides the run's",
    )
    p.add_argument(
        "--text-encoder",
        metavar="DIR",
        help="a text encoder trained by `safediff des train`, written as text_encoder/",
    )
    p.add_argument(
        "--eval",
        metavar="RUN_DIR",
        action="append",
        default=[],
        dest="eval_dirs",
        help="a `safediff eval` / `safediff score` folder whose summary.json goes into the model "
        "card (repeatable)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="precision of the saved weights (default float32: the trained UNet exactly)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="then upload the folder to this hub model repo (needs a token: `hf auth login` or "
        "HF_TOKEN)",
    )
    p.add_argument("--private", action="store_true", help="create the hub repo as private")
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    """`safediff export`: write the folder, then push it when asked."""
    import torch

    from safediff.export import check_repo_id, export_pipeline, push_to_hub

    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)  # before the export, which can take minutes
    out = export_pipeline(
        args.model,
        args.out,
        args.base,
        text_encoder=args.text_encoder,
        eval_dirs=args.eval_dirs,
        overwrite=args.overwrite,
        dtype=getattr(torch, args.dtype),
        repo_id=args.push_to_hub,
    )
    print(f"exported {args.model} to {out} (model card: {out / 'README.md'})")
    if args.push_to_hub is not None:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed to {url}")
    return 0
