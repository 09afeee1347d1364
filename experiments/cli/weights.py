"""``alignsam weights``: list or fetch segmenter checkpoints (:mod:`segmenter.weights`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, existing_file, print_table


def add(sub: Subcommands) -> None:
    w = sub.add_parser(
        "weights",
        help="list or fetch segmenter checkpoints",
        description="List the segmenter checkpoints and where they are, or fetch one (checked "
        "against its SHA-256, moved atomically into $ALIGNSAM_HOME/weights).",
    )
    w.add_argument("action", choices=["list", "fetch"], help="list, or fetch NAME")
    w.add_argument("name", nargs="?", metavar="NAME", help="checkpoint name (default: mobile_sam)")
    w.add_argument(
        "--from",
        dest="source",
        default=None,
        type=existing_file,
        metavar="FILE",
        help="import this local file instead of downloading",
    )
    w.add_argument("--force", action="store_true", help="fetch again even if present")
    w.add_argument("--verify", action="store_true", help="check SHA-256 of present files")
    w.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segmenter import weights as W

    if args.action == "list":
        print_table(
            W.listing(verify=args.verify), ["name", "present", "size_mb", "verified", "file"]
        )
        print(f"cache: {W.weights_dir()}  (override with ${W.CACHE_ENV})")
        return 0
    names = [args.name] if args.name else ["mobile_sam"]
    for name in names:
        path = W.fetch(name, source=args.source, force=args.force)
        print(f"{name}: {path} (SHA-256 verified)")
    return 0
