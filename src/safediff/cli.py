"""Command line: parse, build a config, call one library function. `main(argv) -> int`."""

import argparse
import errno
import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path, PurePath
from typing import Any

import yaml

from safediff import plugins
from safediff.errors import SafediffError

# Commands whose parsers live beside their code: (module, parser builder, one-line help). Only
# the command being run is imported (they pull in torch, diffusers, ...); the others appear in
# `safediff --help` with their help line.
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "steer": ("safediff.steer_tool", "add_steer_parser", "text safety scores and the alpha sweep"),
    "generate": ("safediff.eval.generate", "add_generate_parser", "generate a prompt set's images"),
    "score": ("safediff.eval.score", "add_score_parser", "score a generated run folder"),
    "eval": ("safediff.eval.eval_cmd", "add_eval_parser", "generate then score a prompt set"),
    "report": ("safediff.report_cli", "add_report_parser", "JSON/Markdown/HTML report of runs"),
    "des": ("safediff.defenses.cli", "add_des_parser", "DES: train a distorted text encoder"),
    "esd": ("safediff.defenses.cli", "add_esd_parser", "ESD: erase a concept from the UNet"),
    "negset": ("safediff.defenses.cli", "add_negset_parser", "Safe Denoiser negation sets"),
    "export": ("safediff.export_cli", "add_export_parser", "diffusers folder + model card"),
    "attack": ("safediff.attacks.cli", "add_attack_parser", "red-team a model + defense stack"),
}
TINY_SD_WORLD = "tiny-sd"
TINY_FLOW_WORLDS = {
    "tiny-sd3": ["model.pretrained=tiny-sd3", "sampling.eta=0.7", "optim.lr=3e-3"],
    "tiny-flux": [
        "model.pretrained=tiny-flux",
        "sampling.eta=0.7",
        "sampling.guidance_scale=3.5",
        "optim.lr=3e-3",
    ],
}
"""The engine smoke run on the offline tiny flow pipelines: the tiny-sd demo (brightness reward)
with the flow SDE's noise level a = 0.7 (Flow-GRPO's) and, for FLUX-dev, its distilled guidance."""


def lazy_commands() -> dict[str, tuple[str, str, str]]:
    """The built-in lazy commands and those plug-ins add (`safediff.plugins`)."""
    added = {c.name: (c.module, c.builder, c.help) for c in plugins.commands().values()}
    return {**LAZY_COMMANDS, **added}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="preset name (see `safediff presets`) or a YAML file path")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. grpo.group_size=8"
    )


class _ExtendOverrides(argparse.Action):
    """KEY=VALUE overrides gathered in command-line order wherever they stand, so
    `train --preset P a=1 --resume auto b=2` gives [a=1, b=2] (argparse alone takes one run)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])


class _ResumeThenOverrides(argparse.Action):
    """`--resume CHECKPOINT [KEY=VALUE ...]`: the checkpoint, then overrides added to the rest."""

    def __call__(self, parser, namespace, values, option_string=None):
        checkpoint, *overrides = values  # a stray word is refused with the overrides
        setattr(namespace, self.dest, checkpoint)
        namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *overrides]


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
    from safediff.config import explain, load_config, to_dict

    cfg = load_config(args.preset, args.overrides)
    if args.explain:
        print(explain(cfg))
    else:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from safediff.config import preset_names

    print("\n".join(preset_names()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    worlds = plugins.demo_worlds()
    for name, dests in args.world_options.items():  # another world's options: say so
        for dest in dests:
            if name != args.world and getattr(args, dest) != args.world_defaults[dest]:
                flag = "--" + dest.replace("_", "-")
                raise SafediffError(f"{flag} applies to the {name} world only")
    if args.world == TINY_SD_WORLD or args.world in TINY_FLOW_WORLDS:
        from safediff.demo import run_demo

        overrides = [*TINY_FLOW_WORLDS.get(args.world, []), *args.overrides]
        return run_demo(output_dir=args.output_dir, quick=args.quick, overrides=overrides)
    return int(worlds[args.world].run(args))


def _add_demo_parser(sub: Any) -> None:
    worlds = plugins.demo_worlds()
    default = next((w.name for w in worlds.values() if w.default), TINY_SD_WORLD)
    world_help = "; ".join(f"{w.name}: {w.help}" for w in worlds.values())
    p = sub.add_parser("demo", help="the whole method end to end on the embedded default")
    p.add_argument(
        "--output-dir", default="safediff-demo", help="everything is written under this folder"
    )
    p.add_argument(
        "--quick", action="store_true", help="a shorter run that still shows the direction"
    )
    p.add_argument(
        "--world",
        choices=[*worlds, TINY_SD_WORLD, *TINY_FLOW_WORLDS],
        default=default,
        help=f"which world (default {default}): {world_help}; {TINY_SD_WORLD}: the one-minute "
        "engine smoke run (random tiny SD, brightness reward); tiny-sd3, tiny-flux: the same on "
        "the tiny flow-matching pipelines (flow SDE, noise level 0.7)",
    )
    options: dict[str, list[str]] = {}
    for world in worlds.values():
        before = {a.dest for a in p._actions}
        world.add_arguments(p.add_argument_group(f"{world.name} world"))
        options[world.name] = [a.dest for a in p._actions if a.dest not in before]
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(
        func=_cmd_demo,
        world_options=options,
        world_defaults={d: p.get_default(d) for ds in options.values() for d in ds},
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command` names the lazy command whose full parser is built (None: all)."""
    parser = argparse.ArgumentParser(prog="safediff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="GRPO post-training of a diffusion UNet")
    p.add_argument("--preset", help="preset name (see `safediff presets`) or a YAML file path")
    p.add_argument(
        "overrides",
        nargs="*",
        action=_ExtendOverrides,
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. grpo.group_size=8 (before or after --resume)",
    )
    p.add_argument(
        "--resume",
        nargs="+",
        action=_ResumeThenOverrides,
        metavar=("CHECKPOINT", "KEY=VALUE"),
        help="'auto' (latest checkpoint in run.output_dir) or a checkpoint folder; overrides may "
        "follow it",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config of a preset + overrides")
    _add_config_args(p)
    p.add_argument(
        "--explain",
        action="store_true",
        help="print every option with its value, default, valid range and help",
    )
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=_cmd_presets)

    _add_demo_parser(sub)

    for name, (module, builder, help_line) in lazy_commands().items():
        if command is None or command == name:
            getattr(importlib.import_module(module), builder)(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first argument that is not an option), if lazy."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in lazy_commands() else "-"


def _route_library_logs() -> None:
    """Send diffusers' and transformers' logs through our root handler (one format, one stream)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_warning()
        lib.disable_default_handler()
        lib.enable_propagation()


SEED_MAX = 2**63 - 1
"""The largest seed a command accepts: torch.Generator.manual_seed takes up to 2**64 - 1, but
seeds are offset (SEED + row index) and stored as signed 64-bit integers (prompt sets, numpy)."""


def _check_seeds(args: argparse.Namespace) -> None:
    """Every parsed `--seed` / `--*-seed` lies in [0, SEED_MAX] (else an error naming it)."""
    for name, value in vars(args).items():
        if name != "seed" and not name.endswith("_seed"):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= SEED_MAX:
            flag = "--" + name.replace("_", "-")
            raise SafediffError(f"{flag} {value} is outside [0, 2**63 - 1]; pass one in that range")


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user or the machine causes (not bugs): one line each, no traceback."""
    from safetensors import SafetensorError

    return (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError, SafetensorError)


def _file_of(err: BaseException) -> str | None:
    """The file an error is about: its `filename`, else the innermost frame of its traceback
    that holds a path (`self` of a pathlib method, or a local `path`, `filename`, `out`, ...);
    UnicodeDecodeError, SafetensorError and JSONDecodeError carry no file name of their own."""
    name = getattr(err, "filename", None)
    if name is not None:
        return os.fsdecode(name) if isinstance(name, str | bytes | os.PathLike) else str(name)
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for key in ("self", "path", "filename", "file", "out"):
            value = frame.f_locals.get(key)
            if isinstance(value, PurePath) or (key != "self" and _looks_like_path(value)):
                return str(value)
    return None


def _looks_like_path(value: object) -> bool:
    """A non-empty string naming an existing file, or a file in an existing folder."""
    if not isinstance(value, str) or not value or "\n" in value:
        return False
    return os.path.exists(value) or os.path.isdir(os.path.dirname(value) or ".")


def _describe(err: BaseException) -> str:
    """One sentence for an expected failure: the file it concerns, what was wrong, the fix."""
    from safetensors import SafetensorError

    where = _file_of(err)
    at = f"{where}: " if where else ""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{at}no space left on the device; free some space and rerun (finished checkpoints "
            "and images are kept, and a rerun resumes from them)"
        )
    if isinstance(err, FileExistsError | NotADirectoryError) and where:
        # the file in the way is `where` itself (mkdir) or one of its parents (mkdir -p)
        path = Path(where)
        blocker = next((q for q in (path, *path.parents) if q.is_file()), path)
        return (
            f"{blocker} is a file where a folder is needed"
            + (f" (to write {where})" if blocker != path else "")
            + "; choose another output path, or move the file away"
        )
    if isinstance(err, IsADirectoryError):
        return f"{at}is a folder where a file is needed; give a file path"
    if isinstance(err, PermissionError):
        return f"{at}permission denied; choose a folder you can write to, or fix its permissions"
    if isinstance(err, FileNotFoundError):
        return f"{at}not found; check the path"
    if isinstance(err, OSError):
        return f"{at}{err.strerror or err}"
    if isinstance(err, UnicodeDecodeError):
        return (
            f"{at}not valid {err.encoding} text (bad byte 0x{err.object[err.start]:02x} at byte "
            f"offset {err.start}); re-save the file as UTF-8"
        )
    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{at}not valid YAML ({getattr(err, 'problem', None) or err}{line}); fix the file"
    if isinstance(err, json.JSONDecodeError):
        return (
            f"{at}not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); the file "
            "is damaged: restore it, or delete it and rerun the command that writes it"
        )
    if isinstance(err, SafetensorError):
        return (
            f"{at}not a readable safetensors file ({err}); it is truncated or damaged: restore "
            "it, or delete it and rerun the command that writes it"
        )
    return f"{at}{err}"


def _one_line(message: str) -> str:
    """A message folded onto one line (the CLI's contract: one line per error)."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


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
        _check_seeds(args)
        if args.command not in ("config", "presets"):
            _route_library_logs()
        return int(args.func(args))
    except (SafediffError, *_expected_errors()) as err:
        if args.verbose:
            traceback.print_exception(err)
        message = str(err) if isinstance(err, SafediffError) else _describe(err)
        print(f"safediff: error: {_one_line(message)}", file=sys.stderr)
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
