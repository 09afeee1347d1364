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
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from agents.answers import WORSE, answer_table, best_answer, pad_paths
from agents.config import ConfigError, TaskConfig
from agents.lookahead import LookaheadAgent
from agents.lookahead_training import cross_fitted_maps, fit_judge
from agents.prompt_agent import AgentLoadError, write_meta
from experiments.runs import (
    load_split,
    load_train_split,
    new_run_dir,
    peak_memory_mb,
    seed_everything,
    skipped_by_split,
)
from recalibration.features import FeatureSet
from recalibration.items import collect_items
from recalibration.srm import SemanticRecalibrationModule, simulate_mask_states
from segmenter import EmbeddingCache, build_segmenter, mask_iou
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


def evaluate_lookahead(
    agent: LookaheadAgent, samples: Any, progress: bool = True, chooser: str = "judge"
) -> dict[str, Any]:
    """Full-resolution mIoU of the agent's final masks on ``samples`` (with ground truth);
    ``by_click``: the mIoU of the answer had the episode ended after ``k`` clicks, ``k = 0``
    (the start) to the episode's length (an episode that stopped early keeps its mask), under
    the agent's ``keep``; ``worse``: the share of images whose answer is worse than their start;
    ``table``: every answer rule on the same episodes (:func:`agents.answers.answer_table`),
    and ``by_click_keep`` its rules without a margin; ``paths`` and ``path_scores``: per image
    the true IoU of each path state and each scored rule's scores of them."""
    ious, steps, worse = [], [], []
    paths: list[list[float]] = []
    scores: dict[str, list[list[float]]] = {"best_predicted": []}
    if agent.value is not None:
        scores["valued"] = []
    by_click = []
    for s in progress_bar(
        samples, desc=f"lookahead eval ({chooser})", unit="img", disable=not progress
    ):
        image = s.load_image()
        emb = (
            agent.cache.get_or_encode(agent.segmenter, image)
            if agent.cache is not None
            else agent.segmenter.encode(image)
        )
        gt = np.asarray(s.mask, bool)
        ep = agent.episode(emb, lambda image=image: image, gt, chooser=chooser)
        path = [mask_iou(agent.segmenter.upscale(emb, o.logits), gt) for o in ep.path]
        ious.append(path[ep.kept])  # the final mask is the kept state of the path
        worse.append(path[ep.kept] < path[0] - WORSE)
        by_click.append([path[i] for i in ep.answer_at])
        paths.append(path)
        scores["best_predicted"].append([o.prediction.score for o in ep.path])
        if "valued" in scores:
            scores["valued"].append(ep.values)
        steps.append(len(ep.path) - 1)
    table = answer_table(paths, scores)
    return {
        "miou": float(np.mean(ious)),
        "per_image": ious,
        "mean_steps": float(np.mean(steps)),
        "worse": float(np.mean(worse)),
        "by_click": _mean_by_click(by_click),
        "by_click_keep": {r["keep"]: r["by_click"] for r in table if r["margin"] == 0.0},
        "table": table,
        "paths": paths,
        "path_scores": scores,
    }


def _mean_by_click(paths: list[list[float]]) -> list[float]:
    """Mean over images of the IoU after k clicks (a shorter path keeps its last mask)."""
    return pad_paths(paths).mean(0).tolist() if paths else []


def best_clicks(by_click: list[float]) -> int:
    """The number of clicks whose answers score best (the fewest on ties)."""
    return int(np.argmax(np.round(np.asarray(by_click, np.float64), 6)))


def _shifted_vals(
    agent: LookaheadAgent, val_spec: str, on_error: Any, progress: bool
) -> dict[str, dict[str, Any]]:
    """The agent's episodes on each ``lookahead.choose_shifts`` copy of the val images
    (``VAL@SHIFT``, :data:`experiments.datasets.SHIFTS`), by that spec."""
    from experiments.datasets import load_readable

    check_shifts(agent.config.choose_shifts)
    specs = [f"{val_spec}@{shift}" for shift in agent.config.choose_shifts]
    return {s: evaluate_lookahead(agent, load_readable(s, on_error), progress) for s in specs}


def check_shifts(shifts: Any) -> None:
    """Raise :class:`~agents.config.ConfigError` unless every name is a shift of the images
    that keeps the target (:data:`experiments.datasets.SHIFTS`, ``negative`` excluded)."""
    from experiments.datasets import SHIFTS

    bad = [s for s in shifts if s not in SHIFTS or s == "negative"]
    if bad:
        usable = ", ".join(s for s in SHIFTS if s != "negative")
        raise ConfigError(f"lookahead.choose_shifts: unknown shift(s) {bad}; use {usable}")


def _choose(
    agent: LookaheadAgent, val: dict[str, Any], shifted: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Set ``agent``'s ``keep``, ``margin`` and ``clicks`` to the best answer on ``val``
    (:func:`agents.answers.best_answer` under ``lookahead.max_worse``), and on ``shifted`` copies
    of it with it when given; the summary's record."""
    cfg = agent.config
    tables = {"val": val["table"], **{k: v["table"] for k, v in (shifted or {}).items()}}
    keep, margin, k = best_answer(tables, cfg.keep, cfg.max_worse)
    cfg.keep, cfg.margin, cfg.clicks = keep, margin, k
    rows = {
        name: next(r for r in t if r["keep"] == keep and r["margin"] == margin)
        for name, t in tables.items()
    }
    row = rows["val"]
    logger.info(
        "%d clicks, keep %s (margin %.3f), chosen on val: mIoU %.4f, %.0f %% worse than the "
        "start (by click: %s)", k, keep, margin, row["by_click"][k],
        100 * row["worse_by_click"][k], _by_click_text(row["by_click"]),
    )  # fmt: skip
    for name, r in list(rows.items())[1:]:
        logger.info("  on %s: mIoU %.4f (start %.4f), %.0f %% worse than the start", name,
                    r["by_click"][k], r["by_click"][0], 100 * r["worse_by_click"][k])  # fmt: skip
    return {
        "clicks": k,
        "keep": keep,
        "margin": margin,
        "max_worse": cfg.max_worse,
        "choose_shifts": list(cfg.choose_shifts),
        "val_by_click": row["by_click"],
        "val_worse_by_click": row["worse_by_click"],
        "val_by_click_keep": val["by_click_keep"],
        "val_answers": val["table"],
        "val_miou_all_steps": val["miou"],
        "best_val_miou": row["by_click"][k],
        "val_worse": row["worse_by_click"][k],
        "shifted_val": {
            name: {
                "miou": r["by_click"][k],
                "start": r["by_click"][0],
                "worse": r["worse_by_click"][k],
                "answers": tables[name],
            }
            for name, r in list(rows.items())[1:]
        },
    }


def choose_clicks(
    run: str | Path,
    cache_dir: str | None = None,
    progress: bool = True,
    max_worse: float | None = None,
    value: bool = False,
    shifts: list[str] | None = None,
) -> dict[str, Any]:
    """Set a finished lookahead run's ``clicks``, ``keep`` and ``margin`` to those that score
    best on its task's ``val`` images (:func:`_choose`; the episodes run the full ``steps``),
    in its ``checkpoints/best/lookahead.json``; the choice is recorded in ``summary.json``.
    Training does the same when ``lookahead.choose_clicks``; this is for runs trained before.

    Args:
        run: The run folder.
        cache_dir: Embedding cache.
        progress: Progress bars.
        max_worse: The bound on the share of val images left worse than their start (default:
            the run's ``lookahead.max_worse``).
        value: Fit the value model of ``keep: valued`` first when the run has none
            (:func:`fit_run_value`).
        shifts: Choose on these shifted copies of val too (default: the run's
            ``lookahead.choose_shifts``; ``[]``: val alone).

    Returns the updated summary."""
    from agents.prompt_agent import PromptAgent, checkpoint_of

    run = Path(run)
    check_shifts(shifts or ())
    summary_file = run / "summary.json"
    if not summary_file.is_file():
        raise AgentLoadError(f"{run}: no summary.json; finish training the run first")
    summary = json.loads(summary_file.read_text())
    ckpt = checkpoint_of(run)
    t0 = time.perf_counter()
    if value and not (ckpt / "value.json").is_file():
        summary.setdefault("seconds", {})["value"] = fit_run_value(run, cache_dir, progress)
    agent = PromptAgent.load(ckpt, cache=EmbeddingCache(cache_dir))
    if not isinstance(agent, LookaheadAgent) or not agent.task.data.val:
        raise AgentLoadError(f"{run}: clicks are chosen for lookahead runs with a val split")
    agent.config.clicks = None
    if max_worse is not None:
        agent.config.max_worse = max_worse
    if shifts is not None:
        agent.config.choose_shifts = tuple(shifts)
    val = evaluate_lookahead(agent, load_split(agent.task, "val"), progress)
    shifted = _shifted_vals(agent, agent.task.data.val, agent.task.data.on_error, progress)
    summary.update(_choose(agent, val, shifted))
    settings = json.loads((ckpt / "lookahead.json").read_text())
    cfg = agent.config
    settings.update(clicks=cfg.clicks, keep=cfg.keep, margin=cfg.margin, max_worse=cfg.max_worse)
    settings["choose_shifts"] = list(cfg.choose_shifts)
    text = json.dumps(settings, indent=2).encode()
    atomic_write(ckpt / "lookahead.json", lambda fh: fh.write(text))
    summary.setdefault("seconds", {})["choose_clicks"] = time.perf_counter() - t0
    text = json.dumps(summary, indent=2).encode()
    atomic_write(summary_file, lambda fh: fh.write(text))
    return summary


def fit_run_value(run: str | Path, cache_dir: str | None = None, progress: bool = True) -> float:
    """Fit the value model of ``keep: valued`` for a lookahead run trained before training
    fitted it: one round of judge-driven episodes (the run's judge, its exploration, the stop
    rule) on a seeded sample of ``judge_images`` training images with their cross-fitted maps
    (``stages/maps.npz``), every candidate recorded, :func:`agents.answers.fit_value` on them;
    written as ``value.json`` beside the judge. Returns the seconds it took."""
    from agents.answers import fit_value
    from agents.lookahead_training import judge_episodes
    from agents.prompt_agent import PromptAgent, checkpoint_of

    run, t0 = Path(run), time.perf_counter()
    ckpt = checkpoint_of(run)
    agent = PromptAgent.load(ckpt, cache=EmbeddingCache(cache_dir))
    maps_file = run / "stages" / "maps.npz"
    if not isinstance(agent, LookaheadAgent) or not maps_file.is_file():
        raise AgentLoadError(f"{run}: a lookahead run with its stages/maps.npz is needed")
    with np.load(maps_file) as z:
        maps = list(z["maps"])
    train = load_train_split(agent.task)
    if len(train) != len(maps):
        raise AgentLoadError(
            f"{maps_file} holds {len(maps)} maps for {len(train)} training images: the data "
            "changed since training; train the run again"
        )

    def item(i: int) -> tuple[Any, np.ndarray, Any]:
        image = train[i].load_image()
        emb = agent.cache.get_or_encode(agent.segmenter, image)
        return emb, np.asarray(train[i].mask, bool), lambda: image

    rng = np.random.default_rng(agent.task.seed)
    data, _ = judge_episodes(
        agent, len(train), item, maps, agent.config, rng, agent.judge,
        progress=progress, desc="value states",
    )  # fmt: skip
    fit_value(data.features, data.ious, seed=agent.task.seed).save(ckpt / "value.json")
    logger.info("%s: value model fitted on %d states", run, len(data))
    return time.perf_counter() - t0


def _by_click_text(by_click: list[float]) -> str:
    return ", ".join(f"{k}: {v:.3f}" for k, v in enumerate(by_click))


def _save_best(run_dir: Path, agent: LookaheadAgent, task: TaskConfig, extra: dict) -> Path:
    """``RUN/checkpoints/best``, written into a temporary folder and renamed into place."""
    root = run_dir / "checkpoints"

    def fill(folder: Path) -> None:
        agent.save(folder)
        write_meta(folder, task, 0, agent.segmenter.model_id, {"agent": "lookahead", **extra})

    final = atomic_folder(root / "best", fill)
    atomic_write(root / "latest", lambda fh: fh.write(b"best"))
    return final


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
            mask_states = [list(z[f"item{i}"]) for i in range(len(items))]
    else:
        rng = np.random.default_rng(task.seed)
        mask_states = [
            simulate_mask_states(segmenter, emb, gt, rng)
            for emb, gt, _ in progress_bar(
                items, desc="SRM mask states", unit="img", disable=not progress
            )
        ]
        atomic_write(
            states_file,
            lambda fh: np.savez(fh, **{f"item{i}": np.stack(m) for i, m in enumerate(mask_states)}),
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
            items,
            epochs=task.srm_epochs(len(items)),
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
    reused = maps_file.is_file()
    if reused:
        with np.load(maps_file) as z:
            maps = list(z["maps"])
    else:
        maps = cross_fitted_maps(
            task.srm,
            channels,
            items,
            val_items,
            mask_states,
            folds=cfg.folds,
            epochs=task.srm_epochs(len(items) * (cfg.folds - 1) // cfg.folds),
            seed=task.seed,
            features=features,
            device=task.device,
            progress=progress,
        )
        atomic_write(maps_file, lambda fh: np.savez(fh, maps=np.stack(maps)))
    timings["cross_fit"] = clock.done("cross_fit", time.perf_counter() - t0, reused)

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
        logger.info("val mIoU after k clicks: %s", _by_click_text(val["by_click"]))
        if cfg.choose_clicks:
            t0 = time.perf_counter()
            shifted = _shifted_vals(agent, task.data.val, task.data.on_error, progress)
            timings["val_shifts"] = time.perf_counter() - t0
            chosen = _choose(agent, val, shifted)
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
