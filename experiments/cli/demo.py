"""``alignsam demo``: the whole job end to end on the embedded synthetic task
(:mod:`experiments.demo`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_segmenter_options


def add(sub: Subcommands) -> None:
    d = sub.add_parser(
        "demo",
        help="end-to-end run on the embedded synthetic task",
        description="Train a small agent on the embedded synthetic task, segment its held-out "
        "scenes and compare with random clicks and the simulated annotator.",
    )
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder")
    d.add_argument(
        "--runs-dir",
        default=None,
        metavar="DIR",
        help="parent folder of the demo's run folder (default: OUT/runs)",
    )
    d.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    add_segmenter_options(d)
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo

    return run_demo(args)
