"""The ``alignsam`` command line: one module per command, each holding its options and the
handler that starts the job (imported only when that command runs, so ``--help`` stays fast),
with the set-up every command shares in :mod:`experiments.cli.common`."""

from __future__ import annotations

import argparse
import os
import sys

from experiments.cli import (
    bench,
    benchmark,
    ceiling,
    demo,
    embed,
    finetune,
    oneclick,
    segment,
    srm_eval,
    sweep,
    train,
    weights,
)
from experiments.cli.common import setup
from experiments.runtime import tune_malloc

__all__ = ["build_parser", "main"]

#: Command modules in ``--help`` order; each has ``add(subparsers)``.
COMMANDS = (
    weights,
    embed,
    bench,
    oneclick,
    train,
    ceiling,
    segment,
    finetune,
    benchmark,
    sweep,
    srm_eval,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``alignsam`` parser with every command."""
    p = argparse.ArgumentParser(
        prog="alignsam", description="Automatic prompting of a frozen Segment Anything model."
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_malloc()
    args = build_parser().parse_args(argv)
    setup(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"alignsam {args.command}: error: {exc}", file=sys.stderr)
        return 2
