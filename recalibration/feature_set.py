"""A task's stack of feature sources (:mod:`recalibration.features`), as the SRM reads it.

:class:`FeatureSet` stacks the sources channel-wise on the embedding grid, reads each from the
embedding cache (or computes it once and stores it there) and keeps the last few images in
memory. The encoder's stages (``sam_stages``, ``compact:sam_stages``) come from the same
encoder pass as the embedding when the image is encoded now (:meth:`FeatureSet.embed`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from recalibration.features import (
    CompactSource,
    FeatureError,
    FeatureSource,
    SamEmbedding,
    SamStages,
    build_feature_source,
    reads_stages,
)
from segmenter.base import ImageEmbedding
from segmenter.cache import EmbeddingCache
from segmenter.sam import image_hash

__all__ = ["FeatureSet"]


class FeatureSet:
    """The sources a task's SRM reads, stacked channel-wise on the embedding grid.

    Args:
        names: Source names in order (``"sam"`` first in every shipped task).
        segmenter: The frozen segmenter (its grid, frame and, for ``sam_stages``, encoder).
        cache: Embedding cache: every source but ``sam`` is stored there per image.
        keep: Images whose stacked features are kept in memory (by image hash).
        sources: Built sources to use instead of building them from ``names`` (tests).
    """

    def __init__(
        self,
        names: Sequence[str],
        segmenter: Any,
        cache: EmbeddingCache | None = None,
        keep: int = 8,
        sources: Sequence[FeatureSource] | None = None,
    ) -> None:
        self.names = tuple(names)
        if not self.names:
            raise FeatureError("a feature set needs at least one source (e.g. ['sam'])")
        self.segmenter, self.cache, self.keep = segmenter, cache, int(keep)
        self.sources = (
            list(sources)
            if sources is not None
            else [build_feature_source(n, segmenter, cache) for n in self.names]
        )
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def wants_stages(self) -> bool:
        """Whether a source reads the encoder's stages (encode with ``stages=True`` once)."""
        return any(reads_stages(s) for s in self.sources)

    @property
    def keeps_stages(self) -> bool:
        """Whether the full-size stages belong in the cache (a plain ``sam_stages`` source)."""
        return any(isinstance(s, SamStages) for s in self.sources)

    @property
    def sam_only(self) -> bool:
        """Just the segmenter's embedding (the SRM's classic input)."""
        return self.names == ("sam",)

    def embed(self, image: np.ndarray, cache: EmbeddingCache | None = None) -> ImageEmbedding:
        """``image``'s segmenter embedding through ``cache``, with the encoder's stages in
        ``extras["stages"]`` when a source still needs them (one encoder pass for both)."""
        stages = self.wants_stages
        if stages and not self.keeps_stages and cache is not None:  # compact stages cached?
            key = image_hash(image)
            stages = any(
                reads_stages(s) and not cache.has(s.embedding_id, key) for s in self.sources
            )
        if cache is None:
            return self.segmenter.encode(image, stages=stages)
        return cache.get_or_encode(
            self.segmenter, image, stages=stages, store_stages=self.keeps_stages
        )

    def __call__(
        self, embedding: ImageEmbedding, load_image: Callable[[], np.ndarray] | None = None
    ) -> torch.Tensor:
        """``(1, C, He, We)`` float32 features of ``embedding``'s image: the embedding itself
        for ``sam``, the other sources from memory, the cache, the encoder pass that made
        ``embedding`` (its ``extras["stages"]``) or (with ``load_image``) computed now.

        Raises:
            FeatureError: A source's features are neither kept nor cached and there is no way
                to load the image.
        """
        if self.sam_only:
            return embedding.features.float()
        key = embedding.image_hash
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
            return hit
        image: np.ndarray | None = None
        parts = []
        for source in self.sources:
            if isinstance(source, SamEmbedding):
                parts.append(embedding.features[0].float().cpu())
                continue
            feats = None
            if self.cache is not None:
                cached = self.cache.load(source.embedding_id, key)
                feats = None if cached is None else cached.features[0]
            if feats is None and reads_stages(source) and "stages" in embedding.extras:
                feats = self._from_stages(source, embedding)  # encoded in the same pass
            if feats is None:
                if image is None:
                    if load_image is None:
                        raise FeatureError(
                            f"{source.name} features of image {key[:12]} are not cached and "
                            "its pixels are not at hand: compute them first "
                            "(FeatureSet.prepare) or pass load_image"
                        )
                    image = load_image()
                feats = self._compute(source, image)
            parts.append(feats.float().cpu())
        stacked = torch.cat(parts, dim=0)[None]
        self._memory[key] = stacked
        while len(self._memory) > self.keep:
            self._memory.popitem(last=False)
        return stacked

    def _from_stages(self, source: FeatureSource, embedding: ImageEmbedding) -> torch.Tensor:
        stages = embedding.extras["stages"][0]
        if not isinstance(source, CompactSource):
            return stages
        entry = source.wrap(stages, embedding.original_size, embedding.image_hash)
        if self.cache is not None:
            self.cache.store(entry)
        return entry.features[0]

    def _compute(self, source: FeatureSource, image: np.ndarray) -> torch.Tensor:
        if self.cache is not None and not isinstance(source, SamStages):
            emb = self.cache.get_or_encode(source, image)
        else:
            emb = source.encode(image)  # sam_stages goes through the cache itself
        return emb.features[0]

    def prepare(self, image: np.ndarray, embedding: ImageEmbedding | None = None) -> None:
        """Compute (and cache) every source of ``image`` now, e.g. while the images are at
        hand before training; the stages from ``embedding``'s encoder pass when it has them."""
        stages = embedding is not None and "stages" in embedding.extras
        for source in self.sources:
            if isinstance(source, SamEmbedding):
                continue
            if stages and reads_stages(source):
                key = embedding.image_hash
                if self.cache is not None and not self.cache.has(source.embedding_id, key):
                    self._from_stages(source, embedding)  # plain stages are cached by now
                continue
            self._compute(source, image)

    def channels(self, embedding: ImageEmbedding, load_image: Callable[[], np.ndarray]) -> int:
        """Total channels (the first image tells, since ``sam_stages`` learns its count)."""
        return int(self(embedding, load_image).shape[1])

    def describe(self) -> dict[str, Any]:
        """Names and cache ids, for run folders."""
        return {"sources": list(self.names), "ids": [s.embedding_id for s in self.sources]}
