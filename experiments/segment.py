"""``alignsam segment RUN INPUT... --out DIR``: automatic segmentation with a trained agent.

For every image: encode once (through the embedding cache), SRM initial points, T agent clicks,
final mask. Writes, under ``--out``:

- ``masks/{id}.png``: binary masks (0 / 255, the image's size); ``id`` is the file's stem,
  with ``__1``, ``__2`` ... when two inputs have the same name;
- ``overlays/{id}.png``: the mask and the numbered click sequence on the image;
- ``results.json``: COCO format (``images``, ``annotations`` with RLE ``segmentation`` from
  pycocotools, ``categories``), loadable with ``pycocotools.coco.COCO``. ``images[].file_name``
  is the input's path relative to the folder or dataset it came from, with its extension
  (absolute for a file given by name), plus ``mask_file`` and ``source`` (the input argument);
  each annotation also carries ``score`` (mean decoder foreground probability inside the mask),
  ``presence`` (how sure the SRM is that the target is in the image at all,
  :mod:`recalibration.presence`), ``no_target`` and its ``clicks``;
- ``summary.json``: counts, skipped files with the reason, seconds and images/s, and
  ``no_target``: the images whose presence score fell below the run's threshold
  (``presence.json``, from ``alignsam presence RUN --choose``, or ``presence_threshold``): their
  mask is empty.

All or nothing: every input is found and decoded before the first mask is written, and every
unusable file is named in one error (or, with ``skip_bad``, listed under ``skipped`` and
counted); the outputs are written to a temporary sibling folder that replaces ``--out`` at the
end, so a failed or interrupted run leaves nothing half-done. A non-empty ``--out`` is replaced
only with ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agents.prompt_agent import PromptAgent
from envs.data import IMAGE_SUFFIXES, SKIP_FIX, DataError, Dataset, OnError
from envs.render import overlay
from experiments.datasets import ImageOnly, load_dataset
from segmenter.io import atomic_write
from segmenter.progress import progress_bar

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
    presence_threshold: float | None = None
    no_target: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


@dataclass(frozen=True)
class Input:
    """One image to segment.

    Attributes:
        sample: The dataset sample (``load_image()``, optional ``mask``).
        id: Unique within the run: the stem of its output files (``a``, ``a__1`` on repeats).
        file_name: COCO ``file_name``: the path relative to the folder or dataset it came from,
            with its extension (absolute for an image given as a file; the sample id for
            images without a file, e.g. ``synthetic:``).
        source: The command-line input it came from.
    """

    sample: Any
    id: str
    file_name: str
    source: str

    @property
    def mask(self) -> Any:
        return getattr(self.sample, "mask", None)

    @property
    def image_path(self) -> Any:
        return getattr(self.sample, "image_path", self.file_name)

    def load_image(self) -> np.ndarray:
        return self.sample.load_image()


def _file_names(samples: Sequence[Any], root: Path | None = None) -> list[str]:
    """Each sample's path relative to ``root`` (default: the folder holding all of them)."""
    paths = [getattr(s, "image_path", None) for s in samples]
    if not paths or any(p is None for p in paths):
        return [str(s.id) for s in samples]
    paths = [Path(p).resolve() for p in paths]
    base = root.resolve() if root is not None else None
    if base is None or not all(p.is_relative_to(base) for p in paths):
        base = Path(os.path.commonpath([p.parent for p in paths]))
    return [p.relative_to(base).as_posix() for p in paths]


def _errors_only(skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The skips that are unusable files (``error: ...``), not deliberate leave-outs."""
    return [(f, r) for f, r in skipped if r.startswith("error")]


def _bad_files_error(bad: list[tuple[str, str]], what: str) -> DataError:
    reasons = [(f, r.removeprefix("error: ")) for f, r in bad]
    lines = "\n".join(f"  {r}" if r.startswith(f) else f"  {f}: {r}" for f, r in reasons)
    return DataError(
        f"{len(bad)} {what} cannot be used:\n{lines}\nrepair or remove them, or pass --skip-bad "
        "to segment the others and list these in summary.json"
    )


def gather_inputs(inputs: Sequence[str], on_error: OnError = "raise") -> Dataset:
    """Images to segment from a mix of image files, folders of images and dataset specs.

    Every input is looked at before anything is segmented: missing paths, non-image files and
    unusable files inside dataset specs are reported together in one :class:`DataError`
    (``raise``), or the unusable files are listed in the result's ``skipped`` (``skip``;
    missing paths and non-image files given by name always raise). The same name from two
    inputs gets a numeric suffix in its ``id`` (``a__1``) so no output file is overwritten;
    its COCO ``file_name`` stays the input's own (see :class:`Input`).
    """
    samples: list[Input] = []
    skipped: list[tuple[str, str]] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(
                    (item, f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
                )
                continue
            found: Sequence[Any] = [ImageOnly(path.stem, path)]
            names = [str(path.resolve())]
        elif path.is_dir() or ":" in item:
            try:
                found = load_dataset(item, "skip")
            except DataError as exc:
                problems.append((item, str(exc)))
                continue
            skipped.extend(getattr(found, "skipped", []))
            names = _file_names(found, path if path.is_dir() else None)
        else:
            problems.append((item, "no such file or folder (give image files, folders or specs)"))
            continue
        samples.extend(Input(s, str(s.id), n, item) for s, n in zip(found, names, strict=True))
    bad = problems + (_errors_only(skipped) if on_error == "raise" else [])
    if bad:
        raise _bad_files_error(bad, "input(s)")
    seen: dict[str, int] = {}
    unique = []
    for s in samples:
        n = seen.get(s.id, 0)
        seen[s.id] = n + 1
        unique.append(s if n == 0 else dataclasses.replace(s, id=f"{s.id}__{n}"))
    return Dataset(unique, name="inputs", skipped=skipped)


def check_inputs(samples: Sequence[Any], on_error: OnError = "raise") -> Dataset:
    """Decode every image once before the first mask is written: the unreadable ones are
    reported together in one :class:`DataError` (``raise``) or left out and listed in
    ``skipped`` (``skip``)."""
    skipped = list(getattr(samples, "skipped", []))
    kept, bad = [], []
    for s in samples:
        try:
            s.load_image()
        except (DataError, OSError) as exc:
            bad.append((str(getattr(s, "image_path", s.id)), f"error: {exc}"))
            continue
        kept.append(s)
    if bad and on_error == "raise":
        raise _bad_files_error(bad, "image(s)")
    for file, reason in bad:
        logger.warning("skipped %s: %s", file, reason)
    return Dataset(kept, name=getattr(samples, "name", "inputs"), skipped=skipped + bad)


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """The output folder, checked before any work: a file there, or a non-empty folder without
    ``overwrite``, raises :class:`FileExistsError` saying what to do."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder (new or empty)")
    if out.is_dir() and not overwrite:
        n = sum(1 for _ in out.iterdir())
        if n:
            raise FileExistsError(
                f"--out {out} exists and is not empty ({n} entries); pass --overwrite to "
                "replace it as a whole, or give a new folder"
            )
    return out


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces ``out`` as a whole when the block succeeds and
    is removed when it fails, so ``out`` is never left half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "replaced")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        exc.add_note(f"nothing was written to {out}")
        raise


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
    overwrite: bool = False,
    checked: bool = False,
    progress: bool = True,
    presence_threshold: float | None = None,
) -> SegmentReport:
    """Segment ``samples`` with ``agent`` and write masks, overlays, COCO RLE and a summary.

    All or nothing: every image is decoded and checked first (:func:`check_inputs`), and the
    outputs are written to a temporary sibling folder that replaces ``out`` only when every
    image is done; a failed or interrupted run leaves ``out`` as it was.

    Args:
        agent: A loaded :class:`~agents.prompt_agent.PromptAgent`.
        samples: Objects with ``id`` and ``load_image()`` (a ``mask`` attribute, when present
            and not ``None``, adds the IoU against it to the summary; ``file_name`` and
            ``source``, as :func:`gather_inputs` gives them, go into ``results.json``).
        out: Output folder: new, empty, or replaced as a whole with ``overwrite``.
        steps: Agent clicks per image (default: the task's T; 0: the SRM's start only).
        overlays: Write overlay PNGs.
        skip_bad: Skip (and list) images that cannot be read instead of stopping.
        overwrite: Replace a non-empty ``out``.
        checked: ``samples`` come from :func:`check_inputs` already (not decoded again here).
        progress: Progress bar.
        presence_threshold: Images whose presence score is below it get an empty mask and are
            listed as ``no_target`` (default: the run's ``presence.json``, none without one;
            0 turns the gate off).

    Returns:
        The :class:`SegmentReport` (also written to ``out/summary.json``).
    """
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0 (agent clicks per image), got {steps}")
    if presence_threshold is None and getattr(agent, "presence", None) is not None:
        presence_threshold = agent.presence.threshold
    if presence_threshold is not None and not 0.0 <= presence_threshold <= 1.0:
        raise ValueError(f"presence threshold must lie in [0, 1], got {presence_threshold}")
    out = check_out(out, overwrite)
    if not checked:
        samples = check_inputs(samples, "skip" if skip_bad else "raise")
    with _staged(out) as tmp:
        report = _segment_into(
            agent, samples, tmp, steps, overlays, skip_bad, progress, presence_threshold
        )
        report.out = str(out)
        summary = json.dumps(report.to_dict(), indent=2)
        atomic_write(tmp / "summary.json", lambda fh: fh.write(summary.encode()))
    return report


def _segment_into(
    agent: PromptAgent,
    samples: Sequence[Any],
    out: Path,
    steps: int | None,
    overlays: bool,
    skip_bad: bool,
    progress: bool,
    presence_threshold: float | None = None,
) -> SegmentReport:
    """:func:`segment_images`'s work, written into ``out`` (all but ``summary.json``)."""
    from segmenter.base import mask_iou

    (out / "masks").mkdir()
    if overlays:
        (out / "overlays").mkdir()
    report = SegmentReport(out=str(out), presence_threshold=presence_threshold)
    report.skipped = [{"id": f, "reason": r} for f, r in getattr(samples, "skipped", [])]
    images, annotations, ious, clicks_used = [], [], [], []
    seg = agent.segmenter
    calls0 = getattr(seg, "decoder_calls", 0)
    t_start = time.perf_counter()
    for s in progress_bar(samples, desc="segment", unit="img", disable=not progress):
        try:
            image = s.load_image()
        except (DataError, OSError) as exc:  # readable a moment ago: changed on disk since
            if not skip_bad:
                raise DataError(f"{exc}; or skip it {SKIP_FIX}") from exc
            report.skipped.append({"id": str(s.id), "reason": str(exc)})
            logger.warning("skipped %s: %s", s.id, exc)
            continue
        t0 = time.perf_counter()
        result = agent.segment_detailed(image, steps, presence_threshold)
        report.encode_seconds += result["encode_seconds"]
        mask, clicks = result["mask"], result["clicks"]
        no_target = result["no_target"]  # "nothing here": an empty mask, no episode run
        if no_target:
            report.no_target.append(str(s.id))
        _write_png(out / "masks" / f"{s.id}.png", mask.astype(np.uint8) * 255)
        if overlays:
            gt = getattr(s, "mask", None)
            _write_png(
                out / "overlays" / f"{s.id}.png",
                overlay(image, mask, clicks[:, :2], clicks[:, 2], outline=gt),
            )
        image_id = len(images) + 1
        h, w = mask.shape
        images.append(
            {
                "id": image_id,
                "file_name": str(getattr(s, "file_name", s.id)),
                "height": h,
                "width": w,
                "mask_file": f"masks/{s.id}.png",
                "source": str(getattr(s, "source", "")),
            }
        )
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
                "presence": result["presence"],
                "no_target": bool(no_target),
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
    return report
