"""``alignsam train TASK`` for a task with ``agent: lookahead``: the SRM, its cross-fitted maps,
the mask judge, a val score and the run folder.

Stages, each saved under ``RUN/stages/`` as it ends so that ``--resume RUN`` goes on from the
first unfinished one:

1. the SRM, pretrained on the training images (validation images for early stopping and
   calibration), under decoder mask states simulated once (``srm.pt``, ``mask_states.npz``);
2. the cross-fitted SRM maps of the training images (``maps.npz``,
   :func:`agents.lookahead_training.cross_fitted_maps`);
3. the judge, fitted in DAgger rounds on candidates decoded along training episodes
   (:func:`agents.lookahead_training.fit_judge`);
4. the val mIoU of the finished agent; ``checkpoints/best`` (srm.pt, judge.json,
   lookahead.json, meta.json) is written atomically and ``summary.json`` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from agents.config import TaskConfig
from agents.lookahead import LookaheadAgent
from agents.lookahead_training import cross_fitted_maps, fit_judge, saved_fold_seconds
from agents.prompt_agent import AgentLoadError, write_meta
from experiments.answering import (  # evaluate_lookahead and choose_clicks also imported from here
    best_clicks,
    by_click_text,
    check_shifts,
    choose_answer,
    choose_clicks,
    evaluate_lookahead,
    fit_run_value,
    shifted_vals,
)
from experiments.datasets import shifted_copies
from experiments.runs import (
    load_split,
    load_train_split,
    new_run_dir,
    peak_memory_mb,
    seed_everything,
    skipped_by_split,
)
from recalibration.feature_set import FeatureSet
from recalibration.items import collect_items
from recalibration.srm import SemanticRecalibrationModule, simulate_mask_states
from segmenter import EmbeddingCache, build_segmenter
from segmenter.io import atomic_folder, atomic_write
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "best_clicks",
    "choose_clicks",
    "evaluate_lookahead",
    "fit_run_value",
    "train_lookahead",
]


def _save_best(run_dir: Path, agent: LookaheadAgent, task: TaskConfig, extra: dict) -> Path:
    """``RUN/checkpoints/best``, written into a temporary folder and renamed into place."""
    root = run_dir / "checkpoints"

    def fill(folder: Path) -> None:
        agent.save(folder)
        write_meta(folder, task, 0, agent.segmenter.model_id, {"agent": "lookahead", **extra})

    final = atomic_folder(root / "best", fill)
    atomic_write(root / "latest", lambda fh: fh.write(b"best"))
    return final


def stacked_states(states: Sequence[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """An item's decoder mask states as one ``(n, He, We)`` array for ``mask_states.npz``;
    ``n`` is 0 for an image without background or without foreground, which gets none (e.g. a
    256-px crop inside a large polyp: its SRM batches use synthetic states only)."""
    return np.stack(states) if len(states) else np.zeros((0, *grid), np.float32)


class _StageClock:
    """Seconds of each finished stage, kept in ``stages/seconds.json`` beside the stage's
    file, so that a resumed run's training time counts the stages an earlier attempt did."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / "seconds.json"
        self.saved: dict[str, float] = (
            json.loads(self.file.read_text()) if self.file.is_file() else {}
        )
        self.reused: dict[str, float] = {}  # stage -> seconds an earlier attempt spent on it

    def done(self, stage: str, seconds: float, reused: bool) -> float:
        """``stage``'s seconds: this attempt's, plus the earlier attempt's where it was
        read back from its file (unknown for files written before the clock: 0)."""
        if reused:
            self.reused[stage] = self.saved.get(stage, 0.0)
            return seconds + self.reused[stage]
        self.saved[stage] = seconds
        text = json.dumps(self.saved, indent=2).encode()
        atomic_write(self.file, lambda fh: fh.write(text))
        return seconds


def train_lookahead(
    task: TaskConfig | None,
    runs: Path = Path("runs"),
    resume: Path | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) a lookahead agent; returns the run's summary (also ``summary.json``)."""
    t_start = time.perf_counter()
    if resume is not None:
        config_file = Path(resume) / "config.json"
        if not config_file.is_file():
            raise AgentLoadError(f"--resume {resume}: no config.json there; start a new run")
        saved = TaskConfig.from_dict(json.loads(config_file.read_text()), where=str(config_file))
        if task is not None and task.name != saved.name:
            raise AgentLoadError(
                f"--resume {resume} is a run of task {saved.name!r}, not {task.name!r}"
            )
        task, run_dir = saved, Path(resume)
    assert task is not None
    # choices go into the run's own copy: a caller's task (the curve's next size) keeps its own
    task = dataclasses.replace(task, lookahead=dataclasses.replace(task.lookahead))
    cfg = task.lookahead
    check_shifts(cfg.choose_shifts)  # before an hour of training, not after it
    check_shifts(task.data.shifted_copies, "data.shifted_copies")
    seed_everything(task.seed)
    segmenter = build_segmenter(
        task.segmenter, checkpoint=task.checkpoint, device=task.device, autocast_bf16=task.bf16
    )
    cache = EmbeddingCache(cache_dir)
    train_set = load_train_split(task)
    val_set = load_split(task, "val") if task.data.val else None
    if run_dir is None:
        run_dir = new_run_dir(runs, task)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(task.to_dict(), indent=2, default=str))
    stages = run_dir / "stages"
    stages.mkdir(exist_ok=True)
    writer = SummaryWriter(str(run_dir / "tb"))
    timings: dict[str, float] = {}
    clock = _StageClock(stages)

    features = None
    if tuple(task.srm.features) != ("sam",):
        features = FeatureSet(task.srm.features, segmenter, cache)
    t0 = time.perf_counter()
    # The SRM's features stay in the cache, not in memory (read back per use): memory grows
    # by the embedding and the projected features per image, not the 1,656 raw channels.
    kw = {"progress": progress, "features": features, "keep_features": False}
    items = collect_items(train_set, segmenter, cache, desc="train", **kw)
    val_items = collect_items(val_set, segmenter, cache, desc="val", **kw) if val_set else None
    # shifted copies of the training images: the SRMs' training set only (data.shifted_copies)
    copies = shifted_copies(train_set, task.data.shifted_copies)
    copy_of = [i for i, _ in copies]
    copy_items = (
        collect_items([c for _, c in copies], segmenter, cache, desc="shifted copies", **kw)
        if copies
        else []
    )
    all_items = items + copy_items
    first = items[0][0]
    channels = (
        int(first.features.shape[1])
        if features is None
        else features.channels(first, train_set[0].load_image)
    )
    timings["features"] = time.perf_counter() - t0

    # 1. The SRM (and the decoder mask states every SRM of this run trains under).
    t0 = time.perf_counter()
    states_file = stages / "mask_states.npz"
    reused = states_file.is_file()
    if reused:
        with np.load(states_file) as z:
            mask_states = [list(z[f"item{i}"]) for i in range(len(all_items))]
    else:
        rng = np.random.default_rng(task.seed)
        mask_states = [
            simulate_mask_states(segmenter, emb, gt, rng)
            for emb, gt, _ in progress_bar(
                all_items, desc="SRM mask states", unit="img", disable=not progress
            )
        ]
        atomic_write(
            states_file,
            lambda fh: np.savez(
                fh,
                **{
                    f"item{i}": stacked_states(m, item[0].grid_size)
                    for i, (m, item) in enumerate(zip(mask_states, all_items, strict=True))
                },
            ),
        )
    states_seconds = clock.done("mask_states", time.perf_counter() - t0, reused)
    t0 = time.perf_counter()
    srm_file = stages / "srm.pt"
    reused = srm_file.is_file()
    if reused:
        srm = SemanticRecalibrationModule.load(
            srm_file, device=task.device, segmenter=segmenter, cache=cache
        )
    else:
        srm = SemanticRecalibrationModule(task.srm, channels, device=task.device, features=features)
        srm.pretrain(
            all_items,
            epochs=task.srm_epochs(len(all_items)),
            rng=task.seed,
            val_items=val_items,
            mask_states=mask_states,
            progress=progress,
        )
        srm.save(srm_file)
    srm.config.online = False
    timings["srm"] = states_seconds + clock.done("srm", time.perf_counter() - t0, reused)

    # 2. Cross-fitted maps of the training images.
    t0 = time.perf_counter()
    maps_file = stages / "maps.npz"
    fold_dir = stages / "cross_fit"  # each finished fold, until maps.npz holds them all
    reused = maps_file.is_file()
    earlier = 0.0
    if reused:
        with np.load(maps_file) as z:
            maps = list(z["maps"])
    else:
        earlier = saved_fold_seconds(fold_dir)  # folds an interrupted attempt finished
        maps = cross_fitted_maps(
            task.srm,
            channels,
            items,
            val_items,
            mask_states[: len(items)],
            folds=cfg.folds,
            epochs=task.srm_epochs(len(all_items) * (cfg.folds - 1) // cfg.folds),
            seed=task.seed,
            features=features,
            device=task.device,
            progress=progress,
            copies=[
                (i, item, states)
                for i, item, states in zip(
                    copy_of, copy_items, mask_states[len(items) :], strict=True
                )
            ],
            fold_dir=fold_dir,
        )
        atomic_write(maps_file, lambda fh: np.savez(fh, maps=np.stack(maps)))
        shutil.rmtree(fold_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0 + earlier
    timings["cross_fit"] = clock.done("cross_fit", seconds, reused)

    # 3. The judge.
    t0 = time.perf_counter()
    agent = LookaheadAgent(segmenter, srm, None, cfg, task, cache)
    calls = segmenter.decoder_calls
    train_items = [
        (emb, gt, s.load_image) for (emb, gt, _), s in zip(items, train_set, strict=True)
    ]
    _, history = fit_judge(
        agent,
        train_items,
        maps,
        cfg,
        seed=task.seed,
        progress=progress,
        log=lambda tag, value, step: writer.add_scalar(tag, value, step),
    )
    timings["judge"] = time.perf_counter() - t0
    judge_calls = segmenter.decoder_calls - calls

    # 4. Val, the checkpoint, the summary.
    t0 = time.perf_counter()
    if cfg.choose_clicks:  # val runs every step; the count and the answer are chosen from them
        agent.config.clicks = None
    val = evaluate_lookahead(agent, val_set, progress) if val_set else None
    timings["val"] = time.perf_counter() - t0
    chosen: dict[str, Any] = {}
    if val is not None:
        writer.add_scalar("eval/miou", val["miou"], 0)
        logger.info("lookahead agent: val mIoU %.4f (%.1f steps)", val["miou"], val["mean_steps"])
        logger.info("val mIoU after k clicks: %s", by_click_text(val["by_click"]))
        if cfg.choose_clicks:
            t0 = time.perf_counter()
            shifted = shifted_vals(agent, task.data.val, task.data.on_error, progress)
            timings["val_shifts"] = time.perf_counter() - t0
            chosen = choose_answer(agent, val, shifted)
    elapsed = time.perf_counter() - t_start
    extra = {"val_miou": None if val is None else val["miou"], "elapsed_seconds": elapsed}
    best = _save_best(run_dir, agent, task, extra)
    writer.close()
    summary = {
        "run_dir": str(run_dir),
        "agent": "lookahead",
        "checkpoint": str(best),
        "steps": 0,
        "start_step": 0,
        "best_val_miou": None if val is None else val["miou"],
        "val_mean_steps": None if val is None else val["mean_steps"],
        "val_by_click": None if val is None else val["by_click"],
        **chosen,
        "judge_rounds": history,
        "judge_decoder_calls": judge_calls,
        "seconds": timings,
        "wall_seconds": elapsed,
        "learn_seconds": timings["judge"],
        # with the stages an earlier, interrupted attempt finished (``stages_reused``)
        "train_seconds_total": elapsed + sum(clock.reused.values()),
        "stages_reused": clock.reused,
        "decoder_calls": segmenter.decoder_calls,
        "history": [],
        "imitation": {},
        "skipped": skipped_by_split(train_set, val_set),
        "peak_memory_mb": peak_memory_mb(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
