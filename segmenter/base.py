"""The segmenter contract: encode an image once, decode many prompt sets against it.

Coordinates follow SAM's predictor: points are ``N x 2`` arrays of ``(x, y)`` pixel
coordinates in the *original* image, labels are ``1`` (foreground) or ``0`` (background).
Low-resolution logits live in the decoder's frame: a square of side ``4 x`` the embedding
grid (256 x 256 for SAM-family models) that covers the image resized so that its longest
side equals the encoder input size, padded at the bottom and right.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from segmenter.geometry import embedding_cell_at, embedding_cell_centre


class SegmenterError(RuntimeError):
    """A segmenter could not be built or used; the message says how to fix it."""


@dataclass
class ImageEmbedding:
    """The cached result of encoding one image.

    Attributes:
        features: ``(1, C, He, We)`` image embedding (64 x 64 for SAM-family models).
        original_size: ``(H, W)`` of the image as given to ``encode``.
        input_size: ``(h, w)`` of the image after the longest-side resize (before padding).
        model_id: Identifier of the segmenter (name and checkpoint) that produced it.
        image_hash: Content hash of the RGB pixels, the cache key.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    model_id: str
    image_hash: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(He, We)`` of the embedding grid."""
        return int(self.features.shape[-2]), int(self.features.shape[-1])

    def valid_fraction(self) -> tuple[float, float]:
        """Fraction ``(fy, fx)`` of the padded square frame covered by the image."""
        side = max(self.input_size)
        return self.input_size[0] / side, self.input_size[1] / side

    def valid_shape(self, frame: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns of a ``frame``-sized square map that cover the image (not padding)."""
        fy, fx = self.valid_fraction()
        return max(1, math.ceil(frame[0] * fy)), max(1, math.ceil(frame[1] * fx))

    def cell_centre(self, row: int, col: int) -> tuple[float, float]:
        """Centre of embedding-grid cell ``(row, col)`` in original ``(x, y)`` pixels, clipped
        into the image (:func:`segmenter.geometry.embedding_cell_centre`)."""
        return embedding_cell_centre(
            self.original_size, self.input_size, self.grid_size, row, col
        )

    def cell_at(self, x: float, y: float) -> tuple[int, int]:
        """Embedding-grid ``(row, col)`` holding original pixel ``(x, y)``
        (:func:`segmenter.geometry.embedding_cell_at`)."""
        return embedding_cell_at(self.original_size, self.input_size, self.grid_size, x, y)

    def to_frame(self, mask: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
        """Map an original-size map into the padded square frame of size ``frame``.

        The map is resized to ``input_size`` (as the image was), zero-padded to the encoder's
        square input at the bottom and right, and area-averaged down to ``frame``.

        Args:
            mask: ``(H, W)`` bool or float map in original image pixels.
            frame: ``(Hf, Wf)`` output size (e.g. the 256 x 256 low-res frame or the
                64 x 64 embedding grid).

        Returns:
            ``(Hf, Wf)`` float32 map with values in the input's range, zero over the padding.
        """
        if tuple(mask.shape) != tuple(self.original_size):
            raise ValueError(
                f"map of shape {tuple(mask.shape)} does not match the encoded image size "
                f"{self.original_size}"
            )
        t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        t = F.interpolate(t, size=self.input_size, mode="bilinear", align_corners=False)
        side = max(self.input_size)
        t = F.pad(t, (0, side - self.input_size[1], 0, side - self.input_size[0]))
        return F.adaptive_avg_pool2d(t, frame)[0, 0].numpy()


@dataclass
class Prediction:
    """The decoder's answer to one prompt set.

    Attributes:
        low_res_logits: ``(Hl, Wl)`` float32 logits of the selected mask in the low-res frame.
        score: The decoder's predicted IoU of the selected mask.
        candidates: ``(K, Hl, Wl)`` logits of every returned mask (K = 1 or 3).
        candidate_scores: ``(K,)`` predicted IoUs.
        mask: ``(H, W)`` bool full-resolution mask, present when asked for.
    """

    low_res_logits: torch.Tensor
    score: float
    candidates: torch.Tensor
    candidate_scores: torch.Tensor
    mask: np.ndarray | None = None


@runtime_checkable
class Segmenter(Protocol):
    """A frozen promptable segmenter (SAM family)."""

    model_id: str
    embedding_id: str  # what the encoder computes (the cache key); model_id also names the decoder
    stages_id: str  # the cache key of the encoder's intermediate stages
    device: torch.device

    def encode(self, image: np.ndarray, stages: bool = False) -> ImageEmbedding:
        """Encode an ``(H, W, 3)`` uint8 RGB image once (``stages``: also the encoder's
        intermediate stages, in ``extras["stages"]``)."""
        ...

    def decode(
        self,
        embedding: ImageEmbedding,
        points: np.ndarray,
        labels: np.ndarray,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
        return_full: bool = False,
    ) -> Prediction:
        """Decode one prompt set against a cached embedding (one decoder call)."""
        ...

    def upscale(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> np.ndarray:
        """Turn ``(Hl, Wl)`` low-res logits into an ``(H, W)`` bool mask."""
        ...


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the count (switching
    costs well under a microsecond)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_torch_ops(segmenter: object) -> contextlib.AbstractContextManager[None]:
    """One torch thread for the small torch work around decoder calls (env bookkeeping, SRM
    map, policy forward) when the segmenter decodes outside torch (ONNX Runtime, its own
    thread pool). Torch's OpenMP threads keep spinning for a while after each parallel region
    and take the cores from the decoder call that follows: on 2 cores an env step went from
    1.14-1.17x a bare decoder call to 1.02-1.06x with this. A no-op for torch decoders."""
    if getattr(segmenter, "backend", "torch") == "onnx":
        return torch_threads(1)
    return contextlib.nullcontext()


def mask_iou(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """IoU of two boolean masks of equal shape; 1.0 when both are empty."""
    if isinstance(pred, torch.Tensor):
        pred = pred.cpu().numpy()
    if isinstance(target, torch.Tensor):
        target = target.cpu().numpy()
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {target.shape}")
    inter = np.logical_and(pred, target).sum()
    union = np.logical_or(pred, target).sum()
    return 1.0 if union == 0 else float(inter) / float(union)
