"""Command-line entry points of the defenses: `safediff des train`, `safediff esd train` and
`safediff negset build`.

    safediff des train --safe-prompts safe.csv --unsafe-prompts unsafe.csv --concept nudity \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --output-dir runs/des [KEY=VALUE ...]
    safediff negset build --images unsafe_images/ --model tiny-sd --cache-dir negsets/

    safediff esd train --model sandbox --concept "weapon|skull|fire" --variant x \
        --output-dir runs/esd [KEY=VALUE ...]

KEY=VALUE overrides set any `DESConfig` field (e.g. epochs=1 lr=2e-5 direction=concept), or any
`ESDConfig` field for `esd train` (e.g. steps=200 lr=1e-4 negative_guidance=2).
"""

import argparse
import dataclasses
import json
import math
from typing import Any

from safediff.errors import SafediffError

MAX_RESOLUTION = 2048
"""The largest --resolution of `negset build`, in pixels (as a prompt row's image size)."""
SEED_MAX = 2**63 - 1


def _check_des_numbers(cfg: Any) -> None:
    """Ranges DESConfig's own checks leave open: every float finite (lr=1e309 is inf), the seed
    in [0, 2**63 - 1]; SafediffError naming the field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SafediffError(
                f"invalid DES config: {f.name} must be a finite number, got {value}"
            )
    if not 0 <= cfg.seed <= SEED_MAX:
        raise SafediffError(f"invalid DES config: seed {cfg.seed} is outside [0, 2**63 - 1]")


def _config_from_flags(args: argparse.Namespace, flags: dict[str, Any], cls: type) -> Any:
    """`cls` from --config, then the given flags, then the KEY=VALUE overrides. Flags go in as
    JSON-quoted overrides (a concept such as "yes" must stay a string)."""
    from safediff.config import load_config

    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return load_config(args.config, [*overrides, *args.overrides], cls=cls)


def _cmd_des_train(args: argparse.Namespace) -> int:
    from safediff.defenses.des import DESConfig, run_des

    flags = {
        "model": args.model,
        "safe_prompts": args.safe_prompts,
        "unsafe_prompts": args.unsafe_prompts,
        "concept": args.concept,
        "output_dir": args.output_dir,
    }
    cfg = _config_from_flags(args, flags, DESConfig)
    _check_des_numbers(cfg)
    out = run_des(cfg, device=args.device, progress=not args.no_progress)
    print(f"DES text encoder written to {out} (use it with the defense spec des:{out})")
    return 0


def _cmd_esd_train(args: argparse.Namespace) -> int:
    from safediff.defenses.esd import ESDConfig, run_esd

    flags = {
        "model": args.model,
        "concept": args.concept,
        "variant": args.variant,
        "output_dir": args.output_dir,
    }
    cfg = _config_from_flags(args, flags, ESDConfig)
    out = run_esd(cfg, device=args.device, progress=not args.no_progress)
    print(f"ESD denoiser written to {out} (use it with the defense spec esd:{out})")
    return 0


def _cmd_negset_build(args: argparse.Namespace) -> int:
    from safediff.config import ModelConfig
    from safediff.defenses.safe_denoiser import NegationSet, build_sd_negation_set
    from safediff.models.loading import load_t2i_model

    if args.batch_size < 1:
        raise SafediffError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.resolution is not None and not 1 <= args.resolution <= MAX_RESOLUTION:
        raise SafediffError(
            f"--resolution must be in [1, {MAX_RESOLUTION}] pixels, got {args.resolution}"
        )
    model = load_t2i_model(
        ModelConfig(pretrained=args.model, resolution=args.resolution), device=args.device
    )
    vae = model.components.get("vae")
    if vae is None:
        raise SafediffError(f"model {args.model!r} has no VAE; negation sets are VAE latents")
    resolution = model.latent_shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1)
    path = build_sd_negation_set(vae, args.images, resolution, args.cache_dir, args.batch_size)
    negset = NegationSet.load(path)
    print(
        f"negation set: {len(negset)} latents of shape {negset.sample_shape} at {resolution} px "
        f"-> {path} (use it with the defense spec safe-denoiser:{path})"
    )
    return 0


def add_des_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `des train` to the `safediff` command line."""
    des = subparsers.add_parser("des", help="DES: train a distorted text encoder")
    sub = des.add_subparsers(dest="des_command", required=True)
    departure = (
        "Departure: the concept direction defaults to u = unit(E(concept) - E('')) "
        "(direction=difference, DESIGN.md's form), which is not the DES paper's Eq. 2; "
        "direction=concept gives the reference code's u = unit(E(concept)). See docs/parity.md."
    )
    p = sub.add_parser(
        "train",
        help="train the text encoder on safe/unsafe prompts (UNet and VAE untouched); the "
        "default concept direction departs from the paper (direction=concept: the reference "
        "code's)",
        description="Train the text encoder on safe/unsafe prompts (UNet and VAE untouched). "
        + departure,
    )
    p.add_argument("--safe-prompts", help="safe prompts: a .txt/.csv file or builtin:NAME")
    p.add_argument("--unsafe-prompts", help="unsafe prompts: a .txt/.csv file or builtin:NAME")
    p.add_argument("--concept", help="the concept word (default: nudity)")
    p.add_argument("--model", help="base model: tiny-sd, a pipeline folder or a hub id")
    p.add_argument("--output-dir", help="where the trained encoder is written")
    p.add_argument("--config", help="a YAML file of DESConfig fields")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="DESConfig overrides, e.g. epochs=1 direction=concept",
    )
    p.set_defaults(func=_cmd_des_train)


def add_esd_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `esd train` to the `safediff` command line."""
    esd = subparsers.add_parser("esd", help="ESD: erase a concept from the UNet")
    sub = esd.add_subparsers(dest="esd_command", required=True)
    p = sub.add_parser(
        "train",
        help="fine-tune the denoiser against the concept's guidance direction (resumable)",
        description="ESD (Gandikota et al. 2023): fine-tune a copy of the denoiser (UNet, or "
        "SD3 / FLUX transformer) so its prediction for the concept moves opposite to the "
        "concept's guidance direction. Writes a diffusers folder of it (use it as the defense "
        "esd:FOLDER on the same base model); an interrupted run resumes from OUTPUT/checkpoint/.",
    )
    p.add_argument(
        "--model",
        help="base model: tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux, sandbox, a pipeline folder "
        "(SD, SDXL, SD3, FLUX) or a hub id",
    )
    p.add_argument("--concept", help="concept(s) to erase, '|'-separated, e.g. 'weapon|skull'")
    p.add_argument(
        "--variant", choices=("x", "u", "full"), help="x: what reads the text only (default; "
        "UNet cross-attention, SD3 / FLUX joint attention's context projections); u: everything "
        "else; full: all parameters",
    )  # fmt: skip
    p.add_argument("--output-dir", help="where the trained UNet / transformer is written")
    p.add_argument("--config", help="a YAML file of ESDConfig fields")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="ESDConfig overrides, e.g. steps=200 lr=1e-4",
    )
    p.set_defaults(func=_cmd_esd_train)


def add_negset_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `negset build` (the Safe Denoiser's negation set) to the `safediff` command line."""
    neg = subparsers.add_parser("negset", help="Safe Denoiser negation sets")
    sub = neg.add_subparsers(dest="negset_command", required=True)
    p = sub.add_parser(
        "build", help="encode unsafe images into VAE latents, cached by a hash of the inputs"
    )
    p.add_argument(
        "--images",
        required=True,
        help="folder of unsafe images (png/jpg/webp/bmp); of safe ones for a "
        "reference set (the spec's reference=FILE, gate=odds)",
    )
    p.add_argument("--model", default="tiny-sd", help="base model whose VAE encodes the images")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"image side in pixels, up to {MAX_RESOLUTION}, a multiple of the model's latent "
        "cell (default: the model's)",
    )
    p.add_argument("--cache-dir", default="negsets", help="where negset-<hash>.safetensors goes")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE call (>= 1)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.set_defaults(func=_cmd_negset_build)
