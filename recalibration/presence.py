"""Is the target in the image at all? A presence score from the SRM's foreground map.

An agent shown a frame without its target still clicks and returns a mask (a polyp agent drew
a polyp on 100 of 100 polyp-free colonoscopy frames). Before any click the SRM has already said,
cell by cell, how sure it is that a cell is target; the presence score is the mean of that map
over its most confident :data:`PRESENCE_TOP` share of valid cells (four cells of a 64 x 64
grid). Chosen on Kvasir ``val`` against ``val@negative`` among the map's maximum, the means of
its top 0.1, 1 and 5 %, its mean, contrast and blob sizes (AUC 0.983 for the top 0.1 % and the
maximum, 0.976 for the top 1 %, 0.845 for the mean; ``docs/results.md``). A threshold chosen
on labelled images with and without the target (:func:`choose_threshold`: between keeping all
but 2 % of the images with a target and letting at most 5 % of those without through) turns it
into "nothing here": ``alignsam segment`` writes an empty mask and lists the image under
``no_target``. The threshold lives in the run folder (``presence.json``, written by ``alignsam
presence RUN --choose``).

The SRM map says where the target is more than whether it is there: an SRM trained on more
images is confident somewhere in most frames (the 200-image Kvasir agent's top-0.1 % score:
AUC 0.93 on ``val`` against ``val@negative``). :class:`PresenceModel` is a learned score: a
class-balanced, L2-regularised logistic regression on :func:`presence_features` (statistics of
the SRM map and the segmenter's embedding pooled over the image), fitted on labelled images with
the target and cuts of them without (``alignsam presence --fit-positives --fit-negatives``).
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
    "PresenceModel",
    "choose_threshold",
    "image_presence",
    "nothing_here",
    "presence_features",
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
    positives: Sequence[float],
    negatives: Sequence[float],
    max_recall_loss: float = 0.02,
    max_false_positive_rate: float = 0.05,
) -> dict[str, Any]:
    """The "nothing here" threshold for these labelled images: the recall limit is the highest
    threshold that keeps at least ``1 - max_recall_loss`` of the ``positives`` (images with the
    target) at or above it, the false-positive limit the lowest that lets at most
    ``max_false_positive_rate`` of the ``negatives`` reach it. When the false-positive limit is
    not above the recall limit, both goals hold anywhere between them, and the threshold is the
    middle of that range in log-odds (rule ``middle``): new images shift the scores of both
    kinds, and a threshold at either edge gives the shift no room on that side (measured
    against the recall limit alone from recorded scores, ``docs/results.md``: CamVid ``test``
    recall 0.70 -> 0.89, Kvasir unchanged; ``val``'s own halves do not tell the two apart).
    Otherwise the recall limit (rule
    ``recall``: a missed target costs more than a false alarm). Returns the threshold with the
    rule, both limits, and the recall, the false-positive rate and the score's AUC on these
    images."""
    if not 0.0 <= max_recall_loss < 1.0 or not 0.0 <= max_false_positive_rate < 1.0:
        raise ValueError(
            "max_recall_loss and max_false_positive_rate must lie in [0, 1), got "
            f"{max_recall_loss}, {max_false_positive_rate}"
        )
    p = np.sort(np.asarray(positives, np.float64))
    n = np.sort(np.asarray(negatives, np.float64))[::-1]
    if not len(p) or not len(n):
        raise ValueError("choosing a presence threshold needs images with and without the target")
    recall_limit = float(p[math.floor(max_recall_loss * len(p) + 1e-9)])
    # the (k + 1)-th highest negative must fall below the threshold
    fp_limit = float(np.nextafter(n[math.floor(max_false_positive_rate * len(n) + 1e-9)], np.inf))
    if fp_limit <= recall_limit:
        rule = "middle"
        threshold = float(_sigmoid((_logit(recall_limit) + _logit(fp_limit)) / 2))
        threshold = min(max(threshold, fp_limit), recall_limit)  # rounding at 0 or 1
    else:
        rule, threshold = "recall", recall_limit
    return {
        "threshold": threshold,
        "rule": rule,
        "recall_limit": recall_limit,
        "false_positive_limit": fp_limit,
        "recall": float((p >= threshold).mean()),
        "false_positive_rate": float((n >= threshold).mean()),
        "auc": separation(p, n),
        "positives": len(p),
        "negatives": len(n),
    }


def _logit(x: float) -> float:
    x = min(max(x, 1e-9), 1 - 1e-9)
    return math.log(x / (1 - x))


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


#: Shares of the most confident cells whose mean SRM probability :func:`presence_features`
#: reads, then the map's mean, spread and the shares of cells over 0.5 and 0.9.
_MAP_TOPS = (0.001, 0.01, 0.05, 0.2)


def presence_features(srm_map: np.ndarray, emb: Any) -> np.ndarray:
    """What :class:`PresenceModel` reads of an image, before any click: 8 statistics of the
    valid cells of the SRM map (the means of its top 0.1 / 1 / 5 / 20 %, its mean and spread,
    the shares over 0.5 and 0.9), then the segmenter's embedding averaged and maxed over the
    valid cells (``2 C``)."""
    vh, vw = emb.valid_shape(emb.grid_size)
    cells = np.sort(np.asarray(srm_map, np.float64)[:vh, :vw].reshape(-1))[::-1]
    if not len(cells):
        raise ValueError("presence_features: the map has no valid cell")
    stats = [cells[: max(1, math.ceil(q * len(cells)))].mean() for q in _MAP_TOPS]
    stats += [cells.mean(), cells.std(), (cells > 0.5).mean(), (cells > 0.9).mean()]
    f = emb.features[0, :, :vh, :vw].float()
    pooled = np.concatenate([f.mean((1, 2)).numpy(), f.amax((1, 2)).numpy()])
    return np.concatenate([np.asarray(stats, np.float64), pooled.astype(np.float64)])


@dataclass
class PresenceModel:
    """A learned presence score: ``sigmoid(w . (x - mean) / scale + b)`` on
    :func:`presence_features` ``x``.

    Attributes:
        mean, scale: Standardisation of the features (fitted on the fitting images).
        weights, bias: The logistic regression.
        fitted_on: The fitting sets and their counts.
    """

    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    fitted_on: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        positives: np.ndarray,
        negatives: np.ndarray,
        l2: float = 1e-2,
        fitted_on: dict[str, Any] | None = None,
    ) -> PresenceModel:
        """Fit on ``(N, F)`` features of images with the target and without, each class
        weighted half, L2 penalty ``l2`` on the standardised weights (L-BFGS)."""
        import torch

        pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
        if pos.ndim != 2 or neg.ndim != 2 or not len(pos) or not len(neg):
            raise ValueError("a presence model needs images with and without the target")
        x = np.concatenate([pos, neg])
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        mean, scale = x.mean(0), x.std(0) + 1e-6
        z = torch.tensor((x - mean) / scale)
        t = torch.tensor(y)
        weight = torch.tensor(np.where(y == 1, 0.5 / len(pos), 0.5 / len(neg)))
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                z @ w + b, t, reduction="none"
            )
            loss = (bce * weight).sum() + l2 * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(
            mean.tolist(),
            scale.tolist(),
            w.detach().numpy().tolist(),
            float(b.item()),
            dict(fitted_on or {}, positives=len(pos), negatives=len(neg), l2=l2),
        )

    def score(self, features: np.ndarray) -> float:
        """The probability that the image holds the target."""
        x = np.asarray(features, np.float64)
        if x.shape != (len(self.weights),):
            raise ValueError(
                f"presence model expects {len(self.weights)} features, got {x.shape}: it was "
                "fitted for another segmenter; fit it again (alignsam presence --fit-positives)"
            )
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return float(1.0 / (1.0 + math.exp(-float(z @ np.asarray(self.weights) + self.bias))))


@dataclass
class PresenceGate:
    """A run's "nothing here" threshold on :func:`presence_score` (``presence.json``).

    Attributes:
        threshold: Images scoring below it get an empty mask.
        top: The score's :data:`PRESENCE_TOP` (without a model).
        chosen_on: Where the threshold was chosen: the datasets, the allowed recall loss, and
            the recall, false-positive rate and AUC it had there.
        model: The learned score (``None``: the SRM map's top-``top`` mean).
    """

    threshold: float
    top: float = PRESENCE_TOP
    chosen_on: dict[str, Any] = field(default_factory=dict)
    model: PresenceModel | None = None

    def score(self, srm_map: np.ndarray, emb: Any) -> float:
        """The image's presence score, as this gate computes it."""
        if self.model is not None:
            return self.model.score(presence_features(srm_map, emb))
        return presence_score(srm_map, emb.valid_shape(emb.grid_size), self.top)

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
            model = data.get("model")
            return cls(
                float(data["threshold"]),
                float(data["top"]),
                dict(data["chosen_on"]),
                None if model is None else PresenceModel(**model),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: not a presence gate ({exc}); choose it again with alignsam presence "
                f"{run} --choose, or delete the file"
            ) from exc


def image_presence(gate: PresenceGate | None, srm_map: np.ndarray, emb: Any) -> float:
    """An image's presence score as ``gate`` computes it (:meth:`PresenceGate.score`;
    :func:`presence_score` without a gate) from the SRM map before any click on ``emb``'s
    grid."""
    if gate is not None:
        return gate.score(srm_map, emb)
    return presence_score(srm_map, emb.valid_shape(emb.grid_size))


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
