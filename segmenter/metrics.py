"""Binary-mask quality measures used by the salient-object, shadow and polyp literature.

Every function takes a prediction and a ground truth of the same ``(H, W)`` shape. Predictions
may be binary or soft maps in ``[0, 1]`` (MAE and E-measure use the values; IoU, Dice,
F-beta and BER threshold at 0.5). Conventions for degenerate inputs are stated per function so
that empty predictions and empty ground truths never produce NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ber", "dice", "e_measure", "f_beta", "iou", "mae", "mask_metrics"]


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(
            f"prediction {pred.shape} and ground truth {gt.shape} must be the same (H, W) shape"
        )
    return pred, gt.astype(bool)


def _binary(pred: np.ndarray) -> np.ndarray:
    return pred.astype(bool) if pred.dtype == bool else pred >= 0.5


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float, float]:
    p = _binary(pred)
    tp = float(np.count_nonzero(p & gt))
    fp = float(np.count_nonzero(p & ~gt))
    fn = float(np.count_nonzero(~p & gt))
    tn = float(p.size - tp - fp - fn)
    return tp, fp, fn, tn


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union; 1.0 when both masks are empty."""
    tp, fp, fn, _ = _counts(*_pair(pred, gt))
    union = tp + fp + fn
    return tp / union if union else 1.0


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient ``2|P & G| / (|P| + |G|)``; 1.0 when both masks are empty."""
    tp, fp, fn, _ = _counts(*_pair(pred, gt))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 1.0


def f_beta(pred: np.ndarray, gt: np.ndarray, beta2: float = 0.3) -> float:
    """F-measure with ``beta^2`` (0.3 in salient-object detection, weighting precision).

    Precision is taken as 1.0 when nothing is predicted and recall as 1.0 when the ground truth
    is empty, so an empty prediction of an empty target scores 1.0 and an empty prediction of a
    non-empty target scores 0.0.
    """
    tp, fp, fn, _ = _counts(*_pair(pred, gt))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    denom = beta2 * precision + recall
    return (1 + beta2) * precision * recall / denom if denom else 0.0


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error between the (soft or binary) prediction and the ground truth."""
    pred, gt = _pair(pred, gt)
    return float(np.abs(pred.astype(np.float64) - gt).mean())


def ber(pred: np.ndarray, gt: np.ndarray) -> float:
    """Balanced error rate of the shadow-detection literature, in percent:
    ``100 * (1 - (TP / (TP + FN) + TN / (TN + FP)) / 2)``. A class absent from the ground truth
    contributes an accuracy of 1.0."""
    tp, fp, fn, tn = _counts(*_pair(pred, gt))
    tpr = tp / (tp + fn) if tp + fn else 1.0
    tnr = tn / (tn + fp) if tn + fp else 1.0
    return 100.0 * (1.0 - 0.5 * (tpr + tnr))


def e_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """Enhanced-alignment measure (Fan et al., IJCAI 2018) of a map against a binary target.

    With the bias matrices ``phi_P = P - mean(P)`` and ``phi_G = G - mean(G)``, the alignment
    ``xi = 2 phi_G phi_P / (phi_G^2 + phi_P^2)`` and the enhanced alignment ``(1 + xi)^2 / 4``
    are averaged over the pixels. The paper's special cases: an empty ground truth scores
    ``mean(1 - P)``, a full one ``mean(P)``.
    """
    pred, gt = _pair(pred, gt)
    p = pred.astype(np.float64)
    if pred.dtype != bool:
        p = np.clip(p, 0.0, 1.0)
    g = gt.astype(np.float64)
    if not gt.any():
        return float(np.mean(1.0 - p))
    if gt.all():
        return float(np.mean(p))
    phi_p = p - p.mean()
    phi_g = g - g.mean()
    align = 2.0 * phi_g * phi_p / (phi_g**2 + phi_p**2 + 1e-12)
    return float(np.mean((1.0 + align) ** 2 / 4.0))


def mask_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """All measures of one prediction: ``iou, dice, f_beta, mae, ber, e_measure``."""
    return {
        "iou": iou(pred, gt),
        "dice": dice(pred, gt),
        "f_beta": f_beta(pred, gt),
        "mae": mae(pred, gt),
        "ber": ber(pred, gt),
        "e_measure": e_measure(pred, gt),
    }
