"""``alignsam corrections``: the simulated annotator's corrective clicks after the agent and the
other automatic starts, against prompting from scratch (:mod:`experiments.corrections`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_cache_option, non_negative_int, positive_int


def add(sub: Subcommands) -> None:
    from agents.clickers import HANDOVERS

    c = sub.add_parser(
        "corrections",
        help="clicks a person still needs after the agent, vs from scratch (NoC@85/90)",
        description="The simulated annotator (RITM's protocol) continues from the agent's final "
        "prompts and mask, from its SRM start points alone and from the fine-tuned decoder "
        "(--delta), clicking in the largest error region up to --max-clicks; beside it the same "
        "annotator from scratch. Writes results.json, results.md and corrections.png into --out.",
    )
    c.add_argument("run", metavar="RUN", help="run folder of the agent (alignsam train)")
    c.add_argument(
        "--split", default="val", choices=["train", "val", "test"], help="which split of its task"
    )
    c.add_argument(
        "--dataset", default=None, metavar="SPEC", help="these images instead of --split"
    )
    c.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="first N images only"
    )
    c.add_argument(
        "--delta",
        default=None,
        metavar="DIR",
        help="decoder fine-tuning (alignsam finetune --out) for the fine-tuned (b) start",
    )
    c.add_argument(
        "--handovers",
        nargs="+",
        default=list(HANDOVERS),
        choices=HANDOVERS,
        help="how the annotator takes over: keep the agent's prompts, only its mask, or prune "
        "the clicks the ground truth contradicts",
    )
    c.add_argument(
        "--chosen",
        default=None,
        choices=HANDOVERS,
        help="the hand-over chosen on val, marked in the table (default: the best here)",
    )
    c.add_argument(
        "--max-clicks", type=positive_int, default=20, metavar="N", help="the annotator's budget"
    )
    c.add_argument("--seed", type=non_negative_int, default=0, help="seed of the bootstraps")
    c.add_argument("--out", default="corrections", metavar="DIR", help="output folder")
    add_cache_option(c)
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.corrections import run_corrections
    from segmenter import EmbeddingCache

    result = run_corrections(
        args.run,
        args.split,
        args.out,
        limit=args.limit,
        dataset_spec=args.dataset,
        delta=args.delta,
        handovers=args.handovers,
        chosen_handover=args.chosen,
        max_clicks=args.max_clicks,
        cache=EmbeddingCache(args.cache),
        seed=args.seed,
        progress=not args.no_progress,
    )
    sc = result["scratch"]
    print(
        f"{result['n_images']} images; annotator from scratch: NoC@90 {sc['noc@90'][0]:.2f}, "
        f"NoC@85 {sc['noc@85'][0]:.2f}"
    )
    for entry in result["starts"].values():
        for h in args.handovers:
            row = entry[h]
            saved = row["clicks_saved_90"]
            print(
                f"after {entry['label']} ({h}): NoC@90 {row['noc@90'][0]:.2f}, NoC@85 "
                f"{row['noc@85'][0]:.2f}, clicks saved to 90 % {100 * saved[0]:.0f} % "
                f"[{100 * saved[1]:.0f}, {100 * saved[2]:.0f}], costs clicks on "
                f"{row['costs_clicks_90']} of {result['n_images']} images"
            )
    print(f"results.json, results.md, corrections.png in {args.out}")
    return 0
