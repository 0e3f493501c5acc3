"""`safediff report RUN_DIR [RUN_DIR ...] --out DIR`: scored evaluation runs and attack runs.

It sits above eval/ and attacks/ and wires them: `safediff.eval.report.build_report` renders the
scored runs, and the `safediff attack` run folders among the inputs go to their own section
(`ATTACK_RUNS`), so eval/ never imports attacks/.
"""

import argparse
from pathlib import Path
from typing import Any

from safediff.attacks.run import attack_report, is_attack_run
from safediff.eval.report import SideReport, build_report

ATTACK_RUNS = SideReport(
    key="attacks", title="safediff attack report", claims=is_attack_run, render=attack_report
)
"""`safediff attack` run folders: one table per protocol and an image grid
(`safediff.attacks.run.attack_report`)."""

SIDE_REPORTS = (ATTACK_RUNS,)


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `safediff report RUN_DIR [RUN_DIR ...] --out DIR [--names a,b]`."""
    p = subparsers.add_parser(
        "report",
        help="compare scored runs and attack runs: tables with intervals, image grids, "
        "safety-utility plot",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="scored run folders (first = baseline) and `safediff attack` run folders",
    )
    p.add_argument(
        "--out", required=True, help="output folder (report.html, report.md, report.json)"
    )
    p.add_argument("--names", help="comma-separated display names, one per run")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed for the deltas")
    p.add_argument("--max-grid", type=int, default=24, help="image rows in the grid")
    p.set_defaults(func=run_report)
    return p


def run_report(args: argparse.Namespace) -> int:
    """`safediff report`: build the report and print where it is."""
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    build_report(
        args.run_dirs,
        args.out,
        names,
        seed=args.seed,
        max_grid=args.max_grid,
        side_reports=SIDE_REPORTS,
    )
    print(f"wrote {Path(args.out) / 'report.html'} (+ report.md, report.json)")
    return 0
