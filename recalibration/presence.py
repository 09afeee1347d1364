"""Is the target in the image at all? A presence score from the SRM's foreground map.

An agent shown a frame without its target still clicks and returns a mask (a polyp agent drew
a polyp on 100 of 100 polyp-free colonoscopy frames). Before any click the SRM has already said,
cell by cell, how sure it is that a cell is target; the presence score is the mean of that map
over its most confident :data:`PRESENCE_TOP` share of valid cells (four cells of a 64 x 64
grid). Chosen on Kvasir ``val`` against ``val@negative`` among the map's maximum, the means of
its top 0.1, 1 and 5 %, its mean, contrast and blob sizes (AUC 0.983 for the top 0.1 % and the
maximum, 0.976 for the top 1 %, 0.845 for the mean; ``docs/results.md``). A threshold chosen
on labelled images with and without the target (:func:`choose_threshold`: keep all but
``max_recall_loss`` of the images with a target) turns it into "nothing here": ``alignsam
segment`` writes an empty mask and lists the image under ``no_target``. The threshold lives in
the run folder (``presence.json``, written by ``alignsam presence RUN --choose``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.io import atomic_write

__all__ = [
    "PRESENCE_FILE",
    "PRESENCE_TOP",
    "PresenceGate",
    "choose_threshold",
    "image_presence",
    "nothing_here",
    "presence_score",
    "separation",
]

#: Share of the valid cells whose mean SRM probability is the presence score.
PRESENCE_TOP = 0.001
#: The gate's file in a run folder.
PRESENCE_FILE = "presence.json"


def presence_score(srm_map: np.ndarray, valid_shape: tuple[int, int], top: float = PRESENCE_TOP):
    """Mean foreground probability of the ``top`` share (at least one cell) of the valid cells
    of an ``(He, We)`` SRM map taken before any click."""
    vh, vw = valid_shape
    cells = np.asarray(srm_map, np.float64)[:vh, :vw].reshape(-1)
    if not len(cells):
        raise ValueError("presence_score: the map has no valid cell")
    k = max(1, math.ceil(top * len(cells)))
    return float(np.partition(cells, len(cells) - k)[-k:].mean())


def separation(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve of the score (ties count half): the chance that an image with
    the target scores above one without."""
    p = np.asarray(positives, np.float64)[:, None]
    n = np.asarray(negatives, np.float64)[None, :]
    if not p.size or not n.size:
        raise ValueError("separation needs images with and without the target")
    return float(((p > n) + 0.5 * (p == n)).mean())


def choose_threshold(
    positives: Sequence[float], negatives: Sequence[float], max_recall_loss: float = 0.02
) -> dict[str, float]:
    """The highest threshold that keeps at least ``1 - max_recall_loss`` of the ``positives``
    (images with the target) at or above it, with the recall and the false-positive rate (share
    of ``negatives`` at or above it) it gives on these images, and the score's AUC."""
    if not 0.0 <= max_recall_loss < 1.0:
        raise ValueError(f"max_recall_loss must lie in [0, 1), got {max_recall_loss}")
    p = np.sort(np.asarray(positives, np.float64))
    n = np.asarray(negatives, np.float64)
    if not len(p) or not len(n):
        raise ValueError("choosing a presence threshold needs images with and without the target")
    may_lose = math.floor(max_recall_loss * len(p) + 1e-9)
    threshold = float(p[may_lose])
    return {
        "threshold": threshold,
        "recall": float((p >= threshold).mean()),
        "false_positive_rate": float((n >= threshold).mean()),
        "auc": separation(p, n),
        "positives": len(p),
        "negatives": len(n),
    }


@dataclass
class PresenceGate:
    """A run's "nothing here" threshold on :func:`presence_score` (``presence.json``).

    Attributes:
        threshold: Images scoring below it get an empty mask.
        top: The score's :data:`PRESENCE_TOP`.
        chosen_on: Where the threshold was chosen: the datasets, the allowed recall loss, and
            the recall, false-positive rate and AUC it had there.
    """

    threshold: float
    top: float = PRESENCE_TOP
    chosen_on: dict[str, Any] = field(default_factory=dict)

    def save(self, run: str | Path) -> Path:
        path = Path(run) / PRESENCE_FILE
        data = json.dumps(asdict(self), indent=2).encode()
        atomic_write(path, lambda fh: fh.write(data))
        return path

    @classmethod
    def load(cls, run: str | Path) -> PresenceGate | None:
        """The gate of run folder ``run`` (``None`` when it has none)."""
        path = Path(run) / PRESENCE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(float(data["threshold"]), float(data["top"]), dict(data["chosen_on"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: not a presence gate ({exc}); choose it again with alignsam presence "
                f"{run} --choose, or delete the file"
            ) from exc


def image_presence(gate: PresenceGate | None, srm_map: np.ndarray, emb: Any) -> float:
    """An image's :func:`presence_score` as ``gate`` computes it (its ``top``; the default
    without a gate) from the SRM map before any click on ``emb``'s grid."""
    top = gate.top if gate is not None else PRESENCE_TOP
    return presence_score(srm_map, emb.valid_shape(emb.grid_size), top)


def nothing_here(shape: tuple[int, int], presence: float, encode_seconds: float) -> dict[str, Any]:
    """An agent's ``segment_detailed`` answer for an image under the presence threshold: an
    empty mask, no clicks, no decoder call (the episode is not run)."""
    return {
        "mask": np.zeros(shape, bool),
        "clicks": np.zeros((0, 3), np.float32),
        "score": 0.0,
        "presence": presence,
        "no_target": True,
        "encode_seconds": encode_seconds,
        "decoder_calls": 0,
        "stopped": None,
        "session": None,
    }


def initial_srm_map(srm: Any, segmenter: Any, emb: Any, load_image: Any = None) -> np.ndarray:
    """``(He, We)`` foreground map of ``srm`` on ``emb``'s image before any click (the map the
    start points and :func:`presence_score` read)."""
    from recalibration.labelers import EpisodeState
    from segmenter.base import small_torch_ops

    state = EpisodeState("image", emb, np.zeros(emb.grid_size, np.float32))
    state.load_image = load_image
    with small_torch_ops(segmenter):
        return srm.predict(state)
