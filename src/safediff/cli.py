"""Command line: parse, build a config, call one library function. `main(argv) -> int`."""

import argparse
import importlib
import logging
import sys

import yaml

from safediff.errors import SafediffError

# Commands whose parsers live beside their code: (module, parser builder, one-line help). Only
# the command being run is imported (they pull in torch, diffusers, ...); the others appear in
# `safediff --help` with their help line.
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "steer": ("safediff.steer_tool", "add_steer_parser", "text safety scores and the alpha sweep"),
    "generate": ("safediff.eval.generate", "add_generate_parser", "generate a prompt set's images"),
    "score": ("safediff.eval.score", "add_score_parser", "score a generated run folder"),
    "eval": ("safediff.eval.eval_cmd", "add_eval_parser", "generate then score a prompt set"),
    "report": ("safediff.eval.report", "add_report_parser", "JSON/Markdown/HTML report of runs"),
    "des": ("safediff.defenses.cli", "add_des_parser", "DES: train a distorted text encoder"),
    "negset": ("safediff.defenses.cli", "add_negset_parser", "Safe Denoiser negation sets"),
    "sandbox": (
        "safediff.sandbox.cli",
        "add_sandbox_parser",
        "the sandbox world (build, verify, defenses)",
    ),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="preset name (see `safediff presets`) or a YAML file path")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. grpo.group_size=8"
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from safediff.config import load_config
    from safediff.rl.trainer import train

    cfg = load_config(args.preset, args.overrides)
    summary = train(cfg, resume=args.resume)
    hist = summary["history"]
    if hist:
        print(
            f"trained epochs {summary['start_epoch']}..{summary['end_epoch'] - 1}: "
            f"reward {hist[0]['reward_mean/all']:.4f} -> {hist[-1]['reward_mean/all']:.4f}; "
            f"outputs in {summary['run_dir']}"
        )
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from safediff.config import load_config, to_dict

    cfg = load_config(args.preset, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from safediff.config import preset_names

    print("\n".join(preset_names()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.world == "tiny-sd":
        from safediff.demo import run_demo

        if args.defense:
            raise SafediffError("--defense applies to the sandbox world only")
        return run_demo(output_dir=args.output_dir, quick=args.quick, overrides=args.overrides)
    from safediff.sandbox.demo import parse_merge_weights, run_sandbox_demo

    run_sandbox_demo(
        args.output_dir,
        quick=args.quick,
        overrides=args.overrides,
        defenses=args.defense,
        merge_weights=parse_merge_weights(args.merge_weights),
    )
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command` names the lazy command whose full parser is built (None: all)."""
    parser = argparse.ArgumentParser(prog="safediff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="GRPO post-training of a diffusion UNet")
    _add_config_args(p)
    p.add_argument(
        "--resume", help="'auto' (latest checkpoint in run.output_dir) or a checkpoint folder"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config of a preset + overrides")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("demo", help="the whole method end to end on the embedded default")
    p.add_argument(
        "--output-dir", default="safediff-demo", help="everything is written under this folder"
    )
    p.add_argument(
        "--quick", action="store_true", help="a shorter run that still shows the direction"
    )
    p.add_argument(
        "--world",
        choices=["sandbox", "tiny-sd"],
        default="sandbox",
        help="sandbox (default): GRPO + steering reward on the shipped sandbox model, evaluated "
        "with its judges (unsafe rate per family, utility, alignment; report.html); tiny-sd: the "
        "one-minute engine smoke run (random tiny SD, brightness reward)",
    )
    p.add_argument(
        "--defense",
        default=None,
        metavar="STACK",
        help="also defend the post-trained model at evaluation (the table is then base vs GRPO + "
        "stack): comma-separated bare kinds use the sandbox's versions (des, negprompt, sld, "
        "safe-denoiser; DES and the negation set are prepared under OUTPUT_DIR/defenses/), "
        "KIND:ARG items are passed as given, e.g. --defense des,negprompt",
    )
    p.add_argument(
        "--merge-weights",
        default="auto",
        metavar="W,W,...",
        help="the post-trained model is base + w * (trained - base), w chosen on validation "
        "prompts from these weights (the smallest that cuts the unsafe rate by 80%% while "
        "utility stays within 3 points of the base's, else the largest within 3 points); "
        "'auto' (default): 0.5,0.6,...,1 in the full mode, none in the quick mode or with a "
        "run.merge_weight override; 'none': the config's run.merge_weight",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=_cmd_demo)

    for name, (module, builder, help_line) in LAZY_COMMANDS.items():
        if command is None or command == name:
            getattr(importlib.import_module(module), builder)(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first argument that is not an option), if lazy."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in LAZY_COMMANDS else "-"


def _route_library_logs() -> None:
    """Send diffusers' and transformers' logs through our root handler (one format, one stream)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_warning()
        lib.disable_default_handler()
        lib.enable_propagation()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_of(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # rebind to the current stderr on every call (main() may run many times)
    )
    try:
        if args.command not in ("config", "presets"):
            _route_library_logs()
        return int(args.func(args))
    except SafediffError as err:
        print(f"safediff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "safediff: interrupted (completed checkpoints are kept; resume with --resume auto)",
            file=sys.stderr,
        )
        return 130


def main_entry() -> None:
    from safediff.malloc_tuning import tune_malloc

    tune_malloc()  # the console command only: a library import leaves the process's malloc alone
    sys.exit(main())
