"""Building a frozen open_clip model for the explicit SRM branch: architecture and pretrained
tag together (``ViT-B-16`` / ``openai``), or a local weights file; every failure is a
:class:`ClipLoadError` that says what to pass instead."""

from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ClipLoadError", "ClipSpec", "build_clip_model", "file_sha256", "open_clip_module"]

_SUGGESTED_ARCHS = ("ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-B-16-quickgelu", "ViT-L-14-336")


class ClipLoadError(RuntimeError):
    """The CLIP model could not be built or loaded; the message says what to do about it."""


@dataclass
class ClipSpec:
    """Which open_clip model to build and where its weights come from.

    Attributes:
        arch: open_clip architecture name (see ``open_clip.list_models()``); ViT towers only.
        pretrained: open_clip pretrained tag (e.g. ``"openai"``). ``None`` means random init,
            which is only allowed with ``allow_random=True`` (tests). When ``weights`` is set the
            tag is not downloaded but, if it is a known tag of ``arch``, still describes the
            file: its activation (QuickGELU for ``"openai"``) and normalisation constants are
            used. Set it to ``None`` to build the plain ``arch`` config around the file.
        weights: Local open_clip state-dict file (e.g. ``open_clip_pytorch_model.bin``);
            overrides downloading ``pretrained``.
        allow_random: Permit a randomly initialised model (meaningless maps; tests only).
    """

    arch: str = "ViT-B-16"
    pretrained: str | None = "openai"
    weights: str | Path | None = None
    allow_random: bool = False


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_vit_config(arch: str, cfg: dict[str, Any]) -> None:
    """Reject configs whose image tower is not open_clip's native ``VisionTransformer``."""
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision and vision["timm_model_name"]:
        kind = f"timm model {vision['timm_model_name']!r}"
    elif isinstance(vision.get("layers"), (list, tuple)):
        kind = "ModifiedResNet"
    elif vision.get("attentional_pool"):
        kind = "ViT with attentional pooling (CoCa)"
    elif vision.get("pool_type", "tok") not in ("tok", "avg"):
        kind = f"ViT with pool_type={vision.get('pool_type')!r}"
    else:
        return
    raise ClipLoadError(
        f"CLIP Surgery supports only open_clip ViT image towers (e.g. ViT-B-16, ViT-B-32, "
        f"ViT-L-14); architecture {arch!r} has a {kind} image tower"
    )


def _unknown_arch_error(arch: str) -> ClipLoadError:
    names = open_clip_module().list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
    hint = ", ".join(close) if close else ", ".join(n for n in _SUGGESTED_ARCHS if n in names)
    return ClipLoadError(
        f"unknown open_clip architecture {arch!r}; try one of: {hint} "
        f"(open_clip.list_models() lists all {len(names)})"
    )


def open_clip_module() -> Any:
    """Import open_clip lazily (importing it is slow) and return the module."""
    import open_clip

    return open_clip


def build_clip_model(spec: ClipSpec, device: torch.device) -> tuple[nn.Module, str | None]:
    """Create the frozen open_clip model for ``spec``.

    Returns:
        The model and its id (``None`` when it is derived lazily from a weights-file hash).
    """
    oc = open_clip_module()
    arch = spec.arch
    if arch not in oc.list_models():
        raise _unknown_arch_error(arch)
    cfg = oc.get_model_config(arch)
    _check_vit_config(arch, cfg)

    if spec.weights is not None:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise ClipLoadError(f"CLIP weights file {path} for architecture {arch!r} not found")
        tag_cfg = oc.get_pretrained_cfg(arch, spec.pretrained) if spec.pretrained else {}
        if spec.pretrained and not tag_cfg:
            logger.warning(
                "pretrained tag %r is not known for %s; building the plain config around %s",
                spec.pretrained,
                arch,
                path,
            )
        pp_override = {k: tag_cfg[k] for k in ("mean", "std", "interpolation") if k in tag_cfg}
        try:
            model = oc.create_model(
                arch,
                pretrained=str(path),
                device=device,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                force_preprocess_cfg=pp_override or None,
                weights_only=True,
            )
        except Exception as exc:  # noqa: BLE001 - any load failure is reported the same way
            raise ClipLoadError(
                f"could not load CLIP weights file {path} into open_clip architecture {arch!r}: "
                f"{type(exc).__name__}: {str(exc)[:600]}. The file must be an open_clip state "
                f"dict saved from a {arch} model (same keys and shapes)"
            ) from exc
        model_id = None
    elif spec.pretrained is not None:
        tags = oc.list_pretrained_tags_by_model(arch)
        if spec.pretrained not in tags:
            raise ClipLoadError(
                f"unknown pretrained tag {spec.pretrained!r} for {arch!r} (known tags: "
                f"{', '.join(tags) if tags else 'none'}); pass weights=/path/to/"
                f"open_clip_pytorch_model.bin for a local file"
            )
        tag_cfg = oc.get_pretrained_cfg(arch, spec.pretrained)
        try:
            model = oc.create_model(
                arch,
                pretrained=spec.pretrained,
                device=device,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                weights_only=True,
            )
        except Exception as exc:  # noqa: BLE001 - hub/HTTP/cache errors all end up here
            raise ClipLoadError(
                f"could not fetch the pretrained CLIP weights {arch}/{spec.pretrained} "
                f"({type(exc).__name__}: {str(exc)[:400]}). Pass "
                f"weights=/path/to/open_clip_pytorch_model.bin (ClipSpec.weights) or run where "
                f"huggingface.co is reachable (or with a populated Hugging Face cache)"
            ) from exc
        model_id = f"{arch}/{spec.pretrained}"
    else:
        if not spec.allow_random:
            raise ClipLoadError(
                f"ClipSpec(arch={arch!r}, pretrained=None) would build a randomly initialised CLIP "
                f"whose similarity maps are meaningless; set pretrained=<tag> (e.g. 'openai') or "
                f"weights=/path/to/open_clip_pytorch_model.bin. Random init is only allowed with "
                f"allow_random=True (tests)"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # deterministic random init, so "<arch>/random" is a fair key
            model = oc.create_model(arch, pretrained=None, device=device)
        model_id = f"{arch}/random"

    model.eval()
    model.requires_grad_(False)
    return model, model_id
