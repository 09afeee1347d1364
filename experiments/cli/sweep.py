"""``alignsam sweep``: train every task x seed x grid point (Ray Tune with ``--ray``;
:func:`experiments.distributed.sweep`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import (
    Subcommands,
    UsageError,
    add_cache_option,
    add_deprecated_alias,
    add_ray_options,
    non_negative_int,
    positive_int,
    print_table,
    yaml_value,
)


def add(sub: Subcommands) -> None:
    sw = sub.add_parser(
        "sweep",
        help="train every task x seed x grid point (Ray Tune with --ray)",
        description="Train every TASK x seed x grid point, each in its own run folder under "
        "--runs-dir; every task file and grid value is checked before the first trial. Exit "
        "code 1 when a trial failed.",
    )
    sw.add_argument("tasks", nargs="+", metavar="TASK", help="task YAML files or shipped names")
    sw.add_argument(
        "--seeds", type=positive_int, default=1, metavar="N", help="seeds per task: seed0 ... +N-1"
    )
    sw.add_argument("--seed0", type=non_negative_int, default=0, help="first seed")
    sw.add_argument(
        "--grid",
        nargs="*",
        default=[],
        metavar="KEY=V1,V2",
        help="task settings to sweep, e.g. ppo.learning_rate=1e-4,3e-4",
    )
    sw.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="parent folder of the run folders"
    )
    add_deprecated_alias(sw, "--runs", "--runs-dir", dest="runs_dir")
    sw.add_argument("--name", default=None, help="sweep name (default: sweep-TIME)")
    add_cache_option(sw, shared=True)
    sw.add_argument(
        "--trial-threads", type=positive_int, default=1, metavar="N", help="CPUs per trial"
    )
    sw.add_argument(
        "--max-failures",
        type=non_negative_int,
        default=2,
        metavar="N",
        help="--ray: retries of a failed trial",
    )
    add_ray_options(sw, workers=False)
    sw.set_defaults(func=run)


def _check_grid(tasks: list[str], grid: dict[str, list]) -> None:
    """Every grid value against every task's schema: a bad one is a usage error (exit 2), a bad
    task file a data error (exit 3), both before any trial starts."""
    from agents.config import ConfigError
    from experiments.train import resolve_task

    for ref in tasks:
        task = resolve_task(ref)
        for key, values in grid.items():
            for value in values:
                try:
                    task.with_settings({key: value}, where=f"--grid {key}={value} ({ref})")
                except ConfigError as exc:
                    raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from experiments.distributed import sweep

    grid: dict[str, list] = {}
    for item in args.grid:
        key, _, values = item.partition("=")
        if not values:
            raise UsageError(
                f"--grid {item!r}: expected KEY=V1,V2 (e.g. ppo.learning_rate=1e-4,3e-4)"
            )
        grid[key] = [yaml_value(v) for v in values.split(",")]
    _check_grid(args.tasks, grid)
    rows = sweep(
        args.tasks,
        range(args.seed0, args.seed0 + args.seeds),
        grid=grid,
        runs=args.runs_dir,
        name=args.name,
        cache_dir=args.cache,
        address=args.ray,
        threads_per_trial=args.trial_threads,
        max_failures=args.max_failures,
    )
    keys = ["task", "seed", *sorted({k for r in rows for k in r if k.startswith("hp/")})]
    keys += ["status", "steps", "start_step", "best_val_miou", "wall_seconds", "run_dir"]
    print_table(rows, keys)
    return 0 if all(r["status"] == "TERMINATED" for r in rows) else 1
