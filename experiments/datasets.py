"""Dataset specifications as command-line strings.

Forms (``ROOT`` defaults to the shared data folder, see :func:`envs.data.shared_data_root`):

- ``kvasir:SPLIT`` or ``kvasir:SPLIT:ROOT``          Kvasir-SEG with its ``splits.json``
- ``camvid:SPLIT:CLASS`` or ``camvid:SPLIT:CLASS:ROOT`` CamVid, one class vs rest
- ``folder:IMAGES_DIR:MASKS_DIR``                   image / mask pairs matched by stem
- ``coco:ANNOTATIONS.json:IMAGES_DIR[:CATEGORY]``    COCO instances (pycocotools)
- ``synthetic:SPLIT``                                the embedded procedural task
- ``images:DIR`` or a plain folder                   images without masks (``embed``, ``segment``)

Any spec may end in a Python slice, ``SPEC[a:b]``, to keep part of it in its (sorted) order,
e.g. ``camvid:train:car[:300]`` and ``camvid:train:car[300:]`` for disjoint training and
validation frames.

Specs joined by ``+`` are one dataset, in that order (ids must stay unique): the nested
training sets of a learning curve are ``kvasir:train[:25]``, ``kvasir:train``,
``kvasir:train+kvasir:pool[:50]``, ... (every larger set holds the smaller).

And in an image shift, ``SPEC@SHIFT``, to test how a method copes with images unlike its
training images (:data:`SHIFTS`): ``@down384`` (resized to 384 px wide, masks with them),
``@colour`` (hue, saturation and brightness moved, fixed per image), ``@blur`` (Gaussian blur,
sigma 2.5 px), ``@hue`` (hue rotated by 30-90 degrees either way), ``@jpeg20`` (JPEG at quality
20), ``@border`` (a black endoscope border around an elliptic field of view, vignetted towards
it; the target outside the field is no longer target), ``@crop256`` (a 256-px square cut
around a point of the target); e.g. ``kvasir:test@down384``.

``SPEC@negative`` holds images without the target: each image cut to its largest part away
from the target (the target's box widened by a margin; at least 128 px a side, at most 2:1),
with an empty mask; images without such a part are left out. ``kvasir:val@negative`` are
endoscopy views without a polyp.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs import data as D

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageOnly:
    """An image without ground truth (for embedding and automatic segmentation)."""

    id: str
    image_path: Path
    mask: None = None

    def load_image(self) -> np.ndarray:
        return D.load_image(self.image_path)


def _root(parts: list[str], index: int, sub: str) -> Path:
    if len(parts) > index and parts[index]:
        return Path(parts[index]).expanduser()
    shared = D.shared_data_root()
    if shared is None:
        raise D.DataError(
            f"no data root given and no shared data folder found: pass ROOT in the spec or set "
            f"${D.DATA_ENV} to the folder holding {sub}/"
        )
    return shared / sub


_SLICE = re.compile(r"(?P<base>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]")


def _down384(image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, Any]:
    from PIL import Image

    h, w = image.shape[:2]
    size = (384, max(1, round(h * 384 / w)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    if mask is None:
        return small, None
    m = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize(size, Image.BILINEAR)
    return small, np.asarray(m) > 127


def _colour(image: np.ndarray, mask: np.ndarray | None, seed: int) -> tuple[np.ndarray, Any]:
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-25, 26))) % 256
    out = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.6, 1.4)))
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.75, 1.25)))
    return np.asarray(out), mask


def _blur(image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, Any]:
    from PIL import Image, ImageFilter

    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(2.5))), mask


def _hue(image: np.ndarray, mask: np.ndarray | None, seed: int) -> tuple[np.ndarray, Any]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    degrees = float(rng.uniform(30, 90)) * (1 if rng.random() < 0.5 else -1)
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + round(degrees * 256 / 360)) % 256
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")), mask


def _jpeg(image: np.ndarray, mask: np.ndarray | None, quality: int) -> tuple[np.ndarray, Any]:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), mask


def _border(image: np.ndarray, mask: np.ndarray | None, seed: int) -> tuple[np.ndarray, Any]:
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2 + rng.uniform(-0.03, 0.03) * h, w / 2 + rng.uniform(-0.03, 0.03) * w
    ry, rx = (h / 2) * rng.uniform(0.92, 1.0), (w / 2) * rng.uniform(0.85, 0.95)
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)  # 1 on the field's edge
    light = np.clip(1.0 - 0.6 * r**2, 0.0, 1.0) * (r <= 1.0)
    out = (image.astype(np.float32) * light[..., None]).round().astype(np.uint8)
    return out, None if mask is None else np.asarray(mask, bool) & (r <= 1.0)


def _crop256(image: np.ndarray, mask: np.ndarray | None, seed: int) -> tuple[np.ndarray, Any]:
    h, w = image.shape[:2]
    size = min(256, h, w)
    rng = np.random.default_rng(seed)
    if mask is not None and np.asarray(mask).any():
        ys, xs = np.nonzero(mask)
        k = int(rng.integers(len(ys)))  # a target pixel, somewhere in the crop
        y0 = int(np.clip(ys[k] - rng.integers(size // 4, 3 * size // 4 + 1), 0, h - size))
        x0 = int(np.clip(xs[k] - rng.integers(size // 4, 3 * size // 4 + 1), 0, w - size))
    else:
        y0, x0 = (h - size) // 2, (w - size) // 2
    box = (slice(y0, y0 + size), slice(x0, x0 + size))
    return image[box], None if mask is None else np.asarray(mask)[box]


#: Smallest side, in pixels, of a ``@negative`` cut; its margin around the target's box as a
#: share of the image's shorter side.
NEGATIVE_MIN_SIDE = 128
NEGATIVE_MARGIN = 0.05


def negative_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)``: the largest strip of the image beside the target's box (widened by
    :data:`NEGATIVE_MARGIN`), cut to at most 2:1 around its centre, or ``None`` when no strip
    is :data:`NEGATIVE_MIN_SIDE` px a side."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    if not mask.any():
        return (0, h, 0, w)
    ys, xs = np.nonzero(mask)
    m = round(NEGATIVE_MARGIN * min(h, w))
    by0, by1 = max(0, int(ys.min()) - m), min(h, int(ys.max()) + 1 + m)
    bx0, bx1 = max(0, int(xs.min()) - m), min(w, int(xs.max()) + 1 + m)
    strips = [(0, h, 0, bx0), (0, h, bx1, w), (0, by0, 0, w), (by1, h, 0, w)]
    best = None
    for y0, y1, x0, x1 in strips:
        sh, sw = y1 - y0, x1 - x0
        if min(sh, sw) < NEGATIVE_MIN_SIDE:
            continue
        if sh > 2 * sw:
            y0 += (sh - 2 * sw) // 2
            y1 = y0 + 2 * sw
        elif sw > 2 * sh:
            x0 += (sw - 2 * sh) // 2
            x1 = x0 + 2 * sh
        if best is None or (y1 - y0) * (x1 - x0) > (best[1] - best[0]) * (best[3] - best[2]):
            best = (y0, y1, x0, x1)
    return best


def _negative(image: np.ndarray, mask: np.ndarray | None, seed: int) -> tuple[np.ndarray, Any]:
    if mask is None:
        raise D.DataError("@negative needs the target's mask to cut away from it")
    box = negative_box(mask)
    if box is None:
        raise D.DataError(f"@negative: no part of {NEGATIVE_MIN_SIDE} px beside the target")
    y0, y1, x0, x1 = box
    return np.ascontiguousarray(image[y0:y1, x0:x1]), np.zeros((y1 - y0, x1 - x0), bool)


#: Image shifts of ``SPEC@SHIFT``: ``(image, mask, seed) -> (image, mask)``.
SHIFTS: dict[str, Any] = {
    "down384": lambda image, mask, seed: _down384(image, mask),
    "colour": _colour,
    "blur": lambda image, mask, seed: _blur(image, mask),
    "hue": _hue,
    "jpeg20": lambda image, mask, seed: _jpeg(image, mask, 20),
    "border": _border,
    "crop256": _crop256,
    "negative": _negative,
}
#: The shifts that change the mask (its size or its pixels); the others keep the sample's.
MASK_SHIFTS = ("down384", "border", "crop256", "negative")


@dataclass(frozen=True)
class Shifted:
    """A sample seen through an image shift (:data:`SHIFTS`); the mask follows when the shift
    changes the geometry."""

    inner: Any
    shift: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.inner.id}@{self.shift}"

    @property
    def image_path(self) -> Any:
        return getattr(self.inner, "image_path", None)

    @property
    def mask(self) -> np.ndarray | None:
        inner = getattr(self.inner, "mask", None)
        if inner is None or self.shift not in MASK_SHIFTS:
            return inner
        h, w = inner.shape
        return SHIFTS[self.shift](np.zeros((h, w, 3), np.uint8), inner, self.seed)[1]

    def load_image(self) -> np.ndarray:
        inner = getattr(self.inner, "mask", None) if self.shift in MASK_SHIFTS else None
        image, _ = SHIFTS[self.shift](self.inner.load_image(), inner, self.seed)
        return np.ascontiguousarray(image)


def shifted_copies(samples: Sequence[Any], shifts: Sequence[str]) -> list[tuple[int, Shifted]]:
    """Every sample under every shift, as ``(index of the sample, copy)``; each copy's seed is
    its sample's index, as in ``SPEC@SHIFT``."""
    return [(i, Shifted(s, shift, i)) for shift in shifts for i, s in enumerate(samples)]


def load_dataset(spec: str, on_error: D.OnError = "raise"):
    """Resolve a dataset spec (see module docstring) to a sequence of samples."""
    if "+" in spec and not Path(spec).expanduser().exists():
        parts = [p.strip() for p in spec.split("+")]
        if not all(parts):
            raise D.DataError(f"{spec}: an empty part around '+'; join specs as A+B")
        loaded = [load_dataset(p, on_error) for p in parts]
        return D.Dataset(
            [s for part in loaded for s in part],
            name="+".join(getattr(d, "name", p) for d, p in zip(loaded, parts, strict=True)),
            skipped=[item for d in loaded for item in getattr(d, "skipped", [])],
        )
    if "@" in spec and not Path(spec).expanduser().exists():
        base, _, shift = spec.rpartition("@")
        if shift not in SHIFTS:
            raise D.DataError(f"{spec}: unknown image shift {shift!r}; use {', '.join(SHIFTS)}")
        samples = load_dataset(base, on_error)
        if shift == "negative":  # only the images with room beside the target
            samples = [s for s in samples if s.mask is not None and negative_box(s.mask)]
        return D.Dataset(
            [Shifted(s, shift, i) for i, s in enumerate(samples)],
            name=f"{getattr(samples, 'name', base)}@{shift}",
            skipped=list(getattr(samples, "skipped", [])),
        )
    sliced = _SLICE.fullmatch(spec)
    if sliced and not Path(spec).expanduser().exists():
        base = load_dataset(sliced["base"], on_error)
        start = int(sliced["start"]) if sliced["start"] else None
        stop = int(sliced["stop"]) if sliced["stop"] else None
        part = base[start:stop]
        if not len(part):
            raise D.DataError(f"{spec}: the slice keeps none of the {len(base)} samples")
        return part
    path = Path(spec).expanduser()
    if ":" not in spec or path.is_dir():
        return image_folder(path)
    kind, *parts = spec.split(":")
    if kind == "kvasir":
        if not parts:
            raise D.DataError("kvasir needs a split: kvasir:train | kvasir:val | kvasir:test")
        return D.kvasir_seg(_root(parts, 1, "kvasir-seg"), parts[0], on_error=on_error)
    if kind == "camvid":
        if len(parts) < 2:
            raise D.DataError("camvid needs a split and a class: e.g. camvid:val:car")
        return D.camvid(_root(parts, 2, "camvid"), parts[0], parts[1], on_error=on_error)
    if kind == "folder":
        if len(parts) != 2:
            raise D.DataError("folder needs two folders: folder:IMAGES_DIR:MASKS_DIR")
        return D.folder_pairs(parts[0], parts[1], on_error=on_error)
    if kind == "coco":
        if len(parts) < 2:
            raise D.DataError("coco needs coco:ANNOTATIONS.json:IMAGES_DIR[:CATEGORY]")
        category = parts[2] if len(parts) > 2 else None
        return D.coco_dataset(parts[0], parts[1], category=category, on_error=on_error)
    if kind == "synthetic":
        from envs.synthetic import synthetic_task

        return synthetic_task(parts[0] if parts else "train")
    if kind == "images":
        return image_folder(Path(parts[0]).expanduser())
    raise D.DataError(
        f"unknown dataset kind {kind!r} in {spec!r}; use kvasir:, camvid:, folder:, coco:, "
        "synthetic: or images:"
    )


def load_or_skip(sample, on_error: D.OnError, skipped: list[tuple[str, str]]) -> np.ndarray | None:
    """``sample``'s image; if it cannot be read, raise naming the file and both fixes
    (``raise``) or append ``(file, reason)`` to ``skipped`` and return ``None`` (``skip``)."""
    try:
        return sample.load_image()
    except D.DataError as exc:
        if on_error == "raise":
            raise D.DataError(f"{exc}; or skip it {D.SKIP_FIX}") from exc
        skipped.append((str(getattr(sample, "image_path", sample.id)), f"error: {exc}"))
        return None


def readable(samples: Sequence, on_error: D.OnError = "raise", *, name: str = "data") -> D.Dataset:
    """Decode every image once, before any expensive work, so an unreadable file stops the run
    at once (``raise``) or is left out and listed (``skip``).

    Returns:
        The usable samples as a :class:`~envs.data.Dataset` whose ``skipped`` lists the files
        left out here plus those the dataset itself skipped while it was built.
    """
    skipped = list(getattr(samples, "skipped", []))
    kept = [s for s in samples if load_or_skip(s, on_error, skipped) is not None]
    if skipped:
        # a bad file is named with its reason; an expected omission (a CamVid frame without
        # the class) is counted by kind, once
        errors = [(f, r) for f, r in skipped if r.startswith("error")]
        kinds = Counter(r.split(":")[0] for _, r in skipped)
        logger.log(
            logging.WARNING if errors else logging.INFO,
            "%s: %d usable, %d skipped (%s)",
            name, len(kept), len(skipped), ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        )  # fmt: skip
        for file, reason in errors:
            logger.warning("  skipped %s: %s", file, reason)
    return D.Dataset(kept, name=getattr(samples, "name", name), skipped=skipped)


def load_readable(spec: str, on_error: D.OnError = "raise") -> D.Dataset:
    """:func:`load_dataset` then :func:`readable`: the usable samples of ``spec``, with what
    was skipped in ``.skipped`` (always empty with ``raise``, which stops at the first bad
    file instead)."""
    return readable(load_dataset(spec, on_error), on_error, name=spec)


def image_folder(folder: Path) -> list[ImageOnly]:
    """Every image file of a folder (sorted), without masks."""
    if not folder.is_dir():
        raise D.DataError(f"{folder} is not a folder of images")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in D.IMAGE_SUFFIXES
    )
    if not files:
        raise D.DataError(f"no images ({', '.join(D.IMAGE_SUFFIXES)}) in {folder}")
    return [ImageOnly(p.stem, p) for p in files]
