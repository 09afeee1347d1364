"""The SRM's training loss and the valid-cell mask of an embedding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segmenter.base import ImageEmbedding

__all__ = ["dice_bce_loss", "valid_mask"]


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """Soft Dice + BCE over the valid (non-padding) cells, averaged over the batch.

    Args:
        logits: ``(B, 1, H, W)`` logits.
        target: ``(B, 1, H, W)`` ground-truth coverage in ``[0, 1]``.
        valid: ``(B, 1, H, W)`` 1 on cells that cover the image, 0 on padding.
        dice_weight: Weight of the Dice term (BCE has weight 1).

    Returns:
        Scalar loss.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    n_valid = valid.sum(dim=(1, 2, 3)).clamp_min(1.0)
    bce = ((bce * valid).sum(dim=(1, 2, 3)) / n_valid).mean()
    if dice_weight == 0:
        return bce
    prob = torch.sigmoid(logits) * valid
    tgt = target * valid
    inter = (prob * tgt).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + tgt.sum(dim=(1, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return bce + dice_weight * dice.mean()


def valid_mask(emb: ImageEmbedding) -> np.ndarray:
    """``(He, We)`` float32: 1 on cells covering the image, 0 on padding."""
    he, we = emb.grid_size
    vh, vw = emb.valid_shape((he, we))
    valid = np.zeros((he, we), np.float32)
    valid[:vh, :vw] = 1.0
    return valid
