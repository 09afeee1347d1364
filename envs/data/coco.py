"""COCO-format annotations: polygons and RLE masks of one category (or all)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from envs.data.dataset import Dataset, DatasetBuilder, OnError, Sample
from envs.data.folders import check_dir
from envs.data.images import (
    _EXIF_METHODS,
    _SWAPPING_ORIENTATIONS,
    DataError,
    exif_orientation,
    fmt_size,
    open_image,
    validate_mask,
)

logger = logging.getLogger(__name__)


def _coco_decode(seg: Any, height: int, width: int, where: str) -> np.ndarray:
    """Decode a COCO segmentation (polygons, uncompressed or compressed RLE).

    Returns:
        ``(height, width)`` ``bool`` in the annotation's frame.

    Raises:
        DataError: Malformed segmentation.
    """
    from pycocotools import mask as mask_utils

    try:
        if isinstance(seg, list):
            polygons = [list(map(float, p)) for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            if len(polygons) != len(seg):
                raise DataError(
                    f"{where}: polygon with fewer than 3 points or an odd number of coordinates; "
                    "fix the annotation"
                )
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if [int(v) for v in seg["size"]] != [height, width]:
                raise DataError(
                    f"{where}: RLE size {seg['size']} differs from the image entry "
                    f"[{height}, {width}] (H, W); fix the annotation"
                )
            if isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, height, width)
            else:
                counts = seg["counts"]
                if isinstance(counts, str):
                    counts = counts.encode("ascii")
                rle = {"size": [height, width], "counts": counts}
        else:
            raise DataError(
                f"{where}: segmentation is neither a polygon list nor an RLE dict; fix it"
            )
        with warnings.catch_warnings():
            # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless.
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_utils.decode(rle)
    except DataError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise DataError(f"{where}: malformed segmentation ({exc}); fix the annotation") from exc
    if decoded.ndim == 3:
        decoded = decoded.max(axis=2)
    return decoded.astype(bool)


def _coco_category(category: str | int | None, cats: dict[int, str], ann_file: Path) -> int | None:
    if category is None:
        return None
    listing = ", ".join(f"{i}={n}" for i, n in sorted(cats.items())[:40])
    if isinstance(category, (int, np.integer)) and not isinstance(category, bool):
        if int(category) in cats:
            return int(category)
    elif isinstance(category, str):
        exact = [i for i, n in cats.items() if n == category]
        loose = [i for i, n in cats.items() if n.lower() == category.lower()]
        if exact or len(loose) == 1:
            return (exact or loose)[0]
    raise DataError(f"{ann_file}: unknown category {category!r}; available: {listing}")


def _apply_orientation(mask: np.ndarray, orientation: int) -> np.ndarray:
    method = _EXIF_METHODS.get(orientation)
    if method is None:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").transpose(method)
    return np.asarray(im) > 127


def coco_dataset(
    annotation_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    *,
    per: Literal["instance", "category"] = "instance",
    category: str | int | None = None,
    min_area: int = 1,
    on_error: OnError = "raise",
    name: str | None = None,
) -> Dataset:
    """Binary masks from a COCO-format annotation file (polygons and RLE, via pycocotools).

    * ``per="instance"``: one sample per non-crowd annotation, id ``"<stem>#<annotation id>"``.
      Crowd annotations (``iscrowd=1``) cover groups, not one object: they are left out and
      recorded in ``skipped`` as ``"crowd"``.
    * ``per="category"``: one sample per (image, category), the union of all its annotations
      of that category, crowd ones included; id ``"<stem>#<category id>"``.

    Masks with fewer than ``min_area`` pixels are left out (``"below min_area"``), as are
    images with no matching annotation (``"no annotations"``). Annotations are taken to be in
    the stored pixel frame when the image entry's ``height``/``width`` equal the stored size
    (as in COCO); if the file has an EXIF orientation, masks get the same transpose as
    :func:`load_image`, so they stay aligned. An entry matching only the displayed (rotated)
    size is taken as already in the displayed frame. All masks are held in memory
    (``H x W`` bytes each): restrict with ``category`` on large files.

    Args:
        annotation_file: COCO JSON with ``images``, ``annotations``, ``categories``.
        image_dir: Folder that ``file_name`` entries are relative to.
        per: ``"instance"`` or ``"category"``.
        category: Restrict to one category, by id or name (case-insensitive fallback).
        min_area: Minimum foreground pixels per sample.
        on_error: ``"raise"`` or ``"skip"`` for per-image/per-annotation problems.
        name: Dataset name; defaults to the annotation file's stem.

    Returns:
        The dataset.

    Raises:
        DataError: Unreadable JSON, unknown category, or sample problems when raising.
    """
    if per not in ("instance", "category"):
        raise ValueError(f"per must be 'instance' or 'category', got {per!r}")
    ann_file, image_dir = Path(annotation_file), Path(image_dir)
    check_dir(image_dir, "image")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{ann_file}: annotation file does not exist; check the path") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{ann_file}: cannot parse annotation JSON ({exc}); fix it") from exc
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DataError(
            f"{ann_file}: not a COCO annotation file (needs 'images', 'annotations' and "
            "'categories' lists)"
        )
    try:
        cats = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        images = {int(im["id"]): im for im in data["images"]}
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{ann_file}: entry without a valid 'id'/'image_id' ({exc}); fix it"
        ) from exc
    cat_id = _coco_category(category, cats, ann_file)
    builder = DatasetBuilder(name or ann_file.stem, on_error)

    for image_id, entry in images.items():
        file_name = str(entry.get("file_name", ""))
        image_path = image_dir / file_name
        anns = [
            a
            for a in by_image.get(image_id, [])
            if cat_id is None or a.get("category_id") == cat_id
        ]
        if not anns:
            builder.leave_out(image_path, "no annotations", f"image id {image_id}")
            continue
        try:
            if not file_name:
                raise DataError(f"{ann_file}: image id {image_id} has no file_name; fix the entry")
            with open_image(image_path, None) as im:
                raw_w, raw_h = im.size
                orientation = exif_orientation(im, image_path)
            height, width = int(entry["height"]), int(entry["width"])
            swap = orientation in _SWAPPING_ORIENTATIONS
            if (height, width) == (raw_h, raw_w):
                transform = orientation
            elif swap and (height, width) == (raw_w, raw_h):
                transform = 1  # annotated on the displayed (already rotated) image
            else:
                shown = (raw_w, raw_h) if swap else (raw_h, raw_w)
                raise DataError(
                    f"{ann_file}: image id {image_id} says {height} x {width} (H x W) but "
                    f"{image_path} is {fmt_size(shown)}; fix the entry or the file"
                )
        except (KeyError, TypeError, ValueError) as exc:
            if not isinstance(exc, DataError):
                exc = DataError(
                    f"{ann_file}: image id {image_id} lacks a valid height/width ({exc}); fix it"
                )
            builder.error(image_path, exc)
            continue
        stem = Path(file_name).stem
        groups: dict[str, list[dict[str, Any]]] = {}
        for ann in anns:
            ann_id = ann.get("id")
            if per == "instance":
                if ann.get("iscrowd", 0):
                    builder.leave_out(f"{image_path}#{ann_id}", "crowd", f"annotation {ann_id}")
                    continue
                groups[f"{stem}#{ann_id}"] = [ann]
            else:
                groups.setdefault(f"{stem}#{ann.get('category_id')}", []).append(ann)
        for sample_id, group in groups.items():
            try:
                mask = np.zeros((height, width), dtype=bool)
                for ann in group:
                    where = f"{ann_file}: annotation {ann.get('id')} ({image_path})"
                    mask |= _coco_decode(ann.get("segmentation"), height, width, where)
            except DataError as exc:
                builder.error(f"{image_path}#{group[0].get('id')}", exc)
                continue
            area = int(mask.sum())
            if area < min_area:
                builder.leave_out(
                    f"{image_path}#{sample_id.rsplit('#', 1)[1]}",
                    "below min_area",
                    f"{area} < {min_area} pixels",
                )
                continue
            mask = _apply_orientation(mask, transform)
            try:
                validate_mask(mask, mask.shape, where=f"{ann_file}: {sample_id} ({image_path})")
            except DataError as exc:
                builder.error(f"{image_path}#{sample_id.rsplit('#', 1)[1]}", exc)
                continue
            builder.add(Sample(id=sample_id, image_path=image_path, mask=mask))
    return builder.build()
