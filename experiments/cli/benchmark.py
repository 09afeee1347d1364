"""``alignsam benchmark``: trained agents against manual prompting, the method's ablations and
baselines (:mod:`experiments.benchmark`); ``--methods`` and its help come from the methods table
(:data:`experiments.benchmark.methods.METHODS`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_ray_options, print_skipped


def add(sub: Subcommands) -> None:
    from experiments.benchmark.methods import METHODS

    choices = [name for name, group in METHODS.items() if group.selectable]
    listing = "; ".join(f"{name}: {METHODS[name].help}" for name in choices)
    bm = sub.add_parser("benchmark", help="agents vs manual clicks, ablations and baselines")
    bm.add_argument("task", help="task YAML or shipped task name (its data and segmenter)")
    bm.add_argument("--runs", nargs="+", required=True, help="run folders of trained agents")
    bm.add_argument("--split", default="test", choices=["train", "val", "test"])
    bm.add_argument("--limit", type=int, default=None, help="first N images only")
    bm.add_argument("--out", default="benchmark", help="output folder")
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument("--manual-clicks", type=int, default=20, help="annotator click budget")
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
        help="fine-tuning deltas (alignsam finetune --out folders) to benchmark as methods",
    )
    bm.add_argument(
        "--amg-points", type=int, default=32, help="automatic mask generator grid side (32)"
    )
    bm.add_argument(
        "--amg-tune",
        type=int,
        default=10,
        help="val images to choose the generator's filter thresholds on (0: SAM's defaults)",
    )
    add_ray_options(bm)
    bm.add_argument(
        "--abstain-margin",
        type=float,
        default=None,
        help="the SRM abstains on clicks with |p - 0.5| below this (all env-based methods)",
    )
    bm.add_argument("--device", default=None)
    bm.add_argument("--cache", default=None, help="embedding cache dir")
    bm.add_argument("--no-progress", action="store_true")
    bm.add_argument(
        "--skip-bad", action="store_true", help="leave out unusable images/masks (listed)"
    )
    bm.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.benchmark import render_markdown, run_benchmark
    from experiments.train import resolve_task
    from segmenter import EmbeddingCache

    task = resolve_task(args.task)
    if args.device:
        task.device = args.device
    result = run_benchmark(
        task,
        args.runs,
        split=args.split,
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
