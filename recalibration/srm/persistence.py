"""The SRM's file format: one ``torch.save`` of plain data (format marker and version, config,
embedding channels, head weights, normalisation and calibration), written atomically and
loaded with ``weights_only=True`` after every check that can name what is wrong.

A mixin of :class:`~recalibration.srm.module.SemanticRecalibrationModule`.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Self

import torch

from recalibration.clip_surgery import ClipSurgery
from recalibration.feature_set import FeatureSet
from recalibration.srm.config import WEIGHT_KEYS, SRMConfig
from segmenter.io import atomic_write

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PersistenceMixin", "SRMLoadError", "check_state"]

#: Version of the file written by :meth:`PersistenceMixin.save`.
FORMAT_VERSION = 1
FORMAT_NAME = "alignsam-srm"


class SRMLoadError(RuntimeError):
    """An SRM file cannot be loaded (corrupt, not an SRM, or incompatible); says what to do.

    Attributes:
        problem: What is wrong, naming the file (the message without the fix).
        damaged: The file itself is missing, unreadable or not an SRM file of this format
            (another file, e.g. an earlier checkpoint's, is the fix), as opposed to a valid
            SRM that does not fit what it is loaded for.
    """

    def __init__(self, problem: str, fix: str = "", damaged: bool = False) -> None:
        self.problem = problem
        self.damaged = damaged
        super().__init__(f"{problem}; {fix}" if fix else problem)


class PersistenceMixin:
    """Saving and loading the SRM (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the module: format, config, weights, buffers."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "embed_channels": self.embed_channels,
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "channel_mean": self.channel_mean.detach().cpu().clone(),
            "channel_std": self.channel_std.detach().cpu().clone(),
            "calibration": self.calibration.detach().cpu().clone(),
            **{
                key: getattr(self, key).detach().cpu().clone()
                for key in ("reduce_mean", "reduce_std", "reduce_matrix")
                if getattr(self, key) is not None
            },
            "online_updates": self.online_updates,
        }

    def load_state_dict(self, state: dict[str, Any], where: str = "state dict") -> None:
        """Load weights saved by :meth:`state_dict`, checking branch and channels first.

        Raises:
            SRMLoadError: Not an SRM state, another format version, another branch, another
                input mode or hidden size, or another number of embedding channels.
        """
        check_state(state, where)
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
        defaults = SRMConfig()
        for key in WEIGHT_KEYS:
            saved = cfg.get(key, getattr(defaults, key))  # older files: the default then
            saved = tuple(saved) if isinstance(saved, list) else saved
            if saved != getattr(self.config, key):
                raise SRMLoadError(
                    f"{where} has {key}={saved!r} but this module has "
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
        if self.config.reduce:
            if "reduce_matrix" not in state:
                raise SRMLoadError(f"{where} projects its features but holds no projection")
            for key in ("reduce_mean", "reduce_std", "reduce_matrix"):
                setattr(self, key, state[key].float().to(self.device))
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
        segmenter: Any = None,
        cache: Any = None,
        **overrides: Any,
    ) -> Self:
        """Load a module written by :meth:`save`.

        Args:
            path: The file.
            device: Torch device.
            clip: CLIP for an explicit SRM (otherwise built from the saved ``ClipSpec``).
            branch: Expected branch; a file of the other branch raises.
            embed_channels: Expected embedding channels (the segmenter's); a mismatch raises
                (for an SRM on the embedding alone: with more feature sources the head's input
                is checked on its first image).
            segmenter: The segmenter whose features the SRM reads, needed (with ``cache``)
                when the SRM reads more sources than the embedding
                (``config.features``, :class:`~recalibration.feature_set.FeatureSet`).
            cache: Embedding cache of the feature sources.
            **overrides: Config fields to change that do not affect the weights (``online``,
                ``threshold``, ``q_steps``, ``lr``, ``allow_implicit_fallback``...).

        Raises:
            SRMLoadError: Missing, corrupt or non-SRM file, other branch or channel count.
            ClipLoadError: Explicit SRM whose CLIP cannot be built.
        """
        path = Path(path)
        if not path.is_file():
            raise SRMLoadError(
                f"SRM file {path} does not exist", "train one with pretrain + save", damaged=True
            )
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
                f"SRM file {path} is damaged: not a readable torch file ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]})",
                "delete it and save the SRM again",
                damaged=True,
            ) from exc
        check_state(state, str(path))
        cfg_dict = dict(state["config"])
        if branch is not None and cfg_dict.get("branch") != branch:
            raise SRMLoadError(
                f"SRM file {path} holds an {cfg_dict.get('branch')} SRM, not an {branch} one; "
                f"pass the file of an {branch} SRM (or branch={cfg_dict.get('branch')!r})"
            )
        features = tuple(cfg_dict.get("features", ("sam",)))
        sam_only = features == ("sam",)
        if (
            sam_only
            and embed_channels is not None
            and int(state["embed_channels"]) != int(embed_channels)
        ):
            raise SRMLoadError(
                f"SRM file {path} was trained on {state['embed_channels']}-channel embeddings, "
                f"but the segmenter gives {embed_channels}: it belongs to another segmenter"
            )
        forbidden = ({"branch"} | set(WEIGHT_KEYS)) & set(overrides)
        if forbidden:
            raise ValueError(f"cannot override {sorted(forbidden)}: they define the weights")
        cfg_dict.update(overrides)
        try:
            config = SRMConfig.from_dict(cfg_dict)
        except (TypeError, ValueError) as exc:
            raise SRMLoadError(f"SRM file {path} has an invalid config: {exc}") from exc
        feature_set = None
        if not sam_only:
            if segmenter is None:
                raise SRMLoadError(
                    f"SRM file {path} reads the feature sources {list(features)}: pass "
                    "segmenter= (and cache=) to load it"
                )
            feature_set = FeatureSet(features, segmenter, cache)
        module = cls(
            config, int(state["embed_channels"]), device=device, clip=clip, features=feature_set
        )
        if module.branch != cfg_dict.get("branch"):
            raise SRMLoadError(
                f"SRM file {path} is an explicit SRM but no CLIP could be used (implicit "
                "fallback); the explicit weights cannot run without CLIP: pass clip=..."
            )
        module.load_state_dict(state, where=f"SRM file {path}")
        return module


def check_state(state: Any, where: str) -> None:
    """Raise :class:`SRMLoadError` unless ``state`` looks like an SRM state of this version."""
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise SRMLoadError(
            f"{where} is not an SRM file (no '{FORMAT_NAME}' marker)",
            "is it a segmenter or policy checkpoint? Pass a file written by "
            "SemanticRecalibrationModule.save",
            damaged=True,
        )
    if state.get("version") != FORMAT_VERSION:
        raise SRMLoadError(
            f"{where} has SRM format version {state.get('version')}, this code reads "
            f"{FORMAT_VERSION}",
            "re-train and save the SRM with this version",
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
        raise SRMLoadError(
            f"{where} is an incomplete SRM file (missing {sorted(missing)})", damaged=True
        )
    try:
        json.dumps(state["config"])
    except (TypeError, ValueError) as exc:
        raise SRMLoadError(f"{where} has a config that is not plain data: {exc}") from exc
