"""``alignsam segment RUN_DIR IMAGES... --out DIR``: automatic segmentation with a trained agent.

For every image: encode once (through the embedding cache), SRM initial points, T agent clicks,
final mask. Writes, under ``--out``:

- ``masks/{id}.png``: binary masks (0 / 255, the image's size);
- ``overlays/{id}.png``: the mask and the numbered click sequence on the image;
- ``results.json``: COCO format (``images``, ``annotations`` with RLE ``segmentation`` from
  pycocotools, ``categories``), loadable with ``pycocotools.coco.COCO``; each annotation also
  carries ``score`` (mean decoder foreground probability inside the mask) and its ``clicks``;
- ``summary.json``: counts, skipped files with the reason, seconds and images/s.

Nothing is skipped silently: an unreadable image stops the run with its error, or, with
``skip_bad``, is listed under ``skipped`` and counted in the printed summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from agents.prompt_agent import PromptAgent
from envs.data import IMAGE_SUFFIXES, DataError, Dataset, OnError
from envs.render import overlay
from experiments.datasets import ImageOnly, load_dataset
from segmenter.io import atomic_write

logger = logging.getLogger(__name__)


@dataclass
class SegmentReport:
    """What a ``segment`` run did (also written as ``summary.json``)."""

    out: str
    images: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    encode_seconds: float = 0.0
    decoder_calls: int = 0
    clicks_per_image: float = 0.0
    mean_iou: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


def gather_inputs(inputs: Sequence[str], on_error: OnError = "raise") -> Dataset:
    """Samples from a mix of image files, folders of images and dataset specs.

    Duplicate ids (same file stem from two folders) get a numeric suffix so no output file is
    overwritten. ``on_error`` applies to dataset specs (e.g. a mask of the wrong size); what
    they skip is listed in the result's ``skipped``.
    """
    samples: list[Any] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{path}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})"
                )
            samples.append(ImageOnly(path.stem, path))
        elif path.is_dir() or ":" in item:
            found = load_dataset(item, on_error)
            samples.extend(found)
            skipped.extend(getattr(found, "skipped", []))
        else:
            raise DataError(f"{item}: no such file or folder (give image files, folders or specs)")
    seen: dict[str, int] = {}
    unique = []
    for s in samples:
        n = seen.get(s.id, 0)
        seen[s.id] = n + 1
        unique.append(s if n == 0 else _Renamed(s, f"{s.id}__{n}"))
    return Dataset(unique, name="inputs", skipped=skipped)


@dataclass(frozen=True)
class _Renamed:
    inner: Any
    id: str

    @property
    def mask(self) -> Any:
        return getattr(self.inner, "mask", None)

    def load_image(self) -> np.ndarray:
        return self.inner.load_image()


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: Image.fromarray(array).save(fh, format="PNG"))


def segment_images(
    agent: PromptAgent,
    samples: Sequence[Any],
    out: str | Path,
    *,
    steps: int | None = None,
    overlays: bool = True,
    skip_bad: bool = False,
    progress: bool = True,
) -> SegmentReport:
    """Segment ``samples`` with ``agent`` and write masks, overlays, COCO RLE and a summary.

    Args:
        agent: A loaded :class:`~agents.prompt_agent.PromptAgent`.
        samples: Objects with ``id`` and ``load_image()`` (a ``mask`` attribute, when present
            and not ``None``, adds the IoU against it to the summary).
        out: Output folder (created).
        steps: Agent clicks per image (default: the task's T).
        overlays: Write overlay PNGs.
        skip_bad: Skip (and list) images that cannot be read instead of stopping.
        progress: Progress bar.

    Returns:
        The :class:`SegmentReport` (also written to ``out/summary.json``).
    """
    from segmenter.base import mask_iou

    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
    report = SegmentReport(out=str(out))
    report.skipped = [{"id": f, "reason": r} for f, r in getattr(samples, "skipped", [])]
    images, annotations, ious, clicks_used = [], [], [], []
    seg = agent.segmenter
    calls0 = getattr(seg, "decoder_calls", 0)
    t_start = time.perf_counter()
    for s in tqdm(samples, desc="segment", unit="img", disable=not progress):
        try:
            image = s.load_image()
        except (DataError, OSError) as exc:
            if not skip_bad:
                raise DataError(
                    f"{exc} (pass --skip-bad to skip unreadable images and list them)"
                ) from exc
            report.skipped.append({"id": str(s.id), "reason": str(exc)})
            logger.warning("skipped %s: %s", s.id, exc)
            continue
        t0 = time.perf_counter()
        result = agent.segment_detailed(image, steps)
        report.encode_seconds += result["encode_seconds"]
        mask, clicks = result["mask"], result["clicks"]
        _write_png(out / "masks" / f"{s.id}.png", mask.astype(np.uint8) * 255)
        if overlays:
            gt = getattr(s, "mask", None)
            _write_png(
                out / "overlays" / f"{s.id}.png",
                overlay(image, mask, clicks[:, :2], clicks[:, 2], outline=gt),
            )
        image_id = len(images) + 1
        h, w = mask.shape
        images.append({"id": image_id, "file_name": str(s.id), "height": h, "width": w})
        ys, xs = np.nonzero(mask)
        bbox = (
            [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
            if len(xs)
            else [0.0, 0.0, 0.0, 0.0]
        )
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": _rle(mask),
                "area": float(mask.sum()),
                "bbox": bbox,
                "iscrowd": 0,
                "score": result["score"],
                "clicks": clicks.tolist(),
                "seconds": time.perf_counter() - t0,
            }
        )
        clicks_used.append(len(clicks))
        gt = getattr(s, "mask", None)
        if gt is not None:
            ious.append(mask_iou(mask, np.asarray(gt, bool)))
    report.seconds = time.perf_counter() - t_start
    report.images = len(images)
    report.decoder_calls = int(getattr(seg, "decoder_calls", 0) - calls0)
    report.clicks_per_image = float(np.mean(clicks_used)) if clicks_used else 0.0
    report.mean_iou = float(np.mean(ious)) if ious else None
    coco = {
        "info": {"description": f"alignsam segment, task {agent.task.name}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": agent.task.srm.text or agent.task.name}],
    }
    atomic_write(out / "results.json", lambda fh: fh.write(json.dumps(coco).encode()))
    summary = json.dumps(report.to_dict(), indent=2)
    atomic_write(out / "summary.json", lambda fh: fh.write(summary.encode()))
    return report
