"""Mask states the SRM meets: synthetic ones made from the ground truth, and real ones made by
clicking through a prompting session with the frozen decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segmenter.base import ImageEmbedding, Segmenter
from segmenter.geometry import action_centres, value_at
from segmenter.session import PromptSession

__all__ = ["simulate_mask_states", "synthetic_mask_state"]


def _binary_morph(mask: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    """Square dilation/erosion of a ``(H, W)`` float map (by max-pooling)."""
    t = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    k = 2 * radius + 1
    if dilate:
        out = F.max_pool2d(t, k, stride=1, padding=radius)
    else:
        out = -F.max_pool2d(-t, k, stride=1, padding=radius)
    return out[0, 0].numpy()


def synthetic_mask_state(
    gt_grid: np.ndarray, valid: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A plausible "current mask" probability map made from the ground truth, cheaply.

    One of: zeros (before the first decode), the ground truth eroded or dilated by 1-3 cells,
    the ground truth with a random blob added or removed, or a blurred copy. Used alongside
    decoder masks so the head does not learn to trust the mask blindly.

    Args:
        gt_grid: ``(He, We)`` ground-truth coverage.
        valid: ``(He, We)`` valid-cell mask.
        rng: Random generator.

    Returns:
        ``(He, We)`` float32 map in ``[0, 1]``, zero on padding.
    """
    kind = rng.integers(5)
    he, we = gt_grid.shape
    m = (gt_grid > 0.5).astype(np.float32)
    if kind == 0:
        out = np.zeros_like(m)
    elif kind == 1:
        out = _binary_morph(m, int(rng.integers(1, 4)), dilate=bool(rng.integers(2)))
    elif kind == 2:
        yy, xx = np.mgrid[:he, :we]
        cy, cx = rng.uniform(0, he), rng.uniform(0, we)
        r = rng.uniform(2, max(3.0, he / 6))
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
        out = np.where(blob, float(rng.integers(2)), m).astype(np.float32)
    elif kind == 3:
        t = torch.from_numpy(m)[None, None]
        k = int(rng.integers(1, 4)) * 2 + 1
        out = F.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)[0, 0].numpy()
    else:
        out = m.copy()
    # Soften like a sigmoid of decoder logits: values near but not exactly 0 / 1.
    out = np.clip(out * rng.uniform(0.85, 1.0) + rng.uniform(0.0, 0.05), 0.0, 1.0)
    return (out * valid).astype(np.float32)


def simulate_mask_states(
    segmenter: Segmenter,
    emb: ImageEmbedding,
    gt_full: np.ndarray,
    rng: np.random.Generator,
    *,
    episodes: int = 2,
    steps: int = 15,
    grid: int = 10,
    record_at: Sequence[int] = (0, 1, 3, 7, 15),
    label_noise: Sequence[float] = (0.0, 0.15),
    wrong_start: Sequence[bool] = (False,),
    labeler: Callable[[np.ndarray, float, float], int] | None = None,
) -> list[np.ndarray]:
    """Mask states the SRM meets in the environment, made with the real decoder.

    Each episode starts like a training episode of the environment (one random foreground and one
    random background ground-truth pixel), then clicks random unvisited cells of the ``grid x
    grid`` action grid, labelled by the ground truth with each label flipped with probability
    ``label_noise[episode % len(label_noise)]`` (or by ``labeler(mask_prob, x, y)`` when given),
    decoding with the previous logits as mask input as the environment does. Episodes with
    ``wrong_start[episode % len(wrong_start)]`` put the positive start click on a random
    background pixel instead: the state of an evaluation episode whose SRM start was wrong, which
    teaches the head not to copy the mask where the embedding disagrees.

    Args:
        segmenter: The frozen segmenter whose embedding ``emb`` is.
        emb: The image embedding.
        gt_full: ``(H, W)`` bool ground truth.
        rng: Random generator.
        episodes: Episodes per image.
        steps: Clicks per episode after the start.
        grid: Action grid side.
        record_at: Steps (0 = after the start clicks) whose mask states are returned.
        label_noise: Per-episode probability of flipping a click label.
        wrong_start: Per-episode flag: positive start click on the background.
        labeler: Optional label source ``(mask_prob, x, y) -> 0/1`` instead of noisy ground truth.

    Returns:
        List of ``(He, We)`` float32 mask probabilities on the embedding grid.
    """
    gt = np.asarray(gt_full, bool)
    fg, bg = np.argwhere(gt), np.argwhere(~gt)
    if not len(fg) or not len(bg):
        return []
    out: list[np.ndarray] = []
    record = set(record_at)
    centres = action_centres(gt.shape, grid)
    for ep in range(episodes):
        noise = float(label_noise[ep % len(label_noise)]) if len(label_noise) else 0.0
        wrong = bool(wrong_start[ep % len(wrong_start)]) if len(wrong_start) else False
        fy, fx = (bg if wrong else fg)[rng.integers(len(bg) if wrong else len(fg))]
        by, bx = bg[rng.integers(len(bg))]
        points = np.array([[fx + 0.5, fy + 0.5], [bx + 0.5, by + 0.5]], np.float32)
        session = PromptSession(segmenter, emb)
        session.prompt(points, np.array([1, 0], np.int64))
        if 0 in record:
            out.append(session.mask_prob.astype(np.float32))
        cells = rng.permutation(grid * grid)[:steps]
        for t, cell in enumerate(cells, start=1):
            x, y = (float(v) for v in centres[int(cell)])
            if labeler is not None:
                lab = int(labeler(session.mask_prob, x, y))
            else:
                lab = int(value_at(gt, x, y))
                if rng.random() < noise:
                    lab = 1 - lab
            session.click(x, y, lab)
            if t in record:
                out.append(session.mask_prob.astype(np.float32))
    return out
