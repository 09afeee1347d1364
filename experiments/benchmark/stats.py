"""Statistics of the benchmark: bootstrap intervals and where an mIoU lies on the manual curve."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap ``(lo, hi)`` interval of the mean of ``values``."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float(v.mean())
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_diff_ci(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired images and its percentile-bootstrap interval."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    lo, hi = bootstrap_ci(d, n_boot, alpha, seed)
    return float(d.mean()), lo, hi


def position_on_curve(value: float, curve: Sequence[float]) -> float | None:
    """Where ``value`` lies on an increasing mIoU-vs-clicks ``curve`` (``curve[k-1]`` = mIoU@k),
    as a fractional number of clicks by linear interpolation; ``None`` above the curve's end,
    ``0.0`` below its first point (less than one click)."""
    c = np.maximum.accumulate(np.asarray(curve, np.float64))
    if value > c[-1]:
        return None
    if value <= c[0]:
        return 0.0 if value < c[0] else 1.0
    k = int(np.argmax(c >= value))  # first index reaching value (k >= 1)
    lo, hi = c[k - 1], c[k]
    return float(k + (value - lo) / (hi - lo)) if hi > lo else float(k + 1)
