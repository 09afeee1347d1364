"""Per-method outcomes, their merge over shards and the ``results.json`` content."""

from __future__ import annotations

import copy
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.clickers import ClickTrace, miou_at_k, noc
from agents.config import TaskConfig
from agents.prompt_agent import library_versions
from experiments.benchmark.stats import bootstrap_ci, paired_diff_ci, position_on_curve
from segmenter.metrics import mask_metrics

logger = logging.getLogger(__name__)


#: Per-image metrics of every method (:func:`segmenter.metrics.mask_metrics`).
METRICS: tuple[str, ...] = ("iou", "dice", "f_beta", "mae", "ber", "e_measure")
#: Click counts at which the simulated annotator's masks are reported.
MANUAL_KS: tuple[int, ...] = (1, 3, 5, 10, 20)


@dataclass
class MethodResult:
    """Per-image outcomes of one method."""

    name: str
    kind: str  # "automatic" or "manual"
    per_image: list[dict[str, Any]] = field(default_factory=list)
    curve: list[list[float]] = field(default_factory=list)  # IoU after each click, per image
    start_clicks: int = 0  # leading clicks of each curve decoded together (the start prompts)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # packed masks of kept images
    clicks_points: dict[str, np.ndarray] = field(default_factory=dict)
    train_seconds: float | None = None  # what learning it took (None: training-free)
    trainable_params: int | None = None

    def add(
        self,
        sample_id: str,
        mask: np.ndarray,
        gt: np.ndarray,
        clicks: int,
        seconds: float,
        calls: int,
        points: np.ndarray | None = None,
    ) -> None:
        row = {"id": sample_id, **mask_metrics(mask, gt), "clicks": clicks}
        row.update(seconds=seconds, decoder_calls=calls)
        self.per_image.append(row)
        self.masks[sample_id] = np.packbits(mask, axis=None)
        if points is not None:
            self.clicks_points[sample_id] = np.asarray(points, np.float32)

    def add_trace(self, trace: ClickTrace, gt: np.ndarray) -> None:
        """Record one image's click trace (its final mask, clicks, time and decoder calls)."""
        self.add(
            trace.sample_id,
            trace.final_mask,
            gt,
            trace.n_clicks,
            trace.seconds,
            trace.decoder_calls,
            trace_points(trace),
        )

    def mask(self, sample_id: str, shape: tuple[int, int]) -> np.ndarray:
        bits = np.unpackbits(self.masks[sample_id], count=shape[0] * shape[1])
        return bits.reshape(shape).astype(bool)

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.per_image]

    def summary(self, seed: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name, "kind": self.kind, "n": len(self.per_image)}
        for key in (*METRICS, "clicks", "seconds", "decoder_calls"):
            out[key] = float(np.mean(self.values(key)))
        out["iou_ci95"] = bootstrap_ci(self.values("iou"), seed=seed)
        if self.start_clicks > 0 and len(self.curve) == len(self.per_image) and self.curve:
            # the method's own start (its start prompts decoded together) against its end
            start = np.array([c[self.start_clicks - 1] for c in self.curve], np.float64)
            final = np.array([c[-1] for c in self.curve], np.float64)
            out["start_iou"] = float(start.mean())
            out["worse_than_start"] = float(np.mean(final < start - 1e-6))
        out["train_seconds"] = self.train_seconds
        out["trainable_params"] = self.trainable_params
        return out


def trace_points(trace: ClickTrace) -> np.ndarray:
    return np.concatenate([trace.points, trace.labels[:, None]], axis=1)


@dataclass
class Shard:
    """Every method's outcomes on a subset of the images (one worker's share)."""

    methods: list[MethodResult]
    traces: list[ClickTrace]
    encoded: int
    encode_seconds: float
    env_config: dict[str, Any]
    segmenter_id: str


def merge_shards(
    shards: Sequence[Shard],
) -> tuple[list[MethodResult], list[ClickTrace], float | None, dict[str, Any]]:
    """One result per method over all shards, in shard order (the images' order)."""
    first = shards[0]
    merged = [copy.copy(m) for m in first.methods]
    for m in merged:
        m.per_image, m.curve = list(m.per_image), list(m.curve)
        m.masks, m.clicks_points = dict(m.masks), dict(m.clicks_points)
    traces = list(first.traces)
    for shard in shards[1:]:
        if [m.name for m in shard.methods] != [m.name for m in merged]:
            raise RuntimeError("benchmark shards ran different methods")
        for m, part in zip(merged, shard.methods, strict=True):
            m.per_image += part.per_image
            m.curve += part.curve
            m.masks.update(part.masks)
            m.clicks_points.update(part.clicks_points)
        traces += shard.traces
    encoded = sum(s.encoded for s in shards)
    encode_s = sum(s.encode_seconds for s in shards) / encoded if encoded else None
    return merged, traces, encode_s, first.env_config


def assemble(
    task: TaskConfig,
    split: str,
    samples: Sequence[Any],
    segmenter_id: str,
    run_dirs: Sequence[str | Path],
    methods: list[MethodResult],
    traces: list[ClickTrace],
    manual_clicks: int,
    seed: int,
    encode_s: float | None,
) -> dict[str, Any]:
    ref = methods[0]
    rows = []
    for m in methods:
        row = m.summary(seed)
        if m is not ref:
            row["diff_vs_agent"] = paired_diff_ci(m.values("iou"), ref.values("iou"), seed=seed)
        rows.append(row)
    curve = [miou_at_k(traces, k) for k in range(1, manual_clicks + 1)]
    manual = {
        "miou_at_k": {str(k): v for k, v in enumerate(curve, start=1)},
        "noc@85": float(np.mean([noc(t.ious, 0.85, manual_clicks) for t in traces])),
        "noc@90": float(np.mean([noc(t.ious, 0.90, manual_clicks) for t in traces])),
        "max_clicks": manual_clicks,
    }
    agent_miou = rows[0]["iou"]
    lo, hi = rows[0]["iou_ci95"]
    clicks = by_click(methods, seed)
    return {
        "task": task.name,
        "split": split,
        "n_images": len(samples),
        "segmenter": segmenter_id,
        "runs": [str(r) for r in run_dirs],
        "seed": seed,
        "versions": {**library_versions(), "python": platform.python_version()},
        "encode_seconds_per_image": encode_s,
        "methods": rows,
        "manual": manual,
        "headline": {
            "agent_miou": agent_miou,
            "agent_miou_ci95": [lo, hi],
            "agent_equals_manual_clicks": position_on_curve(agent_miou, curve),
            "ci_equals_manual_clicks": [position_on_curve(lo, curve), position_on_curve(hi, curve)],
        },
        "by_click": clicks,
        "per_image": {m.name: m.per_image for m in methods},
    }


def by_click(methods: list[MethodResult], seed: int) -> dict[str, Any] | None:
    """mIoU after the start prompts and after each of the next clicks, for the agent (the first
    method) and every automatic method with the agent's start whose click traces are at least
    as long (random, heuristics, the agent's ablations; longer traces are cut to the agent's
    budget: the IoU after k clicks does not depend on later ones), with the paired
    bootstrap interval of each method's difference to the agent at every budget. ``None`` when
    the agent has no click traces."""
    ref = methods[0]
    if not ref.curve or len({len(c) for c in ref.curve}) != 1:
        return None
    length, first = len(ref.curve[0]), max(ref.start_clicks - 1, 0)
    agent = np.asarray(ref.curve, np.float64)[:, first:]
    # Column 0 is the start prompts' IoU (k = 0), or the first click when there is no start.
    offset = int(ref.start_clicks == 0)
    budgets = list(range(offset, offset + agent.shape[1]))
    out: dict[str, Any] = {"clicks_after_start": budgets, "methods": {}}
    for m in methods:
        same = m.start_clicks == ref.start_clicks and len(m.curve) == len(ref.curve)
        if m.kind != "automatic" or not same or any(len(c) < length for c in m.curve):
            continue
        ious = np.asarray([c[:length] for c in m.curve], np.float64)[:, first:]
        row: dict[str, Any] = {"miou": ious.mean(0).tolist()}
        if m is not ref:
            row["diff_vs_agent"] = [
                paired_diff_ci(ious[:, k].tolist(), agent[:, k].tolist(), seed=seed)
                for k in range(ious.shape[1])
            ]
        out["methods"][m.name] = row
    return out
