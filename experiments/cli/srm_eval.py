"""``alignsam srm-eval``: SRM label accuracy at the grid cells against the majority class
(:mod:`recalibration.evaluate`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import (
    Subcommands,
    UsageError,
    add_segmenter_options,
    build_segmenter_from,
    existing_file,
    non_negative_int,
    positive_int,
    write_json,
)


def add(sub: Subcommands) -> None:
    se = sub.add_parser(
        "srm-eval",
        help="SRM label accuracy at the grid cells vs majority class",
        description="Train an implicit SRM on --train (early stopping on --val) and report its "
        "label accuracy on --eval, or evaluate a saved SRM file (--srm).",
    )
    se.add_argument("--train", default="kvasir:train", help="dataset spec to train on")
    se.add_argument("--val", default="kvasir:val", help="dataset spec for early stopping")
    se.add_argument("--eval", default="kvasir:test", help="dataset spec reported ('' for none)")
    se.add_argument("--epochs", type=positive_int, default=60, help="training epochs")
    se.add_argument("--seed", type=non_negative_int, default=0, help="training seed")
    se.add_argument("--save", default=None, metavar="FILE", help="write the trained SRM here")
    se.add_argument(
        "--srm",
        default=None,
        type=existing_file,
        metavar="FILE",
        help="evaluate this saved SRM file on --eval (no training)",
    )
    se.add_argument("--out", default=None, metavar="FILE", help="write the figures as JSON here")
    add_segmenter_options(se)
    se.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset
    from recalibration.evaluate import evaluate_saved, pretrain_and_evaluate, summarize
    from segmenter import EmbeddingCache

    seg = build_segmenter_from(args)
    if args.srm:
        if not args.eval:
            raise UsageError("--srm evaluates a saved SRM: give the split to measure with --eval")
        res = evaluate_saved(
            args.srm, load_dataset(args.eval), seg, cache=EmbeddingCache(args.cache)
        )
        print(f"saved SRM {args.srm} on {args.eval}:")
        print(summarize(res))
        write_json(args.out, res)
        return 0
    res = pretrain_and_evaluate(
        load_dataset(args.train),
        load_dataset(args.val),
        load_dataset(args.eval) if args.eval else None,
        seg,
        cache=EmbeddingCache(args.cache),
        epochs=args.epochs,
        seed=args.seed,
        save_path=args.save,
    )
    print(f"SRM (implicit) trained on {args.train}, early-stopped on {args.val}:")
    print(summarize(res))
    write_json(args.out, res)
    return 0
