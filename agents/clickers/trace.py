"""What every clicker returns (:class:`ClickTrace`) and the interactive-segmentation field's
metrics over traces (NoC@85 / NoC@90, mIoU@k)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class ClickTrace:
    """One clicker's prompting of one image.

    Attributes:
        sample_id: Id of the image.
        points: ``(N, 2)`` float32 clicks in original-image ``(x, y)`` pixels, in click order.
        labels: ``(N,)`` int64 labels, 1 = foreground, 0 = background.
        ious: Full-resolution IoU with the ground truth of the mask seen once click ``i`` had
            been placed (``len == N``), or ``[]`` without ground truth. The first
            ``start_clicks`` points were decoded together in one call, so they share that
            call's IoU.
        final_mask: ``(H, W)`` bool full-resolution mask after the last click.
        decoder_calls: Decoder calls made for this trace.
        seconds: Wall time of the trace (decoding, upscaling, click selection; the image
            embedding is given, so encoding is not included).
        start_clicks: Leading points decoded jointly (environment start prompts, the one-shot
            baseline's points); ``0`` when every click had its own decode.
        info: Extra per-trace details (e.g. the environment's low-res IoU per step, the stop
            reason, the selection rule).
    """

    sample_id: str
    points: np.ndarray
    labels: np.ndarray
    ious: list[float]
    final_mask: np.ndarray
    decoder_calls: int
    seconds: float
    start_clicks: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clicks(self) -> int:
        """Number of clicks ``N``."""
        return int(len(self.points))

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the mask)."""
        return {
            "sample_id": self.sample_id,
            "points": np.asarray(self.points, np.float64).round(2).tolist(),
            "labels": np.asarray(self.labels).astype(int).tolist(),
            "ious": [round(float(v), 5) for v in self.ious],
            "decoder_calls": int(self.decoder_calls),
            "seconds": round(float(self.seconds), 4),
            "start_clicks": int(self.start_clicks),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }


def noc(ious: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """Number of clicks to reach ``IoU >= threshold`` (RITM's NoC), ``max_clicks`` when never.

    Args:
        ious: IoU after click 1, 2, ... (only the first ``max_clicks`` count).
        threshold: e.g. ``0.85`` for NoC@85, ``0.9`` for NoC@90.
        max_clicks: Click budget, also the value when the threshold is never reached.

    Returns:
        The 1-based index of the first IoU at or above the threshold, else ``max_clicks``.
    """
    for i, v in enumerate(list(ious)[:max_clicks]):
        if v >= threshold:
            return i + 1
    return max_clicks


def noc_from(
    start_iou: float, ious: Sequence[float], threshold: float, max_clicks: int = 20
) -> int:
    """NoC counted from a start mask (an automatic method's output): ``0`` when the start
    already reaches ``threshold``, else :func:`noc` of the corrective clicks' ``ious``."""
    return 0 if start_iou >= threshold else noc(ious, threshold, max_clicks)


def _iou_at(ious: Sequence[float], k: int) -> float:
    if not len(ious):
        raise ValueError("a trace without IoUs (no ground truth or no clicks) has no mIoU@k")
    return float(ious[min(k, len(ious)) - 1])


def miou_at_k(traces: Iterable[ClickTrace], k: int) -> float:
    """Mean full-resolution IoU after ``k`` clicks over traces.

    A trace that stopped before ``k`` clicks (empty error region) contributes its last IoU.

    Args:
        traces: Traces with ground-truth IoUs.
        k: Number of clicks, ``>= 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vals = [_iou_at(t.ious, k) for t in traces]
    if not vals:
        raise ValueError("miou_at_k needs at least one trace")
    return float(np.mean(vals))


def summarize(
    traces: Sequence[ClickTrace],
    ks: Sequence[int] = (1, 3, 5, 10, 20),
    thresholds: Sequence[float] = (0.85, 0.9),
    max_clicks: int = 20,
) -> dict[str, float]:
    """The field's table row: ``miou@k`` for each k, ``noc@85``... and mean seconds per image."""
    out: dict[str, float] = {f"miou@{k}": miou_at_k(traces, k) for k in ks}
    for thr in thresholds:
        out[f"noc@{round(thr * 100)}"] = float(
            np.mean([noc(t.ious, thr, max_clicks) for t in traces])
        )
    out["seconds_per_image"] = float(np.mean([t.seconds for t in traces]))
    out["decoder_calls_per_image"] = float(np.mean([t.decoder_calls for t in traces]))
    out["n"] = float(len(traces))
    return out
