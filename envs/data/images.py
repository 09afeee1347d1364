"""Reading image, mask and label-map files: decoding, orientation, bit depth, size limits and
the checks that name the file and the fix."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

#: Largest image (width x height, in pixels) any loader decodes. Raise it by assigning
#: ``envs.data.images.MAX_IMAGE_PIXELS = ...`` or pass ``max_pixels=`` to the ``load_*`` functions.
MAX_IMAGE_PIXELS: int = 100_000_000

#: Image file extensions recognised by :func:`folder_pairs` (compared case-insensitively).
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)

#: Mask file extensions searched by :func:`folder_pairs` by default.
MASK_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Label-map extensions searched by :func:`label_map_dataset` (lossless formats only).
LABEL_SUFFIXES: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff")


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
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
)
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


def open_image(path: Path, max_pixels: int | None) -> Image.Image:
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


def exif_orientation(im: Image.Image, path: Path) -> int:
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
    im = open_image(path, max_pixels)
    try:
        with im:
            try:
                im.load()
                out = ImageOps.exif_transpose(im)
            except (
                OSError,
                SyntaxError,
                ValueError,
                EOFError,
                IndexError,
                KeyError,
            ) as exc:
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
    with open_image(path, max_pixels) as im:
        width, height = im.size
        if exif_orientation(im, path) in _SWAPPING_ORIENTATIONS:
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


def rgb_array(image: np.ndarray | Image.Image | str | os.PathLike[str]) -> np.ndarray:
    """An image given as an array, a PIL image or a file path, as ``(H, W, 3)`` ``uint8`` RGB.

    Paths are read with :func:`load_image`; PIL images get the same conversions (EXIF
    orientation, alpha dropped, 16-bit scaled, grayscale repeated); arrays must be ``uint8``
    ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA (alpha dropped) or ``(H, W)`` grayscale.

    Raises:
        DataError: An unreadable file.
        TypeError: Anything else than an array, a PIL image or a path.
        ValueError: An array of another shape or dtype.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        channels = _colour_channels(ImageOps.exif_transpose(image), Path("<PIL image>"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
        ):
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB array, got shape {image.shape} dtype "
                f"{image.dtype}; convert it (e.g. np.asarray(PIL.Image.open(f).convert('RGB'))) "
                "or pass the file path or PIL image"
            )
        channels = image[:, :, None] if image.ndim == 2 else image[:, :, :3]
    else:
        raise TypeError(
            f"expected an image: an (H, W, 3) uint8 array, a PIL image or a file path, got "
            f"{type(image).__name__}"
        )
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


def fmt_size(size: tuple[int, ...]) -> str:
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
            f"{where}: mask is {fmt_size(mask.shape)} but the image is {fmt_size(size)}; "
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
