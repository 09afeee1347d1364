"""Datasets from folders: image / mask pairs matched by file stem."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from envs.data.dataset import Dataset, DatasetBuilder, OnError, Sample
from envs.data.images import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    SKIP_FIX,
    DataError,
    load_mask,
    read_image_size,
    validate_mask,
)

logger = logging.getLogger(__name__)


def check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} directory does not exist; check the path")


def index_dir(directory: Path, suffixes: Sequence[str]) -> dict[str, list[Path]]:
    """Map stem -> files in ``directory`` (not recursive) with one of ``suffixes``.

    Hidden files (``.name``, e.g. macOS ``._x.jpg`` companions) are ignored.
    """
    wanted = {s.lower() for s in suffixes}
    index: dict[str, list[Path]] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            path = Path(entry.path)
            if path.suffix.lower() in wanted:
                index.setdefault(path.stem, []).append(path)
    for paths in index.values():
        paths.sort()
    return index


def unique_file(stem: str, paths: list[Path], what: str) -> Path:
    if len(paths) > 1:
        listed = " and ".join(str(p) for p in paths)
        raise DataError(
            f"{what} files {listed} share the stem {stem!r}, so the pairing is ambiguous; "
            "remove or rename all but one"
        )
    return paths[0]


def resolve_names(
    names: Sequence[str] | None,
    images: dict[str, list[Path]],
    images_dir: Path,
) -> list[str]:
    """Stems to use, in order: all (sorted) or those named (stems or file names)."""
    if names is None:
        return sorted(images)
    if isinstance(names, str):
        raise TypeError("names must be a sequence of stems or file names, not a single string")
    stems: list[str] = []
    seen: set[str] = set()
    for name in names:
        name = str(name)
        candidate = Path(name)
        if name in images:
            stem = name
        elif candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.stem in images:
            stem = candidate.stem
            if not any(p.name == candidate.name for p in images[stem]):
                present = ", ".join(p.name for p in images[stem])
                raise DataError(
                    f"{images_dir / name}: requested file does not exist (found {present} with "
                    "the same stem); fix the name list"
                )
        else:
            raise DataError(
                f"{images_dir / name}: requested image not found among the {len(images)} images "
                f"in {images_dir}; fix the name/split list or restore the file"
            )
        if stem in seen:
            raise DataError(f"{images_dir / name}: listed twice in names; remove the duplicate")
        seen.add(stem)
        stems.append(stem)
    return stems


def folder_files(
    images_dir: Path,
    other_dir: Path,
    names: Sequence[str] | None,
    other_suffixes: Sequence[str],
    other_what: str,
    builder: DatasetBuilder,
) -> Iterator[tuple[str, Path, Path]]:
    """Yield ``(stem, image, partner)`` pairs; missing partners go through ``builder``."""
    check_dir(images_dir, "image")
    check_dir(other_dir, other_what)
    images = index_dir(images_dir, IMAGE_SUFFIXES)
    others = index_dir(other_dir, other_suffixes)
    stems = resolve_names(names, images, images_dir)
    for stem in stems:
        image = unique_file(stem, images[stem], "image")
        if stem not in others:
            tried = "/".join(other_suffixes)
            builder.error(
                image,
                DataError(
                    f"{image}: no {other_what} named {stem}{{{tried}}} in {other_dir}; add it, "
                    f"remove the image, or skip it {SKIP_FIX}"
                ),
            )
            continue
        yield stem, image, unique_file(stem, others[stem], other_what)
    if names is None:
        unmatched = sorted(set(others) - set(images))
        if unmatched:
            logger.info(
                "%s: %d %s file(s) without an image ignored (e.g. %s)",
                builder.name,
                len(unmatched),
                other_what,
                others[unmatched[0]][0],
            )


def folder_pairs(
    images_dir: str | os.PathLike[str],
    masks_dir: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    *,
    on_error: OnError = "raise",
    mask_suffixes: Sequence[str] = MASK_SUFFIXES,
    threshold: int = 127,
    name: str | None = None,
) -> Dataset:
    """Pair images and binary masks from two folders by file stem.

    Images are files with an extension in :data:`IMAGE_SUFFIXES` (case-insensitive); hidden
    files are ignored. Masks are read with :func:`load_mask` and validated against the image
    size read from the image header. Structural problems always raise, whatever ``on_error``:
    two images (or two masks) with the same stem, a requested name that does not exist, a name
    listed twice. Per-sample problems (no mask, unreadable files, size mismatch, empty or full
    mask) raise or are skipped per ``on_error``.

    Args:
        images_dir: Folder of images.
        masks_dir: Folder of masks with the same stems.
        names: Restrict to these stems or image file names, in this order; ``None`` for all
            images, sorted by stem.
        on_error: ``"raise"`` or ``"skip"`` (logged and recorded in ``Dataset.skipped``).
        mask_suffixes: Mask extensions to look for.
        threshold: Foreground is ``value > threshold``, see :func:`load_mask`.
        name: Dataset name; defaults to the images folder name.

    Returns:
        The dataset; sample ids are the stems.

    Raises:
        DataError: See above.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    builder = DatasetBuilder(name or images_dir.name, on_error)
    for stem, image_path, mask_path in folder_files(
        images_dir, masks_dir, names, mask_suffixes, "mask", builder
    ):
        try:
            size = read_image_size(image_path)
            mask = load_mask(mask_path, threshold)
            validate_mask(mask, size, where=f"mask {mask_path} for image {image_path}")
        except DataError as exc:
            builder.error(image_path, exc)
            continue
        builder.add(Sample(id=stem, image_path=image_path, mask=mask))
    return builder.build()
