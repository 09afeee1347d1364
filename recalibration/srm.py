"""Semantic Recalibration Module (SRM): the learned labeler that decides each click's label.

The SRM predicts a foreground-probability map on the segmenter's embedding grid; the label of a
click is read from that map (``1`` when ``p >= threshold``). Two branches, as in AlignSAM:

* **implicit** (abstract targets: polyps, saliency, blur, glass): conv blocks on the state.
* **explicit** (nameable targets: "car", "shadow"): conv layers fusing the semantic state
  ``s_c = E * S`` (``S`` a CLIP-Surgery text similarity map) with ``s_t``, one self-attention
  layer over a pooled token grid, and two conv layers.

State. The paper's state is ``s_t = E * M`` (embedding times previous mask probability). With
``input_mode="paper"`` the head sees exactly that; with ``input_mode="full"`` (the default) it
sees ``concat(E, E * M, M)``. The paper's state is all zeros before the first decode, which is
exactly when the evaluation start (the SRM's most and least confident cells) is chosen, and it
hides everything outside the current mask; ``full`` keeps the image visible while still letting
the head use the segmenter's current mask.

Cost. The first layer of every head is a 1x1 convolution of the state. Because ``M`` (and
``S``) are per-pixel scalars, ``W [E, E*M, M] = (W_a E) + M (W_b E) + w_c M``: the heavy
``C -> hidden`` projections of the frozen embedding depend on the image only and are cached
between steps until the weights change, so a step costs a few small convolutions on the
``He x We`` grid whatever ``C`` is.

Training. :meth:`SemanticRecalibrationModule.pretrain` fits the head offline on a few labelled
images (Dice + BCE against the ground truth on the grid, padding excluded) under realistic mask
states, with joint flip/rotation augmentation and early stopping on a validation set, then fits a
temperature/bias calibration of the logits on the validation set. During RL training episodes
(ground truth present) :meth:`after_step` takes ``q_steps`` optimizer steps on the current state
(Q = 1 implicit, 5 explicit in the paper).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recalibration.clip_surgery import ClipLoadError, ClipSpec, ClipSurgery
from recalibration.labelers import EpisodeState, Labeler
from segmenter.base import ImageEmbedding, Segmenter
from segmenter.geometry import action_centres, value_at
from segmenter.io import atomic_write
from segmenter.session import PromptSession

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "ExplicitHead",
    "ImplicitHead",
    "SRMConfig",
    "SRMLoadError",
    "SRMTrainItem",
    "SemanticRecalibrationModule",
    "dice_bce_loss",
    "simulate_mask_states",
]

#: Version of the file written by :meth:`SemanticRecalibrationModule.save`.
FORMAT_VERSION = 1
_FORMAT_NAME = "alignsam-srm"
#: Config fields that define the weights (cannot differ between a file and a module).
_WEIGHT_KEYS = (
    "hidden",
    "input_mode",
    "normalize",
    "dilation",
    "context",
    "attn_grid",
    "attn_heads",
)
_EPS = 1e-6

#: One pretraining / evaluation item: embedding, ``(H, W)`` ground truth, optional ``(He, We)``
#: semantic map (explicit branch).
SRMTrainItem = tuple[ImageEmbedding, np.ndarray, "np.ndarray | None"]


class SRMLoadError(RuntimeError):
    """An SRM file cannot be loaded (corrupt, not an SRM, or incompatible); says what to do."""


@dataclass
class SRMConfig:
    """Settings of the semantic recalibration module.

    Attributes:
        branch: ``implicit`` (conv blocks) or ``explicit`` (CLIP semantic state + attention).
        hidden: Channels of the hidden layers.
        lr: Adam learning rate of the online updates (and the default for :meth:`pretrain`).
        q_steps: Optimizer steps after each action; ``None``: 1 implicit / 5 explicit (paper).
        online: Update online during RL when the episode has ground truth.
        threshold: A click is labelled foreground when its calibrated probability is ``>=`` this.
        input_mode: ``paper``: ``s_t = E * M`` only; ``full``: ``concat(E, E * M, M)``.
        text: Explicit branch: the target name, e.g. ``"car"``.
        clip: Explicit branch: which CLIP to build when none is passed to the module.
        allow_implicit_fallback: Explicit branch without a usable CLIP: run the implicit branch
            (with a loud warning) instead of raising.
        normalize: Standardisation of the embedding channels before the head: ``dataset``
            (per-channel mean/std of the pretraining images, stored with the weights),
            ``image`` (per image and channel, over the image's valid cells) or ``none``.
        weight_decay: Decoupled weight decay (AdamW) of pretraining and online updates.
        dropout: Channel dropout on the hidden features while training (0 disables).
        dilation: Dilation of the second 3x3 convolution (1 = the plain paper head; 2 widens the
            receptive field from 5x5 to 7x7 cells at no cost).
        context: Implicit branch: pooling factor of an added coarse-context path (0 = none).
        tta: Test-time augmentation: predictions are averaged over this many rotations / flips
            of the state (1 = off, 2 = with the left-right flip, up to 8); costs ``tta`` times
            the head. Calibration is fitted with the value set at pretraining time.
        dice_weight: Weight of the Dice term (BCE has weight 1).
        attn_grid: Explicit branch: side of the pooled token grid of the self-attention layer.
        attn_heads: Explicit branch: attention heads.
    """

    branch: Literal["implicit", "explicit"] = "implicit"
    hidden: int = 64
    lr: float = 1e-3
    q_steps: int | None = None
    online: bool = True
    threshold: float = 0.5
    input_mode: Literal["paper", "full"] = "full"
    text: str | None = None
    clip: ClipSpec | None = None
    allow_implicit_fallback: bool = False
    normalize: Literal["dataset", "image", "none"] = "dataset"
    weight_decay: float = 1e-2
    dropout: float = 0.1
    dilation: int = 2
    context: int = 0
    tta: int = 1
    dice_weight: float = 0.5
    attn_grid: int = 16
    attn_heads: int = 4

    def __post_init__(self) -> None:
        if self.branch not in ("implicit", "explicit"):
            raise ValueError(f"branch must be 'implicit' or 'explicit', got {self.branch!r}")
        if self.input_mode not in ("paper", "full"):
            raise ValueError(f"input_mode must be 'paper' or 'full', got {self.input_mode!r}")
        if self.normalize not in ("dataset", "image", "none"):
            raise ValueError(
                f"normalize must be 'dataset', 'image' or 'none', got {self.normalize!r}"
            )
        if self.hidden < 4 or self.hidden % 4:
            raise ValueError(f"hidden must be a positive multiple of 4, got {self.hidden}")
        if not 1 <= self.tta <= 8:
            raise ValueError(f"tta must lie in [1, 8], got {self.tta}")
        if self.q_steps is not None and self.q_steps < 0:
            raise ValueError(f"q_steps must be >= 0 or None, got {self.q_steps}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if isinstance(self.clip, dict):  # from a saved file
            self.clip = ClipSpec(**self.clip)
        if self.branch == "explicit" and (self.text is None or not str(self.text).strip()):
            raise ValueError(
                "the explicit SRM branch needs a non-empty target name: SRMConfig(text='car')"
            )

    @property
    def effective_q_steps(self) -> int:
        """Optimizer steps per action (the paper's Q: 1 implicit, 5 explicit)."""
        if self.q_steps is not None:
            return self.q_steps
        return 5 if self.branch == "explicit" else 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``clip`` as a dict with a string path)."""
        out = asdict(self)
        if self.clip is not None:
            clip = asdict(self.clip)
            clip["weights"] = None if clip["weights"] is None else str(clip["weights"])
            out["clip"] = clip
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SRMConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored with a warning."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown SRM config keys %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})


# ------------------------------------------------------------------------------------------------
# Heads
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Losses and helpers
# ------------------------------------------------------------------------------------------------


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


def _valid_mask(emb: ImageEmbedding) -> np.ndarray:
    """``(He, We)`` float32: 1 on cells covering the image, 0 on padding."""
    he, we = emb.grid_size
    vh, vw = emb.valid_shape((he, we))
    valid = np.zeros((he, we), np.float32)
    valid[:vh, :vw] = 1.0
    return valid


def _dihedral(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate the last two dims by ``k`` quarter turns, then optionally flip left-right."""
    if k:
        t = torch.rot90(t, k, dims=(-2, -1))
    if flip:
        t = torch.flip(t, dims=(-1,))
    return t


def _undihedral(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Inverse of :func:`_dihedral`."""
    if flip:
        t = torch.flip(t, dims=(-1,))
    if k:
        t = torch.rot90(t, -k, dims=(-2, -1))
    return t


#: Dihedral transforms of test-time augmentation, in order of use (identity first).
_TTA_TRANSFORMS: tuple[tuple[int, bool], ...] = (
    (0, False),
    (0, True),
    (2, False),
    (2, True),
    (1, False),
    (1, True),
    (3, False),
    (3, True),
)


def _binary_morph(mask: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    """Square dilation/erosion of a ``(H, W)`` float map (by max-pooling)."""
    t = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    k = 2 * radius + 1
    if dilate:
        out = F.max_pool2d(t, k, stride=1, padding=radius)
    else:
        out = -F.max_pool2d(-t, k, stride=1, padding=radius)
    return out[0, 0].numpy()


def synthetic_mask_state(
    gt_grid: np.ndarray, valid: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A plausible "current mask" probability map made from the ground truth, cheaply.

    One of: zeros (before the first decode), the ground truth eroded or dilated by 1-3 cells,
    the ground truth with a random blob added or removed, or a blurred copy. Used alongside
    decoder masks so the head does not learn to trust the mask blindly.

    Args:
        gt_grid: ``(He, We)`` ground-truth coverage.
        valid: ``(He, We)`` valid-cell mask.
        rng: Random generator.

    Returns:
        ``(He, We)`` float32 map in ``[0, 1]``, zero on padding.
    """
    kind = rng.integers(5)
    he, we = gt_grid.shape
    m = (gt_grid > 0.5).astype(np.float32)
    if kind == 0:
        out = np.zeros_like(m)
    elif kind == 1:
        out = _binary_morph(m, int(rng.integers(1, 4)), dilate=bool(rng.integers(2)))
    elif kind == 2:
        yy, xx = np.mgrid[:he, :we]
        cy, cx = rng.uniform(0, he), rng.uniform(0, we)
        r = rng.uniform(2, max(3.0, he / 6))
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
        out = np.where(blob, float(rng.integers(2)), m).astype(np.float32)
    elif kind == 3:
        t = torch.from_numpy(m)[None, None]
        k = int(rng.integers(1, 4)) * 2 + 1
        out = F.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)[0, 0].numpy()
    else:
        out = m.copy()
    # Soften like a sigmoid of decoder logits: values near but not exactly 0 / 1.
    out = np.clip(out * rng.uniform(0.85, 1.0) + rng.uniform(0.0, 0.05), 0.0, 1.0)
    return (out * valid).astype(np.float32)


def simulate_mask_states(
    segmenter: Segmenter,
    emb: ImageEmbedding,
    gt_full: np.ndarray,
    rng: np.random.Generator,
    *,
    episodes: int = 2,
    steps: int = 15,
    grid: int = 10,
    record_at: Sequence[int] = (0, 1, 3, 7, 15),
    label_noise: Sequence[float] = (0.0, 0.15),
    wrong_start: Sequence[bool] = (False,),
    labeler: Callable[[np.ndarray, float, float], int] | None = None,
) -> list[np.ndarray]:
    """Mask states the SRM meets in the environment, made with the real decoder.

    Each episode starts like a training episode of the environment (one random foreground and one
    random background ground-truth pixel), then clicks random unvisited cells of the ``grid x
    grid`` action grid, labelled by the ground truth with each label flipped with probability
    ``label_noise[episode % len(label_noise)]`` (or by ``labeler(mask_prob, x, y)`` when given),
    decoding with the previous logits as mask input as the environment does. Episodes with
    ``wrong_start[episode % len(wrong_start)]`` put the positive start click on a random
    background pixel instead: the state of an evaluation episode whose SRM start was wrong, which
    teaches the head not to copy the mask where the embedding disagrees.

    Args:
        segmenter: The frozen segmenter whose embedding ``emb`` is.
        emb: The image embedding.
        gt_full: ``(H, W)`` bool ground truth.
        rng: Random generator.
        episodes: Episodes per image.
        steps: Clicks per episode after the start.
        grid: Action grid side.
        record_at: Steps (0 = after the start clicks) whose mask states are returned.
        label_noise: Per-episode probability of flipping a click label.
        wrong_start: Per-episode flag: positive start click on the background.
        labeler: Optional label source ``(mask_prob, x, y) -> 0/1`` instead of noisy ground truth.

    Returns:
        List of ``(He, We)`` float32 mask probabilities on the embedding grid.
    """
    gt = np.asarray(gt_full, bool)
    fg, bg = np.argwhere(gt), np.argwhere(~gt)
    if not len(fg) or not len(bg):
        return []
    out: list[np.ndarray] = []
    record = set(record_at)
    centres = action_centres(gt.shape, grid)
    for ep in range(episodes):
        noise = float(label_noise[ep % len(label_noise)]) if len(label_noise) else 0.0
        wrong = bool(wrong_start[ep % len(wrong_start)]) if len(wrong_start) else False
        fy, fx = (bg if wrong else fg)[rng.integers(len(bg) if wrong else len(fg))]
        by, bx = bg[rng.integers(len(bg))]
        points = np.array([[fx + 0.5, fy + 0.5], [bx + 0.5, by + 0.5]], np.float32)
        session = PromptSession(segmenter, emb)
        session.prompt(points, np.array([1, 0], np.int64))
        if 0 in record:
            out.append(session.mask_prob.astype(np.float32))
        cells = rng.permutation(grid * grid)[:steps]
        for t, cell in enumerate(cells, start=1):
            x, y = (float(v) for v in centres[int(cell)])
            if labeler is not None:
                lab = int(labeler(session.mask_prob, x, y))
            else:
                lab = int(value_at(gt, x, y))
                if rng.random() < noise:
                    lab = 1 - lab
            session.click(x, y, lab)
            if t in record:
                out.append(session.mask_prob.astype(np.float32))
    return out


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """Per-image tensors of the training / evaluation sets."""

    features: torch.Tensor  # (C, He, We) raw embedding
    gt_grid: torch.Tensor  # (He, We) coverage
    valid: torch.Tensor  # (He, We)
    semantic: torch.Tensor | None  # (He, We)
    mask_states: list[np.ndarray] = field(default_factory=list)


class SemanticRecalibrationModule(Labeler):
    """The learned labeler of AlignSAM (see the module docstring).

    Args:
        config: :class:`SRMConfig`.
        embed_channels: C of the segmenter's embedding (256 for SAM / MobileSAM).
        device: Torch device of the head.
        clip: A ready :class:`ClipSurgery` for the explicit branch (otherwise built from
            ``config.clip``).

    Raises:
        ValueError: Explicit branch with an empty ``text``.
        ClipLoadError: Explicit branch without a usable CLIP (unless
            ``config.allow_implicit_fallback``, which logs a warning and runs implicit).
    """

    name = "srm"
    uses_ground_truth = False

    def __init__(
        self,
        config: SRMConfig,
        embed_channels: int,
        device: str | torch.device = "cpu",
        clip: ClipSurgery | None = None,
    ) -> None:
        if embed_channels < 1:
            raise ValueError(f"embed_channels must be >= 1, got {embed_channels}")
        self.device = torch.device(device)
        self.embed_channels = int(embed_channels)
        self.clip: ClipSurgery | None = None
        if config.branch == "explicit":
            config, self.clip = self._resolve_clip(config, clip)
        self.config = config
        if config.branch == "explicit":
            self.head: nn.Module = ExplicitHead(
                embed_channels,
                config.hidden,
                config.input_mode,
                config.dropout,
                config.attn_grid,
                config.attn_heads,
            )
        else:
            self.head = ImplicitHead(
                embed_channels,
                config.hidden,
                config.input_mode,
                config.dropout,
                config.dilation,
                config.context,
            )
        self.head.to(self.device)
        # Input standardisation (``normalize="dataset"``) and logit calibration, saved with the
        # weights and never touched by the optimizer.
        self.channel_mean = torch.zeros(embed_channels, device=self.device)
        self.channel_std = torch.ones(embed_channels, device=self.device)
        self.calibration = torch.tensor([1.0, 0.0], device=self.device)  # (scale, bias)
        self.optimizer = self._make_optimizer(config.lr)
        self._version = 0  # bumped whenever the weights change
        self._proj_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._pred_cache: tuple[tuple[Any, ...], np.ndarray] | None = None
        self._semantic: dict[tuple[str, str], np.ndarray] = {}
        self.online_updates = 0
        self._fast_threads = 0  # > 0: run the frozen head through ONNX Runtime (use_fast_head)
        self._fast_head: Any = None

    # -- construction helpers ---------------------------------------------------------------------
    @staticmethod
    def _resolve_clip(
        config: SRMConfig, clip: ClipSurgery | None
    ) -> tuple[SRMConfig, ClipSurgery | None]:
        if config.text is None or not config.text.strip():
            raise ValueError(
                "the explicit SRM branch needs a non-empty target name: SRMConfig(text='car')"
            )
        if clip is not None:
            return config, clip
        try:
            if config.clip is None:
                raise ClipLoadError(
                    "the explicit SRM branch needs a CLIP model: pass clip=ClipSurgery(...) or "
                    "set SRMConfig.clip=ClipSpec(arch='ViT-B-16', pretrained='openai') (or "
                    "weights=/path/to/open_clip_pytorch_model.bin)"
                )
            return config, ClipSurgery(config.clip)
        except ClipLoadError as exc:
            if not config.allow_implicit_fallback:
                raise
            logger.warning(
                "!!! explicit SRM for %r has no usable CLIP (%s); FALLING BACK TO THE IMPLICIT "
                "BRANCH (allow_implicit_fallback=True). Results are NOT those of the explicit "
                "method. !!!",
                config.text,
                exc,
            )
            return replace(config, branch="implicit"), None

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.head.parameters(), lr=lr, weight_decay=self.config.weight_decay
        )

    @property
    def branch(self) -> str:
        """The branch actually running (``implicit`` after a CLIP fallback)."""
        return self.config.branch

    def clear_cache(self) -> None:
        """Forget the cached image projection and prediction: the next :meth:`predict`
        recomputes both (as for a new image)."""
        self._proj_cache = None
        self._pred_cache = None

    def _touch(self) -> None:
        self._version += 1
        self._proj_cache = None
        self._pred_cache = None
        self._fast_head = None  # new weights: re-exported (or found by their hash) on next use

    # -- fast inference ---------------------------------------------------------------------------
    def use_fast_head(self, on: bool = True) -> bool:
        """Run the head through ONNX Runtime while its weights stay fixed (inference).

        With torch, the per-step head runs on one thread beside ONNX Runtime decoder calls
        (:func:`segmenter.base.small_torch_ops`); ONNX Runtime runs it on this process's torch
        thread count (taken now) without spinning threads. The first fast result is checked
        against the torch head; on a mismatch or a failed export the module warns and stays on
        torch. Online updates (:meth:`after_step` with ground truth) switch it off. Only the
        implicit head on the CPU; returns whether the fast head is on.
        """
        self._fast_threads, self._fast_head = 0, None
        if not on:
            return False
        from segmenter import onnx_backend

        if self.branch != "implicit" or self.device.type != "cpu":
            logger.debug("fast SRM head: only the implicit head on the CPU (%s)", self.branch)
            return False
        if not onnx_backend.available():
            return False
        self._fast_threads = torch.get_num_threads()
        return True

    @property
    def fast_head(self) -> bool:
        """Whether the head runs through ONNX Runtime (see :meth:`use_fast_head`)."""
        return self._fast_threads > 0

    def _weights_will_change(self, why: str) -> None:
        """Training: the fast head goes off (its export would be stale after every step)."""
        if self.fast_head:
            logger.info("SRM: %s, fast head off", why)
            self.use_fast_head(False)

    def _fast_off(self, reason: str) -> None:
        logger.warning("SRM: fast head off (%s); using the torch head", reason)
        self.use_fast_head(False)

    def _head_projected(self, proj: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``head.forward_projected`` in eval mode, through ONNX Runtime when it is on."""
        if self._fast_threads > 0 and not self.head.training:
            from recalibration.fast_head import OnnxHead

            if self._fast_head is None:
                self._fast_head = OnnxHead(self.head, self._fast_threads)
            try:
                out = self._fast_head.run(proj, maps)
            except Exception as exc:  # noqa: BLE001 - any export / runtime failure: use torch
                self._fast_off(f"{type(exc).__name__}: {exc}")
            else:
                if self._fast_head.verified:
                    return out
                why = self._fast_head.check(out, self.head.forward_projected(proj, maps))
                if why is None:
                    return out
                self._fast_off(why)
        return self.head.forward_projected(proj, maps)

    # -- tensors ----------------------------------------------------------------------------------
    def _normalize(self, feats: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Standardise ``(B, C, H, W)`` features according to ``config.normalize``."""
        mode = self.config.normalize
        if mode == "dataset":
            return (feats - self.channel_mean.view(1, -1, 1, 1)) / self.channel_std.view(
                1, -1, 1, 1
            )
        if mode == "image":
            if valid is None:
                valid = torch.ones_like(feats[:, :1])
            n = valid.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
            mean = (feats * valid).sum(dim=(2, 3), keepdim=True) / n
            var = (((feats - mean) ** 2) * valid).sum(dim=(2, 3), keepdim=True) / n
            return (feats - mean) / (var + _EPS).sqrt()
        return feats

    def semantic_map(self, state: EpisodeState) -> np.ndarray | None:
        """``(He, We)`` CLIP-Surgery map of ``config.text`` (explicit branch), memoised.

        Returns ``None`` for the implicit branch.

        Raises:
            RuntimeError: Explicit branch, the map is not memoised and the state cannot load
                the image.
        """
        if self.branch != "explicit":
            return None
        key = (state.embedding.image_hash or state.sample_id, str(self.config.text))
        if key not in self._semantic:
            if state.load_image is None:
                raise RuntimeError(
                    f"the explicit SRM needs the image of {state.sample_id!r} for its CLIP map, "
                    "but the episode state has no load_image; pass one or call remember_semantic"
                )
            assert self.clip is not None
            he, we = state.embedding.grid_size
            self._semantic[key] = self.clip.similarity_map(
                state.load_image(), str(self.config.text), out_size=(he, we)
            ).astype(np.float32)
        return self._semantic[key]

    def remember_semantic(self, emb: ImageEmbedding, semantic: np.ndarray) -> None:
        """Store a precomputed ``(He, We)`` semantic map of ``emb``'s image for ``config.text``."""
        self._semantic[(emb.image_hash, str(self.config.text))] = np.asarray(semantic, np.float32)

    def _maps(self, mask: torch.Tensor, semantic: torch.Tensor | None) -> torch.Tensor:
        """``(B, n_maps, H, W)`` from ``(B, H, W)`` mask (and semantic) maps."""
        if self.branch == "explicit":
            if semantic is None:
                raise RuntimeError("the explicit SRM needs a semantic map")
            return torch.stack([mask, semantic], dim=1)
        return mask[:, None]

    def _apply_calibration(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.calibration[0] + self.calibration[1]

    # -- prediction -------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_logits(
        self, state: EpisodeState, semantic: np.ndarray | None = None
    ) -> torch.Tensor:
        """Calibrated ``(He, We)`` logits for the state's embedding and current mask."""
        self.head.eval()
        emb = state.embedding
        key = (id(emb), emb.features.data_ptr(), emb.image_hash, self._version)
        if self._proj_cache is not None and self._proj_cache[0] == key:
            proj = self._proj_cache[1]
        else:
            feats = emb.features.to(self.device, torch.float32)
            valid = torch.from_numpy(_valid_mask(emb)).to(self.device)[None, None]
            proj = self.head.project(self._normalize(feats, valid))
            self._proj_cache = (key, proj)
        mask = torch.as_tensor(np.asarray(state.mask_prob, np.float32), device=self.device)[None]
        sem = None
        if self.branch == "explicit":
            s = semantic if semantic is not None else self.semantic_map(state)
            sem = torch.as_tensor(np.asarray(s, np.float32), device=self.device)[None]
        logits = self._infer(proj, self._maps(mask, sem))
        return self._apply_calibration(logits)[0, 0]

    def _infer(self, proj: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Head logits ``(B, 1, H, W)``, averaged over ``config.tta`` dihedral transforms.

        The 1x1 projection commutes with rotations and flips, so the cached projection is
        transformed instead of the embedding; the transforms run as one batch.
        """
        n = self.config.tta
        if n <= 1:
            return self._head_projected(proj, maps)
        b = proj.shape[0]
        ts = _TTA_TRANSFORMS[:n]
        p = torch.cat([_dihedral(proj, k, f) for k, f in ts])
        m = torch.cat([_dihedral(maps, k, f) for k, f in ts])
        out = self._head_projected(p, m)
        back = [_undihedral(out[i * b : (i + 1) * b], k, f) for i, (k, f) in enumerate(ts)]
        return torch.stack(back).mean(dim=0)

    def predict(self, state: EpisodeState, semantic: np.ndarray | None = None) -> np.ndarray:
        """Foreground probability of every embedding-grid cell.

        Args:
            state: The episode state (embedding, current ``mask_prob``).
            semantic: Optional ``(He, We)`` semantic map overriding the memoised CLIP map.

        Returns:
            ``(He, We)`` float32 calibrated probabilities, 0 on padding cells.
        """
        mp = np.ascontiguousarray(state.mask_prob, np.float32)
        emb = state.embedding
        key = (id(emb), emb.features.data_ptr(), emb.image_hash, self._version, hash(mp.tobytes()))
        if semantic is None and self._pred_cache is not None and self._pred_cache[0] == key:
            return self._pred_cache[1]
        prob = torch.sigmoid(self.predict_logits(state, semantic)).cpu().numpy()
        prob = (prob * _valid_mask(state.embedding)).astype(np.float32)
        if semantic is None:
            self._pred_cache = (key, prob)
        return prob

    # -- Labeler API ------------------------------------------------------------------------------
    def begin(self, state: EpisodeState) -> None:
        """Start of an episode: compute (memoise) the semantic map for the explicit branch."""
        self._pred_cache = None
        if self.branch == "explicit":
            self.semantic_map(state)

    def foreground_map(self, state: EpisodeState) -> np.ndarray:
        """``(He, We)`` calibrated foreground probability (see :meth:`predict`)."""
        return self.predict(state)

    def label(self, state: EpisodeState, x: float, y: float) -> int:
        """1 when the probability of the grid cell holding pixel ``(x, y)`` is ``>= threshold``."""
        row, col = state.grid_cell(x, y)
        return int(self.predict(state)[row, col] >= self.config.threshold)

    def after_step(self, state: EpisodeState) -> dict[str, float]:
        """Online learning: ``q_steps`` optimizer steps of Dice + BCE on the current state.

        Only when ``config.online`` and the episode has ground truth (``state.gt_grid``);
        otherwise nothing happens and an empty dict is returned.

        Returns:
            ``{"loss": mean loss over the steps}`` (before each step), or ``{}``.
        """
        q = self.config.effective_q_steps
        if not self.config.online or state.gt_grid is None or q == 0:
            return {}
        self._weights_will_change("learning online")
        emb = state.embedding
        valid_np = _valid_mask(emb)
        feats = emb.features.to(self.device, torch.float32)
        valid = torch.from_numpy(valid_np).to(self.device)[None, None]
        target = torch.as_tensor(np.asarray(state.gt_grid, np.float32), device=self.device)
        mask = torch.as_tensor(np.asarray(state.mask_prob, np.float32), device=self.device)
        sem = None
        if self.branch == "explicit":
            sem = torch.as_tensor(self.semantic_map(state), device=self.device)[None]
        maps = self._maps(mask[None], sem)
        e = self._normalize(feats, valid)
        losses = []
        self.head.train()
        for _ in range(q):
            logits = self.head(e, maps)
            loss = dice_bce_loss(logits, target[None, None], valid, self.config.dice_weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.head.eval()
        self.online_updates += q
        self._touch()
        return {"loss": float(np.mean(losses))}

    @torch.no_grad()
    def loss(self, state: EpisodeState) -> float:
        """Dice + BCE of the current (uncalibrated) prediction against ``state.gt_grid``."""
        if state.gt_grid is None:
            raise ValueError("loss needs state.gt_grid")
        self.head.eval()
        emb = state.embedding
        valid = torch.from_numpy(_valid_mask(emb)).to(self.device)[None, None]
        e = self._normalize(emb.features.to(self.device, torch.float32), valid)
        mask = torch.as_tensor(np.asarray(state.mask_prob, np.float32), device=self.device)
        sem = None
        if self.branch == "explicit":
            sem = torch.as_tensor(self.semantic_map(state), device=self.device)[None]
        logits = self.head(e, self._maps(mask[None], sem))
        target = torch.as_tensor(np.asarray(state.gt_grid, np.float32), device=self.device)
        return float(dice_bce_loss(logits, target[None, None], valid, self.config.dice_weight))

    # -- offline training -------------------------------------------------------------------------
    def _prepare_items(
        self, items: Sequence[SRMTrainItem], mask_states: Sequence[Sequence[np.ndarray]] | None
    ) -> list[_Prepared]:
        out = []
        for i, item in enumerate(items):
            emb, gt_full, sem = item
            if self.branch == "explicit" and sem is None:
                raise ValueError(
                    f"item {i}: the explicit SRM needs a semantic map per item (third element)"
                )
            if emb.features.shape[1] != self.embed_channels:
                raise ValueError(
                    f"item {i}: embedding has {emb.features.shape[1]} channels, the SRM expects "
                    f"{self.embed_channels}"
                )
            gt_grid = emb.to_frame(np.asarray(gt_full, np.float32), emb.grid_size)
            out.append(
                _Prepared(
                    features=emb.features[0].detach().to("cpu", torch.float32),
                    gt_grid=torch.from_numpy(gt_grid),
                    valid=torch.from_numpy(_valid_mask(emb)),
                    semantic=None if sem is None else torch.from_numpy(np.asarray(sem, np.float32)),
                    mask_states=list(mask_states[i]) if mask_states is not None else [],
                )
            )
        return out

    def fit_normalization(self, items: Sequence[SRMTrainItem]) -> None:
        """Set the per-channel mean/std (``normalize="dataset"``) from the items' valid cells."""
        total = torch.zeros(self.embed_channels, dtype=torch.float64)
        total_sq = torch.zeros(self.embed_channels, dtype=torch.float64)
        count = 0
        for emb, _, _ in items:
            he, we = emb.grid_size
            vh, vw = emb.valid_shape((he, we))
            f = emb.features[0, :, :vh, :vw].detach().to("cpu", torch.float64).flatten(1)
            total += f.sum(1)
            total_sq += (f * f).sum(1)
            count += f.shape[1]
        mean = total / max(count, 1)
        std = (total_sq / max(count, 1) - mean * mean).clamp_min(1e-8).sqrt()
        self.channel_mean = mean.float().to(self.device)
        self.channel_std = std.float().clamp_min(1e-3).to(self.device)
        self._touch()

    def _batch(
        self,
        prepared: Sequence[_Prepared],
        indices: Sequence[int],
        rng: np.random.Generator,
        augment: bool,
        p_zero: float,
        p_synthetic: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch ``(e, maps, target, valid)`` with random mask states and augmentation."""
        es, maps, tgts, valids = [], [], [], []
        for i in indices:
            p = prepared[i]
            u = rng.random()
            if u < p_zero:
                m = np.zeros(tuple(p.gt_grid.shape), np.float32)
            elif u < p_zero + p_synthetic or not p.mask_states:
                m = synthetic_mask_state(p.gt_grid.numpy(), p.valid.numpy(), rng)
            else:
                m = p.mask_states[int(rng.integers(len(p.mask_states)))]
            mask = torch.from_numpy(np.asarray(m, np.float32))
            chans = [mask] if p.semantic is None else [mask, p.semantic]
            e, mp, tg, vd = p.features, torch.stack(chans), p.gt_grid[None], p.valid[None]
            if augment:
                k, flip = int(rng.integers(4)), bool(rng.integers(2))
                e, mp, tg, vd = (_dihedral(t, k, flip) for t in (e, mp, tg, vd))
            es.append(e)
            maps.append(mp)
            tgts.append(tg)
            valids.append(vd)
        e = torch.stack(es).to(self.device)
        valid = torch.stack(valids).to(self.device)
        e = self._normalize(e, valid)
        maps_t = torch.stack(maps).to(self.device)
        if self.branch != "explicit":
            maps_t = maps_t[:, :1]
        return e, maps_t, torch.stack(tgts).to(self.device), valid

    def _eval_logits(
        self,
        prepared: Sequence[_Prepared],
        mask_state: str = "zeros",
        max_states: int | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Uncalibrated logits ``(He, We)``, targets and valid maps of every item (eval mode).

        ``mask_state``: ``zeros`` or ``states`` (the stored mask states, at most
        ``max_states`` evenly spaced ones per item, plus zeros).
        """
        self.head.eval()
        out = []
        with torch.inference_mode():
            for p in prepared:
                valid = p.valid[None, None].to(self.device)
                e = self._normalize(p.features[None].to(self.device), valid)
                proj = self.head.project(e)
                states = [np.zeros(tuple(p.gt_grid.shape), np.float32)]
                if mask_state == "states" and p.mask_states:
                    chosen = list(p.mask_states)
                    if max_states is not None and len(chosen) > max_states:
                        idx = np.linspace(0, len(chosen) - 1, max_states).round().astype(int)
                        chosen = [chosen[i] for i in idx]
                    states += chosen
                for m in states:
                    mask = torch.from_numpy(np.asarray(m, np.float32)).to(self.device)[None]
                    sem = None if p.semantic is None else p.semantic[None].to(self.device)
                    logits = self._infer(proj, self._maps(mask, sem))[0, 0]
                    out.append((logits.cpu(), p.gt_grid, p.valid))
        return out

    def _val_score(
        self, prepared: Sequence[_Prepared], max_states: int | None = 2
    ) -> dict[str, float]:
        """Validation loss (Dice + BCE) and cell accuracy over zero and stored mask states."""
        losses, correct, total = [], 0.0, 0.0
        for logits, tgt, valid in self._eval_logits(prepared, "states", max_states):
            losses.append(
                float(
                    dice_bce_loss(
                        logits[None, None],
                        tgt[None, None],
                        valid[None, None],
                        self.config.dice_weight,
                    )
                )
            )
            pred = (logits >= 0).float()
            hard = (tgt >= 0.5).float()
            correct += float(((pred == hard).float() * valid).sum())
            total += float(valid.sum())
        return {"loss": float(np.mean(losses)), "acc": correct / max(total, 1.0)}

    def pretrain(
        self,
        items: Sequence[SRMTrainItem],
        epochs: int = 60,
        batch_size: int = 8,
        augment: bool = True,
        rng: np.random.Generator | int | None = None,
        *,
        val_items: Sequence[SRMTrainItem] | None = None,
        mask_states: Sequence[Sequence[np.ndarray]] | None = None,
        val_mask_states: Sequence[Sequence[np.ndarray]] | None = None,
        segmenter: Segmenter | None = None,
        lr: float | None = None,
        patience: int = 15,
        eval_every: int = 2,
        p_zero: float = 0.3,
        p_synthetic: float = 0.2,
        calibrate: bool = True,
        progress: bool = True,
    ) -> list[float]:
        """Offline training for a fast start (e.g. on a task's 50 training images).

        Every sample draws a mask state: zeros (before the first decode) with probability
        ``p_zero``, a synthetic state from the ground truth (eroded / dilated / blob-edited /
        blurred, see :func:`synthetic_mask_state`) with ``p_synthetic``, otherwise one of the
        item's decoder mask states (``mask_states``, or simulated with ``segmenter`` by
        :func:`simulate_mask_states`, including episodes with noisy click labels). With
        ``augment`` the embedding, mask state, semantic map and ground truth are rotated by a
        random multiple of 90 degrees and flipped, jointly. With ``val_items`` the weights of
        the epoch with the lowest validation loss are kept (early stopping after ``patience``
        epochs without improvement) and, with ``calibrate``, a temperature and bias of the
        logits are fitted on the validation cells (:meth:`calibrate`).

        Args:
            items: ``(embedding, (H, W) bool ground truth, (He, We) semantic map or None)``.
            epochs: Maximum passes over the items.
            batch_size: Images per optimizer step.
            augment: Joint dihedral augmentation.
            rng: Generator or seed (also seeds torch for dropout).
            val_items: Validation items for early stopping and calibration.
            mask_states: Per item, a list of ``(He, We)`` decoder mask states.
            val_mask_states: The same for ``val_items`` (scored with the zero state).
            segmenter: Simulates mask states for items without ``mask_states``.
            lr: Peak learning rate (cosine schedule); default ``config.lr``.
            patience: Early-stopping patience in epochs (with ``val_items``).
            eval_every: Score the validation set every this many epochs (and at the last).
            p_zero: Probability of the zero mask state.
            p_synthetic: Probability of a synthetic mask state.
            calibrate: Fit the logit calibration on ``val_items`` at the end.
            progress: Show a tqdm progress bar.

        Returns:
            Mean training loss of every epoch run.
        """
        from tqdm.auto import tqdm

        if not len(items):
            raise ValueError("pretrain needs at least one item")
        self._weights_will_change("pretraining")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        torch.manual_seed(int(rng.integers(2**31)))
        if mask_states is None and segmenter is not None:
            mask_states = [
                simulate_mask_states(segmenter, emb, gt, rng)
                for emb, gt, _ in tqdm(items, desc="SRM mask states", disable=not progress)
            ]
        if self.config.normalize == "dataset":
            self.fit_normalization(items)
        train = self._prepare_items(items, mask_states)
        val = None
        if val_items is not None and len(val_items):
            val = self._prepare_items(val_items, val_mask_states)
        lr = self.config.lr if lr is None else lr
        opt = self._make_optimizer(lr)
        steps_per_epoch = max(1, math.ceil(len(train) / batch_size))
        total_steps = epochs * steps_per_epoch
        warmup = max(1, total_steps // 20)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 2 %
            if step < warmup:
                return (step + 1) / warmup
            frac = (step - warmup) / max(1, total_steps - warmup)
            return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        history: list[float] = []
        best = (math.inf, copy.deepcopy(self.head.state_dict()), -1)
        bar = tqdm(range(epochs), desc="SRM pretrain", disable=not progress)
        for epoch in bar:
            self.head.train()
            order = rng.permutation(len(train))
            losses = []
            for s in range(0, len(order), batch_size):
                e, maps, tgt, valid = self._batch(
                    train, order[s : s + batch_size], rng, augment, p_zero, p_synthetic
                )
                logits = self.head(e, maps)
                loss = dice_bce_loss(logits, tgt, valid, self.config.dice_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)))
            postfix = {"loss": f"{history[-1]:.4f}"}
            if val is not None and ((epoch + 1) % eval_every == 0 or epoch == epochs - 1):
                score = self._val_score(val)
                postfix.update(val_loss=f"{score['loss']:.4f}", val_acc=f"{score['acc']:.4f}")
                if score["loss"] < best[0]:
                    best = (score["loss"], copy.deepcopy(self.head.state_dict()), epoch)
                elif epoch - best[2] >= patience:
                    logger.info("SRM pretrain: early stop at epoch %d (best %d)", epoch, best[2])
                    bar.set_postfix(postfix)
                    break
            bar.set_postfix(postfix)
        bar.close()
        if val is not None:
            self.head.load_state_dict(best[1])
            logger.info("SRM pretrain: kept epoch %d (val loss %.4f)", best[2], best[0])
            if calibrate:
                self.calibrate_on(val)
        self.head.eval()
        self.optimizer = self._make_optimizer(self.config.lr)
        self._touch()
        return history

    def calibrate_on(self, prepared: Sequence[_Prepared], mask_state: str = "states") -> None:
        """Fit the logit scale and bias by minimising the cell-level NLL (Platt scaling).

        Cells are weighted equally; the target is the hard ground-truth label of the cell
        (coverage ``>= 0.5``), i.e. the label the environment's oracle would give at the cell.
        """
        rows = self._eval_logits(prepared, mask_state)
        logits = torch.cat([lg[v > 0] for lg, _, v in rows]).double()
        target = torch.cat([(t[v > 0] >= 0.5) for _, t, v in rows]).double()
        params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([params], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(logits * params[0] + params[1], target)
            loss.backward()
            return loss

        opt.step(closure)
        scale, bias = (float(v) for v in params.detach())
        if not (math.isfinite(scale) and math.isfinite(bias)) or scale <= 0:
            logger.warning("SRM calibration diverged (%s, %s); keeping identity", scale, bias)
            scale, bias = 1.0, 0.0
        self.calibration = torch.tensor([scale, bias], device=self.device)
        logger.info("SRM calibration: logit scale %.3f, bias %.3f", scale, bias)
        self._touch()

    def calibrate(
        self,
        items: Sequence[SRMTrainItem],
        mask_states: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> tuple[float, float]:
        """Fit the logit calibration on ``items`` (held-out images). Returns (scale, bias)."""
        self.calibrate_on(self._prepare_items(items, mask_states))
        return float(self.calibration[0]), float(self.calibration[1])

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the module: format, config, weights, buffers."""
        return {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "embed_channels": self.embed_channels,
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "channel_mean": self.channel_mean.detach().cpu().clone(),
            "channel_std": self.channel_std.detach().cpu().clone(),
            "calibration": self.calibration.detach().cpu().clone(),
            "online_updates": self.online_updates,
        }

    def load_state_dict(self, state: dict[str, Any], where: str = "state dict") -> None:
        """Load weights saved by :meth:`state_dict`, checking branch and channels first.

        Raises:
            SRMLoadError: Not an SRM state, another format version, another branch, another
                input mode or hidden size, or another number of embedding channels.
        """
        _check_state(state, where)
        cfg = state["config"]
        if cfg.get("branch") != self.branch:
            raise SRMLoadError(
                f"{where} holds an {cfg.get('branch')} SRM but this module is {self.branch}; "
                f"build the module with SRMConfig(branch={cfg.get('branch')!r}) or use "
                "SemanticRecalibrationModule.load"
            )
        if int(state["embed_channels"]) != self.embed_channels:
            raise SRMLoadError(
                f"{where} was trained on {state['embed_channels']}-channel embeddings but this "
                f"module expects {self.embed_channels}: it belongs to another segmenter; train "
                "an SRM for this segmenter"
            )
        for key in _WEIGHT_KEYS:
            if cfg.get(key) != getattr(self.config, key):
                raise SRMLoadError(
                    f"{where} has {key}={cfg.get(key)!r} but this module has "
                    f"{getattr(self.config, key)!r}; use SemanticRecalibrationModule.load"
                )
        try:
            self.head.load_state_dict(state["head"], strict=True)
        except RuntimeError as exc:
            raise SRMLoadError(
                f"{where}: weights do not fit this SRM head ({str(exc).splitlines()[0]})"
            ) from exc
        self.channel_mean = state["channel_mean"].float().to(self.device)
        self.channel_std = state["channel_std"].float().to(self.device)
        self.calibration = state["calibration"].float().to(self.device)
        self.online_updates = int(state.get("online_updates", 0))
        self.optimizer = self._make_optimizer(self.config.lr)
        self._touch()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the module atomically (temp file in the same folder, then ``os.replace``)."""
        state = self.state_dict()
        return atomic_write(path, lambda fh: torch.save(state, fh))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        clip: ClipSurgery | None = None,
        *,
        branch: str | None = None,
        embed_channels: int | None = None,
        **overrides: Any,
    ) -> SemanticRecalibrationModule:
        """Load a module written by :meth:`save`.

        Args:
            path: The file.
            device: Torch device.
            clip: CLIP for an explicit SRM (otherwise built from the saved ``ClipSpec``).
            branch: Expected branch; a file of the other branch raises.
            embed_channels: Expected embedding channels (the segmenter's); a mismatch raises.
            **overrides: Config fields to change that do not affect the weights (``online``,
                ``threshold``, ``q_steps``, ``lr``, ``allow_implicit_fallback``...).

        Raises:
            SRMLoadError: Missing, corrupt or non-SRM file, other branch or channel count.
            ClipLoadError: Explicit SRM whose CLIP cannot be built.
        """
        path = Path(path)
        if not path.is_file():
            raise SRMLoadError(f"SRM file {path} does not exist; train one with pretrain + save")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (
            RuntimeError,
            pickle.UnpicklingError,
            EOFError,
            zipfile.BadZipFile,
            ValueError,
            OSError,
        ) as exc:
            raise SRMLoadError(
                f"SRM file {path} is corrupt or not a torch file ({type(exc).__name__}: "
                f"{str(exc)[:200]}); delete it and save the SRM again"
            ) from exc
        _check_state(state, str(path))
        cfg_dict = dict(state["config"])
        if branch is not None and cfg_dict.get("branch") != branch:
            raise SRMLoadError(
                f"SRM file {path} holds an {cfg_dict.get('branch')} SRM, not an {branch} one; "
                f"pass the file of an {branch} SRM (or branch={cfg_dict.get('branch')!r})"
            )
        if embed_channels is not None and int(state["embed_channels"]) != int(embed_channels):
            raise SRMLoadError(
                f"SRM file {path} was trained on {state['embed_channels']}-channel embeddings, "
                f"but the segmenter gives {embed_channels}: it belongs to another segmenter"
            )
        forbidden = ({"branch"} | set(_WEIGHT_KEYS)) & set(overrides)
        if forbidden:
            raise ValueError(f"cannot override {sorted(forbidden)}: they define the weights")
        cfg_dict.update(overrides)
        try:
            config = SRMConfig.from_dict(cfg_dict)
        except (TypeError, ValueError) as exc:
            raise SRMLoadError(f"SRM file {path} has an invalid config: {exc}") from exc
        module = cls(config, int(state["embed_channels"]), device=device, clip=clip)
        if module.branch != cfg_dict.get("branch"):
            raise SRMLoadError(
                f"SRM file {path} is an explicit SRM but no CLIP could be used (implicit "
                "fallback); the explicit weights cannot run without CLIP: pass clip=..."
            )
        module.load_state_dict(state, where=f"SRM file {path}")
        return module

    def describe(self) -> dict[str, Any]:
        """Config and sizes, for run folders and logs (JSON-able)."""
        n = sum(p.numel() for p in self.head.parameters())
        return {
            **self.config.to_dict(),
            "embed_channels": self.embed_channels,
            "parameters": n,
            "calibration": [float(v) for v in self.calibration],
            "clip": None if self.clip is None else self.clip.model_id,
        }


def _check_state(state: Any, where: str) -> None:
    """Raise :class:`SRMLoadError` unless ``state`` looks like an SRM state of this version."""
    if not isinstance(state, dict) or state.get("format") != _FORMAT_NAME:
        raise SRMLoadError(
            f"{where} is not an SRM file (no '{_FORMAT_NAME}' marker); is it a segmenter or "
            "policy checkpoint? Pass a file written by SemanticRecalibrationModule.save"
        )
    if state.get("version") != FORMAT_VERSION:
        raise SRMLoadError(
            f"{where} has SRM format version {state.get('version')}, this code reads "
            f"{FORMAT_VERSION}; re-train and save the SRM with this version"
        )
    missing = {
        "config",
        "embed_channels",
        "head",
        "channel_mean",
        "channel_std",
        "calibration",
    } - set(state)
    if missing:
        raise SRMLoadError(f"{where} is an incomplete SRM file (missing {sorted(missing)})")
    try:
        json.dumps(state["config"])
    except (TypeError, ValueError) as exc:
        raise SRMLoadError(f"{where} has a config that is not plain data: {exc}") from exc
