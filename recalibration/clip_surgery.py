"""Text-guided dense similarity maps from a frozen open_clip ViT, in the style of CLIP Surgery.

Li et al., "CLIP Surgery for Better Explainability with Enhancement in Open-Vocabulary Tasks"
(2023) observe that plain CLIP patch tokens give noisy, "opposite" localisation maps and fix it
with two changes that need no training:

* **Architecture surgery.** For the last ``surgery_depth`` blocks of the visual transformer a
  second residual stream is run next to the original one. In every such block the new stream
  receives a *v-v self-attention* of the block's (layer-normed) original-stream input: the
  value projection attends to itself (``softmax(v v^T / sqrt(d)) v``) instead of using the
  query/key projections, and the feed-forward network is skipped. The original stream runs the
  unmodified blocks, so the image embedding (class token) is exactly the model's own.
  The new stream's patch tokens, passed through ``ln_post`` and ``proj``, are the dense
  features in the joint image/text space.
* **Feature surgery.** The per-channel products ``feat[p] * text[c]`` contain a component that
  is shared by all classes (redundant features). Subtracting its mean over the classes before
  summing over the channels gives a much cleaner similarity. With a single target text the
  "other classes" are generic prompts (:data:`REDUNDANT_TEXTS`).

Building the model (architecture and pretrained tag, or a weights file) is
:mod:`recalibration.clip_models`. This module hooks into open_clip without modifying it:
:class:`ClipSurgery` runs the ``VisionTransformer`` pieces itself (patch embedding, blocks,
``ln_post``/``proj``) and re-uses the attention weights of each block (``attn.in_proj_weight``
etc.).

Geometry. SAM encodes an image resized so that its longest side is the encoder size and padded
at the bottom/right to a square; its 64 x 64 embedding grid covers that padded square. With
``pad_square=True`` the CLIP input is built the same way (longest side resized to the CLIP
input size, padded bottom/right with zeros after normalisation, i.e. with the mean colour), so
a map of size ``out_size=(64, 64)`` aligns cell for cell with the SAM embedding grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recalibration.clip_models import (
    ClipLoadError,
    ClipSpec,
    build_clip_model,
    file_sha256,
    open_clip_module,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TEMPLATES",
    "REDUNDANT_TEXTS",
    "ClipLoadError",
    "ClipSpec",
    "ClipSurgery",
    "feature_surgery",
]

#: Prompt templates averaged into one text embedding per class name ("{}" is the name).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
)

#: Generic prompts used as the "other classes" of feature surgery when there is one target.
#: Each one is encoded verbatim (no template) and counts as one class. The empty-name templates
#: carry the prompt's own contribution, which is common to every class and hence redundant.
REDUNDANT_TEXTS: tuple[str, ...] = (
    "a photo of a .",
    "a photo of the .",
    "a close-up photo of a .",
    "a cropped photo of a .",
    "there is a  in the scene.",
    "background",
    "a photo of the background.",
    "a photo of something.",
)

_DEFAULT_SURGERY_DEPTH = 6
_EPS = 1e-8


def feature_surgery(
    patch_feats: torch.Tensor,
    text_feats: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Similarity between patch and class features with the redundant features removed.

    For every patch ``p`` and class ``c`` the per-channel products ``feat[p] * text[c]`` are
    formed; their (optionally weighted) mean over the classes is the part every class shares,
    which is subtracted before summing over the channels.

    Args:
        patch_feats: ``(P, D)`` L2-normalised patch features.
        text_feats: ``(C, D)`` L2-normalised class text embeddings, ``C >= 2``.
        class_weights: Optional ``(C,)`` weights for the redundant mean (uniform when ``None``).

    Returns:
        ``(P, C)`` similarity after feature surgery.
    """
    if text_feats.ndim != 2 or text_feats.shape[0] < 2:
        raise ValueError(
            f"feature surgery needs at least 2 classes (got text_feats of shape "
            f"{tuple(text_feats.shape)}); add generic texts such as REDUNDANT_TEXTS"
        )
    prods = patch_feats[:, None, :] * text_feats[None, :, :]  # (P, C, D)
    if class_weights is None:
        redundant = prods.mean(dim=1, keepdim=True)  # (P, 1, D)
    else:
        w = class_weights.to(prods.dtype).reshape(1, -1, 1)
        redundant = (prods * w).sum(dim=1, keepdim=True) / w.sum().clamp_min(_EPS)
    return (prods - redundant).sum(dim=-1)  # (P, C)


def _value_self_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The v-v attention branch of one block, re-using the block's attention weights.

    Args:
        block: An open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) or
            ``CustomResidualAttentionBlock`` (open_clip ``Attention``).
        x: ``(B, L, W)`` layer-normed block input, batch first.

    Returns:
        ``(B, L, W)`` attention output, before the block's residual addition (``ls_1`` and, for
        custom blocks, ``ln_attn`` applied).
    """
    attn = block.attn
    width = x.shape[-1]
    weight = attn.in_proj_weight
    if weight is None:  # nn.MultiheadAttention with separate q/k/v projections
        weight_v, bias_v = attn.v_proj_weight, None
        if attn.in_proj_bias is not None:
            bias_v = attn.in_proj_bias[2 * width :]
    else:
        weight_v = weight[2 * width :]
        bias_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    heads = attn.num_heads
    b, n, _ = x.shape
    v = F.linear(x, weight_v, bias_v).reshape(b, n, heads, width // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(v, v, v)  # softmax(v v^T / sqrt(d)) v, (B, H, L, d)
    head_scale = getattr(attn, "head_scale", None)
    if head_scale is not None:
        out = out * head_scale
    out = out.transpose(1, 2).reshape(b, n, width)
    out = getattr(attn, "ln_inner", nn.Identity())(out)
    out = attn.out_proj(out)
    out = getattr(block, "ln_attn", nn.Identity())(out)
    return block.ls_1(out)


class ClipSurgery:
    """Frozen open_clip ViT producing CLIP-Surgery similarity maps for class names.

    Args:
        spec: Model architecture and weights source.
        device: Torch device to run on.
        surgery_depth: Number of final transformer blocks that get the v-v dual path
            (clamped to the number of blocks; 6 as in the reference setting for ViT-B).

    Raises:
        ClipLoadError: Unknown architecture, non-ViT image tower, weights that do not fit the
            architecture, pretrained weights that cannot be fetched, or random init not allowed.
    """

    def __init__(
        self,
        spec: ClipSpec,
        device: str | torch.device = "cpu",
        *,
        surgery_depth: int = _DEFAULT_SURGERY_DEPTH,
    ) -> None:
        from open_clip.transformer import (
            CustomResidualAttentionBlock,
            ResidualAttentionBlock,
            VisionTransformer,
        )

        self.spec = spec
        self.device = torch.device(device)
        self.model, self._model_id = build_clip_model(spec, self.device)
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ClipLoadError(
                f"CLIP Surgery supports only open_clip ViT image towers; {spec.arch!r} built a "
                f"{type(visual).__name__}"
            )
        if visual.proj is None:
            raise ClipLoadError(f"{spec.arch!r} image tower has no output projection")
        blocks = visual.transformer.resblocks
        for blk in blocks:
            if not isinstance(blk, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
                raise ClipLoadError(f"unsupported transformer block type {type(blk).__name__}")
        if surgery_depth < 1:
            raise ValueError(f"surgery_depth must be >= 1, got {surgery_depth}")
        self.surgery_depth = min(surgery_depth, len(blocks))

        pp = dict(getattr(visual, "preprocess_cfg", {}) or {})
        size = visual.image_size
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.patch_size: tuple[int, int] = (int(visual.patch_size[0]), int(visual.patch_size[1]))
        self._mean = torch.tensor(pp.get("mean", visual.image_mean), dtype=torch.float32)
        self._std = torch.tensor(pp.get("std", visual.image_std), dtype=torch.float32)
        self._mean = self._mean.reshape(1, 3, 1, 1).to(self.device)
        self._std = self._std.reshape(1, 3, 1, 1).to(self.device)
        interp = str(pp.get("interpolation", "bicubic"))
        self._interpolation = interp if interp in ("bicubic", "bilinear") else "bicubic"

        try:
            self.tokenizer = open_clip_module().get_tokenizer(spec.arch)
        except Exception as exc:  # noqa: BLE001
            raise ClipLoadError(f"could not build the tokenizer for {spec.arch!r}: {exc}") from exc

        self._text_cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        self._redundant: torch.Tensor | None = None
        logger.info(
            "ClipSurgery %s: input %s, patch %s, %d blocks (v-v path in last %d)",
            self.model_id,
            self.image_size,
            self.patch_size,
            len(blocks),
            self.surgery_depth,
        )

    # ------------------------------------------------------------------ identity

    @property
    def model_id(self) -> str:
        """Cache key of the weights: ``"<arch>/<tag>"``, ``"<arch>/file:<sha256[:12]>"`` or
        ``"<arch>/random"``."""
        if self._model_id is None:
            assert self.spec.weights is not None
            digest = file_sha256(Path(self.spec.weights).expanduser())
            self._model_id = f"{self.spec.arch}/file:{digest[:12]}"
        return self._model_id

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(gh, gw)`` patch grid of the CLIP input."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    # ------------------------------------------------------------------ text

    @torch.no_grad()
    def _encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(T, D)`` L2-normalised text embeddings of verbatim prompts."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        feats = self.model.encode_text(tokens).float()
        return F.normalize(feats, dim=-1)

    @torch.no_grad()
    def text_embedding(
        self, name: str, templates: Sequence[str] = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """Template-averaged text embedding of a class name, memoised per (name, templates).

        Args:
            name: Class name, e.g. ``"dog"`` (leading/trailing whitespace is ignored).
            templates: Prompt templates containing ``"{}"``.

        Returns:
            ``(D,)`` L2-normalised embedding (a copy of the cached tensor).

        Raises:
            ValueError: Empty or whitespace-only name, or empty/invalid templates.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"class name must be a non-empty string, got {name!r}; pass the target object's "
                f"name (e.g. 'dog')"
            )
        key = (name.strip(), tuple(templates))
        cached = self._text_cache.get(key)
        if cached is None:
            if not key[1] or any("{}" not in t for t in key[1]):
                raise ValueError(
                    f"templates must be a non-empty sequence of strings containing '{{}}', got "
                    f"{key[1]!r}"
                )
            feats = self._encode_prompts([t.format(key[0]) for t in key[1]])  # (T, D)
            cached = F.normalize(feats.mean(dim=0), dim=-1)
            self._text_cache[key] = cached
        return cached.clone()

    @torch.no_grad()
    def redundant_embeddings(self) -> torch.Tensor:
        """``(K, D)`` L2-normalised embeddings of :data:`REDUNDANT_TEXTS` (memoised)."""
        if self._redundant is None:
            self._redundant = self._encode_prompts(REDUNDANT_TEXTS)
        return self._redundant

    # ------------------------------------------------------------------ image

    def preprocess(
        self, image: np.ndarray, *, pad_square: bool = True
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Turn an RGB image into the CLIP input tensor.

        Args:
            image: ``(H, W, 3)`` uint8 RGB image.
            pad_square: Resize the longest side to the CLIP input size and pad bottom/right
                (SAM geometry); otherwise resize (and stretch) to the CLIP input size.

        Returns:
            ``(1, 3, S, S)`` normalised pixels and the ``(h, w)`` of the non-padded content.
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image must be an H x W x 3 RGB numpy array, got "
                f"{getattr(image, 'shape', type(image))}"
            )
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            raise ValueError(f"image is empty: shape {image.shape}")
        s_h, s_w = self.image_size
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        pixels = pixels.permute(2, 0, 1)[None].float().div_(255.0)  # (1, 3, H, W)
        if pad_square:
            if s_h != s_w:
                raise ValueError(f"pad_square needs a square CLIP input, got {self.image_size}")
            scale = s_h / max(height, width)
            new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)  # as SAM
        else:
            new_h, new_w = s_h, s_w
        if (new_h, new_w) != (height, width):
            pixels = F.interpolate(
                pixels,
                size=(new_h, new_w),
                mode=self._interpolation,
                align_corners=False,
                antialias=True,
            ).clamp_(0.0, 1.0)
        pixels = (pixels - self._mean) / self._std
        if (new_h, new_w) != (s_h, s_w):
            pixels = F.pad(pixels, (0, s_w - new_w, 0, s_h - new_h))  # zeros = mean colour
        return pixels, (new_h, new_w)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, 1 + P, W)`` token sequence entering the transformer."""
        visual = self.model.visual
        x = visual.conv1(pixels)  # (B, W, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, P, W)
        cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)  # identity in eval mode
        return visual.ln_pre(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding from the final original-stream tokens, as ``VisionTransformer``."""
        visual = self.model.visual
        pool_type = getattr(visual, "pool_type", "tok")

        def global_pool(t: torch.Tensor) -> torch.Tensor:
            return t[:, 1:].mean(dim=1) if pool_type == "avg" else t[:, 0]

        if getattr(visual, "final_ln_after_pool", False):
            pooled = visual.ln_post(global_pool(x))
        else:
            pooled = global_pool(visual.ln_post(x))
        return pooled @ visual.proj

    def forward_surgery(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the visual tower with the v-v dual path in its last ``surgery_depth`` blocks.

        Args:
            pixels: ``(B, 3, S, S)`` normalised CLIP input.

        Returns:
            ``image_emb`` ``(B, E)``: the original path's (unnormalised) image embedding, equal to
            ``model.encode_image(pixels)``; ``patch_feats`` ``(B, gh, gw, E)``: L2-normalised
            dense features of the surgery path.
        """
        visual = self.model.visual
        transformer = visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        blocks = transformer.resblocks
        start = len(blocks) - self.surgery_depth
        x = self._embed(pixels)  # original stream, (B, 1 + P, W)
        x_vv: torch.Tensor | None = None  # surgery stream
        for i, block in enumerate(blocks):
            if i >= start:
                if x_vv is None:
                    x_vv = x
                x_vv = x_vv + _value_self_attention(block, block.ln_1(x))  # no FFN
            if batch_first:
                x = block(x)
            else:  # (L, B, W) convention of older open_clip
                x = block(x.transpose(0, 1)).transpose(0, 1)
        assert x_vv is not None
        image_emb = self._pool(x)
        tokens = visual.ln_post(x_vv[:, 1:]) @ visual.proj  # (B, P, E)
        tokens = F.normalize(tokens, dim=-1)
        gh, gw = pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1]
        return image_emb, tokens.reshape(tokens.shape[0], gh, gw, -1)

    # ------------------------------------------------------------------ maps

    @torch.inference_mode()
    def similarity_maps(
        self,
        image: np.ndarray,
        names: Sequence[str],
        out_size: tuple[int, int] | None = (64, 64),
        *,
        pad_square: bool = True,
        mask_padding: bool = True,
    ) -> np.ndarray:
        """CLIP-Surgery similarity maps of several class names on one image.

        With one name the generic :data:`REDUNDANT_TEXTS` act as the other classes of feature
        surgery; with several names they are each other's other classes.

        Args:
            image: ``(H, W, 3)`` uint8 RGB image of any size.
            names: Class names (non-empty strings).
            out_size: ``(h, w)`` of the returned maps, covering the padded square when
                ``pad_square`` (``(64, 64)`` = SAM embedding grid). ``None``: the image size
                ``(H, W)`` (the padding is cropped away).
            pad_square: SAM geometry (see :meth:`preprocess`).
            mask_padding: With ``pad_square``, min-max normalise over the patches that see
                image content only and set the fully padded patches to 0.

        Returns:
            ``(N, h, w)`` float32 maps in ``[0, 1]``, one per name.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("names must contain at least one class name")
        text = torch.stack([self.text_embedding(n) for n in names])  # (N, D)
        if len(names) == 1:
            text = torch.cat([text, self.redundant_embeddings()], dim=0)  # (1 + K, D)
        pixels, (new_h, new_w) = self.preprocess(image, pad_square=pad_square)
        _, patches = self.forward_surgery(pixels)
        gh, gw = patches.shape[1:3]
        sim = feature_surgery(patches[0].reshape(gh * gw, -1).float(), text)  # (P, C)
        maps = sim[:, : len(names)].T.reshape(len(names), gh, gw)

        valid = torch.ones(gh, gw, dtype=torch.bool, device=maps.device)
        if pad_square and mask_padding:
            rows = -(-new_h // self.patch_size[0])  # patches with at least one content pixel
            cols = -(-new_w // self.patch_size[1])
            valid[rows:, :] = False
            valid[:, cols:] = False
        flat = maps[:, valid]  # (N, V)
        lo = flat.min(dim=1).values.reshape(-1, 1, 1)
        hi = flat.max(dim=1).values.reshape(-1, 1, 1)
        maps = ((maps - lo) / (hi - lo).clamp_min(_EPS)).clamp_(0.0, 1.0)
        maps = maps.masked_fill(~valid, 0.0)

        height, width = image.shape[:2]
        if out_size is None:
            side = max(height, width) if pad_square else None
            size = (side, side) if side is not None else (height, width)
        else:
            size = (int(out_size[0]), int(out_size[1]))
            if size[0] < 1 or size[1] < 1:
                raise ValueError(f"out_size must be positive, got {out_size}")
        maps = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
        if out_size is None:
            maps = maps[:, :height, :width]
        return maps.clamp_(0.0, 1.0).to(torch.float32).cpu().numpy()

    @torch.inference_mode()
    def similarity_map(
        self,
        image: np.ndarray,
        name: str,
        out_size: tuple[int, int] | None = (64, 64),
        *,
        pad_square: bool = True,
        mask_padding: bool = True,
    ) -> np.ndarray:
        """CLIP-Surgery similarity map of one class name (see :meth:`similarity_maps`).

        Args:
            image: ``(H, W, 3)`` uint8 RGB image of any size.
            name: Target class name.
            out_size: ``(h, w)`` of the map (default: the 64 x 64 SAM grid); ``None`` = image size.
            pad_square: Reproduce SAM's longest-side-resize + bottom/right padding geometry.
            mask_padding: Normalise over content patches only and zero the padded ones.

        Returns:
            ``(h, w)`` float32 map in ``[0, 1]``.
        """
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, got {type(name).__name__}")
        return self.similarity_maps(
            image, [name], out_size, pad_square=pad_square, mask_padding=mask_padding
        )[0]
