"""`safediff sandbox build | verify | prompts | defenses`: the command-line face of build.py,
manifest.py, prompt_export.py and defense_eval.py.

Wire it into the main parser with `add_sandbox_parser(subparsers)`; handlers return an exit code.
"""

import argparse

from safediff.errors import SafediffError


def _parse_only(text: str | None) -> list[str] | None:
    from safediff.sandbox.build import MODELS

    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in MODELS]
    if not names or bad:
        raise SafediffError(f"--only takes a comma-separated subset of {','.join(MODELS)}")
    return names


def cmd_build(args: argparse.Namespace) -> int:
    """Retrain the requested sandbox models (seeded) and update the manifest."""
    import torch

    from safediff.sandbox.build import build_sandbox

    only = _parse_only(args.only)
    torch.set_num_threads(args.threads)  # 1 thread: bit-identical rebuilds on one machine
    entries = build_sandbox(
        out_dir=args.out,
        only=only,
        device=args.device,
        seed=args.seed,
        diffusion_steps=args.diffusion_steps,
        diffusion_batch_size=args.diffusion_batch_size,
        num_workers=args.workers,
        diffusion_run_dir=args.diffusion_run_dir,
        diffusion_init=args.diffusion_init,
        clip_blanks=args.clip_blanks,
        glyph_keep={
            k: v
            for k, v in (
                ("implicit", args.glyph_keep_implicit),
                ("explicit", args.glyph_keep_explicit),
            )
            if v is not None
        },
        progress=not args.no_progress,
    )
    for name, entry in entries.items():
        print(f"{name}: {entry['bytes']} bytes sha256 {entry['sha256'][:16]}...")
        for split, m in entry["metrics"].items():
            if isinstance(m, dict):
                shown = ", ".join(
                    f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "n"
                )
                print(f"  {split}: {shown}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the weight files against the manifest's sizes and sha256 hashes."""
    from pathlib import Path

    from safediff.sandbox.manifest import MANIFEST, WEIGHTS_DIR, read_manifest, verify

    folder = Path(args.dir or WEIGHTS_DIR)
    if not folder.exists():
        raise SafediffError(f"{folder} does not exist; pass the folder `sandbox build` wrote")
    if not folder.is_dir():
        raise SafediffError(f"{folder} is a file, not a folder; pass the weights folder")
    if not (folder / MANIFEST).is_file():
        raise SafediffError(
            f"{folder} has no {MANIFEST}: not a sandbox weights folder (`safediff sandbox build "
            f"--out {folder}` writes one)"
        )
    problems = verify(folder)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    for name, entry in sorted(read_manifest(folder)["files"].items()):
        print(f"ok   {name} ({entry['bytes']} bytes, {entry['kind']})")
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from safediff.sandbox.prompt_export import write_prompt_csv

    path = write_prompt_csv(args.split, args.n, args.seed, args.out)
    print(f"wrote {args.n} {args.split} prompts to {path}")
    return 0


def cmd_defenses(args: argparse.Namespace) -> int:
    """Prepare the sandbox defenses, evaluate every row, print and write the tables."""
    import logging

    import torch

    from safediff.sandbox.defense_eval import default_rows, evaluate_defenses, prepare_defenses

    if args.threads < 1:
        raise SafediffError(f"--threads must be >= 1, got {args.threads}")
    from safediff.models.loading import load_t2i_model
    from safediff.sandbox.defense_eval import resolve_model

    # clear errors (missing weights, no checkpoint yet) before minutes of DES training
    load_t2i_model(resolve_model(None, args.base))
    if args.grpo_run is not None:
        resolve_model(args.grpo_run)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = not args.no_progress
    from safediff.sandbox.defense_eval import SANDBOX_ESD

    esd_cfg = None if args.no_baselines else SANDBOX_ESD
    prepared = prepare_defenses(args.out, device=args.device, progress=progress, esd_cfg=esd_cfg)
    rows = default_rows(
        prepared, args.grpo_run, sld=not args.no_sld, baselines=not args.no_baselines
    )
    result = evaluate_defenses(
        args.out, rows, quick=args.quick, base=args.base, device=args.device, progress=progress
    )
    print(result["markdown"])
    print(f"written: {args.out}/defenses.md, {args.out}/defenses.json, {args.out}/rows/")
    return 0


def add_sandbox_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `sandbox build` and `sandbox verify` to the main CLI's subparsers."""
    p = subparsers.add_parser("sandbox", help="build or verify the sandbox's shipped models")
    sub = p.add_subparsers(dest="sandbox_command", required=True)

    b = sub.add_parser("build", help="retrain sandbox models from scratch (seeded)")
    b.add_argument(
        "--only",
        help="comma-separated subset of detector,reader,clip,diffusion (default: all; the "
        "diffusion model takes hours on a CPU)",
    )
    b.add_argument("--out", help="output folder (default: the package's shipped weights)")
    b.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    b.add_argument("--seed", type=int, default=0, help="base seed of every random draw")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    b.add_argument("--diffusion-steps", type=int, help="override the diffusion training steps")
    b.add_argument("--diffusion-batch-size", type=int, help="override the diffusion batch size")
    b.add_argument(
        "--diffusion-run-dir",
        default="sandbox-diffusion-run",
        help="checkpoints and log of the diffusion run (resumed when present)",
    )
    b.add_argument(
        "--diffusion-init",
        help="continue the diffusion model from this weight file (e.g. the shipped "
        "diffusion.safetensors) when the run folder has no checkpoint",
    )
    b.add_argument(
        "--clip-blanks",
        type=int,
        help="empty scenes captioned as empty added to the CLIP's training pool (default: the "
        "build config's 600, as shipped; 0 rebuilds the CLIP that never saw an empty scene)",
    )
    b.add_argument(
        "--glyph-keep-implicit",
        type=float,
        metavar="P",
        help="probability that an implicit training caption keeps its glyph in the diffusion "
        "model's data (default 1.0; below 1 the prompts only tend to draw it; the shipped model "
        "was continued at 0.25, see its manifest command)",
    )
    b.add_argument(
        "--glyph-keep-explicit",
        type=float,
        metavar="P",
        help="the same for explicit, synonym and keyword-minimal captions (default 1.0)",
    )
    b.add_argument("--workers", type=int, default=0, help="data workers for diffusion training")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)

    pr = sub.add_parser("prompts", help="write a sandbox prompt split as a CSV for generate/eval")
    pr.add_argument("--split", default="eval", choices=["model_train", "grpo_train", "eval"])
    pr.add_argument("--n", type=int, default=400, help="number of prompts")
    pr.add_argument("--seed", type=int, default=0, help="split seed (prompts and image seeds)")
    pr.add_argument("--out", required=True, help="CSV file to write")
    pr.set_defaults(func=cmd_prompts)

    d = sub.add_parser(
        "defenses",
        help="measure each defense (negative prompt, Safe Denoiser, DES, SLD, UCE, RECE, ESD, "
        "SAFREE, stacks) on the sandbox: unsafe rate per family and utility with 95%% intervals",
    )
    d.add_argument("--out", required=True, help="output folder (defenses, rows, tables)")
    d.add_argument("--quick", action="store_true", help="the quick demo's prompt counts")
    d.add_argument(
        "--grpo-run",
        help="a `safediff train` run folder (e.g. DEMO_OUT/train of `safediff demo`): adds the "
        "rows GRPO + steering and GRPO + steering + stack",
    )
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    d.add_argument(
        "--base", default="sandbox", help="base diffusion model: sandbox (shipped) or sandbox:PATH"
    )
    d.add_argument("--no-sld", action="store_true", help="leave out the SLD row")
    d.add_argument(
        "--no-baselines",
        action="store_true",
        help="leave out the concept-erasure baselines (UCE, RECE, ESD-x: about 8 minutes of "
        "training on one CPU thread, SAFREE)",
    )
    d.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_defenses)

    v = sub.add_parser("verify", help="check the weight files against the manifest hashes")
    v.add_argument("--dir", help="weights folder (default: the package's shipped weights)")
    v.set_defaults(func=cmd_verify)
    return p
