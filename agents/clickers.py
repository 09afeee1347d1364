"""Non-learned clickers that prompt the same frozen segmenter as the RL agent, for benchmarks.

Every clicker returns a :class:`ClickTrace`, so the benchmark can put them side by side on the
same images, the same cached embeddings and the same decoder:

* :class:`SimulatedAnnotator`: the interactive-segmentation field's simulated user (RITM's
  protocol, as used by SAM): each click at the point deepest inside the current error region.
  It reads the ground truth, so it is the *manual prompting* reference, not an automatic method.
  :func:`noc` and :func:`miou_at_k` are the field's metrics (NoC@85 / NoC@90, mIoU@k).
* :class:`EnvClicker`: a fixed click policy (random, centre spiral, spread grid, most confident
  labeler cells) run inside :class:`~envs.prompt_env.PointPromptEnv`, so the labels, the start
  prompts and the decoder path are exactly the agent's. ``random`` with the SRM labeler is the
  paper's "w/o RL" ablation.
* :class:`OneShotSimilarity`: a training-free one-shot baseline in the spirit of PerSAM (Zhang
  et al. 2023, "Personalize Segment Anything Model with One Shot"): points at the positions of
  the target image whose embedding is most / least similar to a target prototype taken from a
  reference image and its mask.

Coordinates follow the segmenter contract: points are ``(N, 2)`` ``(x, y)`` pixel coordinates in
the original image. A click on pixel ``(row, col)`` is placed at the pixel's centre
``(col + 0.5, row + 0.5)``, the convention of the environment's ground-truth start points.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from envs.prompt_env import PointPromptEnv
from recalibration.labelers import Labeler
from segmenter.base import ImageEmbedding, Segmenter, mask_iou
from segmenter.session import PromptSession

logger = logging.getLogger(__name__)

Selection = Literal["single", "score", "oracle"]
Policy = Literal["random", "centre", "grid", "srm_confident"]
#: A click policy as a function ``(env, obs, allowed) -> action`` (e.g. a trained agent).
PolicyFn = Callable[[PointPromptEnv, dict[str, np.ndarray], np.ndarray], int]

SELECTIONS: tuple[str, ...] = ("single", "score", "oracle")
POLICIES: tuple[str, ...] = ("random", "centre", "grid", "srm_confident")

__all__ = [
    "POLICIES",
    "SELECTIONS",
    "PolicyFn",
    "ClickTrace",
    "EnvClicker",
    "OneShotSimilarity",
    "SimulatedAnnotator",
    "deepest_point",
    "grid_order",
    "grid_to_pixel",
    "miou_at_k",
    "noc",
    "spiral_order",
    "summarize",
]


# --------------------------------------------------------------------------------------------
# Result type and metrics
# --------------------------------------------------------------------------------------------


@dataclass
class ClickTrace:
    """One clicker's prompting of one image.

    Attributes:
        sample_id: Id of the image.
        points: ``(N, 2)`` float32 clicks in original-image ``(x, y)`` pixels, in click order.
        labels: ``(N,)`` int64 labels, 1 = foreground, 0 = background.
        ious: Full-resolution IoU with the ground truth of the mask seen once click ``i`` had
            been placed (``len == N``), or ``[]`` without ground truth. The first
            ``start_clicks`` points were decoded together in one call, so they share that
            call's IoU.
        final_mask: ``(H, W)`` bool full-resolution mask after the last click.
        decoder_calls: Decoder calls made for this trace.
        seconds: Wall time of the trace (decoding, upscaling, click selection; the image
            embedding is given, so encoding is not included).
        start_clicks: Leading points decoded jointly (environment start prompts, the one-shot
            baseline's points); ``0`` when every click had its own decode.
        info: Extra per-trace details (e.g. the environment's low-res IoU per step, the stop
            reason, the selection rule).
    """

    sample_id: str
    points: np.ndarray
    labels: np.ndarray
    ious: list[float]
    final_mask: np.ndarray
    decoder_calls: int
    seconds: float
    start_clicks: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clicks(self) -> int:
        """Number of clicks ``N``."""
        return int(len(self.points))

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the mask)."""
        return {
            "sample_id": self.sample_id,
            "points": np.asarray(self.points, np.float64).round(2).tolist(),
            "labels": np.asarray(self.labels).astype(int).tolist(),
            "ious": [round(float(v), 5) for v in self.ious],
            "decoder_calls": int(self.decoder_calls),
            "seconds": round(float(self.seconds), 4),
            "start_clicks": int(self.start_clicks),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }


def noc(ious: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """Number of clicks to reach ``IoU >= threshold`` (RITM's NoC), ``max_clicks`` when never.

    Args:
        ious: IoU after click 1, 2, ... (only the first ``max_clicks`` count).
        threshold: e.g. ``0.85`` for NoC@85, ``0.9`` for NoC@90.
        max_clicks: Click budget, also the value when the threshold is never reached.

    Returns:
        The 1-based index of the first IoU at or above the threshold, else ``max_clicks``.
    """
    for i, v in enumerate(list(ious)[:max_clicks]):
        if v >= threshold:
            return i + 1
    return max_clicks


def _iou_at(ious: Sequence[float], k: int) -> float:
    if not len(ious):
        raise ValueError("a trace without IoUs (no ground truth or no clicks) has no mIoU@k")
    return float(ious[min(k, len(ious)) - 1])


def miou_at_k(traces: Iterable[ClickTrace], k: int) -> float:
    """Mean full-resolution IoU after ``k`` clicks over traces.

    A trace that stopped before ``k`` clicks (empty error region) contributes its last IoU.

    Args:
        traces: Traces with ground-truth IoUs.
        k: Number of clicks, ``>= 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vals = [_iou_at(t.ious, k) for t in traces]
    if not vals:
        raise ValueError("miou_at_k needs at least one trace")
    return float(np.mean(vals))


def summarize(
    traces: Sequence[ClickTrace],
    ks: Sequence[int] = (1, 3, 5, 10, 20),
    thresholds: Sequence[float] = (0.85, 0.9),
    max_clicks: int = 20,
) -> dict[str, float]:
    """The field's table row: ``miou@k`` for each k, ``noc@85``... and mean seconds per image."""
    out: dict[str, float] = {f"miou@{k}": miou_at_k(traces, k) for k in ks}
    for thr in thresholds:
        out[f"noc@{round(thr * 100)}"] = float(
            np.mean([noc(t.ious, thr, max_clicks) for t in traces])
        )
    out["seconds_per_image"] = float(np.mean([t.seconds for t in traces]))
    out["decoder_calls_per_image"] = float(np.mean([t.decoder_calls for t in traces]))
    out["n"] = float(len(traces))
    return out


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


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


def grid_to_pixel(embedding: ImageEmbedding, row: int, col: int) -> tuple[float, float]:
    """Centre of embedding-grid cell ``(row, col)`` in original ``(x, y)`` pixels.

    The inverse of :meth:`recalibration.labelers.EpisodeState.grid_cell`, clipped into the
    image (:meth:`segmenter.base.ImageEmbedding.cell_centre`, the rule the environment uses).
    """
    return embedding.cell_centre(row, col)


def spiral_order(grid: int) -> np.ndarray:
    """All ``grid * grid`` cells (``row * grid + col``) spiralling out from the image centre.

    Cells are sorted by distance of their centre from the grid centre, then clockwise by angle
    starting straight up, so every prefix is a near-disc around the centre.
    """
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    dy, dx = rows - (grid - 1) / 2, cols - (grid - 1) / 2
    dist = np.round(np.hypot(dy, dx), 6)
    angle = np.round(np.mod(np.arctan2(dx, -dy), 2 * np.pi), 6)  # 0 = up, clockwise
    return np.lexsort((angle, dist)).astype(np.int64)


def grid_order(grid: int) -> np.ndarray:
    """All ``grid * grid`` cells in a fixed, evenly spread order (greedy maximin).

    Starts at the cell nearest the image centre; each next cell is the one farthest from every
    cell taken so far, where the image border also repels at half the spacing (its distance
    counts twice), so points fill the image evenly instead of racing to the corners. Ties go to
    the lowest cell index. For ``grid = 10`` the first four cells are the centre and the
    centres of the other three quadrants, and the first ten are at least 2.2 cells apart.
    """
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    border = 2.0 * np.minimum.reduce([rows + 0.5, grid - 0.5 - rows, cols + 0.5, grid - 0.5 - cols])
    dist = border.astype(np.float64)
    taken = np.zeros(grid * grid, bool)
    order: list[int] = []
    for _ in range(grid * grid):
        cand = np.where(taken, -1.0, np.round(dist, 9))
        k = int(np.argmax(cand))
        order.append(k)
        taken[k] = True
        dist = np.minimum(dist, np.hypot(rows - rows[k], cols - cols[k]))
    return np.asarray(order, np.int64)


def _check_gt(gt: np.ndarray, embedding: ImageEmbedding) -> np.ndarray:
    gt = np.asarray(gt, dtype=bool)
    if gt.shape != tuple(embedding.original_size):
        raise ValueError(
            f"ground truth of shape {gt.shape} does not match the encoded image size "
            f"{tuple(embedding.original_size)}: pass the mask of the image that was encoded"
        )
    return gt


# --------------------------------------------------------------------------------------------
# Simulated annotator (RITM / SAM protocol)
# --------------------------------------------------------------------------------------------


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

    def _select(
        self, session: PromptSession, gt: np.ndarray
    ) -> tuple[np.ndarray, int]:
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
    ) -> ClickTrace:
        """Click until ``max_clicks`` or an empty error region.

        Args:
            embedding: The cached embedding of the image.
            gt: ``(H, W)`` bool ground truth in original pixels (not empty).
            sample_id: Recorded in the trace.
            keep_masks: Click counts ``k`` whose masks are kept in ``info["masks"][k]`` (a trace
                that stopped before ``k`` clicks keeps its last mask there).

        Returns:
            The trace; ``ious[i]`` is the full-resolution IoU after click ``i + 1`` and
            ``info["seconds_at"][i]`` the wall time up to it.
        """
        t0 = time.perf_counter()
        gt = _check_gt(gt, embedding)
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

    def run_many(self, items: Iterable[tuple[str, ImageEmbedding, np.ndarray]]) -> list[ClickTrace]:
        """:meth:`run` over ``(sample_id, embedding, gt)`` triples."""
        return [self.run(emb, gt, sid) for sid, emb, gt in items]


# --------------------------------------------------------------------------------------------
# Fixed click policies inside the environment
# --------------------------------------------------------------------------------------------


def srm_confident_score(fg: Any, mask: Any) -> Any:
    """``|p - 0.5| * |p - m|`` per cell, the ``srm_confident`` policy's score: where the
    labeler is sure (``p``, the ``fg`` map) and the mask (``m``, the ``mask`` map) disagrees
    with it. NumPy arrays or torch tensors of one shape (the cell policy's prior uses it too)."""
    return abs(fg - 0.5) * abs(fg - mask)


def _has_foreground_map(labeler: Labeler) -> bool:
    return type(labeler).foreground_map is not Labeler.foreground_map


class EnvClicker:
    """A fixed click policy run inside :class:`~envs.prompt_env.PointPromptEnv`.

    The environment supplies everything else exactly as for the RL agent: its labeler labels
    each click, its start mode places the start prompts, and it makes one decoder call per step
    (multimask only for a single-point prompt set, previous logits fed back as configured).

    Policies (each picks one unvisited action cell per step, ``G x G`` grid):

    * ``random``: uniform over unvisited cells, from ``numpy.random.default_rng([seed, index])``
      (the same clicks for an image whatever the run order).
    * ``centre``: cells spiralling out from the image centre (:func:`spiral_order`).
    * ``grid``: a fixed, evenly spread order of the cells (:func:`grid_order`, greedy maximin).
    * ``srm_confident``: the cell maximising ``|p - 0.5| * |p - m|``, where ``p`` is the
      labeler's foreground probability and ``m`` the current mask coverage of the cell (the
      environment's ``fg`` and ``mask`` observations): where the labeler is sure and the mask
      disagrees with it. Ties go to the lowest cell index. Needs a labeler with a foreground
      map (the SRM, or the oracle as an upper bound).
    * a callable :data:`PolicyFn`, e.g. a trained agent:
      ``lambda env, obs, allowed: agent.act(env, obs)``.

    Args:
        env: The environment (wrappers are looked through: ``steps`` bounds each run).
        policy: One of :data:`POLICIES`, or a :data:`PolicyFn`.
        seed: Seed of the ``random`` policy and of ``env.reset`` (the ``gt`` start's points).
        start: Start mode for every run (``"labeler"``, ``"gt"``, ``"none"``); ``None`` keeps
            the environment's configured start.
    """

    def __init__(
        self,
        env: PointPromptEnv,
        policy: Policy | str | PolicyFn,
        seed: int = 0,
        start: str | None = None,
    ) -> None:
        self._fn = policy if callable(policy) else None
        if self._fn is not None:
            policy = getattr(policy, "__name__", "custom")
        elif policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        env = env.unwrapped  # accept make_env()'s TimeLimit-wrapped env too
        if policy == "srm_confident" and not _has_foreground_map(env.labeler):
            raise ValueError(
                f"policy 'srm_confident' needs a labeler with a foreground map; "
                f"{env.labeler.name!r} has none (use the SRM or the oracle labeler)"
            )
        self.env = env
        self.policy = policy
        self.seed = int(seed)
        self.start = start
        g = env.config.grid
        self._fixed = {"centre": spiral_order(g), "grid": grid_order(g)}.get(policy)

    def _choose(
        self, obs: dict[str, np.ndarray], allowed: np.ndarray, rng: np.random.Generator
    ) -> int:
        if self._fn is not None:
            return int(self._fn(self.env, obs, allowed))
        cells = np.flatnonzero(allowed)
        if self.policy == "random":
            return int(rng.choice(cells))
        if self._fixed is not None:
            return int(next(c for c in self._fixed if allowed[c]))
        p = obs["fg"][0].reshape(-1).astype(np.float64)
        score = srm_confident_score(p, obs["mask"][0].reshape(-1).astype(np.float64))
        score[~allowed] = -np.inf
        return int(np.argmax(score))

    def run(self, index: int, steps: int | None = None) -> ClickTrace:
        """One episode on image ``index``.

        Args:
            index: Index into ``env.samples``.
            steps: Prompting steps T (default the environment's ``max_steps``).

        Returns:
            The trace: the start prompts (``start_clicks`` of them, decoded jointly) then one
            click per step; ``ious`` full-resolution (``env.current_mask()``) when the sample
            has a mask; ``info["env_iou"]`` the environment's low-res IoU per step.
        """
        env = self.env
        steps = env.config.max_steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        t0 = time.perf_counter()
        options: dict[str, Any] = {"index": int(index)}
        if self.start is not None:
            options["start"] = self.start
        obs, info = env.reset(seed=self.seed, options=options)
        sample = env.samples[int(index) % len(env.samples)]
        gt = getattr(sample, "mask", None)
        gt = None if gt is None else np.asarray(gt, bool)
        n_start = len(info["prompts"])
        calls = 1 if n_start else 0
        ious: list[float] = []
        env_ious: list[float] = []
        if gt is not None and n_start:
            ious = [mask_iou(env.current_mask(), gt)] * n_start
        rng = np.random.default_rng([self.seed, int(index)])
        n_cells = env.config.grid**2  # the pass action (allow_pass) is the policy fn's to take
        visited = np.zeros(n_cells, bool)
        actions: list[int] = []
        for t in range(steps):
            allowed = env.action_masks()[:n_cells] & ~visited
            if not allowed.any():  # more steps than cells: allow repeats rather than stop
                allowed = np.ones(n_cells, bool)
            action = self._choose(obs, allowed, rng)
            if action < n_cells:
                visited[action] = True
            actions.append(action)
            if t == steps - 1:  # nothing reads the observation after the last click
                _, info = env.final_step(action)
            else:
                obs, _, _, _, info = env.step(action)
            calls += info.get("click") is not None  # a pass makes no decoder call
            env_ious.append(float(info["iou"]))
            if gt is not None:
                ious.append(mask_iou(env.current_mask(), gt))
        prompts = info["prompts"]
        final_mask = env.current_mask()
        seconds = time.perf_counter() - t0
        return ClickTrace(
            sample_id=str(info["sample_id"]),
            points=np.asarray([(x, y) for x, y, _ in prompts], np.float32).reshape(-1, 2),
            labels=np.asarray([lab for _, _, lab in prompts], np.int64),
            ious=ious,
            final_mask=final_mask,
            decoder_calls=calls,
            seconds=seconds,
            start_clicks=n_start,
            info={"policy": self.policy, "actions": actions, "env_iou": env_ious},
        )


# --------------------------------------------------------------------------------------------
# Training-free one-shot baseline (PerSAM-style similarity points)
# --------------------------------------------------------------------------------------------


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


class OneShotSimilarity:
    """PerSAM-style one-shot prompting: similarity points from a target prototype.

    ``fit`` takes the reference embedding's mean feature over the reference mask (coverage-
    weighted on the embedding grid, valid region only, L2-normalised) as the target prototype,
    and the mean over the rest of the valid region as a background prototype. ``run`` computes
    the cosine similarity of every valid embedding position of the new image to the target
    prototype, clicks positive at the ``n_pos`` most similar cells and negative at the ``n_neg``
    least similar ones (cell centres, highest first), and decodes once with multimask output,
    keeping the candidate with the highest predicted IoU.

    This is PerSAM's positive-negative location prior without its target-guided attention,
    target-semantic prompting and cascaded refinement (those change the decoder). With
    ``contrast=True`` positions are ranked by ``cos(f, target) - cos(f, background)`` instead.

    Args:
        segmenter: The frozen segmenter.
        n_pos: Positive points (PerSAM: 1).
        n_neg: Negative points (PerSAM: 1).
        contrast: Rank by similarity to the target minus similarity to the background.
    """

    def __init__(
        self, segmenter: Segmenter, n_pos: int = 1, n_neg: int = 1, contrast: bool = False
    ) -> None:
        if n_pos < 1 or n_neg < 0:
            raise ValueError(f"need n_pos >= 1 and n_neg >= 0, got {n_pos}, {n_neg}")
        self.segmenter = segmenter
        self.n_pos = int(n_pos)
        self.n_neg = int(n_neg)
        self.contrast = bool(contrast)
        self.target_feature: torch.Tensor | None = None  # (C,) unit norm
        self.background_feature: torch.Tensor | None = None  # (C,) unit norm
        self.n_references = 0

    @staticmethod
    def prototypes(
        embedding: ImageEmbedding, mask: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm ``(C,)`` target and background prototypes of one reference image.

        Args:
            embedding: Reference embedding, features ``(1, C, He, We)``.
            mask: ``(H, W)`` bool reference mask in original pixels.
        """
        mask = _check_gt(mask, embedding)
        if not mask.any():
            raise ValueError("the reference mask is empty: one-shot fitting needs a target")
        grid = embedding.grid_size
        vh, vw = embedding.valid_shape(grid)
        cover = torch.from_numpy(embedding.to_frame(mask, grid)[:vh, :vw]).double()
        feats = embedding.features[0, :, :vh, :vw].detach().to("cpu", torch.float64)
        fg_w, bg_w = cover, 1.0 - cover
        target = (feats * fg_w).sum((1, 2)) / fg_w.sum().clamp_min(1e-12)
        background = (feats * bg_w).sum((1, 2)) / bg_w.sum().clamp_min(1e-12)
        return _unit(target).float(), _unit(background).float()

    def fit(self, ref_embedding: ImageEmbedding, ref_mask: np.ndarray) -> OneShotSimilarity:
        """Set the prototypes from one reference image and its mask (PerSAM's one shot)."""
        self.target_feature, self.background_feature = self.prototypes(ref_embedding, ref_mask)
        self.n_references = 1
        return self

    def fit_many(
        self, references: Iterable[tuple[ImageEmbedding, np.ndarray]]
    ) -> OneShotSimilarity:
        """Average the prototypes of several reference images (e.g. a task's 50 training images).

        Each image's unit-norm prototype counts equally; the mean is re-normalised. This is a
        few-shot extension, not PerSAM's one-shot setting: report it as such.
        """
        targets, backgrounds = [], []
        for emb, mask in references:
            t, b = self.prototypes(emb, mask)
            targets.append(t)
            backgrounds.append(b)
        if not targets:
            raise ValueError("fit_many needs at least one (embedding, mask) pair")
        self.target_feature = _unit(torch.stack(targets).mean(0))
        self.background_feature = _unit(torch.stack(backgrounds).mean(0))
        self.n_references = len(targets)
        return self

    def similarity_map(self, embedding: ImageEmbedding) -> np.ndarray:
        """``(vh, vw)`` ranking map over the valid embedding grid (cosine similarity, or the
        target-minus-background difference with ``contrast``)."""
        if self.target_feature is None or self.background_feature is None:
            raise RuntimeError("call fit() or fit_many() before run()")
        vh, vw = embedding.valid_shape(embedding.grid_size)
        feats = embedding.features[0, :, :vh, :vw].detach().to("cpu", torch.float32)
        if feats.shape[0] != self.target_feature.shape[0]:
            raise ValueError(
                f"embedding has {feats.shape[0]} channels, the prototype "
                f"{self.target_feature.shape[0]}: fit with embeddings of the same segmenter"
            )
        unit = feats / feats.norm(dim=0, keepdim=True).clamp_min(1e-12)
        sim = torch.einsum("c,chw->hw", self.target_feature, unit)
        if self.contrast:
            sim = sim - torch.einsum("c,chw->hw", self.background_feature, unit)
        return sim.numpy()

    def points(self, embedding: ImageEmbedding) -> tuple[np.ndarray, np.ndarray]:
        """``(n_pos + n_neg, 2)`` ``(x, y)`` points and their labels (positives first)."""
        sim = self.similarity_map(embedding)
        order = np.argsort(-sim.reshape(-1), kind="stable")
        n = len(order)
        pos = order[: min(self.n_pos, n)]
        neg = order[::-1][: min(self.n_neg, max(n - len(pos), 0))]
        vw = sim.shape[1]
        pts = [grid_to_pixel(embedding, *divmod(int(c), vw)) for c in (*pos, *neg)]
        labels = [1] * len(pos) + [0] * len(neg)
        return np.asarray(pts, np.float32).reshape(-1, 2), np.asarray(labels, np.int64)

    def run(
        self, embedding: ImageEmbedding, gt: np.ndarray | None = None, sample_id: str = ""
    ) -> ClickTrace:
        """Place the similarity points and decode once.

        Args:
            embedding: Embedding of the target image.
            gt: Optional ``(H, W)`` bool ground truth, for the IoU.
            sample_id: Recorded in the trace.

        Returns:
            The trace (all points decoded together: ``start_clicks == N``).
        """
        t0 = time.perf_counter()
        if gt is not None:
            gt = _check_gt(gt, embedding)
        pts, labels = self.points(embedding)
        pred = self.segmenter.decode(embedding, pts, labels, multimask=True)
        best = int(torch.argmax(torch.as_tensor(pred.candidate_scores)))
        mask = self.segmenter.upscale(embedding, pred.candidates[best])
        ious = [mask_iou(mask, gt)] * len(pts) if gt is not None else []
        return ClickTrace(
            sample_id=sample_id,
            points=pts,
            labels=labels,
            ious=ious,
            final_mask=mask,
            decoder_calls=1,
            seconds=time.perf_counter() - t0,
            start_clicks=len(pts),
            info={"references": self.n_references, "contrast": self.contrast},
        )
