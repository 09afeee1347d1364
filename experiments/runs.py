"""What every training run shares: resolving a task, its splits, seeding, the run folder."""

from __future__ import annotations

import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.config import ConfigError, TaskConfig
from envs.data import Dataset
from experiments.datasets import load_dataset, load_readable, readable

__all__ = [
    "TASKS_DIR",
    "describe_run",
    "load_split",
    "load_train_split",
    "new_run_dir",
    "peak_memory_mb",
    "resolve_task",
    "seed_everything",
    "skipped_by_split",
]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def resolve_task(name_or_path: str) -> TaskConfig:
    """A task by YAML path or by the name of a shipped task (``experiments/tasks/NAME.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return TaskConfig.load(path)
    shipped = TASKS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return TaskConfig.load(shipped)
    names = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
    raise ConfigError(f"no task file {name_or_path!r}; shipped tasks: {', '.join(names)}")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(runs: Path, task: TaskConfig) -> Path:
    """A new ``runs/{task}__{agent}__{seed}__{time}`` folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = runs / f"{task.name}__{task.agent}__{task.seed}__{stamp}"
    run.mkdir(parents=True, exist_ok=False)
    return run


def load_split(task: TaskConfig, split: str) -> Dataset:
    """The usable samples of one of the task's splits, every image decoded once up front; files
    that cannot be used stop here or, with ``data.on_error: skip``, are listed in
    ``.skipped``."""
    spec = getattr(task.data, split, None)
    if not spec:
        raise ConfigError(f"task {task.name} has no {split!r} split")
    return load_readable(spec, task.data.on_error)


def load_train_split(task: TaskConfig) -> Dataset:
    """The task's training images: its ``train`` spec, cut to the seeded ``train_subset``
    (the 50 images of the AlignSAM protocol) when one is set, then cut or extended to
    ``train_size`` (a learning curve's point: the first images of that list, then of
    ``data.pool``). Training and every baseline that learns from training images use exactly
    this list. A subset is drawn from the usable images, after any skips."""
    train_set = load_split(task, "train")
    if task.data.train_subset and len(train_set) > task.data.train_subset:
        pick = np.random.default_rng(task.seed).choice(
            len(train_set), task.data.train_subset, replace=False
        )
        train_set = Dataset(
            [train_set[int(i)] for i in sorted(pick)],
            name=train_set.name,
            skipped=train_set.skipped,
        )
    size = task.data.train_size
    if size is None:
        return train_set
    samples, skipped = list(train_set)[:size], list(train_set.skipped)
    if size > len(train_set):
        if not task.data.pool:
            raise ConfigError(
                f"task {task.name}: data.train_size {size} > the {len(train_set)} training "
                "images, and data.pool names no further labelled images"
            )
        pool = load_dataset(task.data.pool, task.data.on_error)  # decoded below, as needed
        have = {s.id for s in train_set}
        extra = [s for s in pool if s.id not in have]
        if task.data.train_subset:  # the training images were a random draw: so is the rest
            order = np.random.default_rng([task.seed, 1]).permutation(len(extra))
            extra = [extra[int(i)] for i in order]
        if len(train_set) + len(extra) < size:
            raise ConfigError(
                f"task {task.name}: data.train_size {size} > the {len(train_set)} training "
                f"+ {len(extra)} pool images ({task.data.pool})"
            )
        more = readable(extra[: size - len(train_set)], task.data.on_error, name=task.data.pool)
        samples += list(more)
        skipped += list(getattr(pool, "skipped", [])) + list(more.skipped)
    return Dataset(samples, name=f"{train_set.name}[:{size}]", skipped=skipped)


def skipped_by_split(train_set: Dataset | None, val_set: Dataset | None) -> dict[str, list]:
    """A run summary's ``skipped``: each split's left-out files with their reasons."""
    return {
        split: [list(item) for item in ds.skipped]
        for split, ds in (("train", train_set), ("val", val_set))
        if ds is not None and ds.skipped
    }


def peak_memory_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, else KiB


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def describe_run(summary: dict[str, Any]) -> str:
    """One line that says what a training run did, in the words of its agent kind: PPO steps for
    a PPO agent; judge rounds, decoder calls and stage times for a lookahead agent; then the
    val score, the wall time and the peak memory."""
    head = f"run {summary['run_dir']}: "
    memory = summary.get("peak_memory_mb")
    tail = "" if memory is None else f"; peak memory {memory / 1024:.2f} GiB"
    if summary.get("agent") == "lookahead":
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in summary.get("seconds", {}).items())
        steps = summary.get("clicks", summary.get("val_mean_steps"))
        chosen = " (chosen on val)" if "clicks" in summary else ""
        at = "" if steps is None else f" at {steps:.1f} clicks{chosen}"
        rounds = len(summary.get("judge_rounds", []))
        return (
            f"{head}lookahead agent, {rounds} judge round{'' if rounds == 1 else 's'} "
            f"({summary.get('judge_decoder_calls', 0)} decoder calls) in "
            f"{summary['wall_seconds']:.0f} s ({stages}); val mIoU "
            f"{_score(summary.get('best_val_miou'))}{at}{tail}"
        )
    resumed = f" (resumed at {summary['start_step']})" if summary.get("start_step") else ""
    return (
        f"{head}PPO agent, {summary['steps']} steps{resumed} in {summary['wall_seconds']:.0f} s "
        f"(PPO learn {summary['learn_seconds']:.0f} s); best val mIoU "
        f"{_score(summary.get('best_val_miou'))}{tail}"
    )
