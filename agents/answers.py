"""Which state of a lookahead episode is its answer, and the choice of that rule on ``val``.

An episode commits clicks one after another from its start (the two SRM start points); its
answer need not be the state after the last click. The rules (:data:`KEEPS`):

- ``last``: the mask after the last click.
- ``best_predicted``: the state whose mask the frozen decoder predicts the highest IoU for.
- ``valued``: the state a value model scores highest (a regression judge fitted on the training
  episodes' states and their true IoUs, :func:`fit_value`).

A scored rule keeps a click's state only when its score beats the start's by more than
``margin`` (otherwise the answer is the start): a click is kept only when its judged gain is
clearly positive, so an image where the agent is unsure keeps its start. With a ``veto``, a
``valued`` state is also kept only when the frozen decoder's own predicted IoU for it is not
below the start's by more than the veto: a second judge, trained on a billion masks rather than
the task's images, whose errors do not follow the SRM's when the images come from elsewhere (on
Kvasir 256-px crops the value model favoured clicks that cost 0.08 mIoU; docs/results.md).

Training chooses the rule, the margin and the number of clicks on ``val`` (:func:`best_answer`):
the best mean IoU among the choices that leave at most ``max_worse`` of the images worse than
their start. With shifted copies of ``val`` (``lookahead.choose_shifts``) the choice is made on
all of them at once: the best mean over the sets, at most ``max_worse`` worse on average over
the sets, and no set's mean below its start's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "KEEPS",
    "MARGINS",
    "WORSE",
    "answer_table",
    "answers",
    "best_answer",
    "fit_value",
    "pad_paths",
]

#: Which state of an episode is its answer (:attr:`agents.lookahead.LookaheadConfig.keep`).
KEEPS: tuple[str, ...] = ("last", "best_predicted", "valued")
#: The margins a scored rule is tried with when the answer rule is chosen on ``val``.
MARGINS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3)
#: An answer whose true IoU is below its start's by more than this is "worse than the start".
WORSE = 1e-6


def answers(
    scores: Sequence[float] | None,
    keep: str,
    margin: float = 0.0,
    length: int | None = None,
    decoder: Sequence[float] | None = None,
    veto: float | None = None,
) -> list[int]:
    """For each ``k``, the index of the episode's answer had it ended after ``k`` clicks.

    Args:
        scores: Each path state's score (the decoder's predicted IoU for ``best_predicted``, the
            value model's for ``valued``), the start first; not read for ``last``.
        keep: One of :data:`KEEPS`.
        margin: A state other than the start is the answer only when its score exceeds the
            start's by more than this (the highest such score among the first ``k + 1``
            states; the earliest on ties).
        length: The path's length for ``last`` when ``scores`` is ``None``.
        decoder: Each path state's predicted IoU by the decoder (read for ``valued`` with a
            ``veto``).
        veto: For ``valued``, a state other than the start qualifies only when its ``decoder``
            score is at least the start's minus this (``None``: no veto).
    """
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    if margin < 0 or (veto is not None and veto < 0):
        raise ValueError(f"the answer margin and veto must be >= 0, got {margin}, {veto}")
    if keep == "last":
        n = len(scores) if scores is not None else length
        if n is None:
            raise ValueError("answers: give the scores or the path's length")
        return list(range(n))
    if scores is None:
        raise ValueError(f"keep={keep!r} needs every state's score")
    s = np.asarray(scores, np.float64)
    vetoed = np.zeros(len(s), bool)
    if keep == "valued" and veto is not None:
        if decoder is None or len(decoder) != len(s):
            raise ValueError("a veto needs the decoder's predicted IoU of every state")
        d = np.asarray(decoder, np.float64)
        vetoed = d < d[0] - veto
    out, best = [], 0
    for k in range(len(s)):
        if k > 0 and not vetoed[k] and s[k] > s[0] + margin and (best == 0 or s[k] > s[best]):
            best = k
        out.append(best)
    return out


def pad_paths(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """``(images, longest)``: each image's values along its path, padded with its last (an
    episode that stopped early keeps its mask)."""
    longest = max(len(r) for r in rows)
    return np.array([list(r) + [r[-1]] * (longest - len(r)) for r in rows], np.float64)


def answer_table(
    ious: Sequence[Sequence[float]],
    scores: dict[str, Sequence[Sequence[float]]],
    margins: Sequence[float] = MARGINS,
    veto: float | None = None,
) -> list[dict[str, Any]]:
    """Every answer rule on the same episodes: per rule (``keep``, ``margin``) the mean true
    IoU of the answer after ``k`` clicks (``by_click``) and the share of images whose answer is
    worse than their start (``worse_by_click``).

    Args:
        ious: Per image, the true IoU of each path state (the start first).
        scores: Per scored rule of :data:`KEEPS` (``best_predicted``, ``valued``), per image,
            each path state's score; a rule missing here is not tried.
        margins: The margins each scored rule is tried with.
        veto: The ``valued`` rules' veto (:func:`answers`; the decoder's scores are those of
            ``best_predicted``), recorded in every row.
    """
    if not ious:
        return []
    if veto is not None and "best_predicted" not in scores:
        raise ValueError("answer_table: a veto needs the best_predicted scores (the decoder's)")
    rules: list[tuple[str, float]] = [("last", 0.0)]
    rules += [(k, float(m)) for k in KEEPS if k in scores for m in margins]
    table = []
    for keep, margin in rules:
        rows = []
        for i, path in enumerate(ious):
            s = scores[keep][i] if keep != "last" else None
            decoder = scores["best_predicted"][i] if veto is not None else None
            idx = answers(s, keep, margin, len(path), decoder, veto)
            rows.append([path[j] for j in idx])
        a = pad_paths(rows)
        start = a[:, :1]
        table.append(
            {
                "keep": keep,
                "margin": margin,
                "veto": veto if keep == "valued" else None,
                "by_click": a.mean(0).tolist(),
                "worse_by_click": (a < start - WORSE).mean(0).tolist(),
            }
        )
    return table


def best_answer(
    table: Sequence[dict[str, Any]] | Mapping[str, Sequence[dict[str, Any]]],
    prefer: str,
    max_worse: float | None = None,
) -> tuple[str, float, int]:
    """The ``(keep, margin, clicks)`` of :func:`answer_table` with the best mean IoU among
    those that leave at most ``max_worse`` of the images worse than their start (``None``: no
    bound; ``clicks = 0``, the start itself, always qualifies). Ties (to 6 decimals): ``prefer``,
    then the smaller margin, then the fewest clicks.

    ``table`` may also map set names (``val`` and its shifted copies) to a table each, all of
    the same rules: then a choice is scored by its mean IoU averaged over the sets, bounded by
    its share of worse images averaged over the sets, and qualifies only when no set's mean IoU
    falls below that set's start (a rule that harms one kind of image on average is out, however
    well it does on the others)."""
    tables = dict(table) if isinstance(table, Mapping) else {"": table}
    if not tables or not all(tables.values()):
        raise ValueError("best_answer: an empty table")
    rules = [[(r["keep"], r["margin"]) for r in t] for t in tables.values()]
    if any(r != rules[0] for r in rules):
        raise ValueError("best_answer: the sets' tables list different rules")
    best: tuple[Any, ...] | None = None
    for same in zip(*tables.values(), strict=True):
        keep, margin = same[0]["keep"], same[0]["margin"]
        means = np.array([r["by_click"] for r in same], np.float64)
        worse = np.array([r["worse_by_click"] for r in same], np.float64).mean(0)
        for k in range(means.shape[1]):
            if k > 0 and max_worse is not None and worse[k] > max_worse + 1e-12:
                continue
            if k > 0 and len(same) > 1 and np.any(means[:, k] < means[:, 0] - 1e-12):
                continue
            key = (-round(float(means[:, k].mean()), 6), keep != prefer, margin, k)
            if best is None or key < best[0]:
                best = (key, keep, margin, k)
    assert best is not None  # k = 0 always qualifies
    return best[1], best[2], best[3]


def fit_value(features: Sequence[np.ndarray], ious: Sequence[np.ndarray], seed: int = 0) -> Any:
    """The value model of ``keep: valued``: a regression :class:`~recalibration.judge.MaskJudge`
    fitted on every candidate of the judge's training states (``features[i]`` ``(n_i, F)``,
    ``ious[i]`` their true IoUs), each candidate on its own (a path state is scored alone, not
    against the other candidates of its step)."""
    from recalibration.judge import MaskJudge

    rows = [r[None] for f in features for r in np.asarray(f)]
    targets = [np.array([y], np.float64) for t in ious for y in np.asarray(t)]
    return MaskJudge("regression", seed=seed).fit(rows, targets)
