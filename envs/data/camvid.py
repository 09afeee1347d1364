"""Label-map datasets (one binary task per class of a label map), and CamVid urban scenes
(SegNet preparation) as one."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from envs.data.dataset import Dataset, DatasetBuilder, OnError, Sample
from envs.data.folders import folder_files
from envs.data.images import (
    LABEL_SUFFIXES,
    DataError,
    load_label_map,
    read_image_size,
    validate_mask,
)

logger = logging.getLogger(__name__)

#: CamVid (SegNet preparation) class names; the index is the label value. 11 = unlabelled.
CAMVID_CLASSES: tuple[str, ...] = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
CAMVID_IGNORE_INDEX = 11


def label_map_dataset(
    images_dir: str | os.PathLike[str],
    labels_dir: str | os.PathLike[str],
    class_id: int,
    *,
    ignore_index: int | None = CAMVID_IGNORE_INDEX,
    names: Sequence[str] | None = None,
    on_error: OnError = "raise",
    label_suffixes: Sequence[str] = LABEL_SUFFIXES,
    name: str | None = None,
) -> Dataset:
    """One-class-vs-rest binary task from integer label maps.

    The mask is ``label == class_id``. Pixels equal to ``ignore_index`` count as background
    (no separate ignore mask is kept). Frames where the class is absent, or covers the whole
    frame, are normal for e.g. "car": they are left out and recorded in ``skipped``
    (``"class absent"`` / ``"class fills frame"``) without a warning. Pairing and errors
    follow :func:`folder_pairs`.

    Args:
        images_dir: Folder of images.
        labels_dir: Folder of label maps with the same stems.
        class_id: Label value of the target class.
        ignore_index: The "unlabelled" value, or ``None``; must differ from ``class_id``.
        names: Restrict to these stems or image file names, in order.
        on_error: ``"raise"`` or ``"skip"``.
        label_suffixes: Label-map extensions to look for.
        name: Dataset name; defaults to ``<images folder>/class<id>``.

    Returns:
        The dataset; sample ids are the stems.

    Raises:
        DataError: Bad ``class_id``, structural problems, or per-sample problems when
            ``on_error="raise"``.
    """
    if isinstance(class_id, bool) or not isinstance(class_id, (int, np.integer)) or class_id < 0:
        raise DataError(f"class_id must be a non-negative integer label value, got {class_id!r}")
    if ignore_index is not None and class_id == ignore_index:
        raise DataError(
            f"class_id {class_id} is the ignore index; pick a real class or pass ignore_index=None"
        )
    class_id = int(class_id)
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    builder = DatasetBuilder(name or f"{images_dir.name}/class{class_id}", on_error)
    for stem, image_path, label_path in folder_files(
        images_dir, labels_dir, names, label_suffixes, "label map", builder
    ):
        try:
            size = read_image_size(image_path)
            labels = load_label_map(label_path)
            mask = labels == class_id
            where = f"label map {label_path} for image {image_path}"
            if labels.shape != size:
                validate_mask(mask, size, where=where)  # raises the size message
        except DataError as exc:
            builder.error(image_path, exc)
            continue
        if not mask.any():
            builder.leave_out(image_path, "class absent", f"no pixel of class {class_id}")
            continue
        if mask.all():
            builder.leave_out(image_path, "class fills frame", f"every pixel is class {class_id}")
            continue
        builder.add(Sample(id=stem, image_path=image_path, mask=mask))
    return builder.build()


def camvid_class_id(class_name_or_id: str | int) -> int:
    """Resolve a CamVid class name (case-insensitive; ``"sign/symbol"`` works) or id.

    Raises:
        DataError: Unknown class; the message lists :data:`CAMVID_CLASSES`.
    """
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(CAMVID_CLASSES))
    if isinstance(class_name_or_id, (int, np.integer)) and not isinstance(class_name_or_id, bool):
        if 0 <= int(class_name_or_id) < len(CAMVID_CLASSES):
            return int(class_name_or_id)
    elif isinstance(class_name_or_id, str):
        key = class_name_or_id.strip().lower()
        if key.isdigit() and int(key) < len(CAMVID_CLASSES):
            return int(key)
        aliases = {"sign/symbol": "sign", "symbol": "sign", "signsymbol": "sign"}
        key = aliases.get(key, key)
        if key in CAMVID_CLASSES:
            return CAMVID_CLASSES.index(key)
    raise DataError(f"unknown CamVid class {class_name_or_id!r}; use one of {listing}")


def camvid(
    root: str | os.PathLike[str],
    split: Literal["train", "val"],
    class_name_or_id: str | int,
    *,
    on_error: OnError = "raise",
) -> Dataset:
    """CamVid (SegNet layout) "class vs rest": ``root/<split>/`` and ``root/<split>annot/``.

    Args:
        root: The camvid folder.
        split: ``"train"`` or ``"val"`` (any ``<split>``/``<split>annot`` pair present works).
        class_name_or_id: A name from :data:`CAMVID_CLASSES` or its index.
        on_error: ``"raise"`` or ``"skip"``.

    Returns:
        Dataset named ``camvid/<split>/<class>``; frames without the class are in ``skipped``.

    Raises:
        DataError: Unknown split or class, or a sample problem.
    """
    root = Path(root)
    class_id = camvid_class_id(class_name_or_id)
    if not ((root / split).is_dir() and (root / f"{split}annot").is_dir()):
        available = (
            sorted(
                p.name for p in root.iterdir() if p.is_dir() and (root / f"{p.name}annot").is_dir()
            )
            if root.is_dir()
            else []
        )
        raise DataError(
            f"{root / split}: unknown CamVid split {split!r} (needs {split}/ and {split}annot/); "
            f"available: {', '.join(available) or 'none, check root'}"
        )
    return label_map_dataset(
        root / split,
        root / f"{split}annot",
        class_id,
        ignore_index=CAMVID_IGNORE_INDEX,
        on_error=on_error,
        name=f"camvid/{split}/{CAMVID_CLASSES[class_id]}",
    )
