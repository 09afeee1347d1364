"""``alignsam sweep``: train every task x seed x grid point (Ray Tune with ``--ray``;
:func:`experiments.distributed.sweep`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_ray_options, print_table, yaml_value


def add(sub: Subcommands) -> None:
    sw = sub.add_parser("sweep", help="train every task x seed x grid point (Ray Tune with --ray)")
    sw.add_argument("tasks", nargs="+", help="task YAML files or shipped task names")
    sw.add_argument("--seeds", type=int, default=1, help="seeds per task (seed0 ... seed0+N-1)")
    sw.add_argument("--seed0", type=int, default=0)
    sw.add_argument(
        "--grid",
        nargs="*",
        default=[],
        help="KEY=V1,V2 task settings, e.g. ppo.learning_rate=1e-4,3e-4",
    )
    sw.add_argument("--runs", default="runs", help="parent folder of the run folders")
    sw.add_argument("--name", default=None, help="sweep name (default sweep-TIME)")
    sw.add_argument("--cache", default=None, help="embedding cache dir (shared by workers)")
    sw.add_argument("--trial-threads", type=int, default=1, help="CPUs per trial")
    sw.add_argument("--max-failures", type=int, default=2, help="--ray: retries of a trial")
    add_ray_options(sw, workers=False)
    sw.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.distributed import sweep

    grid: dict[str, list] = {}
    for item in args.grid:
        key, _, values = item.partition("=")
        if not values:
            raise ValueError(
                f"--grid {item!r}: expected KEY=V1,V2 (e.g. ppo.learning_rate=1e-4,3e-4)"
            )
        grid[key] = [yaml_value(v) for v in values.split(",")]
    rows = sweep(
        args.tasks,
        range(args.seed0, args.seed0 + args.seeds),
        grid=grid,
        runs=args.runs,
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
