"""The SRM's heads: the implicit conv head and the explicit (CLIP-state + attention) head, with
the fused first layer that makes a new mask state cheap, and the dihedral transforms of
test-time augmentation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TTA_TRANSFORMS", "ExplicitHead", "ImplicitHead", "dihedral", "undihedral"]


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


def _conv_block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(_groups(cout), cout),
        nn.ReLU(inplace=True),
    )


class _StateStem(nn.Module):
    """First 1x1 convolution of the state ``concat(E, E*M, M[, E*S, S])``, evaluated cheaply.

    ``W [E, E*M, M] + b = (W_a E + b) + M * (W_b E + w_c)``: the two image-only terms are
    computed by :meth:`project` (cacheable per image) and combined with the maps by
    :meth:`combine`, so a new mask costs one product and one sum per map.

    Args:
        embed_channels: C of the embedding.
        hidden: Output channels.
        input_mode: ``paper`` drops the ``E`` and ``M`` terms (state ``E * M`` only).
        maps: Names of the per-pixel maps multiplied with ``E`` (``("mask",)`` or
            ``("mask", "semantic")``).
    """

    def __init__(
        self, embed_channels: int, hidden: int, input_mode: str, maps: tuple[str, ...]
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.full = input_mode == "full"
        self.n_maps = len(maps)
        n_proj = self.n_maps + (1 if self.full else 0)
        self.proj = nn.Conv2d(embed_channels, hidden * n_proj, 1, bias=False)
        self.map_weight = nn.Parameter(torch.zeros(self.n_maps, hidden)) if self.full else None
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.norm = nn.GroupNorm(_groups(hidden), hidden)

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` normalised embedding -> ``(B, (1 + n_maps) * hidden, H, W)``: the
        constant term and one factor per map (:meth:`combine`)."""
        parts = self.proj(e).split(self.hidden, dim=1)
        bias = self.bias.view(1, -1, 1, 1)
        if self.full:
            weights = self.map_weight.view(self.n_maps, 1, -1, 1, 1)
            terms = [parts[0] + bias, *(parts[1 + i] + weights[i] for i in range(self.n_maps))]
        else:
            terms = [bias.expand_as(parts[0]), *parts]
        return torch.cat(terms, dim=1)

    def combine(self, proj: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Hidden state from :meth:`project`'s output and the ``(B, n_maps, H, W)`` maps."""
        return self.combine_parts(proj.split(self.hidden, dim=1), maps)

    def combine_parts(self, parts: Sequence[torch.Tensor], maps: torch.Tensor) -> torch.Tensor:
        """:meth:`combine` with the projection already split into its ``1 + n_maps`` parts."""
        x = parts[0]
        for i in range(self.n_maps):
            x = x + maps[:, i : i + 1] * parts[1 + i]
        return F.relu(self.norm(x))


class _ContextBranch(nn.Module):
    """Residual coarse-context path: average-pool by ``factor``, two 3x3 blocks, upsample, add.

    On a 64 x 64 grid with ``factor=4`` it sees ~40 x 40 cells (a polyp and its surroundings)
    for a sixteenth of the cost of a full-resolution block.
    """

    def __init__(self, hidden: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv1 = _conv_block(hidden, hidden)
        self.conv2 = _conv_block(hidden, hidden, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = F.avg_pool2d(x, self.factor, ceil_mode=True)
        y = self.conv2(self.conv1(y))
        return x + F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


class ImplicitHead(nn.Module):
    """Implicit SRM head: state -> two conv blocks (conv3x3-GN-ReLU) -> 1x1 conv -> logits.

    The state enters through the fused 1x1 stem (:class:`_StateStem`); optionally a coarse
    context path (pooled by ``context``) is added to the output of the first block.

    Args:
        embed_channels: C of the embedding.
        hidden: Hidden channels.
        input_mode: ``paper`` (``E*M``) or ``full`` (``concat(E, E*M, M)``).
        dropout: Channel dropout after the stem and the first block while training.
        dilation: Dilation of the second 3x3 convolution.
        context: Pooling factor of the context path; 0 disables it (the paper's plain head).
    """

    maps: tuple[str, ...] = ("mask",)

    def __init__(
        self,
        embed_channels: int,
        hidden: int = 64,
        input_mode: str = "full",
        dropout: float = 0.0,
        dilation: int = 1,
        context: int = 0,
    ) -> None:
        super().__init__()
        self.stem = _StateStem(embed_channels, hidden, input_mode, self.maps)
        self.block1 = _conv_block(hidden, hidden)
        self.context = _ContextBranch(hidden, context) if context > 0 else nn.Identity()
        self.block2 = _conv_block(hidden, hidden, dilation)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Conv2d(hidden, 1, 1)

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """Image-only part of the first layer (cache it while the weights do not change)."""
        return self.stem.project(e)

    def forward_projected(self, proj: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H, W)`` from cached projections and ``(B, 1, H, W)`` mask maps."""
        return self.forward_parts(proj.split(self.stem.hidden, dim=1), maps)

    def forward_parts(self, parts: Sequence[torch.Tensor], maps: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_projected` with the projections split into their parts."""
        x = self.drop(self.stem.combine_parts(parts, maps))
        x = self.context(self.drop(self.block1(x)))
        x = self.block2(x)
        return self.out(x)

    def forward(self, e: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H, W)`` from the ``(B, C, H, W)`` normalised embedding and maps."""
        return self.forward_projected(self.project(e), maps)


class ExplicitHead(nn.Module):
    """Explicit SRM head: fuse ``s_c = E*S`` and ``s_t``, attend, decode.

    Three conv layers (the fused 1x1 stem over ``[E, E*M, M, E*S, S]`` and two 3x3 blocks), one
    multi-head self-attention layer over the tokens of the hidden map average-pooled to an
    ``attn_grid x attn_grid`` grid (with a learned positional embedding; its output is upsampled
    and added back), then two conv layers (3x3 block, 1x1 to logits).

    Args:
        embed_channels: C of the embedding.
        hidden: Hidden channels (divisible by ``heads``).
        input_mode: ``paper`` (``E*M`` and ``E*S`` only) or ``full`` (also ``E``, ``M``, ``S``).
        dropout: Channel dropout while training.
        attn_grid: Side of the pooled token grid.
        heads: Attention heads.
    """

    maps: tuple[str, ...] = ("mask", "semantic")

    def __init__(
        self,
        embed_channels: int,
        hidden: int = 64,
        input_mode: str = "full",
        dropout: float = 0.0,
        attn_grid: int = 16,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by attn_heads ({heads})")
        self.attn_grid = attn_grid
        self.stem = _StateStem(embed_channels, hidden, input_mode, self.maps)
        self.fuse1 = _conv_block(hidden, hidden)
        self.fuse2 = _conv_block(hidden, hidden)
        self.pos = nn.Parameter(torch.zeros(1, attn_grid * attn_grid, hidden))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.attn_norm = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.dec1 = _conv_block(hidden, hidden)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Conv2d(hidden, 1, 1)

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """Image-only part of the first layer (cache it while the weights do not change)."""
        return self.stem.project(e)

    def forward_projected(self, proj: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H, W)`` from projections and ``(B, 2, H, W)`` (mask, semantic) maps."""
        x = self.drop(self.stem.combine(proj, maps))
        x = self.fuse2(self.drop(self.fuse1(x)))
        b, c, h, w = x.shape
        g = min(self.attn_grid, h, w)
        tokens = F.adaptive_avg_pool2d(x, g).flatten(2).transpose(1, 2)  # (B, g*g, c)
        pos = self.pos
        if g != self.attn_grid:
            pos = self.pos.transpose(1, 2).reshape(1, c, self.attn_grid, self.attn_grid)
            pos = F.adaptive_avg_pool2d(pos, g).flatten(2).transpose(1, 2)
        t = self.attn_norm(tokens + pos)
        att, _ = self.attn(t, t, t, need_weights=False)
        att = att.transpose(1, 2).reshape(b, c, g, g)
        x = x + F.interpolate(att, size=(h, w), mode="bilinear", align_corners=False)
        x = self.dec1(self.drop(x))
        return self.out(x)

    def forward(self, e: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H, W)`` from the normalised embedding and ``(B, 2, H, W)`` maps."""
        return self.forward_projected(self.project(e), maps)


def dihedral(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate the last two dims by ``k`` quarter turns, then optionally flip left-right."""
    if k:
        t = torch.rot90(t, k, dims=(-2, -1))
    if flip:
        t = torch.flip(t, dims=(-1,))
    return t


def undihedral(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Inverse of :func:`dihedral`."""
    if flip:
        t = torch.flip(t, dims=(-1,))
    if k:
        t = torch.rot90(t, -k, dims=(-2, -1))
    return t


#: Dihedral transforms of test-time augmentation, in order of use (identity first).
TTA_TRANSFORMS: tuple[tuple[int, bool], ...] = (
    (0, False),
    (0, True),
    (2, False),
    (2, True),
    (1, False),
    (1, True),
    (3, False),
    (3, True),
)
