"""The simulated annotator: the interactive-segmentation field's simulated user (RITM's
protocol, as used by SAM), the *manual prompting* reference of every benchmark. It reads the
ground truth, so it is not an automatic method."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from agents.clickers.trace import ClickTrace
from segmenter.base import ImageEmbedding, Segmenter, mask_iou
from segmenter.session import PromptSession

logger = logging.getLogger(__name__)


Selection = Literal["single", "score", "oracle"]
SELECTIONS: tuple[str, ...] = ("single", "score", "oracle")

Handover = Literal["keep", "mask", "prune"]
#: How the simulated annotator takes over an automatic method's final state
#: (:meth:`SimulatedAnnotator.correct`).
HANDOVERS: tuple[str, ...] = ("keep", "mask", "prune")


def _padded_edt(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each ``region`` pixel to the nearest non-region pixel.

    Pixels outside the image count as non-region (RITM pads the mask by one pixel), so a
    region touching the border is deepest away from it. Computed on the region's bounding box
    plus a one-pixel margin, which gives the same values (the margin is all non-region) at a
    fraction of the cost for small regions.

    Args:
        region: ``(H, W)`` bool.

    Returns:
        ``(H, W)`` float distances, 0 outside the region.
    """
    out = np.zeros(region.shape, np.float64)
    rows = np.flatnonzero(region.any(axis=1))
    if not len(rows):
        return out
    cols = np.flatnonzero(region.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(region[r0:r1, c0:c1], 1)
    out[r0:r1, c0:c1] = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
    return out


def deepest_point(mask: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` centre of the pixel farthest from the mask's boundary (image borders count).

    Args:
        mask: ``(H, W)`` bool, not empty.

    Returns:
        ``(col + 0.5, row + 0.5)`` of the first (row-major) maximum of the distance transform.
    """
    if not np.any(mask):
        raise ValueError("deepest_point of an empty mask")
    dist = _padded_edt(np.asarray(mask, bool))
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(col) + 0.5, float(row) + 0.5


def check_gt(gt: np.ndarray, embedding: ImageEmbedding) -> np.ndarray:
    gt = np.asarray(gt, dtype=bool)
    if gt.shape != tuple(embedding.original_size):
        raise ValueError(
            f"ground truth of shape {gt.shape} does not match the encoded image size "
            f"{tuple(embedding.original_size)}: pass the mask of the image that was encoded"
        )
    return gt


class SimulatedAnnotator:
    """The simulated user of interactive segmentation (RITM's protocol, as SAM evaluates it).

    Click rule (RITM ``Clicker._get_next_click``): with the current prediction ``P`` (all
    background before the first click) and ground truth ``G``, take the false negatives
    ``FN = G & ~P`` and false positives ``FP = ~G & P``; compute the Euclidean distance
    transform of each separately, padding by one pixel so the image border counts as boundary;
    set already clicked pixels to 0; click the pixel of the larger maximum (first in row-major
    order among equal maxima), positive if the maximum is in ``FN`` (strictly larger than the
    ``FP`` maximum), negative otherwise. The first click is therefore the deepest interior
    point of ``G``. The trace stops early when both maxima are 0 (the error region is empty,
    or only clicked pixels remain in it).

    Prediction rule: every click decodes the whole prompt set once. Masks are the decoder's
    logits bilinearly upscaled to the original image and thresholded at 0 (the segmenter's
    ``upscale``). With ``use_mask_input`` the previous click's selected low-res logits are fed
    back as ``mask_input`` (SAM's interactive practice). Mask selection:

    * first click, ``selection="score"``: multimask output, the candidate with the highest
      predicted IoU (SAM's automatic choice for an ambiguous single click);
    * first click, ``selection="oracle"``: multimask output, the candidate with the best true
      full-resolution IoU (SAM paper's best-of-3 "oracle");
    * first click, ``selection="single"``: the single-mask head;
    * every later click: the single-mask head (SAM's practice once the prompt is unambiguous).

    Args:
        segmenter: The frozen segmenter (the one that made the embeddings).
        max_clicks: Click budget (20 in the field's protocol).
        selection: First-click mask selection rule, see above.
        use_mask_input: Feed the previous low-res logits back to the decoder.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        max_clicks: int = 20,
        selection: Selection = "score",
        use_mask_input: bool = True,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if max_clicks < 1:
            raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
        self.segmenter = segmenter
        self.max_clicks = int(max_clicks)
        self.selection = selection
        self.use_mask_input = bool(use_mask_input)

    @staticmethod
    def next_click(
        gt: np.ndarray, pred: np.ndarray, clicked: np.ndarray
    ) -> tuple[int, int, int] | None:
        """RITM's next click for prediction ``pred``.

        Args:
            gt: ``(H, W)`` bool ground truth.
            pred: ``(H, W)`` bool current prediction.
            clicked: ``(H, W)`` bool pixels clicked so far (excluded).

        Returns:
            ``(row, col, label)`` or ``None`` when no pixel of the error region is left.
        """
        fn_dt = _padded_edt(gt & ~pred)
        fp_dt = _padded_edt(~gt & pred)
        fn_dt[clicked] = 0.0
        fp_dt[clicked] = 0.0
        fn_max, fp_max = float(fn_dt.max()), float(fp_dt.max())
        if fn_max <= 0.0 and fp_max <= 0.0:
            return None
        positive = fn_max > fp_max
        dt = fn_dt if positive else fp_dt
        row, col = np.unravel_index(int(np.argmax(dt)), dt.shape)
        return int(row), int(col), int(positive)

    def _select(self, session: PromptSession, gt: np.ndarray) -> tuple[np.ndarray, int]:
        """Apply the first-click selection rule to the session's multimask prediction: the
        full mask and the candidate index kept."""
        pred = session.prediction
        if self.selection == "oracle":
            masks = [self.segmenter.upscale(session.embedding, c) for c in pred.candidates]
            best = int(np.argmax([mask_iou(m, gt) for m in masks]))
            session.select_candidate(best)
            return masks[best], best
        # "score": the decoder kept the best-scoring candidate; "single": its only mask.
        best = int(torch.argmax(torch.as_tensor(pred.candidate_scores)))
        return session.current_mask(), best if self.selection == "score" else 0

    def run(
        self,
        embedding: ImageEmbedding,
        gt: np.ndarray,
        sample_id: str = "",
        keep_masks: Sequence[int] = (),
        stop_iou: float | None = None,
    ) -> ClickTrace:
        """Click until ``max_clicks``, an empty error region or (with ``stop_iou``) an IoU of at
        least ``stop_iou`` (RITM's evaluation stops at its highest NoC threshold).

        Args:
            embedding: The cached embedding of the image.
            gt: ``(H, W)`` bool ground truth in original pixels (not empty).
            sample_id: Recorded in the trace.
            keep_masks: Click counts ``k`` whose masks are kept in ``info["masks"][k]`` (a trace
                that stopped before ``k`` clicks keeps its last mask there).
            stop_iou: Stop once the IoU reaches it (``None``: click on).

        Returns:
            The trace; ``ious[i]`` is the full-resolution IoU after click ``i + 1`` and
            ``info["seconds_at"][i]`` the wall time up to it.
        """
        t0 = time.perf_counter()
        gt = check_gt(gt, embedding)
        if not gt.any():
            raise ValueError(
                f"sample {sample_id!r}: empty ground truth; the simulated annotator needs an "
                "object to click on (drop the sample)"
            )
        pred_mask = np.zeros(gt.shape, bool)
        clicked = np.zeros(gt.shape, bool)
        session = PromptSession(
            self.segmenter,
            embedding,
            use_mask_input=self.use_mask_input,
            multimask_single_click=self.selection != "single",
        )
        ious: list[float] = []
        stop = "max_clicks"
        first_candidate = -1
        kept: dict[int, np.ndarray] = {}
        seconds_at: list[float] = []
        for _ in range(self.max_clicks):
            click = self.next_click(gt, pred_mask, clicked)
            if click is None:
                stop = "empty_error"
                break
            row, col, label = click
            clicked[row, col] = True
            session.click(col + 0.5, row + 0.5, label)
            if len(session.points) == 1:
                pred_mask, first_candidate = self._select(session, gt)
            else:
                pred_mask = session.current_mask()
            ious.append(mask_iou(pred_mask, gt))
            seconds_at.append(time.perf_counter() - t0)
            if len(session.points) in keep_masks:
                kept[len(session.points)] = pred_mask
            if stop_iou is not None and ious[-1] >= stop_iou:
                stop = "reached"
                break
        for k in keep_masks:
            kept.setdefault(int(k), pred_mask)
        seconds = time.perf_counter() - t0
        logger.debug(
            "annotator %s: %d clicks, IoU %.3f, stop=%s",
            sample_id,
            len(session.points),
            ious[-1] if ious else float("nan"),
            stop,
        )
        return ClickTrace(
            sample_id=sample_id,
            points=session.points.reshape(-1, 2),
            labels=session.labels,
            ious=ious,
            final_mask=pred_mask,
            decoder_calls=session.decoder_calls,
            seconds=seconds,
            info={
                "stop": stop,
                "selection": self.selection,
                "mask_input": self.use_mask_input,
                "first_candidate": first_candidate,
                "masks": kept,
                "seconds_at": seconds_at,
            },
        )

    def correct(
        self,
        start: PromptSession,
        gt: np.ndarray,
        sample_id: str = "",
        handover: Handover = "keep",
        stop_iou: float | None = None,
    ) -> ClickTrace:
        """Continue from an automatic method's final state with corrective clicks (RITM's click
        rule on the remaining error), up to ``max_clicks`` of the annotator's own.

        Handovers (the method's prompts and mask are in ``start``, which is not changed):

        * ``keep``: the method's prompts stay; each corrective click is added to them and the
          current mask is the mask input (what a person gets in a tool that keeps the agent's
          clicks on screen);
        * ``mask``: only the method's mask, as the mask input of the first corrective click;
          its prompts are dropped;
        * ``prune``: as ``keep``, but at the first corrective click the annotator also removes
          the method's clicks that the ground truth contradicts (foreground clicks outside the
          object, background clicks inside it).

        Args:
            start: The method's session (its embedding, prompts and current mask), e.g.
                ``agent.segment(..., return_session=True)[2]``; decoding goes on with
                ``start.segmenter``.
            gt: ``(H, W)`` bool ground truth.
            sample_id: Recorded in the trace.
            handover: One of :data:`HANDOVERS`.
            stop_iou: Stop once the IoU reaches it, the start's included (``None``: click on
                to ``max_clicks``).

        Returns:
            A trace of the annotator's clicks only (``points``, ``labels``, ``ious`` after each
            of them); ``info["start_iou"]`` is the IoU of the method's mask (0 clicks),
            ``info["dropped"]`` the method's prompts the handover removed.
        """
        if handover not in HANDOVERS:
            raise ValueError(f"handover must be one of {', '.join(HANDOVERS)}, got {handover!r}")
        t0 = time.perf_counter()
        gt = check_gt(gt, start.embedding)
        session = start.fork()
        session.multimask_single_click = False  # the mask input disambiguates a lone click
        pred_mask = session.current_mask()
        start_iou = mask_iou(pred_mask, gt)
        h, w = gt.shape
        # The method's clicks as pixels: not clicked again, and read against the ground truth.
        px = np.clip(session.points[:, 0].astype(int), 0, w - 1)
        py = np.clip(session.points[:, 1].astype(int), 0, h - 1)
        clicked = np.zeros(gt.shape, bool)
        clicked[py, px] = True
        dropped = 0
        if handover == "mask":
            dropped = len(session.points)
            session.drop_prompts()
        ious: list[float] = []
        points: list[tuple[float, float]] = []
        labels: list[int] = []
        stop = "max_clicks"
        for k in range(self.max_clicks):
            if stop_iou is not None and (ious[-1] if ious else start_iou) >= stop_iou:
                stop = "reached"
                break
            click = self.next_click(gt, pred_mask, clicked)
            if click is None:
                stop = "empty_error"
                break
            row, col, label = click
            clicked[row, col] = True
            if k == 0 and handover == "prune" and len(session.points):
                keep = gt[py, px] == (session.labels == 1)
                dropped = int((~keep).sum())
                if dropped:
                    session.drop_prompts(keep)
            session.click(col + 0.5, row + 0.5, label)
            pred_mask = session.current_mask()
            ious.append(mask_iou(pred_mask, gt))
            points.append((col + 0.5, row + 0.5))
            labels.append(label)
        return ClickTrace(
            sample_id=sample_id,
            points=np.asarray(points, np.float32).reshape(-1, 2),
            labels=np.asarray(labels, np.int64),
            ious=ious,
            final_mask=pred_mask,
            decoder_calls=session.decoder_calls,
            seconds=time.perf_counter() - t0,
            info={
                "stop": stop,
                "handover": handover,
                "start_iou": start_iou,
                "start_prompts": int(len(start.points)),
                "dropped": dropped,
            },
        )

    def run_many(self, items: Iterable[tuple[str, ImageEmbedding, np.ndarray]]) -> list[ClickTrace]:
        """:meth:`run` over ``(sample_id, embedding, gt)`` triples."""
        return [self.run(emb, gt, sid) for sid, emb, gt in items]
