"""Frozen SAM-family segmenters: encode an image once, decode many prompt sets."""

from segmenter.base import ImageEmbedding, Prediction, Segmenter, SegmenterError, mask_iou
from segmenter.cache import EmbeddingCache
from segmenter.registry import build_segmenter, segmenter_registry
from segmenter.sam import SamSegmenter

__all__ = [
    "EmbeddingCache",
    "ImageEmbedding",
    "Prediction",
    "SamSegmenter",
    "Segmenter",
    "SegmenterError",
    "build_segmenter",
    "mask_iou",
    "segmenter_registry",
]
