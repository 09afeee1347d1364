"""``alignsam oneclick``: mean IoU of one click at the deepest interior point
(:func:`experiments.segmenter_bench.one_click_iou`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import (
    Subcommands,
    add_segmenter_options,
    build_segmenter_from,
    positive_int,
    write_json,
)


def add(sub: Subcommands) -> None:
    o = sub.add_parser(
        "oneclick",
        help="mean IoU of one click at the deepest interior point",
        description="Mean IoU of one positive click at the deepest interior point of each "
        "ground-truth mask: single-mask head vs SAM's three candidates.",
    )
    o.add_argument(
        "dataset", nargs="?", default="kvasir:train", metavar="DATASET", help="dataset spec"
    )
    o.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="first N images (default: all)",
    )
    o.add_argument("--out", default=None, metavar="FILE", help="write the figures as JSON here")
    add_segmenter_options(o)
    o.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset
    from experiments.segmenter_bench import one_click_iou
    from segmenter import EmbeddingCache

    samples = load_dataset(args.dataset)
    if args.limit:
        samples = samples[: args.limit]
    seg = build_segmenter_from(args)
    res = one_click_iou(seg, samples, EmbeddingCache(args.cache))
    m = res["mean_iou"]
    print(
        f"{seg.model_id} on {args.dataset} ({res['n']} images), one positive click at the deepest "
        f"interior point:\n  mean IoU single-mask head {m['single']:.4f} | multimask, best "
        f"predicted score {m['score']:.4f} | multimask, oracle best-of-3 {m['oracle']:.4f}"
    )
    write_json(args.out, res)
    return 0
