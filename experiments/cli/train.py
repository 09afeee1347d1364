"""``alignsam train`` and ``alignsam evaluate``: train a prompt agent for a task, and score a
run's best agent on a split (:mod:`experiments.train`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from experiments.cli.common import Subcommands, print_skipped, write_json


def add(sub: Subcommands) -> None:
    t = sub.add_parser("train", help="train a prompt agent (PPO + SRM) for a task")
    t.add_argument("task", nargs="?", help="task YAML or shipped task name (experiments/tasks)")
    t.add_argument(
        "--resume", default=None, help="continue this run folder from its last checkpoint"
    )
    t.add_argument("--runs", default="runs", help="parent folder of run folders")
    t.add_argument("--steps", type=int, default=None, help="override total_timesteps")
    t.add_argument(
        "--imitation-rounds",
        type=int,
        default=None,
        help="override imitation.rounds (0: PPO only, the paper's training)",
    )
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--segmenter", default=None, help="override the task's segmenter")
    t.add_argument(
        "--branch", choices=["implicit", "explicit"], default=None, help="override the SRM branch"
    )
    t.add_argument("--device", default=None)
    t.add_argument("--cache", default=None, help="embedding cache dir")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--skip-bad", action="store_true", help="leave out unusable images/masks (listed)"
    )
    t.set_defaults(func=run)

    ev = sub.add_parser("evaluate", help="evaluate a run's best agent on a split")
    ev.add_argument("run")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--out", default=None)
    ev.set_defaults(func=run_evaluate)


def run(args: argparse.Namespace) -> int:
    from experiments.train import resolve_task, train

    if not args.task and not args.resume:
        raise ValueError("give a TASK (YAML file or shipped name) or --resume RUN_DIR")
    if args.resume:
        task = resolve_task(args.task) if args.task else None  # checked against the run's
    else:
        task = resolve_task(args.task)
        overrides = {
            "segmenter": args.segmenter,
            "device": args.device,
            "seed": args.seed,
            "total_timesteps": args.steps,
        }
        for key, value in overrides.items():
            if value is not None:
                setattr(task, key, value)
        if args.branch:
            task.srm.branch = args.branch
        if args.imitation_rounds is not None:
            task.imitation = dataclasses.replace(task.imitation, rounds=args.imitation_rounds)
    if task is not None and args.skip_bad:
        task.data.on_error = "skip"
    summary = train(
        task,
        runs=Path(args.runs),
        resume=Path(args.resume) if args.resume else None,
        cache_dir=args.cache,
        progress=not args.no_progress,
        total_timesteps=args.steps if args.resume else None,
    )
    print(
        f"run {summary['run_dir']}: {summary['steps']} steps in {summary['wall_seconds']:.0f} s "
        f"(PPO learn {summary['learn_seconds']:.0f} s), best val mIoU "
        f"{summary['best_val_miou']:.4f}"
    )
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

    res = evaluate_run(Path(args.run), args.split, args.limit)
    print(f"{args.run} on {args.split}: mIoU {res['miou']:.4f} over {len(res['per_image'])} images")
    write_json(args.out, res)
    return 0
