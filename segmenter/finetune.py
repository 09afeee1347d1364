"""Fine-tuning SAM on a few annotated images: the baselines a practitioner would pick instead of
a prompt agent, at the three levels in use.

* ``decoder``: image encoder frozen (embeddings from the cache), mask decoder and the prompt
  encoder's learned embeddings trained. The most common choice.
* ``lora``: low-rank adapters (``peft``) on the image encoder's attention ``qkv`` projections,
  decoder trained too. Every step runs the encoder forward and backward: slow on a CPU.
* ``full``: every weight trained (for GPU users).

Training follows the usual recipe: Dice + BCE on the decoder's low-res logits against the
ground truth in the same padded frame, with simulated prompts drawn from the ground truth each
step: no prompt at all, random positive / negative points, and a jittered box. The model stays in
eval mode (TinyViT's batch norms keep their statistics at batch size 1). Early stopping on the
``val`` images' low-res IoU with no prompt and with one interior point (the two regimes of the
automatic variants).

Weights are saved as deltas on the frozen base (:mod:`segmenter.deltas`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from segmenter.base import ImageEmbedding, SegmenterError
from segmenter.deltas import (
    DELTA_FORMAT,
    LEVELS,
    PROMPT_EMBEDDINGS,
    add_lora,
    apply_delta,
    delta_state,
    is_decoder_key,
    load_delta,
    save_delta,
)
from segmenter.io import atomic_write
from segmenter.sam import SamSegmenter

logger = logging.getLogger(__name__)

__all__ = [
    "DELTA_FORMAT",
    "LEVELS",
    "PROMPT_EMBEDDINGS",
    "FinetuneConfig",
    "FinetuneItem",
    "FinetuneResult",
    "Finetuner",
    "add_lora",
    "apply_delta",
    "delta_state",
    "jittered_box",
    "load_delta",
    "sample_point_sets",
    "save_delta",
    "seg_loss",
]


@dataclass
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run.

    Attributes:
        level: One of :data:`LEVELS`.
        epochs: Passes over the training images (one optimizer step per image).
        lr: AdamW learning rate of the decoder (and of the LoRA / full weights).
        weight_decay: AdamW weight decay.
        patience: Stop after this many epochs without a better ``val`` score (0: never).
        point_sets: Random point prompt sets per image and step (one batched decoder call).
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA scaling ``alpha``.
        lora_targets: Module names that get adapters (``qkv`` in TinyViT and SAM's ViT).
        seed: Seed of the prompt sampling and image order.
    """

    level: str = "decoder"
    epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 5
    point_sets: int = 3
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("qkv",)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown fine-tuning level {self.level!r}; choose one of {LEVELS}")
        if self.epochs < 1 or self.point_sets < 1 or self.lora_rank < 1:
            raise ValueError("epochs, point_sets and lora_rank must be >= 1")
        self.lora_targets = tuple(self.lora_targets)


@dataclass
class FinetuneItem:
    """One annotated image: its ground truth and either its cached embedding (``decoder``
    level) or its pixels (``lora`` / ``full``, where the encoder runs every step)."""

    id: str
    gt: np.ndarray
    embedding: ImageEmbedding | None = None
    image: np.ndarray | None = None


@dataclass
class FinetuneResult:
    """What :meth:`Finetuner.fit` did."""

    delta: Path
    best_epoch: int
    best_val: float
    epochs_run: int
    seconds: float
    trainable_params: int
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Prompts and loss
# ---------------------------------------------------------------------------------------------


def _interior_point(gt: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` of the ground-truth pixel farthest from the background (its deepest point)."""
    dist = ndimage.distance_transform_edt(np.pad(gt, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return x + 0.5, y + 0.5


def sample_point_sets(
    gt: np.ndarray, n_sets: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n_sets`` random prompt sets from a ground-truth mask: 1-3 positive points inside it and
    0-2 negative points outside, padded with label -1 (SAM's not-a-point) to one length.

    Returns ``(n_sets, P, 2)`` float32 ``(x, y)`` pixels and ``(n_sets, P)`` int64 labels. An
    empty mask gives negative points only.
    """
    fg, bg = np.flatnonzero(gt), np.flatnonzero(~gt)
    sets = []
    for _ in range(n_sets):
        n_pos = int(rng.integers(1, 4)) if len(fg) else 0
        n_neg = int(rng.integers(0, 3)) if len(bg) else 0
        if n_pos + n_neg == 0:
            n_neg = 1 if len(bg) else 0
        idx = [*rng.choice(fg, n_pos), *rng.choice(bg, n_neg)] if n_pos + n_neg else []
        sets.append((np.asarray(idx, np.int64), [1] * n_pos + [0] * n_neg))
    width = max(1, max(len(lab) for _, lab in sets))
    points = np.zeros((n_sets, width, 2), np.float32)
    labels = np.full((n_sets, width), -1, np.int64)
    for i, (idx, lab) in enumerate(sets):
        ys, xs = np.unravel_index(idx, gt.shape)
        points[i, : len(idx)] = np.stack([xs + 0.5, ys + 0.5], 1) if len(idx) else 0
        labels[i, : len(lab)] = lab
    return points, labels


def jittered_box(gt: np.ndarray, rng: np.random.Generator, frac: float = 0.1) -> np.ndarray | None:
    """``(4,)`` ``x0, y0, x1, y1`` box around the mask, each side moved by up to ``frac`` of the
    box size (at most 20 px, as in SAM's training); ``None`` for an empty mask."""
    ys, xs = np.nonzero(gt)
    if not len(xs):
        return None
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    size = np.array([box[2] - box[0], box[3] - box[1]] * 2, np.float32)
    noise = rng.normal(0, 1, 4) * np.minimum(frac * size, 20.0)
    h, w = gt.shape
    return np.clip(box + noise, 0, [w, h, w, h]).astype(np.float32)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dice + BCE of ``(B, 1, Hl, Wl)`` logits against a ``(1, 1, Hl, Wl)`` target, over the
    image's part of the padded frame (``valid``)."""
    t = target.expand_as(logits)
    v = valid.expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, weight=v, reduction="sum") / v.sum()
    p = torch.sigmoid(logits) * v
    inter = (p * t).sum((-2, -1))
    dice = 1 - (2 * inter + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    return bce + dice.mean()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    item: FinetuneItem
    frame: ImageEmbedding  # geometry (sizes) of the encoded image
    target: torch.Tensor  # (1, 1, Hl, Wl) ground truth in the low-res padded frame
    valid: torch.Tensor  # (1, 1, Hl, Wl) the image's part of that frame
    centre: tuple[float, float]  # deepest ground-truth point (val prompt)


class Finetuner:
    """Fine-tune a copy of a frozen segmenter's model; the segmenter itself is not touched.

    Args:
        segmenter: The base (it supplies the model to copy, geometry and device).
        config: Level and hyperparameters.
        out: Folder for ``delta.pt`` (best on val), ``finetune_state.pt`` (resume point, written
            after every epoch) and TensorBoard logs.
    """

    def __init__(self, segmenter: SamSegmenter, config: FinetuneConfig, out: str | Path) -> None:
        if segmenter.variant is not None:
            raise SegmenterError("fine-tune from a base segmenter, not from a fine-tuned one")
        self.base = segmenter
        self.config = config
        self.out = Path(out)
        self.device = segmenter.device
        self.model = copy.deepcopy(segmenter.model).to(self.device).eval()
        self.model.requires_grad_(False)
        if config.level == "lora":
            add_lora(self.model, config.lora_rank, config.lora_alpha, config.lora_targets)
        for name, p in self.model.named_parameters():
            lora = config.level == "lora" and name.startswith("image_encoder.") and "lora_" in name
            p.requires_grad_(config.level == "full" or is_decoder_key(name) or lora)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, weight_decay=config.weight_decay
        )
        self.dense_pe = self.model.prompt_encoder.get_dense_pe().detach()

    @property
    def trainable_params(self) -> int:
        return int(sum(p.numel() for p in self.params))

    # -- pieces ---------------------------------------------------------------------------------
    def _prepare(self, item: FinetuneItem) -> _Prepared:
        if item.embedding is None and item.image is None:
            raise ValueError(f"{item.id}: a fine-tuning item needs its embedding or its image")
        if self.config.level != "decoder" and item.image is None:
            raise ValueError(f"{item.id}: {self.config.level} fine-tuning needs the image pixels")
        gt = np.asarray(item.gt, bool)
        if item.embedding is not None:
            frame = item.embedding
        else:
            size = (int(item.image.shape[0]), int(item.image.shape[1]))
            frame = ImageEmbedding(torch.zeros(0), size, self.base.input_size_for(size), "")
        if gt.shape != tuple(frame.original_size):
            raise ValueError(
                f"{item.id}: mask of shape {gt.shape} does not match its image "
                f"{tuple(frame.original_size)}"
            )
        hl, wl = self.base.low_res_size
        target = frame.to_frame(gt.astype(np.float32), (hl, wl)) > 0.5
        valid = frame.to_frame(np.ones(gt.shape, np.float32), (hl, wl)) > 0.5
        as_t = lambda a: torch.from_numpy(a.astype(np.float32))[None, None].to(self.device)  # noqa: E731
        centre = _interior_point(gt) if gt.any() else (gt.shape[1] / 2, gt.shape[0] / 2)
        return _Prepared(item, frame, as_t(target), as_t(valid), centre)

    def _features(self, p: _Prepared) -> torch.Tensor:
        if self.config.level == "decoder":
            return p.item.embedding.features.to(self.device)
        return self.model.image_encoder(self.base.encoder_input(p.item.image))

    def _scale(self, p: _Prepared) -> torch.Tensor:
        (h, w), (nh, nw) = p.frame.original_size, p.frame.input_size
        return torch.tensor([nw / w, nh / h, nw / w, nh / h], device=self.device)

    def _decode(
        self,
        feats: torch.Tensor,
        p: _Prepared,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> torch.Tensor:
        """``(B, 1, Hl, Wl)`` single-mask logits of a batch of prompt sets (or of no prompt)."""
        scale = self._scale(p)
        pts = None
        if points is not None:
            coords = torch.from_numpy(points).to(self.device) * scale[:2]
            pts = (coords, torch.from_numpy(labels).to(self.device))
        boxes = None if box is None else torch.from_numpy(box).to(self.device)[None] * scale
        sparse, dense = self.model.prompt_encoder(points=pts, boxes=boxes, masks=None)
        logits, _ = self.model.mask_decoder(
            image_embeddings=feats,
            image_pe=self.dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits

    def _step(self, p: _Prepared, rng: np.random.Generator) -> float:
        gt = np.asarray(p.item.gt, bool)
        feats = self._features(p)
        loss = seg_loss(self._decode(feats, p), p.target, p.valid)  # no prompt
        points, labels = sample_point_sets(gt, self.config.point_sets, rng)
        loss = loss + seg_loss(self._decode(feats, p, points, labels), p.target, p.valid)
        box = jittered_box(gt, rng)
        if box is not None:
            loss = loss + seg_loss(self._decode(feats, p, box=box), p.target, p.valid)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, prepared: Sequence[_Prepared]) -> dict[str, float]:
        """Low-res IoU on ``prepared`` with no prompt and with one interior positive point."""
        scores: dict[str, list[float]] = {"iou_no_prompt": [], "iou_one_point": []}
        for p in prepared:
            feats = self._features(p)
            point = np.asarray([[p.centre]], np.float32)
            for key, logits in (
                ("iou_no_prompt", self._decode(feats, p)),
                ("iou_one_point", self._decode(feats, p, point, np.ones((1, 1), np.int64))),
            ):
                pred = (logits[0, 0] > 0) & (p.valid[0, 0] > 0)
                t = p.target[0, 0] > 0
                union = float((pred | t).sum())
                scores[key].append(float((pred & t).sum()) / union if union else 1.0)
        out = {k: float(np.mean(v)) for k, v in scores.items()}
        out["val"] = (out["iou_no_prompt"] + out["iou_one_point"]) / 2
        return out

    # -- resume ---------------------------------------------------------------------------------
    def _save_state(self, epoch: int, best: tuple[float, int], history: list, seconds: float):
        trainable = {
            n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }
        state = {
            "epoch": epoch,
            "best": list(best),
            "history": history,
            "seconds": seconds,
            "config": {**asdict(self.config), "lora_targets": list(self.config.lora_targets)},
            "params": trainable,
            "optimizer": self.optimizer.state_dict(),
        }
        atomic_write(self.out / "finetune_state.pt", lambda fh: torch.save(state, fh))

    def _load_state(self) -> dict[str, Any] | None:
        path = self.out / "finetune_state.pt"
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise SegmenterError(
                f"resume point {path} is unreadable ({exc}); delete it to start over"
            ) from exc
        want = {**asdict(self.config), "lora_targets": list(self.config.lora_targets)}
        if {k: v for k, v in state["config"].items() if k != "epochs"} != {
            k: v for k, v in want.items() if k != "epochs"
        }:
            raise SegmenterError(
                f"{path} was written with other settings ({state['config']}); "
                "resume with the same settings or use a new --out folder"
            )
        missing, unexpected = self.model.load_state_dict(state["params"], strict=False)
        if unexpected:
            raise SegmenterError(f"{path} does not fit this model ({unexpected[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        return state

    # -- the loop -------------------------------------------------------------------------------
    def fit(
        self,
        train: Sequence[FinetuneItem],
        val: Sequence[FinetuneItem],
        *,
        resume: bool = False,
        progress: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> FinetuneResult:
        """Train on ``train``, keep the best-on-``val`` weights as ``out/delta.pt``.

        With ``resume`` the run continues after the last completed epoch of a previous call
        with the same settings (the optimizer state included).
        """
        from torch.utils.tensorboard import SummaryWriter

        from segmenter.progress import progress_bar

        if not train or not val:
            raise ValueError("fine-tuning needs at least one train and one val image")
        self.out.mkdir(parents=True, exist_ok=True)
        tr = [self._prepare(it) for it in train]
        va = [self._prepare(it) for it in val]
        cfg = self.config
        start, best, history, spent = 0, (-1.0, -1), [], 0.0
        state = self._load_state() if resume else None
        if state is not None:
            start, best, history = state["epoch"], tuple(state["best"]), state["history"]
            spent = float(state["seconds"])
            logger.info("resuming fine-tuning after epoch %d", start)
        if start == 0:
            first = self.evaluate(va)
            history.append({"epoch": 0, "loss": None, **first})
            best = (first["val"], 0)
            save_delta(self.out / "delta.pt", self.model, cfg, self.base.model_id, meta)
        writer = SummaryWriter(str(self.out / "tb"))
        t0 = time.perf_counter()
        bar = progress_bar(
            total=(cfg.epochs - start) * len(tr),
            desc=f"finetune {cfg.level}",
            unit="img",
            disable=not progress,
        )
        epoch = start
        for epoch in range(start + 1, cfg.epochs + 1):
            if cfg.patience and epoch - 1 - best[1] >= cfg.patience:
                epoch -= 1
                break
            rng = np.random.default_rng([cfg.seed, epoch])
            losses = []
            for i in rng.permutation(len(tr)):
                losses.append(self._step(tr[int(i)], rng))
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses):.3f}", best=f"{best[0]:.3f}")
            scores = self.evaluate(va)
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), **scores})
            for k, v in history[-1].items():
                if k != "epoch":
                    writer.add_scalar(f"finetune/{k}", v, epoch)
            if scores["val"] > best[0]:
                best = (scores["val"], epoch)
                save_delta(self.out / "delta.pt", self.model, cfg, self.base.model_id, meta)
            self._save_state(epoch, best, history, spent + time.perf_counter() - t0)
        bar.close()
        writer.close()
        return FinetuneResult(
            delta=self.out / "delta.pt",
            best_epoch=int(best[1]),
            best_val=float(best[0]),
            epochs_run=int(epoch),
            seconds=spent + time.perf_counter() - t0,
            trainable_params=self.trainable_params,
            history=history,
        )
