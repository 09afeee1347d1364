"""A prompting session: one image's embedding, the clicks so far, and the mask they give.

Every loop of the project that clicks, decodes and looks at the mask runs on this class: the
environment's steps, the imitation teacher's and the ceiling's candidate clicks, the SRM's
simulated mask states and its label evaluation, and the simulated annotator. It is the one
place that knows how a prompt set becomes a mask:

* the decoder is called once per prompt set, with the previous low-res logits as mask input
  (SAM's interactive practice; ``use_mask_input``), and with SAM's three-candidate head for a
  lone click when asked (``multimask_single_click``);
* the mask state on the embedding grid (``mask_prob``, what the SRM and the policy read) is the
  decoder's probability area-pooled to that grid;
* with a :class:`Target` (ground truth), the IoU is measured in the valid part of the decoder's
  low-res frame, the cheap IoU of training.

:meth:`PromptSession.click` commits a click; :meth:`PromptSession.preview` decodes candidate
clicks against the current prompts and mask input without committing (what a lookahead agent
needs), and :meth:`PromptSession.commit` adopts one of the previewed outcomes without decoding
again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from segmenter.base import ImageEmbedding, Prediction, Segmenter, mask_iou
from segmenter.geometry import to_grid

__all__ = ["Outcome", "PromptSession", "Target"]


@dataclass(frozen=True)
class Target:
    """One image's ground truth in the frames a session scores in.

    Attributes:
        full: ``(H, W)`` bool ground truth in original pixels.
        low: ``(vh, vw)`` bool ground truth in the valid (non-padding) part of the decoder's
            low-res frame (coverage > 0.5).
        grid: ``(He, We)`` float32 coverage on the embedding grid (zero over the padding).
    """

    full: np.ndarray
    low: np.ndarray
    grid: np.ndarray

    @classmethod
    def of(
        cls, embedding: ImageEmbedding, mask: np.ndarray, low_res_size: tuple[int, int]
    ) -> Target:
        """The target of ``mask`` (``(H, W)``, the encoded image's size) for ``embedding``."""
        full = np.asarray(mask, dtype=bool)
        vh, vw = embedding.valid_shape(low_res_size)
        low = embedding.to_frame(full, low_res_size)[:vh, :vw] > 0.5
        return cls(full, low, embedding.to_frame(full, embedding.grid_size))


@dataclass
class Outcome:
    """What one prompt set gives.

    Attributes:
        points: ``(N, 2)`` float32 ``(x, y)`` prompts in original pixels.
        labels: ``(N,)`` int64 labels (1 foreground, 0 background).
        prediction: The decoder's answer (selected logits, score, candidates).
        iou: Low-res IoU with the session's target, ``None`` without one.
        grid_size: ``(He, We)`` of the embedding grid (for :attr:`mask_prob`).
    """

    points: np.ndarray
    labels: np.ndarray
    prediction: Prediction
    iou: float | None
    grid_size: tuple[int, int] = field(repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """``(Hl, Wl)`` low-res logits of the selected mask."""
        return self.prediction.low_res_logits

    @cached_property
    def mask_prob(self) -> np.ndarray:
        """``(He, We)`` float32 mask probability on the embedding grid."""
        return to_grid(torch.sigmoid(self.prediction.low_res_logits), self.grid_size)


class PromptSession:
    """Prompting one image: the embedding, the clicks so far and the current mask.

    Args:
        segmenter: The frozen segmenter that made ``embedding``.
        embedding: The image's embedding (encoded once, usually from the cache).
        target: Ground truth, for :attr:`iou` and the outcomes' IoU; ``None`` without.
        use_mask_input: Feed the current low-res logits back to the decoder with every new
            prompt set.
        multimask_single_click: Decode a one-point prompt set with SAM's three-candidate head
            and keep the highest-scoring mask; otherwise always the single-mask head.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        embedding: ImageEmbedding,
        target: Target | None = None,
        *,
        use_mask_input: bool = True,
        multimask_single_click: bool = False,
    ) -> None:
        self.segmenter = segmenter
        self.embedding = embedding
        self.target = target
        self.use_mask_input = bool(use_mask_input)
        self.multimask_single_click = bool(multimask_single_click)
        #: Decoder calls made by this session (previews included).
        self.decoder_calls = 0
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    @cached_property
    def valid_low(self) -> tuple[int, int]:
        """Rows and columns of the decoder's low-res frame that cover the image."""
        return self.embedding.valid_shape(self.segmenter.low_res_size)

    def reset(self) -> None:
        """Forget every prompt: no points, no mask (no decoder call)."""
        self.points = np.zeros((0, 2), np.float32)
        self.labels = np.zeros((0,), np.int64)
        self.outcome: Outcome | None = None
        self._history: list[tuple[np.ndarray, np.ndarray, Outcome | None]] = []

    @property
    def logits(self) -> torch.Tensor | None:
        """``(Hl, Wl)`` low-res logits of the current mask, ``None`` before the first decode."""
        return None if self.outcome is None else self.outcome.logits

    @property
    def prediction(self) -> Prediction | None:
        """The decoder's answer for the current prompts, ``None`` before the first decode."""
        return None if self.outcome is None else self.outcome.prediction

    @property
    def mask_prob(self) -> np.ndarray:
        """``(He, We)`` float32 probability of the current mask on the embedding grid (zeros
        before the first decode)."""
        if self.outcome is None:
            return np.zeros(self.embedding.grid_size, np.float32)
        return self.outcome.mask_prob

    @property
    def iou(self) -> float:
        """Low-res IoU of the current mask with the target (0.0 before the first decode).

        Raises:
            RuntimeError: The session has no target.
        """
        if self.target is None:
            raise RuntimeError("this prompting session has no ground truth (target=None)")
        return 0.0 if self.outcome is None else float(self.outcome.iou)

    # -- decoding ------------------------------------------------------------------------------
    def _mask_input(self) -> torch.Tensor | None:
        return self.logits if self.use_mask_input else None

    def _decode(self, points: np.ndarray, labels: np.ndarray, mask_input: bool = True) -> Outcome:
        pred = self.segmenter.decode(
            self.embedding,
            points,
            labels,
            mask_input=self._mask_input() if mask_input else None,
            multimask=self.multimask_single_click and len(points) == 1,
        )
        self.decoder_calls += 1
        return self._outcome(points, labels, pred)

    def _outcome(self, points: np.ndarray, labels: np.ndarray, pred: Prediction) -> Outcome:
        iou = None
        if self.target is not None:
            vh, vw = self.valid_low
            iou = mask_iou(pred.low_res_logits[:vh, :vw].numpy() > 0, self.target.low)
        return Outcome(points, labels, pred, iou, self.embedding.grid_size)

    def _extended(self, x: float, y: float, label: int) -> tuple[np.ndarray, np.ndarray]:
        points = np.concatenate([self.points, [[x, y]]]).astype(np.float32)
        labels = np.concatenate([self.labels, [label]]).astype(np.int64)
        return points, labels

    def prompt(self, points: np.ndarray, labels: np.ndarray, mask_input: bool = True) -> Outcome:
        """Replace the prompt set by ``points`` / ``labels`` and decode it (one decoder call,
        the current mask as mask input unless ``mask_input`` is False); commits and returns
        the outcome."""
        points = np.asarray(points, np.float32).reshape(-1, 2)
        labels = np.asarray(labels, np.int64).reshape(-1)
        return self.commit(self._decode(points, labels, mask_input))

    def click(self, x: float, y: float, label: int) -> Outcome:
        """Add one click at original pixel ``(x, y)`` with ``label`` and decode (one decoder
        call); commits and returns the outcome."""
        return self.commit(self._decode(*self._extended(x, y, int(label))))

    def preview(self, clicks: Sequence[tuple[float, float, int]]) -> list[Outcome]:
        """Outcomes of each candidate click ``(x, y, label)`` added to the current prompts,
        decoded against the current mask input; nothing is committed. One decoder call per
        candidate, made as one batched call (``segmenter.decode_batch``) where the segmenter
        has one and no candidate needs the multimask head."""
        sets = [self._extended(float(x), float(y), int(lab)) for x, y, lab in clicks]
        batch = getattr(self.segmenter, "decode_batch", None)
        single = self.multimask_single_click and len(self.points) == 0
        if batch is None or single or len(sets) < 2:
            return [self._decode(p, lab) for p, lab in sets]
        preds = batch(
            self.embedding,
            np.stack([p for p, _ in sets]),
            np.stack([lab for _, lab in sets]),
            mask_input=self._mask_input(),
        )
        self.decoder_calls += len(sets)
        return [self._outcome(p, lab, pred) for (p, lab), pred in zip(sets, preds, strict=True)]

    def commit(self, outcome: Outcome) -> Outcome:
        """Adopt ``outcome`` (from :meth:`preview` of this state, or a decode) as the current
        prompts and mask, with no decoder call (:meth:`undo` goes back)."""
        self._history.append((self.points, self.labels, self.outcome))
        self.points, self.labels = outcome.points, outcome.labels
        self.outcome = outcome
        return outcome

    @property
    def can_undo(self) -> bool:
        """Whether :meth:`undo` has a state to go back to."""
        return bool(self._history)

    def undo(self) -> Outcome | None:
        """Go back to the state before the last commit (a click, a prompt set, a candidate
        choice, :meth:`drop_prompts`), with no decoder call; returns the restored outcome
        (``None``: no mask).

        Raises:
            IndexError: Nothing to undo.
        """
        if not self._history:
            raise IndexError("nothing to undo: the session is at its first state")
        self.points, self.labels, self.outcome = self._history.pop()
        return self.outcome

    def drop_prompts(self, keep: np.ndarray | None = None) -> None:
        """Drop prompts (all, or those where ``keep`` is False) and keep the current mask as
        the next decode's mask input: a person continuing from a mask without its clicks. No
        decoder call; :meth:`undo` restores them."""
        keep = np.zeros(len(self.points), bool) if keep is None else np.asarray(keep, bool)
        if keep.shape != (len(self.points),):
            raise ValueError(f"keep must have one entry per prompt ({len(self.points)})")
        self._history.append((self.points, self.labels, self.outcome))
        self.points, self.labels = self.points[keep], self.labels[keep]

    def fork(self, segmenter: Segmenter | None = None, commits: int | None = None) -> PromptSession:
        """A new session at this one's state (prompts, mask, target; no history, no calls
        counted), e.g. one per way of continuing; ``segmenter`` decodes its next prompts
        (default: this session's; it must read the same embedding). With ``commits``, at the
        state after the first ``commits`` commits instead (0: before any; e.g. 1: an agent's
        start points, before its clicks)."""
        states = [*self._history, (self.points, self.labels, self.outcome)]
        if commits is not None and not 0 <= commits < len(states):
            raise ValueError(f"commits must be in 0..{len(states) - 1}, got {commits}")
        points, labels, outcome = states[-1 if commits is None else commits]
        other = PromptSession(
            segmenter or self.segmenter,
            self.embedding,
            self.target,
            use_mask_input=self.use_mask_input,
            multimask_single_click=self.multimask_single_click,
        )
        other.points, other.labels, other.outcome = points, labels, outcome
        return other

    def select_candidate(self, index: int) -> Outcome:
        """Make candidate ``index`` of the current multimask prediction the current mask (e.g.
        the simulated annotator's best-of-3 oracle choice); no decoder call."""
        if self.outcome is None:
            raise RuntimeError("select_candidate needs a decoded prompt set")
        pred = self.outcome.prediction
        chosen = Prediction(
            low_res_logits=pred.candidates[index],
            score=float(pred.candidate_scores[index]),
            candidates=pred.candidates,
            candidate_scores=pred.candidate_scores,
        )
        iou = None
        if self.target is not None:
            vh, vw = self.valid_low
            iou = mask_iou(chosen.low_res_logits[:vh, :vw].numpy() > 0, self.target.low)
        return self.commit(Outcome(self.points, self.labels, chosen, iou, self.embedding.grid_size))

    # -- the mask ------------------------------------------------------------------------------
    def current_mask(self) -> np.ndarray:
        """``(H, W)`` bool full-resolution mask of the current prompts (empty before any)."""
        if self.outcome is None:
            return np.zeros(self.embedding.original_size, bool)
        return self.segmenter.upscale(self.embedding, self.outcome.logits)

    def mask_score(self) -> float:
        """Mean decoder foreground probability inside the current mask (0.0 when empty): a
        confidence score computed without ground truth."""
        if self.outcome is None:
            return 0.0
        vh, vw = self.valid_low
        logits = self.outcome.logits[:vh, :vw]
        inside = logits > 0
        return float(torch.sigmoid(logits[inside]).mean()) if bool(inside.any()) else 0.0
