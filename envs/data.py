"""Datasets of (image, binary target mask) pairs for prompting episodes.

Every builder returns a :class:`Dataset`, a list of :class:`Sample` objects. Masks are read,
converted to ``bool`` ``(H, W)`` arrays and validated once, when the dataset is built; images
are only *opened* then (to read their size, so that size mismatches fail early) and decoded
lazily by :meth:`Sample.load_image`.

Conventions shared by all loaders:

* Images are ``(H, W, 3)`` ``uint8`` RGB after the EXIF orientation has been applied
  (``PIL.ImageOps.exif_transpose``); masks and label maps get the same transpose, so a mask
  drawn on the image *as displayed* lines up with it.
* Alpha channels are **dropped** (the stored colour values are kept as they are, not
  composited onto a background).
* 16-bit images are scaled to 8 bit by the full range of the 16-bit type
  (``round(v * 255 / 65535)``), never clipped. 32-bit integer images whose values fit in
  ``0..65535`` are treated as 16-bit; other integer and float images are scaled by the actual
  range of their values (floats already in ``[0, 1]`` are multiplied by 255).
* Masks: foreground is ``value > threshold`` on the 8-bit scale after that conversion, taking
  the maximum over the colour channels (alpha ignored). JPEG masks are not exactly binary,
  hence the threshold.
* Anything that cannot be used raises :class:`DataError` naming the file and the fix. Builders
  take ``on_error="skip"`` to skip such samples instead: each skip is logged as a warning and
  recorded in :attr:`Dataset.skipped`. Nothing is dropped silently and masks are never resized.
* Images larger than :data:`MAX_IMAGE_PIXELS` pixels are refused before decoding.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

#: Largest image (width x height, in pixels) any loader decodes. Raise it by assigning
#: ``envs.data.MAX_IMAGE_PIXELS = ...`` or pass ``max_pixels=`` to the ``load_*`` functions.
MAX_IMAGE_PIXELS: int = 100_000_000

#: Image file extensions recognised by :func:`folder_pairs` (compared case-insensitively).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Mask file extensions searched by :func:`folder_pairs` by default.
MASK_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Label-map extensions searched by :func:`label_map_dataset` (lossless formats only).
LABEL_SUFFIXES: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff")

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

#: Environment variable that overrides the location of the shared datasets.
DATA_ENV = "ALIGNSAM_DATA"

_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_METHODS: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PIL_LIMIT_LOCK = threading.Lock()
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)
_LIMIT_FIX = (
    "raise the limit with `envs.data.MAX_IMAGE_PIXELS = <pixels>` or pass max_pixels=..., "
    "or downscale the file"
)


class DataError(ValueError):
    """A data file cannot be used; the message names the file and says how to fix it."""


#: The fix every per-sample error offers besides repairing the file: leave it out.
SKIP_FIX = "(--skip-bad, on_error='skip')"


# --------------------------------------------------------------------------------------------
# Low-level file loading
# --------------------------------------------------------------------------------------------


def _limit(max_pixels: int | None) -> int:
    return MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)


def _too_big(path: Path, size: tuple[int, int] | None, limit: int, detail: str = "") -> DataError:
    what = f"{size[0]} x {size[1]} = {size[0] * size[1]} pixels" if size else detail
    return DataError(
        f"{path}: image is too large ({what}; the limit is {limit} pixels); {_LIMIT_FIX}"
    )


def _open(path: Path, max_pixels: int | None) -> Image.Image:
    """Open ``path`` with PIL (header only) and enforce the pixel limit.

    Args:
        path: Image file.
        max_pixels: Pixel limit, ``None`` for :data:`MAX_IMAGE_PIXELS`.

    Returns:
        The lazily loaded PIL image (the caller closes it).

    Raises:
        DataError: Missing, unreadable, unidentifiable or too large file.
    """
    limit = _limit(max_pixels)
    if not path.exists():
        raise DataError(f"{path}: file does not exist; check the path or the split/list file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image file; check the path")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); re-export or remove it")
    try:
        with warnings.catch_warnings():
            # PIL warns from ~89 Mpx; this module enforces its own limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(path)
            except Image.DecompressionBombError as exc:
                pil_limit = Image.MAX_IMAGE_PIXELS
                if pil_limit is None or limit <= 2 * pil_limit:
                    raise _too_big(path, None, limit, str(exc)) from exc
                # The caller allows more than PIL does: retry with PIL's own check off.
                with _PIL_LIMIT_LOCK:
                    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        im = Image.open(path)
                    finally:
                        Image.MAX_IMAGE_PIXELS = saved
    except DataError:
        raise
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"{path}: not a readable image ({type(exc).__name__}: {exc}); "
            "re-export the file or remove it from the dataset"
        ) from exc
    width, height = im.size
    if width * height > limit:
        im.close()
        raise _too_big(path, (width, height), limit)
    return im


def _orientation(im: Image.Image, path: Path) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"{path}: unreadable image or EXIF data ({type(exc).__name__}: {exc}); "
            "re-export the file or remove it from the dataset"
        ) from exc
    return value if isinstance(value, int) else 1


def _decode(path: Path, max_pixels: int | None) -> Image.Image:
    """Fully decode ``path`` and apply its EXIF orientation.

    Returns:
        A loaded PIL image detached from the file.

    Raises:
        DataError: Unreadable, corrupt, truncated or too large file.
    """
    im = _open(path, max_pixels)
    try:
        with im:
            try:
                im.load()
                out = ImageOps.exif_transpose(im)
            except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as exc:
                raise DataError(
                    f"{path}: image data is corrupt or truncated ({type(exc).__name__}: {exc}); "
                    "re-export the file or remove it from the dataset"
                ) from exc
            except Image.DecompressionBombError as exc:
                raise _too_big(path, im.size, _limit(max_pixels)) from exc
    except MemoryError as exc:
        raise _too_big(path, im.size, _limit(max_pixels), "out of memory") from exc
    return out


def read_image_size(
    path: str | os.PathLike[str], *, max_pixels: int | None = None
) -> tuple[int, int]:
    """Size of an image as :func:`load_image` will return it, from the file header.

    Orientations 5-8 swap width and height. Only PNG files are decoded (PIL must read the whole
    file to find an ``eXIf`` chunk placed after the pixel data).

    Args:
        path: Image file.
        max_pixels: Pixel limit, ``None`` for :data:`MAX_IMAGE_PIXELS`.

    Returns:
        ``(H, W)`` after the EXIF orientation is applied.

    Raises:
        DataError: Unreadable or too large file.
    """
    path = Path(path)
    with _open(path, max_pixels) as im:
        width, height = im.size
        if _orientation(im, path) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    return height, width


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel 16/32-bit or float array to ``uint8`` without clipping.

    Args:
        arr: ``(H, W)`` array from a PIL ``I;16*``, ``I`` or ``F`` image.
        mode: The PIL mode it came from.

    Returns:
        ``(H, W)`` ``uint8``.
    """
    if arr.size == 0:
        return np.zeros(arr.shape, np.uint8)
    if mode.startswith("I;16") or (arr.dtype.kind == "u" and arr.dtype.itemsize == 2):
        wide = arr.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if arr.dtype.kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:  # a 16-bit image stored in a 32-bit container
            wide = arr.astype(np.int64)
            return ((wide * 255 + 32767) // 65535).astype(np.uint8)
        span = max(hi - lo, 1)
        return ((arr.astype(np.float64) - lo) * (255.0 / span) + 0.5).astype(np.uint8)
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = data * 255.0
    else:
        scaled = (data - lo) * (255.0 / max(hi - lo, np.finfo(np.float64).tiny))
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _colour_channels(im: Image.Image, path: Path) -> np.ndarray:
    """8-bit colour channels of a decoded image, alpha dropped.

    Returns:
        ``(H, W, 1)`` for single-channel images, ``(H, W, 3)`` otherwise; ``uint8``.
    """
    mode = im.mode
    if mode == "L":
        return np.asarray(im)[:, :, None]
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_uint8(np.asarray(im), mode)[:, :, None]
    if mode in ("LA", "La"):
        return np.asarray(im)[:, :, :1]
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(im)[:, :, :3]
    if mode == "PA":
        im = im.convert("RGBA")
        return np.asarray(im)[:, :, :3]
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise DataError(
            f"{path}: unsupported image mode {mode!r} ({exc}); convert the file to RGB, "
            "grayscale or 16-bit grayscale"
        ) from exc


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as RGB.

    Handles grayscale, palette, alpha (dropped, not composited), 16-bit (scaled by the 16-bit
    range), 32-bit integer and float, CMYK and the EXIF orientation tag.

    Args:
        path: Image file.
        max_pixels: Refuse images with more pixels than this; ``None`` for
            :data:`MAX_IMAGE_PIXELS`.

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB, ``H x W`` as displayed (after the EXIF transpose).

    Raises:
        DataError: Missing, empty, corrupt, truncated, non-image or too large file.
    """
    path = Path(path)
    channels = _colour_channels(_decode(path, max_pixels), path)
    if channels.shape[2] == 1:
        channels = np.repeat(channels, 3, axis=2)
    return np.ascontiguousarray(channels, dtype=np.uint8)


def load_mask(
    path: str | os.PathLike[str], threshold: int = 127, *, max_pixels: int | None = None
) -> np.ndarray:
    """Read a binary mask file.

    Foreground is ``value > threshold`` on the 8-bit scale (16-bit and float masks are scaled
    to 8 bit like images); for multi-channel masks the maximum over the colour channels is
    used, alpha is ignored; palette masks are compared by their palette colours. The EXIF
    orientation is applied as for images. No size or emptiness check (see
    :func:`validate_mask`).

    Args:
        path: Mask file.
        threshold: ``0 <= threshold <= 254``; 127 suits JPEG-compressed 0/255 masks.
        max_pixels: Pixel limit, ``None`` for :data:`MAX_IMAGE_PIXELS`.

    Returns:
        ``(H, W)`` ``bool``.

    Raises:
        DataError: Unreadable file.
        ValueError: ``threshold`` out of range.
    """
    if isinstance(threshold, bool) or not 0 <= int(threshold) <= 254:
        raise ValueError(f"threshold must be an integer in 0..254, got {threshold!r}")
    path = Path(path)
    im = _decode(path, max_pixels)
    if im.mode == "1":
        return np.array(im, dtype=bool)
    channels = _colour_channels(im, path)
    gray = channels[:, :, 0] if channels.shape[2] == 1 else channels.max(axis=2)
    return gray > int(threshold)


def load_label_map(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> np.ndarray:
    """Read a single-channel integer label map (CamVid style), without thresholding.

    ``L`` and ``P`` (palette *indices*) give ``uint8``, 16-bit gives ``uint16``, ``I`` gives
    ``int32``. RGB files whose three channels are equal are accepted (channel 0 is used);
    colour-coded label maps are refused. The EXIF orientation is applied.

    Args:
        path: Label-map file.
        max_pixels: Pixel limit, ``None`` for :data:`MAX_IMAGE_PIXELS`.

    Returns:
        ``(H, W)`` integer array of label values.

    Raises:
        DataError: Unreadable file, colour-coded or non-integer labels.
    """
    path = Path(path)
    im = _decode(path, max_pixels)
    mode = im.mode
    if mode in ("L", "P"):
        return np.array(im, dtype=np.uint8)
    if mode == "1":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.array(im).astype(np.uint16)
    if mode == "I":
        return np.array(im, dtype=np.int32)
    if mode == "F":
        arr = np.asarray(im)
        if np.isfinite(arr).all() and np.array_equal(arr, np.round(arr)):
            return arr.astype(np.int32)
        raise DataError(
            f"{path}: float label map with non-integer values; save labels as an 8- or 16-bit "
            "single-channel PNG"
        )
    if mode in ("LA", "PA"):
        return np.array(im)[:, :, 0].astype(np.uint8)
    if mode in ("RGB", "RGBA", "RGBX"):
        arr = np.asarray(im)
        if np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(
            arr[:, :, 0], arr[:, :, 2]
        ):
            return np.array(arr[:, :, 0], dtype=np.uint8)
        raise DataError(
            f"{path}: colour-coded label map (mode {mode}, channels differ); convert it to a "
            "single-channel index map (one integer class id per pixel)"
        )
    raise DataError(
        f"{path}: unsupported label-map mode {mode!r}; save labels as an 8- or 16-bit "
        "single-channel PNG"
    )


def _fmt_size(size: tuple[int, ...]) -> str:
    return f"{size[0]} x {size[1]} (H x W)" if len(size) == 2 else f"shape {tuple(size)}"


def validate_mask(mask: np.ndarray, image_size: tuple[int, int], where: str) -> None:
    """Check that a mask can drive a prompting episode.

    Args:
        mask: ``(H, W)`` ``bool``.
        image_size: ``(H, W)`` of the image (after the EXIF transpose).
        where: Names the files involved, prefixed to every message.

    Raises:
        DataError: Not a 2-D bool array, size differs from the image, no foreground pixel,
            or every pixel foreground (an episode needs a background pixel for a negative
            point).
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        shape = getattr(mask, "shape", None)
        raise DataError(f"{where}: mask must be a 2-D (H, W) array, got {shape!r}")
    if mask.dtype != np.bool_:
        raise DataError(
            f"{where}: mask must have dtype bool, got {mask.dtype}; threshold it (e.g. mask > 0)"
        )
    size = (int(image_size[0]), int(image_size[1]))
    if mask.shape != size:
        raise DataError(
            f"{where}: mask is {_fmt_size(mask.shape)} but the image is {_fmt_size(size)}; "
            f"masks are never resized: fix or re-export the mask, or skip it {SKIP_FIX}"
        )
    if not mask.any():
        raise DataError(
            f"{where}: mask has no foreground pixels; remove the sample or skip it {SKIP_FIX}"
        )
    if mask.all():
        raise DataError(
            f"{where}: every mask pixel is foreground; an episode needs at least one background "
            f"pixel for a negative point: remove the sample or skip it {SKIP_FIX}"
        )


# --------------------------------------------------------------------------------------------
# Samples and datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Sample:
    """One image and its binary target mask.

    Attributes:
        id: Unique within its dataset: the file stem, or ``stem#<id>`` for COCO samples.
        image_path: The image file, decoded on demand by :meth:`load_image`.
        mask: ``(H, W)`` ``bool``, read-only, same size as the image after the EXIF
            transpose; never empty, never all ``True``.
    """

    id: str
    image_path: Path
    mask: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", Path(self.image_path))
        mask = self.mask
        if isinstance(mask, np.ndarray):
            validate_mask(mask, mask.shape[:2], where=f"sample {self.id!r} ({self.image_path})")
        else:
            validate_mask(mask, (0, 0), where=f"sample {self.id!r} ({self.image_path})")
        view = mask.view()
        view.flags.writeable = False
        object.__setattr__(self, "mask", view)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the mask and of the image."""
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    def load_image(self) -> np.ndarray:
        """Decode the image.

        Returns:
            ``(H, W, 3)`` ``uint8`` RGB, see :func:`load_image`.
        """
        return load_image(self.image_path)

    def __repr__(self) -> str:
        h, w = self.size
        return f"Sample(id={self.id!r}, image_path={str(self.image_path)!r}, mask={h}x{w})"


@dataclass(eq=False)
class Dataset(Sequence[Sample]):
    """A list of samples plus what was left out while building it.

    Attributes:
        samples: The usable samples, with unique ids.
        name: For logs and summaries, e.g. ``"kvasir-seg/train"``.
        skipped: ``(file, reason)`` for every candidate left out; ``reason`` starts with a
            short category (``"error: ..."``, ``"class absent: ..."``, ...).
    """

    samples: list[Sample]
    name: str = "dataset"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.samples = list(self.samples)
        seen: dict[str, Sample] = {}
        for sample in self.samples:
            if sample.id in seen:
                raise DataError(
                    f"{self.name}: duplicate sample id {sample.id!r} "
                    f"({seen[sample.id].image_path} and {sample.image_path}); ids must be unique"
                )
            seen[sample.id] = sample

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> Dataset: ...

    def __getitem__(self, index: int | slice) -> Sample | Dataset:
        if isinstance(index, slice):
            return Dataset(self.samples[index], name=self.name, skipped=list(self.skipped))
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def ids(self) -> list[str]:
        """Sample ids in order."""
        return [s.id for s in self.samples]

    def skip_counts(self) -> dict[str, int]:
        """Number of skipped candidates per reason category (text before the first ``:``)."""
        return dict(Counter(reason.split(":", 1)[0] for _, reason in self.skipped))

    def summary(self) -> str:
        """One line, e.g. ``"camvid/val/car: 60 samples, 41 skipped (41 class absent)"``."""
        text = f"{self.name}: {len(self.samples)} samples, {len(self.skipped)} skipped"
        if self.skipped:
            parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skip_counts().items()))
            text += f" ({parts})"
        return text

    def __repr__(self) -> str:
        return f"Dataset({self.summary()!r})"


class _Builder:
    """Collects samples and skips while a dataset is built, applying ``on_error``."""

    def __init__(self, name: str, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.name = name
        self.on_error = on_error
        self.samples: list[Sample] = []
        self.skipped: list[tuple[str, str]] = []
        self._quiet: Counter[str] = Counter()

    def error(self, file: str | Path, exc: DataError) -> None:
        """Raise ``exc`` or record it as a skip, per ``on_error``."""
        if self.on_error == "raise":
            if SKIP_FIX in str(exc):
                raise exc
            raise DataError(f"{exc}; or skip it {SKIP_FIX}") from exc
        logger.warning("%s: skipping %s: %s", self.name, file, exc)
        self.skipped.append((str(file), f"error: {exc}"))

    def leave_out(self, file: str | Path, kind: str, detail: str) -> None:
        """Record an expected omission (absent class, crowd...), logged once per kind."""
        logger.debug("%s: leaving out %s: %s: %s", self.name, file, kind, detail)
        self.skipped.append((str(file), f"{kind}: {detail}"))
        self._quiet[kind] += 1

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def build(self) -> Dataset:
        for kind, n in sorted(self._quiet.items()):
            logger.info("%s: left out %d candidate(s): %s", self.name, n, kind)
        dataset = Dataset(self.samples, name=self.name, skipped=self.skipped)
        logger.info("%s", dataset.summary())
        return dataset


def _check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} directory does not exist; check the path")


def _index_dir(directory: Path, suffixes: Sequence[str]) -> dict[str, list[Path]]:
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


def _unique(stem: str, paths: list[Path], what: str) -> Path:
    if len(paths) > 1:
        listed = " and ".join(str(p) for p in paths)
        raise DataError(
            f"{what} files {listed} share the stem {stem!r}, so the pairing is ambiguous; "
            "remove or rename all but one"
        )
    return paths[0]


def _resolve_names(
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


def _pairs(
    images_dir: Path,
    other_dir: Path,
    names: Sequence[str] | None,
    other_suffixes: Sequence[str],
    other_what: str,
    builder: _Builder,
) -> Iterator[tuple[str, Path, Path]]:
    """Yield ``(stem, image, partner)`` pairs; missing partners go through ``builder``."""
    _check_dir(images_dir, "image")
    _check_dir(other_dir, other_what)
    images = _index_dir(images_dir, IMAGE_SUFFIXES)
    others = _index_dir(other_dir, other_suffixes)
    stems = _resolve_names(names, images, images_dir)
    for stem in stems:
        image = _unique(stem, images[stem], "image")
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
        yield stem, image, _unique(stem, others[stem], other_what)
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
    builder = _Builder(name or images_dir.name, on_error)
    for stem, image_path, mask_path in _pairs(
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


def kvasir_seg(root: str | os.PathLike[str], split: str, *, on_error: OnError = "raise") -> Dataset:
    """Kvasir-SEG polyps: ``root/images/*.jpg``, ``root/masks/*.jpg``, ``root/splits.json``.

    ``splits.json`` maps split names to lists of image file names.

    Args:
        root: The dataset folder.
        split: A key of ``splits.json`` (``train``, ``val``, ``test``, ``test_rest``).
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
    builder = _Builder(name or f"{images_dir.name}/class{class_id}", on_error)
    for stem, image_path, label_path in _pairs(
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


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


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
    _check_dir(image_dir, "image")
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
    builder = _Builder(name or ann_file.stem, on_error)

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
            with _open(image_path, None) as im:
                raw_w, raw_h = im.size
                orientation = _orientation(im, image_path)
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
                    f"{image_path} is {_fmt_size(shown)}; fix the entry or the file"
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


# --------------------------------------------------------------------------------------------
# Locating the shared data
# --------------------------------------------------------------------------------------------


def shared_data_root() -> Path | None:
    """Folder holding the shared datasets (``kvasir-seg/``, ``camvid/``), if present.

    ``$ALIGNSAM_DATA`` wins when set (``None`` with a warning if it is not a folder); otherwise
    the first existing of ``<repo>/../shared/data`` and ``<repo>/shared/data``, where
    ``<repo>`` is the parent of the ``envs`` package folder.

    Returns:
        The folder, or ``None`` when absent (tests then skip).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path
        logger.warning("$%s=%s is not a directory; shared data unavailable", DATA_ENV, env)
        return None
    repo = Path(__file__).resolve().parent.parent
    for candidate in (repo.parent / "shared" / "data", repo / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_IGNORE_INDEX",
    "DATA_ENV",
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
    "MASK_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "DataError",
    "Dataset",
    "Sample",
    "camvid",
    "camvid_class_id",
    "coco_dataset",
    "folder_pairs",
    "kvasir_seg",
    "label_map_dataset",
    "load_image",
    "load_label_map",
    "load_mask",
    "read_image_size",
    "shared_data_root",
    "validate_mask",
]
