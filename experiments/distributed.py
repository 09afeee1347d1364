"""Scale-out on Ray (the optional extra ``alignsam[ray]``): embedding pre-compute as a Ray Data
job, the benchmark sharded over Ray tasks, and training sweeps as Ray Tune trials.

Every path writes what the single-machine path writes: embeddings into the same
content-addressed cache (:class:`~segmenter.cache.EmbeddingCache`, whose atomic writes make
concurrent writers safe), the benchmark's ``results.json`` from merged per-image results, and run
folders of ``alignsam train``. Workers need the project installed and the cache / run folders on
a filesystem they share with the driver (one machine, NFS, or a mounted bucket).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

INSTALL = "pip install 'alignsam[ray]'"


def require_ray() -> Any:
    """The ``ray`` module, or an error that names the install command."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(f"--ray needs Ray, which is not installed: {INSTALL}") from exc
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at ``address`` (``""`` or ``"auto"``: ``$RAY_ADDRESS`` or a new local
    instance). The workers get this process's threads setting and project environment."""
    ray = require_ray()
    if not ray.is_initialized():
        env = {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("ALIGNSAM_", "MALLOC_", "HF_")) or k == "PYTHONPATH"
        }
        ray.init(
            address=address or None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": env} if env else None,
        )
    return ray


def _cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


# ---------------------------------------------------------------------------------------------
# Embedding: Ray Data batch inference
# ---------------------------------------------------------------------------------------------


class _Encoder:
    """Ray Data actor: one segmenter per actor, writing into the shared cache."""

    def __init__(self, spec: str, segmenter: dict[str, Any], cache_root: str, threads: int) -> None:
        from experiments.datasets import load_dataset
        from segmenter import EmbeddingCache, build_segmenter

        _threads(threads)
        self.samples = load_dataset(spec, "skip")
        self.segmenter = build_segmenter(**segmenter)
        self.cache = EmbeddingCache(cache_root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status, reason = [], []
        for index in batch["index"]:
            sample = self.samples[int(index)]
            try:
                image = sample.load_image()
            except Exception as exc:  # noqa: BLE001 - reported per image, like the local path
                status.append("unreadable")
                reason.append(str(exc))
                continue
            hits = self.cache.hits
            self.cache.get_or_encode(self.segmenter, image)
            status.append("cached" if self.cache.hits > hits else "encoded")
            reason.append("")
        return {"index": batch["index"], "status": np.array(status), "reason": np.array(reason)}


def embed(
    spec: str,
    segmenter: dict[str, Any],
    cache_root: str | Path,
    *,
    address: str | None = "",
    limit: int | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    gpus_per_worker: float = 0.0,
) -> dict[str, Any]:
    """Encode dataset ``spec`` into the cache at ``cache_root`` with Ray Data actors.

    Args:
        spec: Dataset spec or image folder (as for ``alignsam embed``), read on each worker.
        segmenter: ``build_segmenter`` keyword arguments.
        cache_root: The shared cache folder.
        address: Ray address (``""``: local / ``$RAY_ADDRESS``).
        limit: First N images only.
        workers: Actors (default: one per ``threads_per_worker`` CPUs of the cluster, or one
            per GPU with ``gpus_per_worker``).
        threads_per_worker: CPUs (torch threads) per actor.
        gpus_per_worker: GPUs per actor (e.g. 1 on a GPU cluster, with ``device="cuda"``).

    Returns:
        Counts per status, the unreadable files and the wall time.
    """
    from experiments.datasets import load_dataset

    ray = connect(address)
    samples = load_dataset(spec, "skip")
    n = min(len(samples), limit) if limit else len(samples)
    if workers is None:
        if gpus_per_worker:
            workers = max(1, int(ray.cluster_resources().get("GPU", 1) / gpus_per_worker))
        else:
            workers = max(1, _cpus(ray) // max(1, threads_per_worker))
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"index": i} for i in range(n)])
    out = ds.map_batches(
        _Encoder,
        fn_constructor_kwargs={
            "spec": spec,
            "segmenter": segmenter,
            "cache_root": str(Path(cache_root).resolve()),
            "threads": threads_per_worker,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=int(min(workers, max(1, n)))),
        num_cpus=threads_per_worker,
        num_gpus=gpus_per_worker or None,
    ).take_all()
    counts: dict[str, int] = {}
    unreadable = []
    for row in out:
        counts[str(row["status"])] = counts.get(str(row["status"]), 0) + 1
        if row["status"] == "unreadable":
            unreadable.append((samples[int(row["index"])].id, str(row["reason"])))
    return {
        "images": n,
        "counts": counts,
        "unreadable": unreadable,
        "skipped": [list(s) for s in getattr(samples, "skipped", [])],
        "workers": workers,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# Benchmark: shards of images as Ray tasks
# ---------------------------------------------------------------------------------------------


def _benchmark_shard(run_methods, task, run_dirs, samples, indices, cache_root, options, threads):
    from segmenter import EmbeddingCache, build_segmenter

    _threads(threads)
    seg = build_segmenter(
        task.segmenter, checkpoint=task.checkpoint, device=task.device, autocast_bf16=task.bf16
    )
    cache = EmbeddingCache(cache_root)
    return run_methods(task, run_dirs, samples, indices, cache, seg, options)


def benchmark_shards(
    run_methods: Any,
    task: Any,
    run_dirs: Sequence[str | Path],
    samples: Sequence[Any],
    cache_root: str | Path,
    options: Any,
    *,
    address: str | None = "",
    workers: int | None = None,
    threads_per_worker: int = 1,
) -> list[Any]:
    """Run ``run_methods`` (:func:`experiments.benchmark.runner.run_methods`, passed in so that
    this module does not import the benchmark) on contiguous shards of the images, one Ray task
    each; returns the shards in image order."""
    import dataclasses

    ray = connect(address)
    n = len(samples)
    workers = max(1, min(n, workers or _cpus(ray) // max(1, threads_per_worker)))
    bounds = np.linspace(0, n, workers + 1).round().astype(int)
    shards = [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    remote = ray.remote(num_cpus=threads_per_worker, max_retries=2)(_benchmark_shard)
    samples_ref = ray.put(list(samples))
    opts = dataclasses.replace(options, progress=False)
    runs = [str(Path(r).resolve()) for r in run_dirs]
    root = str(Path(cache_root).resolve())
    futures = [
        remote.remote(
            run_methods, task, runs, samples_ref, list(idx), root, opts, threads_per_worker
        )
        for idx in shards
    ]
    logger.info("benchmark: %d images in %d Ray shards", n, len(futures))
    return ray.get(futures)


# ---------------------------------------------------------------------------------------------
# Sweeps: Ray Tune trials of `alignsam train`
# ---------------------------------------------------------------------------------------------


def _grid_point(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def trial_name(task: str, seed: int, params: dict[str, Any], sweep: str) -> str:
    """Run-folder name of a trial: the ``alignsam train`` pattern with the sweep's name."""
    hp = "".join(f"_{k.split('.')[-1]}={v}" for k, v in sorted(params.items()))
    return f"{task}__ppo__{seed}__{sweep}{hp}"


def run_trial(
    task_ref: str,
    seed: int,
    params: dict[str, Any],
    runs: str,
    sweep: str,
    cache_dir: str | None,
    threads: int = 1,
) -> dict[str, Any]:
    """One (task, seed, hyperparameters) training, resumed from its run folder's last checkpoint
    when an earlier attempt of the same trial was interrupted (e.g. its worker was killed)."""
    from agents.prompt_agent import latest_checkpoint
    from experiments.train import resolve_task, train

    _threads(threads)
    task = resolve_task(task_ref).with_settings({**params, "seed": int(seed)}, where="trial")
    run_dir = Path(runs) / trial_name(task.name, task.seed, params, sweep)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "worker.pid").write_text(str(os.getpid()))
    resume = run_dir if latest_checkpoint(run_dir) is not None else None
    summary = train(
        None if resume else task,
        runs=Path(runs),
        resume=resume,
        cache_dir=cache_dir,
        progress=False,
        run_dir=None if resume else run_dir,
    )
    return {
        "task": task.name,
        "seed": task.seed,
        **{f"hp/{k}": v for k, v in params.items()},
        "run_dir": summary["run_dir"],
        "steps": summary["steps"],
        "start_step": summary.get("start_step", 0),
        "best_val_miou": summary["best_val_miou"],
        "wall_seconds": summary["wall_seconds"],
    }


def _tune_trainable(config: dict[str, Any]) -> None:
    from ray import tune

    params = dict(config.get("params") or {})
    tune.report(
        run_trial(
            config["task"],
            config["seed"],
            params,
            config["runs"],
            config["sweep"],
            config["cache_dir"],
            config["threads"],
        )
    )


def sweep(
    tasks: Sequence[str],
    seeds: Sequence[int],
    *,
    grid: dict[str, Sequence[Any]] | None = None,
    runs: str | Path = "runs",
    name: str | None = None,
    cache_dir: str | None = None,
    address: str | None = None,
    threads_per_trial: int = 1,
    max_failures: int = 2,
) -> list[dict[str, Any]]:
    """Train every (task, seed, grid point), on Ray Tune when ``address`` is not ``None``
    (``""``: local Ray) or one after another in this process otherwise.

    Returns one row per trial (its run folder, steps, resumed-from step, best val mIoU,
    status); the same rows go to ``runs/sweep-NAME.json``.
    """
    import itertools

    from experiments.train import resolve_task

    name = name or time.strftime("sweep-%Y%m%d-%H%M%S")
    grid = {k: list(v) for k, v in (grid or {}).items()}
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    # A bad task file, grid key or value stops here, before any folder or trial.
    for task_ref in tasks:
        task = resolve_task(task_ref)
        for params in points:
            task.with_settings(params, where=f"--grid {_grid_point(params)} for {task_ref}")
    runs = Path(runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    cache = str(Path(cache_dir).resolve()) if cache_dir else None
    rows: list[dict[str, Any]] = []
    if address is None:
        for task, seed, params in itertools.product(tasks, seeds, points):
            row = run_trial(task, seed, params, str(runs), name, cache, threads_per_trial)
            rows.append({**row, "status": "TERMINATED"})
    else:
        rows = _tune(
            tasks, seeds, points, runs, name, cache, address, threads_per_trial, max_failures
        )
    (runs / f"{name}.json").write_text(json.dumps(rows, indent=2))
    return rows


def _tune(tasks, seeds, points, runs, name, cache, address, threads, max_failures):
    connect(address)
    from ray import tune

    tasks = [str(Path(t).resolve()) if Path(t).exists() else t for t in tasks]
    space = {
        "task": tune.grid_search(list(tasks)),
        "seed": tune.grid_search([int(s) for s in seeds]),
        "params": tune.grid_search(points),
        "runs": str(runs),
        "sweep": name,
        "cache_dir": cache,
        "threads": threads,
    }
    tuner = tune.Tuner(
        tune.with_resources(_tune_trainable, {"cpu": threads}),
        param_space=space,
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(runs / "_tune"),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=0,
        ),
    )
    results = tuner.fit()
    rows = []
    for r in results:
        row = dict(r.metrics or {})
        keep = ("task", "seed", "run_dir", "steps", "start_step", "best_val_miou", "wall_seconds")
        row = {k: v for k, v in row.items() if k in keep or k.startswith("hp/")}
        if "task" not in row:
            row.update(task=r.config["task"], seed=r.config["seed"])
        row["status"] = "ERROR" if r.error else "TERMINATED"
        if r.error:
            row["error"] = str(r.error).splitlines()[0][:200]
        rows.append(row)
    return rows
