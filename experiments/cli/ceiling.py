"""``alignsam ceiling``: how much click placement can matter with a run's SRM labels
(:mod:`experiments.ceiling`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, write_json


def add(sub: Subcommands) -> None:
    ce = sub.add_parser(
        "ceiling", help="how much click placement can matter with a run's SRM labels"
    )
    ce.add_argument("run")
    ce.add_argument("--split", default="val", choices=["train", "val", "test"])
    ce.add_argument("--limit", type=int, default=20, help="first N images (greedy is slow)")
    ce.add_argument("--cache", default=None, help="embedding cache dir")
    ce.add_argument("--out", default=None, help="write per-image IoUs as JSON here")
    ce.add_argument("--no-progress", action="store_true")
    ce.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agents.prompt_agent import PromptAgent
    from experiments.ceiling import placement_ceiling
    from experiments.train import load_split
    from segmenter import EmbeddingCache

    agent = PromptAgent.load(args.run, cache=EmbeddingCache(args.cache))
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
