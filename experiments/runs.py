"""What every training run shares: resolving a task, its splits, seeding, the run folder."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from agents.config import ConfigError, TaskConfig
from envs.data import Dataset
from experiments.datasets import load_readable

__all__ = [
    "TASKS_DIR",
    "load_split",
    "load_train_split",
    "new_run_dir",
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
    (the 50 images of the AlignSAM protocol) when one is set. Training and every baseline that
    learns from training images use exactly this list. A subset is drawn from the usable
    images, after any skips."""
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
    return train_set


def skipped_by_split(train_set: Dataset | None, val_set: Dataset | None) -> dict[str, list]:
    """A run summary's ``skipped``: each split's left-out files with their reasons."""
    return {
        split: [list(item) for item in ds.skipped]
        for split, ds in (("train", train_set), ("val", val_set))
        if ds is not None and ds.skipped
    }
