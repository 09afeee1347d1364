"""``alignsam ceiling``: how much click placement can matter with a run's SRM labels
(:mod:`experiments.ceiling`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_cache_option, positive_int, write_json


def add(sub: Subcommands) -> None:
    ce = sub.add_parser(
        "ceiling",
        help="how much click placement can matter with a run's SRM labels",
        description="Mean IoU of a greedy click placer that reads the ground truth, beside "
        "RUN's agent and random clicks, all labelled by RUN's SRM.",
    )
    ce.add_argument("run", metavar="RUN", help="run folder made by alignsam train")
    ce.add_argument(
        "--split", default="val", choices=["train", "val", "test"], help="which split of the task"
    )
    ce.add_argument(
        "--which",
        choices=["best", "latest"],
        default="best",
        help="checkpoint of RUN: best on val, or the latest written",
    )
    ce.add_argument(
        "--limit",
        type=positive_int,
        default=20,
        metavar="N",
        help="first N images (greedy placement is slow)",
    )
    add_cache_option(ce)
    ce.add_argument("--out", default=None, metavar="FILE", help="write per-image IoUs as JSON")
    ce.add_argument("--no-progress", action="store_true", help="no progress bar")
    ce.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agents.prompt_agent import PromptAgent
    from experiments.ceiling import placement_ceiling
    from experiments.train import load_split
    from segmenter import EmbeddingCache

    agent = PromptAgent.load(args.run, cache=EmbeddingCache(args.cache), which=args.which)
    samples = list(load_split(agent.task, args.split))[: args.limit]
    res = placement_ceiling(agent, samples, progress=not args.no_progress)
    m = res["mean_iou"]
    print(
        f"{args.run} on {args.split} ({res['n']} images, labels from its SRM): mean IoU greedy "
        f"(reads the ground truth to place) {m['greedy']:.4f} | agent {m['agent']:.4f} | "
        f"random {m['random']:.4f}"
    )
    write_json(args.out, res)
    return 0
