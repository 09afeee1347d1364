"""``alignsam review RUN IMAGES --out DIR``: review the agent's masks on a local web page and fix
the bad ones with a few clicks on the same frozen segmenter. This module holds the review's
state (:class:`ReviewStore`); the page and its server are :mod:`experiments.review_app`.

Each image opens with the agent's mask and clicks (the agent runs when the image is first
shown; the next image is prepared in the background). A person adds foreground / background
clicks (each one decoder call on the cached embedding, answered with a fresh overlay), removes a
click, undoes, resets to the agent's mask, clears the mask ("no target") and accepts. Accepted
images are written into DIR the way ``alignsam segment`` writes them: ``masks/{id}.png``,
``overlays/{id}.png`` and a COCO ``results.json`` whose annotations carry every click with who
made it (``agent`` or ``person``), plus ``summary.json`` (counts, the "no target" images). Each
image is accepted atomically (its files, then its record ``records/{id}.json``, then
``results.json`` rebuilt from the records), so killing the server loses at most the image being
edited, and a rerun with the same DIR resumes: accepted images are marked and the page opens at
the first one not yet accepted.

Safety: the server binds 127.0.0.1 unless told otherwise; requests address images by their
index in the list given on the command line, never by path, so no request reaches the file
system; malformed requests get a 4xx with a message; nothing is written outside DIR.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from envs.data import DataError
from envs.render import overlay
from experiments.segment import _rle
from segmenter.io import atomic_write
from segmenter.session import PromptSession

logger = logging.getLogger(__name__)

__all__ = ["ReviewError", "ReviewStore"]

#: Images whose agent state is kept in memory (the rest are recomputed when reopened).
KEEP_OPEN = 8
#: Characters of an image id that are not kept in its output file names.
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class _Open:
    """One image being reviewed: its pixels, the agent's session and the person's edits."""

    image: np.ndarray
    session: PromptSession
    agent_points: np.ndarray
    agent_labels: np.ndarray
    agent_outcome: Any
    cleared: bool = False
    by: list[str] = field(default_factory=list)
    seconds: float = 0.0
    history: list[tuple[Any, ...]] = field(default_factory=list)

    def snapshot(self) -> None:
        """Remember the state before a person's action (what undo goes back to)."""
        s = self.session
        self.history.append((s.points, s.labels, s.outcome, list(self.by), self.cleared))

    def restore(self, state: tuple[Any, ...]) -> None:
        s = self.session
        s.points, s.labels, s.outcome, by, self.cleared = state
        self.by = list(by)

    @property
    def edited(self) -> bool:
        return self.cleared or "person" in self.by or len(self.by) != len(self.agent_points)


class ReviewError(ValueError):
    """A request the store cannot serve (its message goes back to the page, with a 4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ReviewStore:
    """The review's state: the images, the agent, what is open and what is accepted in ``out``.

    Args:
        agent: A loaded agent (``PromptAgent`` or ``LookaheadAgent``).
        samples: The images (``id``, ``load_image()``, ``file_name``), e.g. from
            :func:`experiments.segment.gather_inputs`.
        out: The output folder; accepted images already in it are kept (a resumed review).
        steps: The agent's clicks per image (default: the task's T).
    """

    def __init__(
        self, agent: Any, samples: Sequence[Any], out: str | Path, steps: int | None = None
    ):
        self.agent = agent
        self.samples = list(samples)
        self.out = Path(out)
        self.steps = steps
        self.lock = threading.RLock()
        self._agent_lock = threading.Lock()
        self._pending: dict[int, threading.Event] = {}
        self._open: OrderedDict[int, _Open] = OrderedDict()
        self._errors: dict[int, str] = {}
        self.out.mkdir(parents=True, exist_ok=True)
        self._files = {
            i: _SAFE_ID.sub("_", str(s.id)) or f"image{i}" for i, s in enumerate(self.samples)
        }
        if len(set(self._files.values())) < len(self._files):  # two ids made the same file name
            self._files = {i: f"{i:06d}_{n}" for i, n in self._files.items()}
        self.records: dict[int, dict[str, Any]] = {}
        by_file = {n: i for i, n in self._files.items()}
        for rec in sorted((self.out / "records").glob("*.json")):
            try:
                data = json.loads(rec.read_text())
            except (OSError, ValueError):
                logger.warning("%s is unreadable; that image counts as not accepted", rec)
                continue
            i = by_file.get(rec.stem)
            if i is not None and data.get("id") == str(self.samples[i].id):
                self.records[i] = data

    # -- the list ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def status(self, index: int) -> str:
        if index in self.records:
            return "no target" if self.records[index]["no_target"] else "accepted"
        if index in self._errors:
            return "unreadable"
        return "edited" if index in self._open and self._open[index].edited else "todo"

    def listing(self, offset: int, limit: int) -> dict[str, Any]:
        """One page of the image list (``offset``, at most ``limit`` entries)."""
        rows = [
            {"index": i, "id": str(self.samples[i].id), "status": self.status(i)}
            for i in range(offset, min(offset + limit, len(self)))
        ]
        todo = next((i for i in range(len(self)) if i not in self.records), None)
        return {
            "total": len(self),
            "accepted": len(self.records),
            "first_todo": todo,
            "offset": offset,
            "items": rows,
        }

    # -- one image -----------------------------------------------------------------------------
    def _check(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise ReviewError(f"no image {index}: the review has images 0 to {len(self) - 1}", 404)

    def open(self, index: int) -> _Open:
        """The image's state, running the agent on it the first time. The agent runs outside
        the store's lock (one agent run at a time), so clicks on an open image are answered
        while the next image is being prepared."""
        self._check(index)
        while True:
            with self.lock:
                if index in self._open:
                    self._open.move_to_end(index)
                    return self._open[index]
                if index in self._errors:
                    raise ReviewError(self._errors[index], 422)
                pending = self._pending.get(index)
                mine = pending is None
                if mine:
                    pending = self._pending[index] = threading.Event()
            if mine:
                break
            pending.wait()  # another request is running the agent on it
        try:
            with self._agent_lock:
                state = self._run_agent(index)
            with self.lock:
                self._open[index] = state
                while len(self._open) > KEEP_OPEN:
                    self._open.popitem(last=False)
            return state
        finally:
            with self.lock:
                self._pending.pop(index).set()

    def _run_agent(self, index: int) -> _Open:
        try:
            image = self.samples[index].load_image()
        except (DataError, OSError) as exc:
            message = f"cannot read image {self.samples[index].id}: {exc}"
            with self.lock:
                self._errors[index] = message
            raise ReviewError(message, 422) from exc
        t0 = time.perf_counter()
        _, _, session = self.agent.segment(image, self.steps, return_session=True)
        return _Open(
            image,
            session,
            session.points.copy(),
            session.labels.copy(),
            session.outcome,
            by=["agent"] * len(session.points),
            seconds=time.perf_counter() - t0,
        )

    def prefetch(self, index: int) -> None:
        """Run the agent on ``index`` in the background (errors surface when it is opened)."""
        if not 0 <= index < len(self) or index in self._open or index in self.records:
            return

        def work() -> None:
            try:
                self.open(index)
            except ReviewError:
                pass

        threading.Thread(target=work, daemon=True).start()

    def mask(self, index: int) -> np.ndarray:
        """The image's current mask (``(H, W)`` bool; empty after "no target")."""
        st = self.open(index)
        with self.lock:
            return self._mask(st)

    @staticmethod
    def _mask(st: _Open) -> np.ndarray:
        if st.cleared or st.session.outcome is None:
            return np.zeros(st.image.shape[:2], bool)
        return st.session.current_mask()

    def state(self, index: int) -> dict[str, Any]:
        """What the page shows of an image (not the pixels)."""
        st = self.open(index)
        with self.lock:
            return self._state(index, st)

    def _state(self, index: int, st: _Open) -> dict[str, Any]:  # under the lock
        h, w = st.image.shape[:2]
        clicks = [
            {"x": float(x), "y": float(y), "label": int(lab), "by": by}
            for (x, y), lab, by in zip(st.session.points, st.session.labels, st.by, strict=True)
        ]
        mask = self._mask(st)
        return {
            "index": index,
            "id": str(self.samples[index].id),
            "width": w,
            "height": h,
            "clicks": clicks,
            "person_clicks": sum(1 for c in clicks if c["by"] == "person"),
            "mask_area": float(mask.mean()),
            "cleared": st.cleared,
            "can_undo": bool(st.history),
            "status": self.status(index),
            "agent_seconds": round(st.seconds, 3),
        }

    def overlay_png(self, index: int) -> bytes:
        st = self.open(index)
        with self.lock:
            mask = self._mask(st)
            pts = st.session.points if len(st.session.points) else None
            labs = st.session.labels if len(st.session.labels) else None
            picture = overlay(st.image, mask, pts, labs)
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def click(self, index: int, x: float, y: float, label: int) -> dict[str, Any]:
        """Add a person's click at image pixel ``(x, y)`` (one decoder call)."""
        st = self.open(index)
        with self.lock:
            h, w = st.image.shape[:2]
            if not (0 <= x < w and 0 <= y < h):
                raise ReviewError(f"click ({x:.1f}, {y:.1f}) is outside the {w}x{h} image")
            if label not in (0, 1):
                raise ReviewError(f"label must be 1 (foreground) or 0 (background), got {label}")
            st.snapshot()
            if st.cleared:  # a click after "clear" starts from nothing
                st.session.points, st.session.labels = st.session.points[:0], st.session.labels[:0]
                st.session.outcome = None
                st.by = []
                st.cleared = False
            st.session.click(float(x), float(y), int(label))
            st.by.append("person")
            return self._state(index, st)

    def remove(self, index: int, x: float, y: float, radius: float) -> dict[str, Any]:
        """Remove the click nearest to ``(x, y)`` within ``radius`` pixels and decode the rest
        afresh (one decoder call; no click left: an empty mask)."""
        st = self.open(index)
        with self.lock:
            pts = st.session.points
            if not len(pts):
                raise ReviewError("there is no click to remove")
            d = np.hypot(pts[:, 0] - x, pts[:, 1] - y)
            j = int(np.argmin(d))
            if d[j] > radius:
                raise ReviewError(f"no click within {radius:.0f} px of ({x:.0f}, {y:.0f})")
            keep = np.ones(len(pts), bool)
            keep[j] = False
            st.snapshot()
            if keep.any():
                st.session.prompt(pts[keep], st.session.labels[keep], mask_input=False)
            else:
                st.session.points, st.session.labels = pts[:0], st.session.labels[:0]
                st.session.outcome = None
            st.by = [b for b, k in zip(st.by, keep, strict=True) if k]
            return self._state(index, st)

    def undo(self, index: int) -> dict[str, Any]:
        """Undo the person's last action on the image (a click, a removal, reset, clear)."""
        st = self.open(index)
        with self.lock:
            if not st.history:
                raise ReviewError("nothing to undo on this image")
            st.restore(st.history.pop())
            return self._state(index, st)

    def reset(self, index: int) -> dict[str, Any]:
        """Back to the agent's mask and clicks (no decoder call)."""
        st = self.open(index)
        with self.lock:
            st.snapshot()
            st.session.points, st.session.labels = st.agent_points, st.agent_labels
            st.session.outcome = st.agent_outcome
            st.by = ["agent"] * len(st.agent_points)
            st.cleared = False
            return self._state(index, st)

    def clear(self, index: int) -> dict[str, Any]:
        """An empty mask: "no target" when accepted (undo brings the mask back)."""
        st = self.open(index)
        with self.lock:
            st.snapshot()
            st.cleared = True
            return self._state(index, st)

    def accept(self, index: int) -> dict[str, Any]:
        """Write the image's mask, overlay and record into ``out``, then ``results.json``."""
        st = self.open(index)
        with self.lock:
            mask = self._mask(st)
            name = self._files[index]
            pts = st.session.points if not st.cleared else np.zeros((0, 2))
            labs = st.session.labels if not st.cleared else np.zeros(0)
            by = st.by if not st.cleared else []
            _png(self.out / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
            _png(
                self.out / "overlays" / f"{name}.png",
                overlay(st.image, mask, pts if len(pts) else None, labs if len(labs) else None),
            )
            s = self.samples[index]
            ys, xs = np.nonzero(mask)
            record = {
                "id": str(s.id),
                "file_name": str(getattr(s, "file_name", s.id)),
                "source": str(getattr(s, "source", "")),
                "height": int(mask.shape[0]),
                "width": int(mask.shape[1]),
                "mask_file": f"masks/{name}.png",
                "no_target": not bool(mask.any()),
                "segmentation": _rle(mask),
                "area": float(mask.sum()),
                "bbox": [
                    float(xs.min()),
                    float(ys.min()),
                    float(np.ptp(xs) + 1),
                    float(np.ptp(ys) + 1),
                ]
                if len(xs)
                else [0.0, 0.0, 0.0, 0.0],
                "clicks": [
                    {"x": float(x), "y": float(y), "label": int(lab), "by": b}
                    for (x, y), lab, b in zip(pts, labs, by, strict=True)
                ],
                "agent_clicks": int(len(st.agent_points)),
                "person_clicks": sum(1 for b in by if b == "person"),
                "edited": st.edited,
                "accepted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            data = json.dumps(record).encode()
            atomic_write(self.out / "records" / f"{name}.json", lambda fh: fh.write(data))
            self.records[index] = record
            self._write_results()
            return self._state(index, st)

    def _write_results(self) -> None:
        order = sorted(self.records)
        images, annotations = [], []
        for n, i in enumerate(order, start=1):
            r = self.records[i]
            images.append(
                {k: r[k] for k in ("file_name", "height", "width", "mask_file", "source")}
                | {"id": n}
            )
            if r["no_target"]:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": n,
                    "category_id": 1,
                    "segmentation": r["segmentation"],
                    "area": r["area"],
                    "bbox": r["bbox"],
                    "iscrowd": 0,
                    "clicks": r["clicks"],
                    "person_clicks": r["person_clicks"],
                }
            )
        task = self.agent.task
        coco = {
            "info": {"description": f"alignsam review, task {task.name}"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": task.srm.text or task.name}],
        }
        blob = json.dumps(coco).encode()
        atomic_write(self.out / "results.json", lambda fh: fh.write(blob))
        recs = [self.records[i] for i in order]
        summary = {
            "out": str(self.out),
            "images": len(self),
            "accepted": len(recs),
            "edited": sum(1 for r in recs if r["edited"]),
            "person_clicks": sum(r["person_clicks"] for r in recs),
            "no_target": [r["id"] for r in recs if r["no_target"]],
        }
        text = json.dumps(summary, indent=2).encode()
        atomic_write(self.out / "summary.json", lambda fh: fh.write(text))


def _png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: Image.fromarray(array).save(fh, format="PNG"))
