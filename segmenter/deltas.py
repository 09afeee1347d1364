"""Fine-tuning deltas: what a fine-tuned segmenter changed, saved apart from the frozen base.

A delta holds the decoder state dict (``decoder``), the LoRA adapter plus decoder (``lora``)
or the whole state dict (``full``), with the base it was trained on; written atomically beside
the run, never over the base checkpoint. :func:`apply_delta` puts one on a built segmenter: a
decoder delta keeps the segmenter's ``embedding_id`` (cached embeddings stay valid), a LoRA /
full delta changes it (the encoder computes something else). LoRA adapters are merged into the
``qkv`` weights on load, so the fast ONNX path serves fine-tuned models too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from segmenter.base import SegmenterError
from segmenter.io import atomic_write
from segmenter.sam import SamSegmenter

if TYPE_CHECKING:
    from segmenter.finetune import FinetuneConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DELTA_FORMAT",
    "LEVELS",
    "PROMPT_EMBEDDINGS",
    "add_lora",
    "apply_delta",
    "delta_state",
    "is_decoder_key",
    "load_delta",
    "save_delta",
]

LEVELS: tuple[str, ...] = ("decoder", "lora", "full")
DELTA_FORMAT = "alignsam-delta/1"
#: The prompt encoder's learned embeddings, trained with the decoder (SAM's fine-tuning recipe).
PROMPT_EMBEDDINGS: tuple[str, ...] = (
    "prompt_encoder.point_embeddings.",
    "prompt_encoder.not_a_point_embed.",
    "prompt_encoder.no_mask_embed.",
)


def is_decoder_key(name: str) -> bool:
    return name.startswith("mask_decoder.") or name.startswith(PROMPT_EMBEDDINGS)


def _lora_config(rank: int, alpha: float, targets: Sequence[str]) -> Any:
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency
        raise SegmenterError("LoRA fine-tuning needs peft: pip install peft") from exc
    return LoraConfig(
        r=int(rank), lora_alpha=float(alpha), target_modules=list(targets), lora_dropout=0.0
    )


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> Any:
    """Inject LoRA adapters into ``model.image_encoder`` in place; returns peft's ``LoraModel``
    (its ``merge_and_unload()`` gives back the encoder with merged plain weights)."""
    from peft import LoraModel

    tuner = LoraModel(model.image_encoder, _lora_config(rank, alpha, targets), "default")
    if not any("lora_" in n for n, _ in model.image_encoder.named_parameters()):
        raise SegmenterError(f"no module of the image encoder is named one of {list(targets)}")
    return tuner


def delta_state(model: nn.Module, level: str) -> dict[str, torch.Tensor]:
    """The weights a delta of ``level`` holds (detached CPU copies)."""
    if level == "full":
        items = model.state_dict().items()
    else:
        items = [(k, v) for k, v in model.state_dict().items() if is_decoder_key(k)]
        if level == "lora":
            enc = model.image_encoder.state_dict().items()
            items += [(f"image_encoder.{k}", v) for k, v in enc if "lora_" in k]
    return {k: v.detach().to("cpu").clone() for k, v in items}


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:12]


def save_delta(
    path: str | Path,
    model: nn.Module,
    config: FinetuneConfig,
    base_model_id: str,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the fine-tuned weights of ``model`` as a delta file, atomically."""
    state = delta_state(model, config.level)
    payload = {
        "format": DELTA_FORMAT,
        "level": config.level,
        "base_model_id": base_model_id,
        "config": {**asdict(config), "lora_targets": list(config.lora_targets)},
        "digest": _digest(state),
        "meta": meta or {},
        "state": state,
    }
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_delta(path: str | Path) -> dict[str, Any]:
    """Read a delta file, with errors that name the file and the fix."""
    path = Path(path)
    if path.is_dir():
        path = path / "delta.pt"
    fix = f"re-run `alignsam finetune` to write {path}"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise SegmenterError(f"fine-tuning delta {path} does not exist: {fix}") from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable / truncated file
        raise SegmenterError(f"fine-tuning delta {path} is unreadable ({exc}): {fix}") from exc
    if not isinstance(payload, dict) or payload.get("format") != DELTA_FORMAT:
        raise SegmenterError(f"{path} is not an alignsam fine-tuning delta ({DELTA_FORMAT})")
    payload["path"] = str(path)
    return payload


def apply_delta(segmenter: SamSegmenter, path: str | Path) -> SamSegmenter:
    """Load a fine-tuning delta into ``segmenter`` (in place; returns it).

    The segmenter must be the unmodified base the delta was trained from. Its ``model_id``
    gains the delta's level and digest; a ``decoder`` delta keeps the ``embedding_id``.
    """
    d = load_delta(path)
    where = d["path"]
    if segmenter.variant is not None:
        raise SegmenterError(f"{segmenter.model_id} already carries a delta; build a fresh base")
    if d["base_model_id"] != segmenter.model_id:
        raise SegmenterError(
            f"delta {where} was trained on {d['base_model_id']}, not {segmenter.model_id}: "
            "build the segmenter from the same checkpoint"
        )
    model, level, state = segmenter.model, d["level"], d["state"]
    if level == "lora":
        cfg = d["config"]
        tuner = add_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_targets"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (level == "full" and missing):
        raise SegmenterError(
            f"delta {where} does not fit {segmenter.model_id} "
            f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
        )
    if level == "lora":
        model.image_encoder = tuner.merge_and_unload()
    model_id = f"{segmenter.model_id}+{level}-ft:{d['digest']}"
    embedding_id = segmenter.embedding_id if level == "decoder" else model_id
    segmenter.weights_changed(model_id, embedding_id, f"{level}-ft:{d['digest']}")
    return segmenter
