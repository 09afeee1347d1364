"""Offline training of the SRM: pretraining on a task's labelled images under realistic mask
states, and the logit calibration fitted on held-out images.

A mixin of :class:`~recalibration.srm.module.SemanticRecalibrationModule`: it works on the
module's head, normalisation and calibration (``self``), and never labels clicks itself.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from recalibration.srm.config import SRMTrainItem
from recalibration.srm.heads import dihedral
from recalibration.srm.losses import dice_bce_loss, valid_mask
from recalibration.srm.mask_states import simulate_mask_states, synthetic_mask_state
from segmenter.memory import trim_heap

if TYPE_CHECKING:
    from segmenter.base import ImageEmbedding, Segmenter

logger = logging.getLogger(__name__)

__all__ = ["PreparedItem", "TrainingMixin"]


@dataclass
class PreparedItem:
    """Per-image tensors of the training / evaluation sets."""

    features: torch.Tensor  # (C, He, We) input features (float16 from pretraining; read as float32)
    gt_grid: torch.Tensor  # (He, We) coverage
    valid: torch.Tensor  # (He, We)
    semantic: torch.Tensor | None  # (He, We)
    mask_states: list[np.ndarray] = field(default_factory=list)


class TrainingMixin:
    """Pretraining, normalisation statistics and calibration of the SRM (see the module
    docstring)."""

    def _prepare_items(
        self, items: Sequence[SRMTrainItem], mask_states: Sequence[Sequence[np.ndarray]] | None
    ) -> list[PreparedItem]:
        out = []
        for i, item in enumerate(items):
            emb, gt_full, sem = item
            if self.branch == "explicit" and sem is None:
                raise ValueError(
                    f"item {i}: the explicit SRM needs a semantic map per item (third element)"
                )
            feats = self.input_features(emb)
            gt_grid = emb.to_frame(np.asarray(gt_full, np.float32), emb.grid_size)
            out.append(
                PreparedItem(
                    # float16: half the memory of the largest per-image tensor of pretraining
                    # (4 -> 2 MiB per image at 256 channels); both readers cast to float32
                    features=feats[0].detach().to("cpu", torch.float16),
                    gt_grid=torch.from_numpy(gt_grid),
                    valid=torch.from_numpy(valid_mask(emb)),
                    semantic=None if sem is None else torch.from_numpy(np.asarray(sem, np.float32)),
                    mask_states=list(mask_states[i]) if mask_states is not None else [],
                )
            )
            trim_heap()  # the raw features were short-lived: no heap growth per image
        return out

    def fit_reduction(
        self, items: Sequence[SRMTrainItem], max_cells: int = 200_000, seed: int = 0
    ) -> None:
        """Fit the input projection (``config.reduce`` channels): a whitened PCA of the items'
        standardised features over their valid cells (at most ``max_cells`` of them, drawn
        evenly from every image).

        The moments are summed image by image (``C x C`` in float64), never the sampled cells
        themselves: memory stays at one image's features whatever the number of images (the
        cells stacked at once took ~8 GB for 1,656 channels)."""
        d = int(self.config.reduce)
        rng = np.random.default_rng(seed)
        per_image = max(1, max_cells // max(len(items), 1))
        total: torch.Tensor | None = None
        outer: torch.Tensor | None = None
        n = 0
        for emb, _, _ in items:
            vh, vw = emb.valid_shape(emb.grid_size)
            f = self.raw_features(emb)[0, :, :vh, :vw].detach().to("cpu", torch.float64)
            f = f.flatten(1).T
            rows = f[rng.choice(len(f), min(len(f), per_image), replace=False)]
            if total is None or outer is None:
                total = torch.zeros(rows.shape[1], dtype=torch.float64)
                outer = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
            total += rows.sum(0)
            outer += rows.T @ rows
            n += len(rows)
            trim_heap()
        if total is None or outer is None:
            raise ValueError("fit_reduction needs at least one item")
        if d > total.shape[0]:
            raise ValueError(f"reduce={d} exceeds the {total.shape[0]} feature channels")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / max(n - 1, 1)  # unbiased, as Tensor.std
        std = cov.diagonal().clamp_min(0.0).sqrt().clamp_min(1e-3)
        values, vectors = torch.linalg.eigh(cov / torch.outer(std, std))
        top = torch.argsort(values, descending=True)[:d]
        matrix = vectors[:, top].T / values[top].clamp_min(1e-6).sqrt()[:, None]
        self.reduce_mean = mean.float().to(self.device)
        self.reduce_std = std.float().to(self.device)
        self.reduce_matrix = matrix.float().to(self.device)
        self._touch()

    def fit_normalization(self, items: Sequence[SRMTrainItem]) -> None:
        """Set the per-channel mean/std (``normalize="dataset"``) from the items' valid cells."""
        mean, std, _, _ = self._channel_moments(
            ((emb, None) for emb, _, _ in items), self.input_features, self.head_channels
        )
        self.channel_mean = mean.float().to(self.device)
        self.channel_std = std.float().to(self.device)
        self._touch()

    @staticmethod
    def _channel_moments(
        images: Iterable[tuple[ImageEmbedding, Callable[[], np.ndarray] | None]],
        read: Callable[..., torch.Tensor],
        channels: int,
        dark: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Per-channel mean and spread (floored at 1e-3) of ``read(emb, load_image)`` over the
        valid cells of every image, summed image by image in float64; with the number of cells
        and images. With ``dark``, cells whose mean pixel value (0-1) is below it are left out
        (an endoscope's black border, letterboxing: they say nothing of the images' domain)."""
        total = torch.zeros(channels, dtype=torch.float64)
        total_sq = torch.zeros(channels, dtype=torch.float64)
        count = n_images = 0
        for emb, load_image in images:
            vh, vw = emb.valid_shape(emb.grid_size)
            f = read(emb, load_image)[0, :, :vh, :vw].detach().to("cpu", torch.float64).flatten(1)
            if dark is not None and load_image is not None:
                pixels = np.asarray(load_image(), np.float32).mean(axis=-1) / 255.0
                light = emb.to_frame(pixels, emb.grid_size)[:vh, :vw].reshape(-1) >= dark
                if light.any():
                    f = f[:, torch.from_numpy(light)]
            total += f.sum(1)
            total_sq += (f * f).sum(1)
            count += f.shape[1]
            n_images += 1
            trim_heap()
        mean = total / max(count, 1)
        std = (total_sq / max(count, 1) - mean * mean).clamp_min(1e-8).sqrt()
        return mean, std.clamp_min(1e-3), count, n_images

    def adapt_statistics(
        self,
        images: Iterable[tuple[ImageEmbedding, Callable[[], np.ndarray] | None]],
        mix: float = 1.0,
        dark: float | None = None,
        when: Callable[[float], bool] | None = None,
    ) -> dict[str, Any]:
        """Re-estimate the input statistics on the images to be segmented (no labels needed):
        the per-channel mean and spread the SRM standardises its raw features with before the
        projection (``reduce``), else those of the head's inputs (``normalize="dataset"``).

        The head, the projection and the calibration stay as trained: the images are brought
        back to the statistics the head saw in training (the batch-norm re-estimation of Li et
        al., "Revisiting batch normalization for practical domain adaptation", 2016, applied to
        the SRM's one normalisation). ``images`` are ``(embedding, load_image)`` pairs; ``mix``
        is the target's share of the new statistics (1: the target's alone; 0.5: the mean and
        second moment halfway between the training images' and the target's); ``dark`` leaves
        out cells darker than it (mean pixel value, 0-1); ``when``, given the images' drift
        (:meth:`feature_drift`), says whether to re-estimate at all (the statistics stay as
        trained when it says no). Returns what was re-estimated (``None``: nothing), on how many
        images and cells, the mix and the drift.

        Raises:
            ValueError: No image, or an SRM with no dataset statistics to re-estimate
                (``normalize="image"`` without ``reduce`` standardises every image by itself).
        """
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {mix}")
        raw, mean, std, cells, n_images = self._moments_of(images, dark)
        m0, s0 = self._held_statistics(raw)
        drift = _drift(mean, m0, s0)
        info = {"statistics": None, "images": n_images, "cells": cells, "mix": mix, "drift": drift}
        if when is not None and not when(drift):
            return info
        if mix < 1.0:  # pool first and second moments
            second = (1 - mix) * (s0**2 + m0**2) + mix * (std**2 + mean**2)
            mean = (1 - mix) * m0 + mix * mean
            std = (second - mean**2).clamp_min(1e-8).sqrt().clamp_min(1e-3)
        if raw:
            self.reduce_mean = mean.float().to(self.device)
            self.reduce_std = std.float().to(self.device)
        else:
            self.channel_mean = mean.float().to(self.device)
            self.channel_std = std.float().to(self.device)
        self._touch()
        info["statistics"] = "raw features (before the projection)" if raw else "head inputs"
        return info

    def feature_drift(
        self,
        images: Iterable[tuple[ImageEmbedding, Callable[[], np.ndarray] | None]],
        dark: float | None = None,
    ) -> float:
        """How far the images' features lie from the statistics the SRM standardises them
        with: the mean over channels of ``|mean - trained mean| / trained spread``, measured as
        :meth:`adapt_statistics` measures (and returns as ``drift``), nothing changed. On the
        training images' own domain it is not 0 (the statistics are pooled differently, and
        from other images): compare a target's drift with that of images of the training
        domain (``alignsam adapt`` does, with the run's labelled images)."""
        raw, mean, _, _, _ = self._moments_of(images, dark)
        return _drift(mean, *self._held_statistics(raw))

    def _held_statistics(self, raw: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and spread the SRM standardises with now (the raw features' with
        ``reduce``, else the head inputs'), in float64 on the CPU."""
        mean, std = (
            (self.reduce_mean, self.reduce_std) if raw else (self.channel_mean, self.channel_std)
        )
        return mean.detach().to("cpu", torch.float64), std.detach().to("cpu", torch.float64)

    def _moments_of(
        self,
        images: Iterable[tuple[ImageEmbedding, Callable[[], np.ndarray] | None]],
        dark: float | None,
    ) -> tuple[bool, torch.Tensor, torch.Tensor, int, int]:
        """Whether the statistics are the raw features' (``reduce``), and the images' channel
        moments, cells and images (:meth:`_channel_moments`) of those features."""
        raw = bool(self.config.reduce)
        if not raw and self.config.normalize != "dataset":
            raise ValueError(
                "this SRM standardises each image by itself (normalize='image', no reduce): "
                "there are no training statistics to re-estimate"
            )
        read = self.raw_features if raw else self.input_features
        channels = self.embed_channels if raw else self.head_channels
        mean, std, cells, n_images = self._channel_moments(images, read, channels, dark)
        if not n_images:
            raise ValueError("at least one image is needed to measure feature statistics on")
        return raw, mean, std, cells, n_images

    def _batch(
        self,
        prepared: Sequence[PreparedItem],
        indices: Sequence[int],
        rng: np.random.Generator,
        augment: bool,
        p_zero: float,
        p_synthetic: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch ``(e, maps, target, valid)`` with random mask states and augmentation."""
        es, maps, tgts, valids = [], [], [], []
        for i in indices:
            p = prepared[i]
            u = rng.random()
            if u < p_zero:
                m = np.zeros(tuple(p.gt_grid.shape), np.float32)
            elif u < p_zero + p_synthetic or not p.mask_states:
                m = synthetic_mask_state(p.gt_grid.numpy(), p.valid.numpy(), rng)
            else:
                m = p.mask_states[int(rng.integers(len(p.mask_states)))]
            mask = torch.from_numpy(np.asarray(m, np.float32))
            chans = [mask] if p.semantic is None else [mask, p.semantic]
            e, mp, tg, vd = p.features, torch.stack(chans), p.gt_grid[None], p.valid[None]
            if augment:
                k, flip = int(rng.integers(4)), bool(rng.integers(2))
                e, mp, tg, vd = (dihedral(t, k, flip) for t in (e, mp, tg, vd))
            es.append(e)
            maps.append(mp)
            tgts.append(tg)
            valids.append(vd)
        e = torch.stack(es).to(self.device, torch.float32)
        valid = torch.stack(valids).to(self.device)
        e = self._normalize(e, valid)
        maps_t = torch.stack(maps).to(self.device)
        if self.branch != "explicit":
            maps_t = maps_t[:, :1]
        return e, maps_t, torch.stack(tgts).to(self.device), valid

    def _eval_logits(
        self,
        prepared: Sequence[PreparedItem],
        mask_state: str = "zeros",
        max_states: int | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Uncalibrated logits ``(He, We)``, targets and valid maps of every item (eval mode).

        ``mask_state``: ``zeros`` or ``states`` (the stored mask states, at most
        ``max_states`` evenly spaced ones per item, plus zeros).
        """
        self.head.eval()
        out = []
        with torch.inference_mode():
            for p in prepared:
                valid = p.valid[None, None].to(self.device)
                feats = p.features[None].to(self.device, torch.float32)
                e = self._normalize(feats, valid)
                proj = self.head.project(e)
                states = [np.zeros(tuple(p.gt_grid.shape), np.float32)]
                if mask_state == "states" and p.mask_states:
                    chosen = list(p.mask_states)
                    if max_states is not None and len(chosen) > max_states:
                        idx = np.linspace(0, len(chosen) - 1, max_states).round().astype(int)
                        chosen = [chosen[i] for i in idx]
                    states += chosen
                for m in states:
                    mask = torch.from_numpy(np.asarray(m, np.float32)).to(self.device)[None]
                    sem = None if p.semantic is None else p.semantic[None].to(self.device)
                    logits = self._infer(proj, self._maps(mask, sem))[0, 0]
                    out.append((logits.cpu(), p.gt_grid, p.valid))
        return out

    def _val_score(
        self, prepared: Sequence[PreparedItem], max_states: int | None = 2
    ) -> dict[str, float]:
        """Validation loss (Dice + BCE) and cell accuracy over zero and stored mask states."""
        losses, correct, total = [], 0.0, 0.0
        for logits, tgt, valid in self._eval_logits(prepared, "states", max_states):
            losses.append(
                float(
                    dice_bce_loss(
                        logits[None, None],
                        tgt[None, None],
                        valid[None, None],
                        self.config.dice_weight,
                    )
                )
            )
            pred = (logits >= 0).float()
            hard = (tgt >= 0.5).float()
            correct += float(((pred == hard).float() * valid).sum())
            total += float(valid.sum())
        return {"loss": float(np.mean(losses)), "acc": correct / max(total, 1.0)}

    def pretrain(
        self,
        items: Sequence[SRMTrainItem],
        epochs: int = 60,
        batch_size: int = 8,
        augment: bool = True,
        rng: np.random.Generator | int | None = None,
        *,
        val_items: Sequence[SRMTrainItem] | None = None,
        mask_states: Sequence[Sequence[np.ndarray]] | None = None,
        val_mask_states: Sequence[Sequence[np.ndarray]] | None = None,
        segmenter: Segmenter | None = None,
        lr: float | None = None,
        patience: int = 15,
        eval_every: int = 2,
        p_zero: float = 0.3,
        p_synthetic: float = 0.2,
        calibrate: bool = True,
        progress: bool = True,
    ) -> list[float]:
        """Offline training for a fast start (e.g. on a task's 50 training images).

        Every sample draws a mask state: zeros (before the first decode) with probability
        ``p_zero``, a synthetic state from the ground truth (eroded / dilated / blob-edited /
        blurred, see :func:`synthetic_mask_state`) with ``p_synthetic``, otherwise one of the
        item's decoder mask states (``mask_states``, or simulated with ``segmenter`` by
        :func:`simulate_mask_states`, including episodes with noisy click labels). With
        ``augment`` the embedding, mask state, semantic map and ground truth are rotated by a
        random multiple of 90 degrees and flipped, jointly. With ``val_items`` the weights of
        the epoch with the lowest validation loss are kept (early stopping after ``patience``
        epochs without improvement) and, with ``calibrate``, a temperature and bias of the
        logits are fitted on the validation cells (:meth:`calibrate`).

        Args:
            items: ``(embedding, (H, W) bool ground truth, (He, We) semantic map or None)``.
            epochs: Maximum passes over the items.
            batch_size: Images per optimizer step.
            augment: Joint dihedral augmentation.
            rng: Generator or seed (also seeds torch for dropout).
            val_items: Validation items for early stopping and calibration.
            mask_states: Per item, a list of ``(He, We)`` decoder mask states.
            val_mask_states: The same for ``val_items`` (scored with the zero state).
            segmenter: Simulates mask states for items without ``mask_states``.
            lr: Peak learning rate (cosine schedule); default ``config.lr``.
            patience: Early-stopping patience in epochs (with ``val_items``).
            eval_every: Score the validation set every this many epochs (and at the last).
            p_zero: Probability of the zero mask state.
            p_synthetic: Probability of a synthetic mask state.
            calibrate: Fit the logit calibration on ``val_items`` at the end.
            progress: Show progress (segmenter.progress).

        Returns:
            Mean training loss of every epoch run.
        """
        from segmenter.progress import progress_bar

        if not len(items):
            raise ValueError("pretrain needs at least one item")
        self._weights_will_change("pretraining")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        torch.manual_seed(int(rng.integers(2**31)))
        if mask_states is None and segmenter is not None:
            mask_states = [
                simulate_mask_states(segmenter, emb, gt, rng)
                for emb, gt, _ in progress_bar(
                    items, desc="SRM mask states", unit="img", disable=not progress
                )
            ]
        if self.config.reduce:
            self.fit_reduction(items, seed=int(rng.integers(2**31)))
        if self.config.normalize == "dataset":
            self.fit_normalization(items)
        train = self._prepare_items(items, mask_states)
        val = None
        if val_items is not None and len(val_items):
            val = self._prepare_items(val_items, val_mask_states)
        lr = self.config.lr if lr is None else lr
        opt = self._make_optimizer(lr)
        steps_per_epoch = max(1, math.ceil(len(train) / batch_size))
        total_steps = epochs * steps_per_epoch
        warmup = max(1, total_steps // 20)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 2 %
            if step < warmup:
                return (step + 1) / warmup
            frac = (step - warmup) / max(1, total_steps - warmup)
            return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        history: list[float] = []
        best = (math.inf, copy.deepcopy(self.head.state_dict()), -1)
        bar = progress_bar(range(epochs), desc="SRM pretrain", unit="epoch", disable=not progress)
        for epoch in bar:
            self.head.train()
            order = rng.permutation(len(train))
            losses = []
            for s in range(0, len(order), batch_size):
                e, maps, tgt, valid = self._batch(
                    train, order[s : s + batch_size], rng, augment, p_zero, p_synthetic
                )
                logits = self.head(e, maps)
                loss = dice_bce_loss(logits, tgt, valid, self.config.dice_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)))
            postfix = {"loss": f"{history[-1]:.4f}"}
            if val is not None and ((epoch + 1) % eval_every == 0 or epoch == epochs - 1):
                score = self._val_score(val)
                postfix.update(val_loss=f"{score['loss']:.4f}", val_acc=f"{score['acc']:.4f}")
                if score["loss"] < best[0]:
                    best = (score["loss"], copy.deepcopy(self.head.state_dict()), epoch)
                elif epoch - best[2] >= patience:
                    logger.info("SRM pretrain: early stop at epoch %d (best %d)", epoch, best[2])
                    bar.set_postfix(postfix)
                    break
            bar.set_postfix(postfix)
        bar.close()
        if val is not None:
            self.head.load_state_dict(best[1])
            logger.info("SRM pretrain: kept epoch %d (val loss %.4f)", best[2], best[0])
            if calibrate:
                self.calibrate_on(val)
        self.head.eval()
        self.optimizer = self._make_optimizer(self.config.lr)
        self._touch()
        return history

    def calibrate_on(self, prepared: Sequence[PreparedItem], mask_state: str = "states") -> None:
        """Fit the logit scale and bias by minimising the cell-level NLL (Platt scaling).

        Cells are weighted equally; the target is the hard ground-truth label of the cell
        (coverage ``>= 0.5``), i.e. the label the environment's oracle would give at the cell.
        """
        rows = self._eval_logits(prepared, mask_state)
        logits = torch.cat([lg[v > 0] for lg, _, v in rows]).double()
        target = torch.cat([(t[v > 0] >= 0.5) for _, t, v in rows]).double()
        params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([params], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(logits * params[0] + params[1], target)
            loss.backward()
            return loss

        opt.step(closure)
        scale, bias = (float(v) for v in params.detach())
        if not (math.isfinite(scale) and math.isfinite(bias)) or scale <= 0:
            logger.warning("SRM calibration diverged (%s, %s); keeping identity", scale, bias)
            scale, bias = 1.0, 0.0
        self.calibration = torch.tensor([scale, bias], device=self.device)
        logger.debug("SRM calibration: logit scale %.3f, bias %.3f", scale, bias)
        self._touch()

    def calibrate(
        self,
        items: Sequence[SRMTrainItem],
        mask_states: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> tuple[float, float]:
        """Fit the logit calibration on ``items`` (held-out images). Returns (scale, bias)."""
        self.calibrate_on(self._prepare_items(items, mask_states))
        return float(self.calibration[0]), float(self.calibration[1])


def _drift(mean: torch.Tensor, old_mean: torch.Tensor, old_std: torch.Tensor) -> float:
    """Mean over channels of ``|mean - old_mean| / old_std`` (float64 CPU tensors)."""
    return float(((mean.to(torch.float64) - old_mean).abs() / old_std).mean())
