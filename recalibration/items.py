"""SRM training items from samples: each image encoded once (through the embedding cache), its
extra feature sources computed while the image is at hand, and, for the explicit branch, its
CLIP semantic map. Shared by training (:mod:`experiments.train`, :mod:`experiments.lookahead`)
and the SRM evaluation (:mod:`recalibration.evaluate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from recalibration.feature_set import FeatureSet
from recalibration.labelers import EpisodeState
from recalibration.srm import SemanticRecalibrationModule, SRMTrainItem
from segmenter.base import Segmenter
from segmenter.cache import EmbeddingCache
from segmenter.memory import trim_heap

__all__ = ["attach_semantic_maps", "collect_items"]


def collect_items(
    samples: Sequence[Any],
    segmenter: Segmenter,
    cache: EmbeddingCache | None = None,
    *,
    progress: bool = True,
    desc: str = "embeddings",
    features: FeatureSet | None = None,
    keep_features: bool = True,
) -> list[SRMTrainItem]:
    """``(embedding, ground truth, None)`` for every sample (embeddings through ``cache``).

    Args:
        samples: Objects with ``mask`` (``(H, W)`` bool) and ``load_image()``.
        segmenter: The frozen segmenter.
        cache: Embedding cache (recommended: encoding is the expensive step).
        progress: show progress (segmenter.progress).
        desc: Progress-bar label.
        features: The SRM's feature sources: their stacked features are computed while the
            images are at hand and kept (float16) in ``emb.extras["srm_features"]``.
        keep_features: ``False``: the features are computed and stored in the feature set's
            cache only, and read back from there when the SRM needs them (the same float16
            values; ~13.5 MiB less memory per image for the shipped feature sources, at the
            price of a disk read per use). Needs the feature set to have a cache.
    """
    from segmenter.progress import progress_bar

    items: list[SRMTrainItem] = []
    for s in progress_bar(samples, desc=f"{desc} images", unit="img", disable=not progress):
        image = s.load_image()
        extra = features is not None and not features.sam_only
        if extra:  # the encoder's stages, when a source needs them, from the same pass
            emb = features.embed(image, cache)
        elif cache is not None:
            emb = cache.get_or_encode(segmenter, image)
        else:
            emb = segmenter.encode(image)
        emb.features = emb.features.detach().to("cpu", torch.float32)
        if extra:
            if keep_features or features.cache is None:
                emb.extras["srm_features"] = features(emb, lambda image=image: image).half()
            else:
                features.prepare(image, emb)
        emb.extras.pop("stages", None)  # cached or folded into srm_features by now
        items.append((emb, np.asarray(s.mask, bool), None))
        # the stages and decoded features were short-lived and the embedding stays: give the
        # freed pages back, or the heap keeps a hole per image (segmenter.memory)
        trim_heap()
    return items


def attach_semantic_maps(
    srm: SemanticRecalibrationModule,
    items: Sequence[SRMTrainItem],
    samples: Sequence[Any],
    *,
    progress: bool = True,
) -> list[SRMTrainItem]:
    """Items with the explicit SRM's CLIP map of each sample as third element (memoised in
    the module, so the environment reuses them); items unchanged for the implicit branch."""
    if srm.branch != "explicit":
        return list(items)
    from segmenter.progress import progress_bar

    out: list[SRMTrainItem] = []
    pairs = list(zip(items, samples, strict=True))
    for (emb, gt, _), s in progress_bar(pairs, desc="CLIP maps", unit="img", disable=not progress):
        he, we = emb.grid_size
        state = EpisodeState(
            str(s.id), emb, np.zeros((he, we), np.float32), load_image=s.load_image
        )
        out.append((emb, gt, srm.semantic_map(state)))
    return out
