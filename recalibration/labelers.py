"""Click labelers: who decides whether a click is foreground (1) or background (0).

The environment asks a labeler for the label of every click. The semantic recalibration
module (:mod:`recalibration.srm`) is the method's labeler; the oracle (ground truth) and
always-positive labelers are the ablations. Only labelers with ``uses_ground_truth = True``
may read ``EpisodeState.gt_full`` to choose a label; the SRM reads ground truth only to
train itself online, never to label.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from segmenter.base import ImageEmbedding
from segmenter.geometry import to_grid, value_at

__all__ = [
    "AlwaysPositiveLabeler",
    "EpisodeState",
    "Labeler",
    "OracleLabeler",
    "PositiveWithMap",
    "to_grid",
]


@dataclass
class EpisodeState:
    """What a labeler may see of the current episode.

    Attributes:
        sample_id: Id of the image.
        embedding: The cached image embedding (features ``(1, C, He, We)``).
        mask_prob: ``(He, We)`` float32 probability of the current mask on the embedding grid
            (zeros before the first decode).
        points: ``(N, 2)`` clicks so far in original-image ``(x, y)`` pixels.
        labels: ``(N,)`` their labels.
        gt_grid: ``(He, We)`` float32 ground-truth coverage on the embedding grid, or ``None``
            when there is no ground truth (automatic segmentation).
        gt_full: ``(H, W)`` bool ground truth in original pixels, or ``None``.
        load_image: Returns the ``(H, W, 3)`` uint8 RGB image (for labelers that look at
            pixels, e.g. CLIP); ``None`` when unavailable.
    """

    sample_id: str
    embedding: ImageEmbedding
    mask_prob: np.ndarray
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    gt_grid: np.ndarray | None = None
    gt_full: np.ndarray | None = None
    load_image: Callable[[], np.ndarray] | None = None

    def grid_cell(self, x: float, y: float) -> tuple[int, int]:
        """Embedding-grid ``(row, col)`` holding original-image pixel ``(x, y)``."""
        return self.embedding.cell_at(x, y)


class Labeler(ABC):
    """Decides the label of each click; may also offer a foreground map and learn online."""

    name: str = "labeler"
    uses_ground_truth: bool = False

    def begin(self, state: EpisodeState) -> None:  # noqa: B027 - optional hook
        """Called at the start of an episode, before any decode."""

    def foreground_map(self, state: EpisodeState) -> np.ndarray | None:
        """``(He, We)`` foreground probability on the embedding grid, if this labeler has one."""
        return None

    @abstractmethod
    def label(self, state: EpisodeState, x: float, y: float) -> int:
        """Label (1 foreground, 0 background) of a click at original pixel ``(x, y)``."""

    def after_step(self, state: EpisodeState) -> dict[str, float]:
        """Called after each decode; online learners update here. Returns scalars to log."""
        return {}


class OracleLabeler(Labeler):
    """Ground-truth labels: the upper bound, and a training ablation."""

    name = "oracle"
    uses_ground_truth = True

    def foreground_map(self, state: EpisodeState) -> np.ndarray | None:
        return None if state.gt_grid is None else state.gt_grid.astype(np.float32)

    def label(self, state: EpisodeState, x: float, y: float) -> int:
        if state.gt_full is None:
            raise RuntimeError("the oracle labeler needs ground truth, and this episode has none")
        return int(value_at(state.gt_full, x, y))


class AlwaysPositiveLabeler(Labeler):
    """Every click is foreground: the paper's "w/o SRM" ablation."""

    name = "positive"

    def label(self, state: EpisodeState, x: float, y: float) -> int:
        return 1


class PositiveWithMap(AlwaysPositiveLabeler):
    """Every click foreground, while the observation and start keep ``base``'s foreground map.

    The "w/o SRM" ablation of a trained agent: the agent sees exactly what it was trained on
    (the SRM map in its observation, the SRM start points) but its clicks lose the SRM labels.
    """

    name = "positive+map"

    def __init__(self, base: Labeler) -> None:
        self.base = base

    def begin(self, state: EpisodeState) -> None:
        self.base.begin(state)

    def foreground_map(self, state: EpisodeState) -> np.ndarray | None:
        return self.base.foreground_map(state)
