"""Settings of the semantic recalibration module (``srm:`` in a task file)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from recalibration.clip_surgery import ClipSpec
from segmenter.base import ImageEmbedding

logger = logging.getLogger(__name__)

__all__ = ["EPS", "WEIGHT_KEYS", "SRMConfig", "SRMTrainItem"]

#: Config fields that define the weights (cannot differ between a file and a module).
WEIGHT_KEYS = (
    "features",
    "reduce",
    "hidden",
    "input_mode",
    "normalize",
    "dilation",
    "context",
    "attn_grid",
    "attn_heads",
)
EPS = 1e-6

#: One pretraining / evaluation item: embedding, ``(H, W)`` ground truth, optional ``(He, We)``
#: semantic map (explicit branch).
SRMTrainItem = tuple[ImageEmbedding, np.ndarray, "np.ndarray | None"]


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
        features: The frozen feature sources the head reads, stacked
            (:data:`recalibration.features.FEATURE_SOURCES`): ``("sam",)`` is the segmenter's
            embedding alone (the paper's SRM); e.g. ``("sam", "sam_stages",
            "efficientnet_lite0")`` adds the encoder's stages and ImageNet features.
        reduce: Project the stacked features to this many channels first (a whitened PCA
            fitted on the pretraining images' valid cells, saved with the weights); 0 keeps
            them all. With a few thousand channels it makes training several times faster
            and less prone to fit 50 images by heart.
    """

    branch: Literal["implicit", "explicit"] = "implicit"
    hidden: Annotated[int, Field(ge=4, multiple_of=4)] = 64
    lr: PositiveFloat = 1e-3
    q_steps: NonNegativeInt | None = None
    online: bool = True
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    input_mode: Literal["paper", "full"] = "full"
    text: str | None = None
    clip: ClipSpec | None = None
    allow_implicit_fallback: bool = False
    normalize: Literal["dataset", "image", "none"] = "dataset"
    weight_decay: NonNegativeFloat = 1e-2
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    dilation: PositiveInt = 2
    context: NonNegativeInt = 0
    tta: Annotated[int, Field(ge=1, le=8)] = 1
    dice_weight: NonNegativeFloat = 0.5
    attn_grid: PositiveInt = 16
    attn_heads: PositiveInt = 4
    features: tuple[str, ...] = ("sam",)
    reduce: NonNegativeInt = 0

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        if self.reduce < 0:
            raise ValueError(f"reduce must be >= 0, got {self.reduce}")
        if not self.features:
            raise ValueError("features must name at least one source, e.g. ['sam']")
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
