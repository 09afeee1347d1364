"""How well does an SRM label clicks? Cell-level label accuracy at the environment's action cells.

The environment clicks the centres of a ``G x G`` grid over the original image (cell ``(r, c)``
has its centre at ``x = (c + 0.5) W / G``, ``y = (r + 0.5) H / G``) and asks the labeler for each
click's label. :func:`label_accuracy` compares the SRM's label at every such centre with the
ground-truth pixel there, next to the trivial baseline that always answers the majority label.

:func:`pretrain_and_evaluate` is the reproducible measurement behind ``alignsam srm-eval``:
train on one split (early stopping and calibration on a validation split), report on another.
This module takes samples (objects with ``id``, ``mask`` and ``load_image()``), so it does not
depend on any data loader.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from recalibration.feature_set import FeatureSet
from recalibration.items import collect_items
from recalibration.labelers import EpisodeState
from recalibration.srm import (
    SemanticRecalibrationModule,
    SRMConfig,
    SRMTrainItem,
    simulate_mask_states,
)
from segmenter.base import ImageEmbedding, Segmenter, mask_iou
from segmenter.cache import EmbeddingCache
from segmenter.geometry import action_centres, value_at
from segmenter.session import PromptSession

logger = logging.getLogger(__name__)

__all__ = [
    "MaskStateMode",
    "action_cell_centres",
    "cell_metrics",
    "evaluate_saved",
    "evaluate_srm",
    "label_accuracy",
    "map_as_mask",
    "pretrain_and_evaluate",
    "summarize",
    "time_srm",
]

#: Mask state under which labels are read: ``zeros`` (before any decode: the state in which the
#: evaluation episode's first clicks are chosen), ``self_start`` (after decoding the evaluation
#: start: the SRM's most confident cell as positive, least confident as negative, as the
#: environment's ``start="labeler"``), ``gt_start`` (after a random ground-truth positive and
#: negative pixel, as the environment's training start).
MaskStateMode = Literal["zeros", "self_start", "gt_start"]


def action_cell_centres(size: tuple[int, int], grid: int) -> np.ndarray:
    """``(G*G, 2)`` ``(x, y)`` centres of the action cells in original pixels (row-major;
    :func:`segmenter.geometry.action_centres`)."""
    return action_centres(size, grid)


def _start_state(
    srm: SemanticRecalibrationModule,
    emb: ImageEmbedding,
    gt: np.ndarray,
    semantic: np.ndarray | None,
    mode: str,
    segmenter: Segmenter | None,
    rng: np.random.Generator,
    clicks: int,
    grid: int,
) -> np.ndarray:
    """The ``(He, We)`` mask state under which the labels of one image are read."""
    he, we = emb.grid_size
    zeros = np.zeros((he, we), np.float32)
    if mode == "zeros":
        return zeros
    if segmenter is None:
        raise ValueError(f"mask_state={mode!r} needs a segmenter to decode the start clicks")
    state = EpisodeState(sample_id=emb.image_hash, embedding=emb, mask_prob=zeros)
    if mode == "self_start":
        # As the environment's start="labeler": argmax / argmin over the valid cells.
        fg = srm.predict(state, semantic)
        vh, vw = emb.valid_shape((he, we))
        fgv = fg[:vh, :vw]
        cells = (
            np.unravel_index(np.argmax(fgv), fgv.shape),
            np.unravel_index(np.argmin(fgv), fgv.shape),
        )
        points = np.array([emb.cell_centre(r, c) for r, c in cells], np.float32)
    elif mode == "gt_start":
        fg_px, bg_px = np.argwhere(gt), np.argwhere(~gt)
        fy, fx = fg_px[rng.integers(len(fg_px))]
        by, bx = bg_px[rng.integers(len(bg_px))]
        points = np.array([[fx + 0.5, fy + 0.5], [bx + 0.5, by + 0.5]], np.float32)
    else:
        raise ValueError(f"unknown mask_state {mode!r}; use zeros, self_start or gt_start")
    # Lone clicks never occur here; the session decodes with the previous mask as mask input.
    session = PromptSession(segmenter, emb, multimask_single_click=True)
    session.prompt(points, np.array([1, 0], np.int64))
    centres = action_centres(gt.shape, grid)
    for cell in rng.permutation(grid * grid)[:clicks]:
        x, y = centres[cell]
        state.mask_prob = session.mask_prob
        if mode == "self_start":
            p = srm.predict(state, semantic)[state.grid_cell(float(x), float(y))]
            lab = int(p >= srm.config.threshold)
        else:
            lab = int(value_at(gt, x, y))
        session.click(x, y, lab)
    return session.mask_prob


def label_accuracy(
    srm: SemanticRecalibrationModule,
    items: Sequence[SRMTrainItem],
    grid: int = 10,
    mask_state: MaskStateMode = "zeros",
    *,
    segmenter: Segmenter | None = None,
    clicks: int = 0,
    rng: np.random.Generator | int | None = 0,
    bins: int = 10,
) -> dict[str, float]:
    """Accuracy of the SRM's click labels at the ``grid x grid`` action-cell centres.

    For each image the SRM's label at every action-cell centre (read as the environment reads
    it: the probability of the embedding-grid cell holding that pixel, thresholded at
    ``config.threshold``) is compared with the ground-truth pixel at the centre.

    Args:
        srm: The module (its ``predict`` is used; no learning happens).
        items: ``(embedding, (H, W) bool ground truth, (He, We) semantic map or None)``.
        grid: G of the action grid.
        mask_state: See :data:`MaskStateMode`.
        segmenter: Needed for every ``mask_state`` except ``zeros``.
        clicks: After the start, this many random action cells are clicked (labelled by the SRM
            for ``self_start``, by the ground truth for ``gt_start``) and decoded before the
            labels are read.
        rng: Generator or seed for ``gt_start`` pixels and extra clicks.
        bins: Bins of the expected calibration error.

    Returns:
        ``accuracy``; ``majority_accuracy`` (always answering the majority label of all the
        evaluated cells, the trivial baseline); ``balanced_accuracy``; ``fg_precision``,
        ``fg_recall``; ``fg_fraction``; ``brier`` (mean squared error of the probability) and
        ``ece`` (expected calibration error over ``bins`` equal-width bins); ``image_accuracy``
        (mean over images); ``map_miou``: the SRM map itself as a mask (thresholded at
        ``config.threshold`` after upsampling to the image, :func:`map_as_mask`), its mean IoU
        with the ground truth; ``n_cells``, ``n_images``.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    probs, truths, per_image, map_ious = [], [], [], []
    for emb, gt_full, semantic in items:
        gt = np.asarray(gt_full, bool)
        h, w = gt.shape
        if semantic is not None and srm.branch == "explicit":
            srm.remember_semantic(emb, semantic)
        sem = semantic if srm.branch == "explicit" else None
        mask = _start_state(srm, emb, gt, sem, mask_state, segmenter, rng, clicks, grid)
        state = EpisodeState(sample_id=emb.image_hash, embedding=emb, mask_prob=mask)
        fg = srm.predict(state, sem)
        centres = action_centres((h, w), grid)
        p = np.empty(len(centres), np.float64)
        t = np.empty(len(centres), bool)
        for i, (x, y) in enumerate(centres):
            p[i] = fg[state.grid_cell(float(x), float(y))]
            t[i] = value_at(gt, x, y)
        probs.append(p)
        truths.append(t)
        per_image.append(float(((p >= srm.config.threshold) == t).mean()))
        map_ious.append(mask_iou(map_as_mask(fg, emb, srm.config.threshold), gt))
    if not probs:
        raise ValueError("label_accuracy needs at least one item")
    p = np.concatenate(probs)
    t = np.concatenate(truths)
    out = cell_metrics(p, t, srm.config.threshold, bins)
    out["image_accuracy"] = float(np.mean(per_image))
    out["map_miou"] = float(np.mean(map_ious))
    out["n_images"] = float(len(per_image))
    return out


def map_as_mask(prob: np.ndarray, emb: ImageEmbedding, threshold: float = 0.5) -> np.ndarray:
    """``(H, W)`` bool: an ``(He, We)`` map on the embedding grid as a mask of the image (SAM's
    upscaling rule: the grid covers the padded square, which is cropped to the resized image
    and resized to the original size)."""
    side = max(emb.input_size)
    t = torch.from_numpy(np.ascontiguousarray(prob, np.float32))[None, None]
    t = torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)
    t = t[..., : emb.input_size[0], : emb.input_size[1]]
    t = torch.nn.functional.interpolate(
        t, size=tuple(emb.original_size), mode="bilinear", align_corners=False
    )
    return t[0, 0].numpy() >= threshold


def cell_metrics(
    prob: np.ndarray, truth: np.ndarray, threshold: float = 0.5, bins: int = 10
) -> dict[str, float]:
    """Label metrics of ``(N,)`` foreground probabilities against ``(N,)`` bool truths.

    Returns:
        accuracy, majority_accuracy, balanced_accuracy, fg_precision, fg_recall, fg_fraction,
        brier, ece, n_cells (see :func:`label_accuracy`). Precision is 1.0 when nothing is
        labelled foreground, recall 1.0 when there is no foreground.
    """
    prob = np.asarray(prob, np.float64)
    truth = np.asarray(truth, bool)
    pred = prob >= threshold
    n = len(truth)
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    tn = float(np.sum(~pred & ~truth))
    fg_frac = float(truth.mean())
    recall = tp / (tp + fn) if tp + fn else 1.0
    specificity = tn / (tn + fp) if tn + fp else 1.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(prob[sel].mean() - truth[sel].mean())
    return {
        "accuracy": (tp + tn) / n,
        "majority_accuracy": max(fg_frac, 1.0 - fg_frac),
        "balanced_accuracy": 0.5 * (recall + specificity),
        "fg_precision": tp / (tp + fp) if tp + fp else 1.0,
        "fg_recall": recall,
        "fg_fraction": fg_frac,
        "brier": float(np.mean((prob - truth) ** 2)),
        "ece": float(ece),
        "n_cells": float(n),
    }


def time_srm(
    srm: SemanticRecalibrationModule, item: SRMTrainItem, repeats: int = 30
) -> dict[str, float]:
    """Median milliseconds of ``predict`` (new mask state, cached embedding projection), of
    ``predict`` on a new image (projection included) and of one online ``after_step``.

    The module's weights are restored afterwards.
    """
    emb, gt, semantic = item
    if semantic is not None and srm.branch == "explicit":
        srm.remember_semantic(emb, semantic)
    he, we = emb.grid_size
    gt_grid = emb.to_frame(np.asarray(gt, np.float32), (he, we))
    rng = np.random.default_rng(0)
    state = EpisodeState("timing", emb, rng.random((he, we)).astype(np.float32), gt_grid=gt_grid)
    saved = srm.state_dict()
    saved_opt = srm.optimizer.state_dict()
    fast = srm.fast_head  # online steps switch the fast head off: restored below
    pred_ms, cold_ms, upd_ms = [], [], []
    try:
        srm.predict(state)
        for _ in range(repeats):
            state.mask_prob = rng.random((he, we)).astype(np.float32)
            t0 = time.perf_counter()
            srm.predict(state)
            pred_ms.append(1e3 * (time.perf_counter() - t0))
            srm.clear_cache()  # measure a first call on an image
            state.mask_prob = rng.random((he, we)).astype(np.float32)
            t0 = time.perf_counter()
            srm.predict(state)
            cold_ms.append(1e3 * (time.perf_counter() - t0))
        q = srm.config.q_steps
        srm.config.q_steps = 1
        online = srm.config.online
        srm.config.online = True
        for _ in range(max(3, repeats // 3)):
            t0 = time.perf_counter()
            srm.after_step(state)
            upd_ms.append(1e3 * (time.perf_counter() - t0))
        srm.config.q_steps, srm.config.online = q, online
    finally:
        srm.load_state_dict(saved)
        srm.optimizer.load_state_dict(saved_opt)
        srm.use_fast_head(fast)
    return {
        "predict_ms": float(np.median(pred_ms)),
        "predict_new_image_ms": float(np.median(cold_ms)),
        "update_step_ms": float(np.median(upd_ms)),
        "threads": float(torch.get_num_threads()),
    }


def pretrain_and_evaluate(
    train_samples: Sequence[Any],
    val_samples: Sequence[Any],
    eval_samples: Sequence[Any] | None,
    segmenter: Segmenter,
    config: SRMConfig | None = None,
    *,
    cache: EmbeddingCache | None = None,
    epochs: int = 60,
    batch_size: int = 8,
    seed: int = 0,
    grid: int = 10,
    simulate_states: bool = True,
    eval_mask_states: Sequence[MaskStateMode] = ("zeros", "self_start"),
    save_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an SRM on one split, early-stop and calibrate on another, evaluate on a third.

    This is the measurement of the SRM's label accuracy reported for a task (e.g. Kvasir-SEG
    ``train`` -> ``val`` -> ``test``). Decoder mask states for training and validation are
    simulated with ``segmenter`` (:func:`~recalibration.srm.simulate_mask_states`) when
    ``simulate_states``.

    Args:
        train_samples: Training samples (``id``, ``mask``, ``load_image()``).
        val_samples: Validation samples (early stopping, calibration, reported).
        eval_samples: Samples evaluated once at the end (e.g. the test split); may be ``None``.
        segmenter: Frozen segmenter of the embeddings.
        config: SRM config (implicit branch; default :class:`SRMConfig`).
        cache: Embedding cache.
        epochs: Maximum pretraining epochs.
        batch_size: Images per optimizer step.
        seed: Seed of every random choice.
        grid: Action grid side of the evaluation.
        simulate_states: Train with simulated decoder mask states.
        eval_mask_states: Mask states under which accuracy is reported.
        save_path: Save the trained SRM there.
        progress: Progress bars.

    Returns:
        ``{"config", "val": {mode: metrics}, "eval": {mode: metrics} | None, "timing",
        "history", "seconds"}``.
    """
    config = config or SRMConfig()
    if config.branch != "implicit":
        raise ValueError(
            "pretrain_and_evaluate measures the implicit branch; the explicit branch needs "
            "CLIP maps per item (build the items yourself and call pretrain / label_accuracy)"
        )
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    fs = None
    if tuple(config.features) != ("sam",):
        fs = FeatureSet(config.features, segmenter, cache)
    kw = {"progress": progress, "features": fs}
    train = collect_items(train_samples, segmenter, cache, desc="train", **kw)
    val = collect_items(val_samples, segmenter, cache, desc="val", **kw)
    train_states = val_states = None
    if simulate_states:
        from segmenter.progress import progress_bar

        train_states = [
            simulate_mask_states(segmenter, emb, gt, rng)
            for emb, gt, _ in progress_bar(
                train, desc="train mask states", unit="img", disable=not progress
            )
        ]
        val_states = [
            simulate_mask_states(segmenter, emb, gt, rng, episodes=1)
            for emb, gt, _ in progress_bar(
                val, desc="val mask states", unit="img", disable=not progress
            )
        ]
    first = train[0][0]
    channels = int(first.extras.get("srm_features", first.features).shape[1])
    srm = SemanticRecalibrationModule(config, channels, features=fs)
    history = srm.pretrain(
        train,
        epochs=epochs,
        batch_size=batch_size,
        rng=rng,
        val_items=val,
        mask_states=train_states,
        val_mask_states=val_states,
        progress=progress,
    )
    result: dict[str, Any] = {
        "config": config.to_dict(),
        "calibration": [float(v) for v in srm.calibration],
        "history": history,
        "val": {
            m: label_accuracy(srm, val, grid, m, segmenter=segmenter, rng=seed)
            for m in eval_mask_states
        },
        "eval": None,
    }
    if eval_samples is not None:
        ev = collect_items(eval_samples, segmenter, cache, desc="eval", **kw)
        result["eval"] = {
            m: label_accuracy(srm, ev, grid, m, segmenter=segmenter, rng=seed)
            for m in eval_mask_states
        }
    result["timing"] = time_srm(srm, train[0])
    if save_path is not None:
        result["saved"] = str(srm.save(save_path))
    result["seconds"] = time.perf_counter() - t0
    result["srm"] = srm
    return result


def evaluate_saved(
    srm_path: str | Path,
    eval_samples: Sequence[Any],
    segmenter: Segmenter,
    *,
    cache: EmbeddingCache | None = None,
    seed: int = 0,
    grid: int = 10,
    eval_mask_states: Sequence[MaskStateMode] = ("zeros", "self_start"),
    progress: bool = True,
) -> dict[str, Any]:
    """Label accuracy of a saved SRM (e.g. ``RUN/checkpoints/best/srm.pt``, after its online
    updates during RL) on ``eval_samples``; no training. Same result layout as
    :func:`pretrain_and_evaluate`, with ``val`` empty."""
    channels = int(segmenter.embedding_shape[0])
    srm = SemanticRecalibrationModule.load(
        srm_path, embed_channels=channels, online=False, segmenter=segmenter, cache=cache
    )
    res = evaluate_srm(
        srm,
        eval_samples,
        segmenter,
        cache=cache,
        seed=seed,
        grid=grid,
        eval_mask_states=eval_mask_states,
        progress=progress,
    )
    return {**res, "loaded": str(srm_path)}


def evaluate_srm(
    srm: SemanticRecalibrationModule,
    eval_samples: Sequence[Any],
    segmenter: Segmenter,
    *,
    cache: EmbeddingCache | None = None,
    seed: int = 0,
    grid: int = 10,
    eval_mask_states: Sequence[MaskStateMode] = ("zeros", "self_start"),
    progress: bool = True,
) -> dict[str, Any]:
    """Label accuracy (and the map as a mask) of a ready SRM on ``eval_samples``."""
    t0 = time.perf_counter()
    if srm.branch != "implicit":
        raise ValueError(
            f"this is an {srm.branch} SRM; the evaluation measures the implicit branch"
        )
    ev = collect_items(
        eval_samples, segmenter, cache, progress=progress, desc="eval", features=srm.feature_set
    )
    return {
        "config": srm.config.to_dict(),
        "val": None,
        "eval": {
            m: label_accuracy(srm, ev, grid, m, segmenter=segmenter, rng=seed)
            for m in eval_mask_states
        },
        "timing": time_srm(srm, ev[0]),
        "seconds": time.perf_counter() - t0,
    }


def summarize(result: dict[str, Any]) -> str:
    """One readable block of the numbers of :func:`pretrain_and_evaluate`."""
    lines = []
    for split in ("val", "eval"):
        if not result.get(split):
            continue
        for mode, m in result[split].items():
            lines.append(
                f"{split:4s} {mode:10s} acc {m['accuracy']:.4f}  majority "
                f"{m['majority_accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  "
                f"map mIoU {m.get('map_miou', float('nan')):.4f}  "
                f"P {m['fg_precision']:.3f} R {m['fg_recall']:.3f}  brier {m['brier']:.4f}  "
                f"ece {m['ece']:.4f}  cells {int(m['n_cells'])}"
            )
    t = result.get("timing")
    if t:
        lines.append(
            f"timing: predict {t['predict_ms']:.2f} ms (new image {t['predict_new_image_ms']:.2f}"
            f" ms), online step {t['update_step_ms']:.2f} ms, {int(t['threads'])} threads"
        )
    return "\n".join(lines)
