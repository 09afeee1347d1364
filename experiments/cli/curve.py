"""``alignsam curve``: the learning curve, mIoU against labelled images, of the task's agent and
what a user would pick instead (:mod:`experiments.curve`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.cli.common import (
    Subcommands,
    UsageError,
    add_cache_option,
    add_ray_options,
    non_negative_int,
    positive_int,
    yaml_value,
)


def add(sub: Subcommands) -> None:
    c = sub.add_parser(
        "curve",
        help="learning curve: train and benchmark at several numbers of labelled images",
        description="For every size N: train TASK's agent on its first N labelled images (the "
        "task's train images, then data.pool), the paper's PPO agent (--ppo-task) and the "
        "fine-tuned decoder, benchmark all on the same --split images, then write results.json, "
        "results.md and curve.png into --out. Each size's rows are ordinary run folders under "
        "--out; running the same command again resumes at the first unfinished step.",
    )
    c.add_argument("task", metavar="TASK", help="task YAML or shipped task name (with data.pool)")
    c.add_argument(
        "--sizes",
        nargs="+",
        type=positive_int,
        default=[25, 50, 100, 200, 400],
        metavar="N",
        help="numbers of labelled training images",
    )
    c.add_argument(
        "--seeds", nargs="+", type=non_negative_int, default=[0], metavar="S", help="seeds"
    )
    c.add_argument(
        "--extra-seeds",
        nargs="*",
        type=non_negative_int,
        default=[1],
        metavar="S",
        help="further seeds at the sizes up to --extra-seeds-max-size (default 1; the flag "
        "alone: none)",
    )
    c.add_argument(
        "--extra-seeds-max-size",
        type=non_negative_int,
        default=50,
        metavar="N",
        help="the largest size with --extra-seeds",
    )
    c.add_argument(
        "--ppo-task",
        default=None,
        metavar="TASK",
        help="the paper's PPO agent as a row (a task with the same data); none: no PPO row",
    )
    c.add_argument(
        "--ppo-sizes",
        nargs="*",
        type=positive_int,
        default=[],
        metavar="N",
        help="sizes with the PPO row (default: every size)",
    )
    c.add_argument("--no-finetune", action="store_true", help="no fine-tuned decoder row")
    c.add_argument(
        "--finetune-steps",
        type=positive_int,
        default=1000,
        metavar="N",
        help="fine-tuning budget in images seen (epochs = N / size, at least 2)",
    )
    c.add_argument("--split", default="test", help="the split every row is scored on")
    c.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="first N images only"
    )
    c.add_argument(
        "--confirm",
        default=None,
        metavar="SPEC",
        help="also score the largest size's rows on these images (e.g. kvasir:test_rest)",
    )
    c.add_argument(
        "--manual-clicks",
        type=positive_int,
        default=5,
        metavar="K",
        help="the simulated annotator's budget (its @1/@3/@5 are drawn)",
    )
    c.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="task settings for every size, e.g. srm_pretrain_steps=3000 lookahead.judge_images=50",
    )
    c.add_argument("--out", required=True, metavar="DIR", help="the curve's folder")
    add_cache_option(c)
    add_ray_options(c, workers=False)
    c.add_argument(
        "--trial-threads",
        type=positive_int,
        default=1,
        metavar="N",
        help="--ray: CPUs per point (each size and seed is a Ray Tune trial)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=run)


def _settings(pairs: list[str]) -> dict[str, object]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: write KEY=VALUE, e.g. srm_pretrain_steps=3000")
        out[key] = yaml_value(value)
    return out


def run(args: argparse.Namespace) -> int:
    from agents.config import ConfigError
    from experiments.curve import CurveConfig, run_curve
    from experiments.train import resolve_task

    if args.sizes != sorted(set(args.sizes)):
        raise UsageError(f"--sizes must be distinct and ascending, got {args.sizes}")
    settings = _settings(args.set)
    task = resolve_task(args.task)
    ppo = resolve_task(args.ppo_task) if args.ppo_task else None
    try:
        task = task.with_settings(settings, where="--set")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if max(args.sizes) > 50 and not task.data.pool:
        raise UsageError(
            f"task {task.name} has no data.pool: sizes past its training images need one "
            "(e.g. pool: kvasir:pool in the task file)"
        )
    config = CurveConfig(
        sizes=args.sizes,
        seeds=args.seeds,
        extra_seeds=args.extra_seeds,
        extra_seeds_max_size=args.extra_seeds_max_size,
        ppo_task=ppo,
        ppo_sizes=args.ppo_sizes,
        finetune=not args.no_finetune,
        finetune_steps=args.finetune_steps,
        split=args.split,
        limit=args.limit,
        manual_clicks=args.manual_clicks,
        confirm=args.confirm,
    )
    result = run_curve(
        task,
        config,
        args.out,
        args.cache,
        progress=not args.no_progress,
        ray_address=args.ray,
        threads_per_trial=args.trial_threads,
    )
    out = Path(args.out)
    print((out / "results.md").read_text(), end="")
    minutes = result["seconds"] / 60
    print(f"wrote {out / 'results.json'}, results.md, curve.png ({minutes:.0f} min)")
    return 0
