"""How a trained lookahead agent answers, measured and chosen on ``val``.

:func:`evaluate_lookahead` runs the agent on images with ground truth and scores every answer
rule of :mod:`agents.answers` on the same episodes; :func:`choose_clicks` (``alignsam answer``,
and training when ``lookahead.choose_clicks``) writes the best rule, margin and number of clicks
on ``val`` (and shifted copies of it) into the run; :func:`fit_run_value` fits the value model
of ``keep: valued`` for a run trained before training fitted one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.answers import WORSE, answer_table, best_answer, pad_paths
from agents.config import ConfigError
from agents.lookahead import LookaheadAgent
from agents.prompt_agent import AgentLoadError
from experiments.runs import load_split, load_train_split
from segmenter import EmbeddingCache, mask_iou
from segmenter.io import atomic_write
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "best_clicks",
    "by_click_text",
    "check_shifts",
    "choose_answer",
    "choose_clicks",
    "evaluate_lookahead",
    "fit_run_value",
    "shifted_vals",
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
    table = answer_table(paths, scores, veto=agent.config.veto)
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


def shifted_vals(
    agent: LookaheadAgent, val_spec: str, on_error: Any, progress: bool
) -> dict[str, dict[str, Any]]:
    """The agent's episodes on each ``lookahead.choose_shifts`` copy of the val images
    (``VAL@SHIFT``, :data:`experiments.datasets.SHIFTS`), by that spec."""
    from experiments.datasets import load_readable

    check_shifts(agent.config.choose_shifts)
    specs = [f"{val_spec}@{shift}" for shift in agent.config.choose_shifts]
    return {s: evaluate_lookahead(agent, load_readable(s, on_error), progress) for s in specs}


def check_shifts(shifts: Any, key: str = "lookahead.choose_shifts") -> None:
    """Raise :class:`~agents.config.ConfigError` unless every name is a shift of the images
    that keeps the target (:data:`experiments.datasets.SHIFTS`, ``negative`` excluded); ``key``
    is the setting named in the message."""
    from experiments.datasets import SHIFTS

    bad = [s for s in shifts if s not in SHIFTS or s == "negative"]
    if bad:
        usable = ", ".join(s for s in SHIFTS if s != "negative")
        raise ConfigError(f"{key}: unknown shift(s) {bad}; use {usable}")


def choose_answer(
    agent: LookaheadAgent, val: dict[str, Any], shifted: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Set ``agent``'s ``keep``, ``margin`` and ``clicks`` to the best answer on ``val``
    (:func:`agents.answers.best_answer` under ``lookahead.max_worse``; the tables were scored
    under the agent's ``lookahead.veto``), and on ``shifted`` copies of it with it when given;
    the summary's record."""
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
        100 * row["worse_by_click"][k], by_click_text(row["by_click"]),
    )  # fmt: skip
    for name, r in list(rows.items())[1:]:
        logger.info("  on %s: mIoU %.4f (start %.4f), %.0f %% worse than the start", name,
                    r["by_click"][k], r["by_click"][0], 100 * r["worse_by_click"][k])  # fmt: skip
    return {
        "clicks": k,
        "keep": keep,
        "margin": margin,
        "veto": cfg.veto,
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
    veto: float | str | None = "run",
) -> dict[str, Any]:
    """Set a finished lookahead run's ``clicks``, ``keep`` and ``margin`` to those that score
    best on its task's ``val`` images (:func:`choose_answer`; the episodes run the full ``steps``),
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
        veto: The ``valued`` rules' veto (``"run"``: the run's ``lookahead.veto``; ``None``:
            none), written into the run with the choice.

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
    if veto != "run":
        agent.config.veto = None if veto is None else float(veto)
    val = evaluate_lookahead(agent, load_split(agent.task, "val"), progress)
    shifted = shifted_vals(agent, agent.task.data.val, agent.task.data.on_error, progress)
    summary.update(choose_answer(agent, val, shifted))
    settings = json.loads((ckpt / "lookahead.json").read_text())
    cfg = agent.config
    settings.update(clicks=cfg.clicks, keep=cfg.keep, margin=cfg.margin, veto=cfg.veto)
    settings["max_worse"] = cfg.max_worse
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


def by_click_text(by_click: list[float]) -> str:
    return ", ".join(f"{k}: {v:.3f}" for k, v in enumerate(by_click))
