"""Builders for the supported segmenters, in a plain registry like SAM's ``sam_model_registry``.

Every builder returns a frozen :class:`~segmenter.sam.SamSegmenter`: eval mode, no gradients,
weights loaded on the CPU with ``weights_only=True`` and ``strict=True``, then moved to
``device``.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import warnings
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from segmenter import weights as W
from segmenter.base import SegmenterError
from segmenter.sam import SamSegmenter

logger = logging.getLogger(__name__)


def load_state_dict(model: nn.Module, path: Path, name: str) -> None:
    """Load a checkpoint safely and strictly, with errors that say what to do."""
    fix = f"delete it and run `alignsam weights fetch {name}`"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise SegmenterError(f"checkpoint {path} does not exist: {fix}") from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise SegmenterError(
            f"checkpoint {path} is corrupt or not a state dict ({exc}): {fix}"
        ) from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SegmenterError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise SegmenterError(
            f"checkpoint {path} does not fit the {name} architecture ({first}...). Is it the "
            f"checkpoint of another model? Known: {', '.join(W.CHECKPOINTS)}"
        ) from exc


def _file_id(path: Path) -> str:
    """Short content id of a checkpoint (its known hash when it is a registry file)."""
    for spec in W.CHECKPOINTS.values():
        if path.name == spec.filename and path.stat().st_size == spec.size:
            return spec.sha256[:12]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 24))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:12]


def _finish(
    model: nn.Module,
    name: str,
    checkpoint: str | Path | None,
    device: str | torch.device,
    autocast_bf16: bool,
    backend: str = "auto",
) -> SamSegmenter:
    path = Path(checkpoint).expanduser() if checkpoint is not None else W.ensure(name)
    if not path.is_file():
        raise SegmenterError(
            f"checkpoint {path} does not exist: run `alignsam weights fetch {name}` "
            "or pass the path of a downloaded file"
        )
    load_state_dict(model, path, name)
    return SamSegmenter(model, f"{name}:{_file_id(path)}", device, autocast_bf16, backend)


def build_mobile_sam(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    autocast_bf16: bool = False,
    backend: str = "auto",
) -> SamSegmenter:
    """MobileSAM (TinyViT encoder + SAM's decoder), the default: fast on a laptop CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mirror's timm imports print deprecation notes
        from mobile_sam.build_sam import build_sam_vit_t

        model = build_sam_vit_t(checkpoint=None)
    return _finish(model, "mobile_sam", checkpoint, device, autocast_bf16, backend)


def _build_sam_vit(
    variant: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    autocast_bf16: bool = False,
    backend: str = "auto",
) -> SamSegmenter:
    from segment_anything import sam_model_registry

    model = sam_model_registry[variant](checkpoint=None)
    return _finish(model, f"sam_{variant}", checkpoint, device, autocast_bf16, backend)


def build_tiny_sam(
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    autocast_bf16: bool = False,
    seed: int = 0,
    img_size: int = 256,
    backend: str = "auto",
) -> SamSegmenter:
    """A tiny random-weight SAM (ViT encoder, 16 x 16 embedding of 32 channels) for tests.

    Its masks are meaningless but every shape, coordinate rule and code path is SAM's own.
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    dim, patch = 32, 16
    grid = img_size // patch
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size,
                patch_size=patch,
                embed_dim=48,
                depth=1,
                num_heads=2,
                mlp_ratio=2.0,
                out_chans=dim,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=False,
                window_size=0,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim,
                image_embedding_size=(grid, grid),
                input_image_size=(img_size, img_size),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                transformer_dim=dim,
                iou_head_depth=2,
                iou_head_hidden_dim=32,
            ),
        )
    finally:
        torch.random.set_rng_state(gen_state)
    if checkpoint is not None:
        load_state_dict(model, Path(checkpoint), "tiny")
    return SamSegmenter(model, f"tiny:seed{seed}", device, autocast_bf16, backend)


SegmenterBuilder = Callable[..., SamSegmenter]

segmenter_registry: dict[str, SegmenterBuilder] = {
    "mobile_sam": build_mobile_sam,
    "sam_vit_b": partial(_build_sam_vit, "vit_b"),
    "sam_vit_l": partial(_build_sam_vit, "vit_l"),
    "sam_vit_h": partial(_build_sam_vit, "vit_h"),
    "tiny": build_tiny_sam,
}


def build_segmenter(
    name: str = "mobile_sam",
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    autocast_bf16: bool = False,
    backend: str = "auto",
) -> SamSegmenter:
    """Build a frozen segmenter by registry name.

    Args:
        name: One of ``segmenter_registry``.
        checkpoint: Weights file; by default the cached one, fetched on first use.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        autocast_bf16: Run under bf16 autocast.
        backend: ``auto`` (ONNX Runtime where it applies), ``onnx`` or ``torch`` (stock
            reference); see :class:`~segmenter.sam.SamSegmenter`.
    """
    if name not in segmenter_registry:
        raise SegmenterError(
            f"unknown segmenter {name!r}; choose one of {', '.join(segmenter_registry)}"
        )
    return segmenter_registry[name](
        checkpoint=checkpoint, device=device, autocast_bf16=autocast_bf16, backend=backend
    )
