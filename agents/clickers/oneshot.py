"""A training-free one-shot baseline in the spirit of PerSAM (Zhang et al. 2023, "Personalize
Segment Anything Model with One Shot"): points at the positions of the target image whose
embedding is most / least similar to a target prototype taken from a reference image and its
mask."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import torch

from agents.clickers.annotator import check_gt
from agents.clickers.trace import ClickTrace
from segmenter.base import ImageEmbedding, Segmenter, mask_iou

logger = logging.getLogger(__name__)


def grid_to_pixel(embedding: ImageEmbedding, row: int, col: int) -> tuple[float, float]:
    """Centre of embedding-grid cell ``(row, col)`` in original ``(x, y)`` pixels.

    The inverse of :meth:`recalibration.labelers.EpisodeState.grid_cell`, clipped into the
    image (:meth:`segmenter.base.ImageEmbedding.cell_centre`, the rule the environment uses).
    """
    return embedding.cell_centre(row, col)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


class OneShotSimilarity:
    """PerSAM-style one-shot prompting: similarity points from a target prototype.

    ``fit`` takes the reference embedding's mean feature over the reference mask (coverage-
    weighted on the embedding grid, valid region only, L2-normalised) as the target prototype,
    and the mean over the rest of the valid region as a background prototype. ``run`` computes
    the cosine similarity of every valid embedding position of the new image to the target
    prototype, clicks positive at the ``n_pos`` most similar cells and negative at the ``n_neg``
    least similar ones (cell centres, highest first), and decodes once with multimask output,
    keeping the candidate with the highest predicted IoU.

    This is PerSAM's positive-negative location prior without its target-guided attention,
    target-semantic prompting and cascaded refinement (those change the decoder). With
    ``contrast=True`` positions are ranked by ``cos(f, target) - cos(f, background)`` instead.

    Args:
        segmenter: The frozen segmenter.
        n_pos: Positive points (PerSAM: 1).
        n_neg: Negative points (PerSAM: 1).
        contrast: Rank by similarity to the target minus similarity to the background.
    """

    def __init__(
        self, segmenter: Segmenter, n_pos: int = 1, n_neg: int = 1, contrast: bool = False
    ) -> None:
        if n_pos < 1 or n_neg < 0:
            raise ValueError(f"need n_pos >= 1 and n_neg >= 0, got {n_pos}, {n_neg}")
        self.segmenter = segmenter
        self.n_pos = int(n_pos)
        self.n_neg = int(n_neg)
        self.contrast = bool(contrast)
        self.target_feature: torch.Tensor | None = None  # (C,) unit norm
        self.background_feature: torch.Tensor | None = None  # (C,) unit norm
        self.n_references = 0

    @staticmethod
    def prototypes(
        embedding: ImageEmbedding, mask: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm ``(C,)`` target and background prototypes of one reference image.

        Args:
            embedding: Reference embedding, features ``(1, C, He, We)``.
            mask: ``(H, W)`` bool reference mask in original pixels.
        """
        mask = check_gt(mask, embedding)
        if not mask.any():
            raise ValueError("the reference mask is empty: one-shot fitting needs a target")
        grid = embedding.grid_size
        vh, vw = embedding.valid_shape(grid)
        cover = torch.from_numpy(embedding.to_frame(mask, grid)[:vh, :vw]).double()
        feats = embedding.features[0, :, :vh, :vw].detach().to("cpu", torch.float64)
        fg_w, bg_w = cover, 1.0 - cover
        target = (feats * fg_w).sum((1, 2)) / fg_w.sum().clamp_min(1e-12)
        background = (feats * bg_w).sum((1, 2)) / bg_w.sum().clamp_min(1e-12)
        return _unit(target).float(), _unit(background).float()

    def fit(self, ref_embedding: ImageEmbedding, ref_mask: np.ndarray) -> OneShotSimilarity:
        """Set the prototypes from one reference image and its mask (PerSAM's one shot)."""
        self.target_feature, self.background_feature = self.prototypes(ref_embedding, ref_mask)
        self.n_references = 1
        return self

    def fit_many(
        self, references: Iterable[tuple[ImageEmbedding, np.ndarray]]
    ) -> OneShotSimilarity:
        """Average the prototypes of several reference images (e.g. a task's 50 training images).

        Each image's unit-norm prototype counts equally; the mean is re-normalised. This is a
        few-shot extension, not PerSAM's one-shot setting: report it as such.
        """
        targets, backgrounds = [], []
        for emb, mask in references:
            t, b = self.prototypes(emb, mask)
            targets.append(t)
            backgrounds.append(b)
        if not targets:
            raise ValueError("fit_many needs at least one (embedding, mask) pair")
        self.target_feature = _unit(torch.stack(targets).mean(0))
        self.background_feature = _unit(torch.stack(backgrounds).mean(0))
        self.n_references = len(targets)
        return self

    def similarity_map(self, embedding: ImageEmbedding) -> np.ndarray:
        """``(vh, vw)`` ranking map over the valid embedding grid (cosine similarity, or the
        target-minus-background difference with ``contrast``)."""
        if self.target_feature is None or self.background_feature is None:
            raise RuntimeError("call fit() or fit_many() before run()")
        vh, vw = embedding.valid_shape(embedding.grid_size)
        feats = embedding.features[0, :, :vh, :vw].detach().to("cpu", torch.float32)
        if feats.shape[0] != self.target_feature.shape[0]:
            raise ValueError(
                f"embedding has {feats.shape[0]} channels, the prototype "
                f"{self.target_feature.shape[0]}: fit with embeddings of the same segmenter"
            )
        unit = feats / feats.norm(dim=0, keepdim=True).clamp_min(1e-12)
        sim = torch.einsum("c,chw->hw", self.target_feature, unit)
        if self.contrast:
            sim = sim - torch.einsum("c,chw->hw", self.background_feature, unit)
        return sim.numpy()

    def points(self, embedding: ImageEmbedding) -> tuple[np.ndarray, np.ndarray]:
        """``(n_pos + n_neg, 2)`` ``(x, y)`` points and their labels (positives first)."""
        sim = self.similarity_map(embedding)
        order = np.argsort(-sim.reshape(-1), kind="stable")
        n = len(order)
        pos = order[: min(self.n_pos, n)]
        neg = order[::-1][: min(self.n_neg, max(n - len(pos), 0))]
        vw = sim.shape[1]
        pts = [grid_to_pixel(embedding, *divmod(int(c), vw)) for c in (*pos, *neg)]
        labels = [1] * len(pos) + [0] * len(neg)
        return np.asarray(pts, np.float32).reshape(-1, 2), np.asarray(labels, np.int64)

    def run(
        self, embedding: ImageEmbedding, gt: np.ndarray | None = None, sample_id: str = ""
    ) -> ClickTrace:
        """Place the similarity points and decode once.

        Args:
            embedding: Embedding of the target image.
            gt: Optional ``(H, W)`` bool ground truth, for the IoU.
            sample_id: Recorded in the trace.

        Returns:
            The trace (all points decoded together: ``start_clicks == N``).
        """
        t0 = time.perf_counter()
        if gt is not None:
            gt = check_gt(gt, embedding)
        pts, labels = self.points(embedding)
        pred = self.segmenter.decode(embedding, pts, labels, multimask=True)
        best = int(torch.argmax(torch.as_tensor(pred.candidate_scores)))
        mask = self.segmenter.upscale(embedding, pred.candidates[best])
        ious = [mask_iou(mask, gt)] * len(pts) if gt is not None else []
        return ClickTrace(
            sample_id=sample_id,
            points=pts,
            labels=labels,
            ious=ious,
            final_mask=mask,
            decoder_calls=1,
            seconds=time.perf_counter() - t0,
            start_clicks=len(pts),
            info={"references": self.n_references, "contrast": self.contrast},
        )
