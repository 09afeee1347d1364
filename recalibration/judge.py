"""The mask judge: how good is a decoded candidate mask, without the ground truth?

A lookahead agent decodes several candidate clicks (each cell with both labels) and keeps the
best; the judge is what "best" means at test time. It scores a whole candidate mask, not a
point: how the mask agrees with the SRM's foreground map (soft Dice and IoU, the map's mass it
covers, its mean inside and outside), what the decoder itself says of it (predicted IoU, the
stability of its logits, how many pieces it has), how much it changes the current mask, and the
click that made it (its label, and whether the SRM agreed with that label). Gradient-boosted
trees (LightGBM) map these to the IoU the mask will have, fitted on masks decoded on the
training images along exploratory trajectories, with SRM maps cross-fitted so that the maps it
learns from are as wrong on an image as they are on unseen ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from segmenter.io import atomic_write
from segmenter.session import Outcome

logger = logging.getLogger(__name__)

__all__ = ["JUDGE_FEATURES", "JudgeError", "MaskJudge", "candidate_features", "rank_quality"]

#: Names of :func:`candidate_features`' columns, in order.
JUDGE_FEATURES: tuple[str, ...] = (
    "soft_dice",
    "soft_iou",
    "hard_iou",
    "map_covered",
    "map_precision",
    "map_inside",
    "map_outside",
    "area",
    "map_area",
    "decoder_score",
    "stability",
    "pieces",
    "largest_piece",
    "change",
    "label",
    "map_at_click",
    "label_agrees",
    "clicks",
    "mean_prob_inside",
)
FORMAT = "alignsam-judge/1"


class JudgeError(RuntimeError):
    """A judge file cannot be used; the message says what to do."""


def _stability(logits: torch.Tensor, delta: float = 1.0) -> float:
    """SAM's stability score: IoU of the mask thresholded at ``+delta`` and ``-delta``."""
    inner = int((logits > delta).sum())
    outer = int((logits > -delta).sum())
    return inner / outer if outer else 1.0


def candidate_features(
    outcome: Outcome,
    srm_map: np.ndarray,
    valid: tuple[int, int],
    current: np.ndarray,
    click: tuple[float, float, int],
    map_at_click: float,
) -> np.ndarray:
    """The judge's view of one candidate (:data:`JUDGE_FEATURES`).

    Args:
        outcome: The decoded candidate (:meth:`segmenter.session.PromptSession.preview`).
        srm_map: ``(He, We)`` SRM foreground probability (0 on padding).
        valid: ``(vh, vw)`` embedding-grid cells covering the image.
        current: ``(He, We)`` mask probability before the candidate's click.
        click: ``(x, y, label)`` of the candidate's click.
        map_at_click: The SRM map at the click's cell.
    """
    vh, vw = valid
    pm = outcome.mask_prob[:vh, :vw].astype(np.float64)
    s = np.asarray(srm_map, np.float64)[:vh, :vw]
    cur = np.asarray(current, np.float64)[:vh, :vw]
    inter = float((pm * s).sum())
    s_sum, p_sum = float(s.sum()) + 1e-6, float(pm.sum()) + 1e-6
    hard, s_hard = pm > 0.5, s > 0.5
    logits = outcome.logits[: vh * 4, : vw * 4]
    binary = (logits > 0).numpy()
    labelled, pieces = ndimage.label(binary)
    largest = np.bincount(labelled.ravel())[1:].max() / max(binary.sum(), 1) if pieces else 0.0
    inside = logits > 0
    label = int(click[2])
    return np.array(
        [
            2 * inter / (s_sum + p_sum),
            float(np.minimum(pm, s).sum() / (np.maximum(pm, s).sum() + 1e-6)),
            float((hard & s_hard).sum() / max((hard | s_hard).sum(), 1)),
            inter / s_sum,
            inter / p_sum,
            float(s[hard].mean()) if hard.any() else 0.0,
            float(s[~hard].mean()) if (~hard).any() else 0.0,
            float(hard.mean()),
            float(s_hard.mean()),
            float(outcome.prediction.score),
            _stability(logits),
            float(pieces),
            float(largest),
            float(np.abs(pm - cur).mean()),
            float(label),
            float(map_at_click),
            float(label == int(map_at_click >= 0.5)),
            float(len(outcome.points)),
            float(torch.sigmoid(logits[inside]).mean()) if bool(inside.any()) else 0.0,
        ],
        np.float64,
    )


class MaskJudge:
    """Predicted IoU of candidate masks from :func:`candidate_features`.

    LightGBM gradient-boosted trees on each candidate's features and their difference from the
    other candidates of its state (:meth:`design`). ``lambdarank`` (the default) learns the
    order of a state's candidates by true IoU, which is all the agent needs (it compares the
    candidates of one step, the current mask among them); ``regression`` fits the IoU itself.
    Saved in LightGBM's own text format inside a JSON envelope: loading a judge file parses
    trees, it never runs code.

    Args:
        objective: ``lambdarank`` (order within a state) or ``regression`` (IoU).
        rounds: Boosting rounds.
        learning_rate: Shrinkage.
        num_leaves: Leaves per tree.
        min_data_in_leaf: Smallest leaf.
        seed: Random seed.
    """

    def __init__(
        self,
        objective: str = "lambdarank",
        rounds: int = 300,
        learning_rate: float = 0.05,
        num_leaves: int = 15,
        min_data_in_leaf: int = 20,
        seed: int = 0,
    ) -> None:
        if objective not in ("regression", "lambdarank"):
            raise ValueError(f"objective must be regression or lambdarank, got {objective!r}")
        self.params = {
            "objective": objective,
            "learning_rate": float(learning_rate),
            "num_leaves": int(num_leaves),
            "min_data_in_leaf": int(min_data_in_leaf),
            "seed": int(seed),
            "num_threads": 1,
            "verbosity": -1,
            "deterministic": True,
            "feature_fraction": 0.5,
            "feature_fraction_seed": int(seed),
        }
        self.rounds = int(rounds)
        self.booster: Any = None
        self.info: dict[str, Any] = {}

    def fit(self, states: Sequence[np.ndarray], ious: Sequence[np.ndarray]) -> MaskJudge:
        """Fit on the candidates of many states: ``states[i]`` ``(n_i, F)`` features of state
        i's candidates (:func:`candidate_features`), ``ious[i]`` their ``(n_i,)`` true IoUs."""
        import lightgbm as lgb

        if not len(states) or len(states) != len(ious):
            raise ValueError("the judge needs one IoU array per state, and at least one state")
        for f in states:
            if f.ndim != 2 or f.shape[1] != len(JUDGE_FEATURES):
                raise ValueError(
                    f"judge features must be (n, {len(JUDGE_FEATURES)}) per state, got {f.shape}"
                )
        x = np.concatenate([self.design(f) for f in states])
        params = dict(self.params)
        if params["objective"] == "lambdarank":
            # Relevance: each candidate's rank by true IoU within its state (0 = worst).
            label = np.concatenate([np.argsort(np.argsort(y, kind="stable")) for y in ious])
            params["label_gain"] = list(range(int(label.max()) + 1))
        else:
            label = np.concatenate([np.asarray(y, np.float64) for y in ious])
        groups = [len(y) for y in ious]
        data = lgb.Dataset(x, label, group=groups if params["objective"] == "lambdarank" else None)
        self.booster = lgb.train(params, data, num_boost_round=self.rounds)
        self.info = {"states": len(states), "candidates": int(len(label))}
        self.info["objective"] = params["objective"]
        return self

    @staticmethod
    def design(features: np.ndarray) -> np.ndarray:
        """The model's input for one state: each candidate's features and their difference from
        the state's mean (how it compares with the other candidates of the same step)."""
        f = np.asarray(features, np.float64).reshape(-1, len(JUDGE_FEATURES))
        return np.concatenate([f, f - f.mean(axis=0, keepdims=True)], axis=1)

    @property
    def fitted(self) -> bool:
        return self.booster is not None

    def leaves(self) -> int:
        """Fitted leaves of all trees (its learned values: the judge's parameter count)."""
        if self.booster is None:
            return 0
        dump = self.booster.dump_model()
        return int(sum(t["num_leaves"] for t in dump["tree_info"]))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(n,)`` scores of one state's ``(n, F)`` candidates (higher: better; the predicted
        IoU for ``regression``, an order only for ``lambdarank``)."""
        if self.booster is None:
            raise JudgeError("the judge is not fitted: fit it or load a judge file")
        return np.asarray(self.booster.predict(self.design(features), num_threads=1), np.float64)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the judge atomically (JSON holding LightGBM's text model)."""
        if self.booster is None:
            raise JudgeError("nothing to save: the judge is not fitted")
        payload = {
            "format": FORMAT,
            "features": list(JUDGE_FEATURES),
            "params": self.params,
            "rounds": self.rounds,
            "info": self.info,
            "model": self.booster.model_to_string(),
        }
        text = json.dumps(payload)
        return atomic_write(path, lambda fh: fh.write(text.encode()))

    @classmethod
    def load(cls, path: str | Path) -> MaskJudge:
        """Read a judge written by :meth:`save`."""
        import lightgbm as lgb

        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise JudgeError(
                f"cannot read judge file {path} ({exc}): train the agent again"
            ) from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise JudgeError(f"{path} is not an alignsam judge file ({FORMAT}); train it again")
        if tuple(payload.get("features", ())) != JUDGE_FEATURES:
            raise JudgeError(
                f"{path} was fitted on other judge features; retrain it with this version"
            )
        p = payload["params"]
        judge = cls(
            p["objective"],
            payload["rounds"],
            p["learning_rate"],
            p["num_leaves"],
            p["min_data_in_leaf"],
            p["seed"],
        )
        try:
            judge.booster = lgb.Booster(model_str=payload["model"])
        except Exception as exc:  # noqa: BLE001 - LightGBM raises its own error types
            raise JudgeError(f"{path} holds no readable model ({exc}); train it again") from exc
        judge.info = dict(payload.get("info", {}))
        return judge


def rank_quality(
    predicted: Sequence[np.ndarray], true: Sequence[np.ndarray], current: Sequence[float]
) -> dict[str, float]:
    """How well a judge ranks the candidates of each state.

    Args:
        predicted: Per state, the judge's scores of its candidates.
        true: Per state, their true IoUs.
        current: Per state, the IoU before the step (the do-nothing baseline).

    Returns:
        ``spearman`` (mean within-state rank correlation, states with distinct IoUs),
        ``top1_regret`` (mean IoU lost by the judge's top choice vs the best candidate) and
        ``mae``.
    """
    from scipy.stats import spearmanr

    rhos, regrets, errs = [], [], []
    for p, y in zip(predicted, true, strict=True):
        p, y = np.asarray(p), np.asarray(y)
        if np.ptp(y) > 1e-6 and np.ptp(p) > 1e-12:
            rhos.append(spearmanr(p, y)[0])
        regrets.append(float(y.max() - y[int(np.argmax(p))]))
        errs.append(np.abs(p - y).mean())
    return {
        "spearman": float(np.nanmean(rhos)) if rhos else float("nan"),
        "top1_regret": float(np.mean(regrets)),
        "mae": float(np.mean(errs)),
        "states": float(len(regrets)),
    }
