"""SAM's automatic mask generator ("segment everything") with a pick: the training-free
alternative a practitioner would try before a prompt agent.

The stock generator of the segmenter's own package (``mobile_sam`` or ``segment_anything``)
runs unchanged: a grid of single-point prompts, IoU-prediction and stability filtering, NMS. Only
its image encoding is replaced by the cached embedding (:class:`_CachedPredictor`), so it prompts
the same frozen model with the same features as every other method. A final mask is then chosen:

* :func:`pick_by_foreground`: the union of the generated masks whose mean foreground
  probability (the SRM's map, no ground truth) is at least ``threshold``; the single most
  foreground-like mask when none reaches it;
* :func:`pick_oracle`: the generated mask with the best IoU against the ground truth, a ceiling
  of what any pick could reach (it reads the answer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segmenter.base import ImageEmbedding, mask_iou
from segmenter.sam import SamSegmenter

#: SAM's defaults (its paper and ``SamAutomaticMaskGenerator``).
DEFAULT_POINTS_PER_SIDE = 32


def _package(segmenter: SamSegmenter) -> tuple[type, type]:
    """The generator and predictor classes of the package the model comes from."""
    if type(segmenter.model).__module__.startswith("mobile_sam"):
        from mobile_sam import SamAutomaticMaskGenerator, SamPredictor
    else:
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor
    return SamAutomaticMaskGenerator, SamPredictor


def _cached_predictor(base: type, model: Any) -> Any:
    class _CachedPredictor(base):  # type: ignore[misc, valid-type]
        """The package's predictor, with ``set_image`` taking the pending cached embedding."""

        pending: ImageEmbedding | None = None

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            emb = self.pending
            if emb is None or tuple(image.shape[:2]) != tuple(emb.original_size):
                raise ValueError("the cached embedding does not belong to this image")
            self.reset_image()
            self.original_size = tuple(emb.original_size)
            self.input_size = tuple(emb.input_size)
            self.features = emb.features.to(self.device)
            self.is_image_set = True

    return _CachedPredictor(model)


@dataclass
class GeneratedMasks:
    """The generator's masks for one image (largest first) and what they cost."""

    masks: list[np.ndarray]
    predicted_iou: list[float]
    stability: list[float]
    seconds: float
    point_prompts: int
    extras: dict[str, Any] = field(default_factory=dict)


class AutoMaskGenerator:
    """The stock automatic mask generator on cached embeddings (no crops, full image).

    Args:
        segmenter: The frozen segmenter (its torch model runs the batched point grid).
        points_per_side: Point grid side (SAM's default 32, i.e. 1024 single-point prompts).
        points_per_batch: Points per decoder batch (SAM's default 64).
        **kwargs: Further ``SamAutomaticMaskGenerator`` settings (thresholds, NMS...).
    """

    def __init__(
        self,
        segmenter: SamSegmenter,
        points_per_side: int = DEFAULT_POINTS_PER_SIDE,
        points_per_batch: int = 64,
        **kwargs: Any,
    ) -> None:
        generator_cls, predictor_cls = _package(segmenter)
        self.segmenter = segmenter
        self.points_per_side = int(points_per_side)
        self.generator = generator_cls(
            segmenter.model,
            points_per_side=self.points_per_side,
            points_per_batch=points_per_batch,
            output_mode="binary_mask",
            **kwargs,
        )
        self.generator.predictor = _cached_predictor(predictor_cls, segmenter.model)

    def generate(self, image: np.ndarray, embedding: ImageEmbedding) -> GeneratedMasks:
        """All masks of ``image`` (whose cached ``embedding`` is used instead of encoding)."""
        if embedding.model_id != self.segmenter.embedding_id:
            raise ValueError(
                f"embedding of {embedding.model_id!r}, generator on {self.segmenter.embedding_id!r}"
            )
        t0 = time.perf_counter()
        self.generator.predictor.pending = embedding
        try:
            anns = self.generator.generate(image)
        finally:
            self.generator.predictor.pending = None
        anns.sort(key=lambda a: -int(a["area"]))
        return GeneratedMasks(
            masks=[np.asarray(a["segmentation"], bool) for a in anns],
            predicted_iou=[float(a["predicted_iou"]) for a in anns],
            stability=[float(a["stability_score"]) for a in anns],
            seconds=time.perf_counter() - t0,
            point_prompts=self.points_per_side**2,
        )


def mask_foreground_scores(
    masks: list[np.ndarray], foreground: np.ndarray, embedding: ImageEmbedding
) -> np.ndarray:
    """Mean of the ``(He, We)`` ``foreground`` probability map inside each mask (area-weighted
    on the embedding grid)."""
    out = np.zeros(len(masks), np.float64)
    for i, m in enumerate(masks):
        cover = embedding.to_frame(m.astype(np.float32), foreground.shape)
        total = float(cover.sum())
        out[i] = float((cover * foreground).sum()) / total if total > 0 else 0.0
    return out


def pick_by_foreground(
    gen: GeneratedMasks,
    foreground: np.ndarray,
    embedding: ImageEmbedding,
    threshold: float = 0.5,
) -> tuple[np.ndarray, list[int]]:
    """Union of the masks whose mean foreground probability is ``>= threshold`` (or the single
    best-scoring mask when none is); an empty mask when nothing was generated. Returns the mask
    and the indices used."""
    h, w = embedding.original_size
    if not gen.masks:
        return np.zeros((h, w), bool), []
    scores = mask_foreground_scores(gen.masks, foreground, embedding)
    keep = [int(i) for i in np.flatnonzero(scores >= threshold)] or [int(np.argmax(scores))]
    return np.logical_or.reduce([gen.masks[i] for i in keep]), keep


def pick_oracle(gen: GeneratedMasks, gt: np.ndarray) -> tuple[np.ndarray, int | None]:
    """The generated mask closest to the ground truth (a ceiling: it reads the answer)."""
    if not gen.masks:
        return np.zeros(gt.shape, bool), None
    ious = [mask_iou(m, gt) for m in gen.masks]
    best = int(np.argmax(ious))
    return gen.masks[best], best


#: (predicted-IoU, stability) filter pairs tried on ``val`` by :func:`choose_thresholds`; the
#: first is SAM's default.
THRESHOLD_GRID: tuple[tuple[float, float], ...] = (
    (0.88, 0.95),
    (0.88, 0.85),
    (0.75, 0.9),
    (0.75, 0.8),
    (0.6, 0.8),
    (0.5, 0.6),
)


def filtered(gen: GeneratedMasks, iou_thresh: float, stability_thresh: float) -> GeneratedMasks:
    """The masks of an unfiltered generation that pass the generator's two filters."""
    keep = [
        i
        for i in range(len(gen.masks))
        if gen.predicted_iou[i] >= iou_thresh and gen.stability[i] >= stability_thresh
    ]
    return GeneratedMasks(
        masks=[gen.masks[i] for i in keep],
        predicted_iou=[gen.predicted_iou[i] for i in keep],
        stability=[gen.stability[i] for i in keep],
        seconds=gen.seconds,
        point_prompts=gen.point_prompts,
    )


def choose_thresholds(
    generations: list[GeneratedMasks],
    foregrounds: list[np.ndarray],
    embeddings: list[ImageEmbedding],
    gts: list[np.ndarray],
    grid: tuple[tuple[float, float], ...] = THRESHOLD_GRID,
) -> tuple[tuple[float, float], dict[str, float]]:
    """The filter pair whose SRM pick has the best mean IoU on held-out images (``val``), from
    unfiltered generations (``pred_iou_thresh=0, stability_score_thresh=0``) filtered after
    the fact. SAM's defaults suit natural images; a domain such as endoscopy may need looser
    ones. Returns the pair and every pair's score."""
    scores: dict[str, float] = {}
    for iou_t, stab_t in grid:
        ious = []
        for gen, fg, emb, gt in zip(generations, foregrounds, embeddings, gts, strict=True):
            mask, _ = pick_by_foreground(filtered(gen, iou_t, stab_t), fg, emb)
            ious.append(mask_iou(mask, gt))
        scores[f"{iou_t}/{stab_t}"] = float(np.mean(ious))
    best = max(grid, key=lambda p: scores[f"{p[0]}/{p[1]}"])
    return best, scores
