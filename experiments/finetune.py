"""``alignsam finetune TASK --level decoder|lora|full --out DIR``: fine-tune the task's segmenter
on the same training images the agent learns from, early-stopped on ``val``.

The result is a delta (``DIR/delta.pt``) that ``alignsam segment --delta`` and
``alignsam benchmark --finetuned`` load onto the frozen base, plus ``DIR/summary.json``
(wall time, trainable parameters, per-epoch validation) and TensorBoard logs in ``DIR/tb``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from agents.config import TaskConfig
from experiments.train import load_split, load_train_split, seed_everything
from segmenter import EmbeddingCache, build_segmenter
from segmenter.finetune import FinetuneConfig, FinetuneItem, Finetuner
from segmenter.io import atomic_write

logger = logging.getLogger(__name__)


def _items(samples, level: str, seg, cache: EmbeddingCache) -> list[FinetuneItem]:
    items = []
    for s in samples:
        image = s.load_image()
        emb = cache.get_or_encode(seg, image) if level == "decoder" else None
        items.append(FinetuneItem(s.id, s.mask, embedding=emb, image=None if emb else image))
    return items


def run_finetune(
    task: TaskConfig,
    out: str | Path,
    config: FinetuneConfig,
    *,
    val_limit: int | None = 20,
    device: str | None = None,
    cache: EmbeddingCache | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune on ``task``'s training images (the agent's ``train_subset``), keep the best
    on its first ``val_limit`` val images; write and return ``summary.json``."""
    t0 = time.perf_counter()
    out = Path(out)
    summary_path = out / "summary.json"
    if summary_path.is_file() and not resume:
        raise FileExistsError(f"{out} already holds a finished fine-tuning run; pick a new --out")
    seed_everything(config.seed)
    train = load_train_split(task)
    val = load_split(task, "val")
    val = val[:val_limit] if val_limit else val
    seg = build_segmenter(task.segmenter, checkpoint=task.checkpoint, device=device or task.device)
    cache = cache if cache is not None else EmbeddingCache()
    tr, va = _items(train, config.level, seg, cache), _items(val, config.level, seg, cache)
    meta = {"task": task.name, "train_images": len(tr), "val_images": len(va)}
    tuner = Finetuner(seg, config, out)
    res = tuner.fit(tr, va, resume=resume, progress=progress, meta=meta)
    summary = {
        "task": task.name,
        "level": config.level,
        "base_model_id": seg.model_id,
        "delta": str(res.delta),
        "config": {**config.__dict__, "lora_targets": list(config.lora_targets)},
        "train_images": len(tr),
        "val_images": len(va),
        "trainable_params": res.trainable_params,
        "train_seconds": res.seconds,
        "wall_seconds": time.perf_counter() - t0,
        "best_epoch": res.best_epoch,
        "best_val": res.best_val,
        "epochs_run": res.epochs_run,
        "history": res.history,
        "device": str(seg.device),
        "skipped": {"train": list(train.skipped), "val": list(val.skipped)},
    }
    atomic_write(summary_path, lambda fh: fh.write(json.dumps(summary, indent=2).encode()))
    return summary


def read_summary(delta: str | Path) -> dict[str, Any]:
    """The ``summary.json`` beside a delta (file or its folder); empty when there is none."""
    folder = Path(delta)
    folder = folder if folder.is_dir() else folder.parent
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}
