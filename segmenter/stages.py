"""The image encoder's intermediate stages, captured in the same pass as its embedding.

The neck's 256-channel embedding is what the mask decoder needs; the encoder's own stages hold
more about what the image shows (on Kvasir-SEG an SRM head on MobileSAM's TinyViT stages labels
cells better than one on the neck: see docs/results.md). They cost nothing extra at encode
time, so :class:`EncoderWithStages` returns both from one forward pass, the stages pooled (or
reshaped) to the embedding grid:

* TinyViT (MobileSAM): the output of each of its four layers (128 + 160 + 320 + 320 channels;
  the first is area-pooled from 128 x 128 to 64 x 64);
* SAM's ViT: the output of each global-attention block (or of the last block when it has none).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EncoderWithStages"]


def _is_tiny_vit(encoder: nn.Module) -> bool:
    return hasattr(encoder, "layers") and hasattr(encoder, "patch_embed") and hasattr(
        encoder, "neck"
    )


def _to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` or ``(B, L, C)`` tokens -> ``(B, C, He, We)`` on the embedding grid."""
    if x.dim() == 3:  # TinyViT tokens (static shapes: a plain int also when exported)
        side = math.isqrt(int(x.shape[1]))
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    if tuple(x.shape[-2:]) != tuple(grid):
        x = F.adaptive_avg_pool2d(x, grid)
    return x


class EncoderWithStages(nn.Module):
    """``image_encoder`` returning ``(embedding, stages)``: the usual ``(B, C, He, We)``
    embedding and ``(B, Cs, He, We)`` the intermediate stages concatenated on its grid.

    Args:
        encoder: SAM's ``ImageEncoderViT`` or MobileSAM's ``TinyViT``.
        grid: ``(He, We)`` of the embedding.
    """

    def __init__(self, encoder: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.grid = tuple(int(v) for v in grid)
        self.tiny_vit = _is_tiny_vit(encoder)
        if not self.tiny_vit and not hasattr(encoder, "blocks"):
            raise TypeError(f"no stages known for encoder {type(encoder).__name__}")
        if not self.tiny_vit:  # the global-attention blocks (window_size 0)
            kept = [i for i, b in enumerate(encoder.blocks) if getattr(b, "window_size", 0) == 0]
            self.kept = tuple(kept or (len(encoder.blocks) - 1,))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        stages = []
        if self.tiny_vit:
            x = enc.patch_embed(x)
            for layer in enc.layers:
                x = layer(x)
                stages.append(_to_grid(x, self.grid))
            b, _, c = x.size()
            x = x.view(b, self.grid[0], self.grid[1], c).permute(0, 3, 1, 2)
            return enc.neck(x), torch.cat(stages, dim=1)
        x = enc.patch_embed(x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for i, blk in enumerate(enc.blocks):
            x = blk(x)
            if i in self.kept:
                stages.append(_to_grid(x.permute(0, 3, 1, 2), self.grid))
        return enc.neck(x.permute(0, 3, 1, 2)), torch.cat(stages, dim=1)
