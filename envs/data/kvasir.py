"""Kvasir-SEG polyps with the project's fixed splits."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from envs.data.dataset import Dataset, OnError
from envs.data.folders import folder_pairs
from envs.data.images import DataError

logger = logging.getLogger(__name__)


def kvasir_seg(root: str | os.PathLike[str], split: str, *, on_error: OnError = "raise") -> Dataset:
    """Kvasir-SEG polyps: ``root/images/*.jpg``, ``root/masks/*.jpg``, ``root/splits.json``.

    ``splits.json`` maps split names to lists of image file names.

    Args:
        root: The dataset folder.
        split: A key of ``splits.json`` (``train``, ``val``, ``test``, ``pool``, ``test_rest``).
        on_error: See :func:`folder_pairs`.

    Returns:
        Dataset named ``kvasir-seg/<split>`` in the split file's order.

    Raises:
        DataError: Missing or malformed ``splits.json``, unknown split, or a sample problem.
    """
    root = Path(root)
    splits_file = root / "splits.json"
    if not splits_file.is_file():
        raise DataError(
            f"{splits_file}: split file not found; point root at the kvasir-seg folder "
            "(the one holding images/, masks/ and splits.json)"
        )
    try:
        splits = json.loads(splits_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{splits_file}: cannot parse ({exc}); fix the JSON") from exc
    if not isinstance(splits, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in splits.values()
    ):
        raise DataError(
            f"{splits_file}: expected an object mapping split names to lists of file names"
        )
    if split not in splits:
        raise DataError(
            f"{splits_file}: unknown split {split!r}; available: {', '.join(sorted(splits))}"
        )
    return folder_pairs(
        root / "images",
        root / "masks",
        splits[split],
        on_error=on_error,
        name=f"kvasir-seg/{split}",
    )
