"""``alignsam benchmark``: trained agents against manual prompting, the method's ablations and
baselines (:mod:`experiments.benchmark`); ``--methods`` and its help come from the methods table
(:data:`experiments.benchmark.methods.METHODS`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import (
    Subcommands,
    UsageError,
    add_cache_option,
    add_deprecated_alias,
    add_ray_options,
    fraction,
    non_negative_int,
    positive_int,
    print_skipped,
)


def add(sub: Subcommands) -> None:
    from experiments.benchmark.methods import METHODS

    choices = [name for name, group in METHODS.items() if group.selectable]
    listing = "; ".join(f"{name}: {METHODS[name].help}" for name in choices)
    bm = sub.add_parser(
        "benchmark",
        help="agents vs manual clicks, ablations and baselines",
        description="Score trained agents (--agents RUN ...) against the simulated manual "
        "annotator and the baselines, on the same frozen segmenter, images and embeddings.",
    )
    bm.add_argument(
        "task", metavar="TASK", help="task YAML or shipped task name (its data and segmenter)"
    )
    bm.add_argument(
        "--agents", nargs="+", default=None, metavar="RUN", help="run folders of trained agents"
    )
    add_deprecated_alias(bm, "--runs", "--agents", dest="agents", nargs="+")
    bm.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="which split of TASK"
    )
    bm.add_argument(
        "--dataset",
        default=None,
        metavar="SPEC",
        help="benchmark on these images instead of --split (e.g. kvasir:test@down384)",
    )
    bm.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="first N images only"
    )
    bm.add_argument("--out", default="benchmark", metavar="DIR", help="output folder")
    bm.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of random clicks and bootstraps"
    )
    bm.add_argument(
        "--manual-clicks",
        type=positive_int,
        default=20,
        metavar="N",
        help="click budget of the simulated annotator",
    )
    bm.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=choices,
        metavar="METHOD",
        help=f"subset besides agents and manual (default: all). {listing}",
    )
    bm.add_argument(
        "--finetuned",
        nargs="+",
        default=[],
        metavar="DIR",
        help="fine-tuning deltas (alignsam finetune --out folders) to benchmark as methods",
    )
    bm.add_argument(
        "--amg-points",
        type=positive_int,
        default=32,
        metavar="N",
        help="automatic mask generator: points per side of its grid",
    )
    bm.add_argument(
        "--amg-tune",
        type=non_negative_int,
        default=10,
        metavar="N",
        help="val images to choose the generator's filter thresholds on (0: SAM's defaults)",
    )
    add_ray_options(bm)
    bm.add_argument(
        "--abstain-margin",
        type=fraction,
        default=None,
        metavar="P",
        help="the SRM abstains on clicks with |p - 0.5| below this (all env-based methods; "
        "below 0.5)",
    )
    bm.add_argument("--device", default=None, help="torch device (default: the task's)")
    add_cache_option(bm)
    bm.add_argument("--no-progress", action="store_true", help="no progress bars")
    bm.add_argument(
        "--skip-bad", action="store_true", help="leave out unusable images/masks (listed)"
    )
    bm.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.benchmark import render_markdown, run_benchmark
    from experiments.train import resolve_task
    from segmenter import EmbeddingCache

    if not args.agents:
        raise UsageError("give the trained agents to score: --agents RUN [RUN ...]")
    if args.abstain_margin is not None and args.abstain_margin >= 0.5:
        raise UsageError(f"--abstain-margin must be below 0.5, got {args.abstain_margin}")
    task = resolve_task(args.task)
    if args.device:
        task.device = args.device
    result = run_benchmark(
        task,
        args.agents,
        split=args.split,
        dataset_spec=args.dataset,
        limit=args.limit,
        out=args.out,
        seed=args.seed,
        cache=EmbeddingCache(args.cache),
        manual_clicks=args.manual_clicks,
        methods=args.methods,
        progress=not args.no_progress,
        abstain_margin=args.abstain_margin,
        skip_bad=args.skip_bad,
        finetuned=args.finetuned,
        amg_points_per_side=args.amg_points,
        amg_tune_images=args.amg_tune,
        ray_address=args.ray,
        ray_workers=args.workers,
    )
    print(render_markdown(result))
    print_skipped(result["skipped"])
    print(
        f"wrote results.json, results.md, curves.png, examples.png to {args.out} "
        f"({result['seconds']:.0f} s)"
    )
    return 0
