"""``alignsam train`` and ``alignsam evaluate``: train a prompt agent for a task, and score a
run's best agent on a split (:mod:`experiments.train`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.cli.common import (
    Subcommands,
    UsageError,
    add_cache_option,
    add_deprecated_alias,
    non_negative_int,
    positive_int,
    print_skipped,
    write_json,
)


def add(sub: Subcommands) -> None:
    t = sub.add_parser(
        "train",
        help="train a prompt agent (PPO + SRM) for a task",
        description="Train a prompt agent for TASK in a new run folder under --runs-dir, or "
        "continue a run with --resume RUN. The task file and every override are checked before "
        "anything is loaded or created.",
    )
    t.add_argument(
        "task",
        nargs="?",
        metavar="TASK",
        help="task YAML file or shipped task name (experiments/tasks); optional with --resume",
    )
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue the run folder RUN from its last checkpoint, with its own config",
    )
    t.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="parent folder of new run folders"
    )
    add_deprecated_alias(t, "--runs", "--runs-dir", dest="runs_dir")
    t.add_argument(
        "--timesteps",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="total PPO environment steps (0: none, e.g. imitation only; default: the task's "
        "total_timesteps)",
    )
    add_deprecated_alias(t, "--steps", "--timesteps", dest="timesteps", type=non_negative_int)
    t.add_argument(
        "--imitation-rounds",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="override imitation.rounds (0: PPO only, the paper's training; default: the task's)",
    )
    t.add_argument("--seed", type=non_negative_int, default=None, help="override the task's seed")
    t.add_argument("--segmenter", default=None, help="override the task's segmenter")
    t.add_argument(
        "--branch", choices=["implicit", "explicit"], default=None, help="override the SRM branch"
    )
    t.add_argument("--device", default=None, help="override the task's torch device")
    add_cache_option(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument(
        "--skip-bad", action="store_true", help="leave out unusable images/masks (listed)"
    )
    t.set_defaults(func=run)

    ev = sub.add_parser(
        "evaluate",
        help="evaluate a run's best agent on a split",
        description="Mean IoU of the best checkpoint of RUN on a split of its own task.",
    )
    ev.add_argument("run", metavar="RUN", help="run folder made by alignsam train")
    ev.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="which split of the task"
    )
    ev.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="first N images only"
    )
    ev.add_argument(
        "--which",
        choices=["best", "latest"],
        default="best",
        help="checkpoint of RUN: best on val, or the latest written",
    )
    add_cache_option(ev)
    ev.add_argument("--out", default=None, metavar="FILE", help="write per-image IoUs as JSON")
    ev.set_defaults(func=run_evaluate)


def overrides(args: argparse.Namespace) -> dict[str, object]:
    """The task settings the command line changes (dotted keys)."""
    given = {
        "segmenter": args.segmenter,
        "device": args.device,
        "seed": args.seed,
        "total_timesteps": args.timesteps,
        "srm.branch": args.branch,
        "imitation.rounds": args.imitation_rounds,
        "data.on_error": "skip" if args.skip_bad else None,
    }
    return {k: v for k, v in given.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from agents.config import ConfigError
    from experiments.runs import describe_run
    from experiments.train import resolve_task, train

    if not args.task and not args.resume:
        raise UsageError("give a TASK (YAML file or shipped name) or --resume RUN")
    changed = overrides(args)
    if args.resume:
        fixed = sorted(set(changed) - {"total_timesteps"})
        if fixed:
            raise UsageError(
                f"--resume continues RUN with its own config; it cannot change {', '.join(fixed)}"
                " (start a new run for other settings)"
            )
    task = resolve_task(args.task) if args.task else None  # with --resume: checked against RUN
    if task is not None and not args.resume:
        try:
            task = task.with_settings(changed, where="command line")
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    summary = train(
        task,
        runs=Path(args.runs_dir),
        resume=Path(args.resume) if args.resume else None,
        cache_dir=args.cache,
        progress=not args.no_progress,
        total_timesteps=args.timesteps if args.resume else None,  # None: the run's own
    )
    print(describe_run(summary))
    for r in summary["imitation"].get("rounds", []):
        val = "n/a" if r["val_miou"] is None else f"{r['val_miou']:.4f}"
        print(
            f"imitation round {r['round']}: {r['states']} states, {r['collect_decoder_calls']} "
            f"decoder calls, {r['seconds']:.0f} s, val mIoU {val}"
        )
    for split, skipped in summary["skipped"].items():
        print(f"{split}:", end=" ")
        print_skipped(skipped)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from experiments.train import evaluate_run

    res = evaluate_run(Path(args.run), args.split, args.limit, args.which, args.cache)
    print(f"{args.run} on {args.split}: mIoU {res['miou']:.4f} over {len(res['per_image'])} images")
    write_json(args.out, res)
    return 0
