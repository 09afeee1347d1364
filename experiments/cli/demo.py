"""``alignsam demo``: the whole job end to end on the embedded synthetic task
(:mod:`experiments.demo`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_segmenter_options


def add(sub: Subcommands) -> None:
    d = sub.add_parser("demo", help="end-to-end run on the embedded synthetic task")
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    add_segmenter_options(d)
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo

    return run_demo(args)
