"""Training the lookahead agent's judge on a task's training images.

The judge must learn what a candidate mask's IoU will be from the SRM map it will see at test
time. On a training image the final SRM has seen the ground truth, so its map there is better
than it will ever be on a new image, and a judge fitted on those maps would trust the map too
much. The maps the judge learns from are therefore **cross-fitted**: the training images are
split into folds, an SRM is trained on the other folds (same settings, the same validation
images for early stopping), and its map of each held-out image is what the judge sees there.

Rounds (DAgger): round 0 runs lookahead episodes that commit the truly best candidate, or a
random one with probability ``explore`` (good and poor states); later rounds commit what the
judge fitted so far prefers (with the same exploration), so the judge learns the states its
own choices lead to. Every round's candidates are kept and the judge is refitted on all of
them. Ground truth is read only here, to score candidates on training images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.answers import fit_value
from agents.lookahead import LookaheadAgent, LookaheadConfig
from recalibration.judge import JUDGE_FEATURES, MaskJudge, rank_quality
from recalibration.labelers import EpisodeState
from recalibration.srm import SemanticRecalibrationModule, SRMConfig, SRMTrainItem
from segmenter.base import ImageEmbedding, mask_iou
from segmenter.io import atomic_write
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "JudgeData",
    "cross_fitted_maps",
    "evaluate_judge",
    "fit_judge",
    "saved_fold_seconds",
    "srm_maps",
]


def srm_maps(srm: SemanticRecalibrationModule, items: Sequence[SRMTrainItem]) -> list[np.ndarray]:
    """The SRM's ``(He, We)`` map of each item's image before any click."""
    out = []
    for emb, _, _ in items:
        state = EpisodeState(emb.image_hash, emb, np.zeros(emb.grid_size, np.float32))
        out.append(srm.predict(state))
    return out


def cross_fitted_maps(
    config: SRMConfig,
    channels: int,
    items: Sequence[SRMTrainItem],
    val_items: Sequence[SRMTrainItem] | None,
    mask_states: Sequence[Sequence[np.ndarray]] | None,
    *,
    folds: int,
    epochs: int,
    seed: int,
    features: Any = None,
    device: str = "cpu",
    progress: bool = True,
    copies: Sequence[tuple[int, SRMTrainItem, Sequence[np.ndarray] | None]] = (),
    fold_dir: Path | None = None,
) -> list[np.ndarray]:
    """Each training image's SRM map from an SRM trained without it (``folds`` folds).

    Args:
        config: The task's SRM settings.
        channels: Input channels of the SRM head.
        items: The training items (their ``srm_features`` precomputed when the SRM reads more
            than the embedding).
        val_items: Validation items for each fold's early stopping and calibration.
        mask_states: Per item, its simulated decoder mask states (reused by every fold).
        folds: Number of folds.
        epochs: Pretraining epochs of each fold's SRM.
        seed: Seed of the fold split and of each fold's training.
        features: The SRM's feature set.
        device: Torch device.
        progress: Progress bars.
        copies: Shifted copies of training images the SRMs also train on, as ``(index of the
            image, item, mask states)``; a fold trains on the copies of its own images only,
            so no map is drawn by an SRM that saw any version of the image.
        fold_dir: Where each finished fold's maps are saved (``fold{f}.npz``: its held-out
            images, their maps, its seconds) and read back on a rerun, so an interrupted
            stage resumes at its next fold. Each fold's training is seeded by the fold alone:
            the maps are those of an uninterrupted run.
    """
    n = len(items)
    folds = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    maps: list[np.ndarray | None] = [None] * n
    bar = progress_bar(
        list(enumerate(np.array_split(order, folds))),
        desc="cross-fitted SRMs",
        unit="fold",
        disable=not progress,
    )
    for f, held in bar:
        part = None if fold_dir is None else Path(fold_dir) / f"fold{f}.npz"
        if part is not None and part.is_file():
            with np.load(part) as z:
                if np.array_equal(z["held"], held):
                    for i, m in zip(held, z["maps"], strict=True):
                        maps[int(i)] = m
                    logger.info("cross-fitted SRM fold %d/%d read back from %s", f + 1, folds, part)
                    continue
        t0 = time.perf_counter()
        keep = np.setdiff1d(np.arange(n), held)
        kept = set(keep.tolist())
        extra = [(item, states) for i, item, states in copies if i in kept]
        srm = SemanticRecalibrationModule(config, channels, device=device, features=features)
        srm.pretrain(
            [items[i] for i in keep] + [item for item, _ in extra],
            epochs=epochs,
            rng=seed * 100 + f,
            val_items=val_items,
            mask_states=None
            if mask_states is None
            else [mask_states[i] for i in keep] + [states for _, states in extra],
            progress=False,  # one line per fold set, not per fold
        )
        fold_maps = srm_maps(srm, [items[i] for i in held])
        for i, m in zip(held, fold_maps, strict=True):
            maps[int(i)] = m
        if part is not None:
            part.parent.mkdir(parents=True, exist_ok=True)
            seconds = time.perf_counter() - t0
            atomic_write(
                part,
                lambda fh, h=held, m=fold_maps, t=seconds: np.savez(
                    fh, held=h, maps=np.stack(m), seconds=t
                ),
            )
        logger.debug("cross-fitted SRM fold %d/%d: %d held-out maps", f + 1, folds, len(held))
    return [m for m in maps if m is not None]


def saved_fold_seconds(fold_dir: Path) -> float:
    """Seconds the folds saved in ``fold_dir`` took (0 when there are none)."""
    total = 0.0
    for part in sorted(Path(fold_dir).glob("fold*.npz")):
        with np.load(part) as z:
            total += float(z["seconds"])
    return total


@dataclass
class JudgeData:
    """Candidates decoded along training episodes: features, true IoUs, states."""

    features: list[np.ndarray]
    ious: list[np.ndarray]
    before: list[float]
    image: list[int]

    @classmethod
    def empty(cls) -> JudgeData:
        return cls([], [], [], [])

    def add(self, image: int, states: Sequence[tuple[np.ndarray, np.ndarray | None, float]]):
        for feats, true, before in states:
            if true is None:
                raise ValueError("judge training needs the candidates' true IoUs")
            self.features.append(feats)
            self.ious.append(true)
            self.before.append(float(before))
            self.image.append(int(image))

    def __len__(self) -> int:
        return len(self.ious)


def judge_episodes(
    agent: LookaheadAgent,
    n: int,
    item: Callable[[int], tuple[ImageEmbedding, np.ndarray, Callable[[], np.ndarray] | None]],
    maps: Sequence[np.ndarray],
    config: LookaheadConfig,
    rng: np.random.Generator,
    judge: MaskJudge | None,
    *,
    progress: bool = True,
    desc: str = "judge episodes",
) -> tuple[JudgeData, list[float]]:
    """One round of the judge's training episodes: ``config.episodes`` per image on a seeded
    sample of ``config.judge_images`` of the ``n`` training images (all when ``None``; drawn
    from ``rng``), following the true IoU (``judge=None``) or ``judge``, every candidate
    recorded; with each episode's final IoU.

    Args:
        agent: The agent whose segmenter decodes.
        n: Training images.
        item: ``item(i)``: ``(embedding, ground truth, load_image)`` of image ``i``.
        maps: The cross-fitted SRM map of each image.
        config: Episodes per image, steps, exploration, ``judge_images``.
        rng: Draws the sample and the exploration.
        judge: The judge the episodes follow (``None``: the true IoU, with ``explore``).
        progress: Progress bar (``desc``).
    """
    new, finals = JudgeData.empty(), []
    picked = range(n)
    if config.judge_images is not None and config.judge_images < n:
        picked = sorted(rng.choice(n, config.judge_images, replace=False).tolist())
    for i in progress_bar(picked, desc=desc, unit="img", disable=not progress):
        emb, gt, load = item(i)
        for _ in range(config.episodes):
            ep = agent.episode(
                emb,
                load,
                gt,
                chooser="oracle" if judge is None else "judge",
                srm_map=maps[i],
                steps=config.steps,
                explore=config.explore,
                rng=rng,
                record=True,
                score=None if judge is None else judge.predict,
                # DAgger on the judge's own choices: the judge alone, stopping when it prefers
                # the current mask; the agreement term and running all T steps are choices of
                # the agent that uses it (chosen on val).
                stop=True,
                agreement=0.0,
            )
            new.add(i, ep.states)
            finals.append(ep.ious[-1])
    return new, finals


def fit_judge(
    agent: LookaheadAgent,
    items: Sequence[tuple[ImageEmbedding, np.ndarray, Callable[[], np.ndarray] | None]],
    maps: Sequence[np.ndarray],
    config: LookaheadConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str, float, int], None] | None = None,
) -> tuple[MaskJudge, list[dict[str, float]]]:
    """Fit the judge in ``config.rounds`` DAgger rounds on the training images. The episodes
    follow the true IoU (round 0) or the judge fitted so far, alone and with the stop rule,
    whatever ``config.agreement`` and ``config.stop`` say about the agent that will use it.

    Args:
        agent: The agent whose segmenter decodes (its judge is replaced by the fitted one).
        items: ``(embedding, ground truth, load_image)`` of each training image.
        maps: The cross-fitted SRM map of each.
        config: Rounds, episodes per image and round, exploration, objective.
        seed: Seed of the exploration.
        progress: Progress bars.
        log: ``log(tag, value, round)`` for TensorBoard.

    The value model of ``keep: valued`` (:func:`agents.answers.fit_value`) is fitted on the
    same states and set on ``agent`` too.

    Returns:
        The judge and, per round, its figures on the round's new states before refitting
        (``spearman``, ``top1_regret``, ``mae``) and the round's mean final IoU.
    """
    data = JudgeData.empty()
    judge: MaskJudge | None = None
    history: list[dict[str, float]] = []
    rng = np.random.default_rng(seed)
    for r in range(config.rounds):
        t0 = time.perf_counter()
        new, finals = judge_episodes(
            agent, len(items), items.__getitem__, maps, config, rng, judge,
            progress=progress, desc=f"judge round {r}",
        )  # fmt: skip
        figures: dict[str, float] = {"round": float(r), "states": float(len(new))}
        figures["final_iou"] = float(np.mean(finals))
        if judge is not None:  # the fitted judge on states it has not been fitted on
            q = rank_quality([judge.predict(f) for f in new.features], new.ious, new.before)
            figures.update({f"new_{k}": v for k, v in q.items()})
        data.features += new.features
        data.ious += new.ious
        data.before += new.before
        data.image += new.image
        judge = MaskJudge(config.objective, seed=seed).fit(data.features, data.ious)
        figures["seconds"] = time.perf_counter() - t0
        history.append(figures)
        if log is not None:
            for key, value in figures.items():
                log(f"judge/{key}", value, r)
        ranked = (
            ""
            if "new_spearman" not in figures
            else f", ranks new states at Spearman {figures['new_spearman']:.2f}"
        )
        logger.info(
            "judge round %d: %d states, episodes' final IoU %.3f%s, %.0f s",
            r,
            len(new),
            figures["final_iou"],
            ranked,
            figures["seconds"],
        )
    assert judge is not None
    agent.judge = judge
    agent.value = fit_value(data.features, data.ious, seed=seed)  # for ``keep: valued``
    return judge, history


def _heuristic_index(feats: np.ndarray) -> int:
    """Row of the SRM-confident heuristic's choice among a state's candidates: the first
    proposed cell (rows 1 and 2) with the SRM's label."""
    p = feats[1, JUDGE_FEATURES.index("map_at_click")]
    return 1 if p >= 0.5 else 2


def evaluate_judge(
    agent: LookaheadAgent,
    items: Sequence[tuple[ImageEmbedding, np.ndarray, Callable[[], np.ndarray] | None]],
    progress: bool = True,
) -> dict[str, Any]:
    """How well the agent's judge chooses, on images with ground truth.

    Per state (the 2k decoded clicks of a step, on the judge's own trajectories and on the
    true-IoU chooser's): the within-state Spearman correlation of the judge's scores with the
    candidates' true IoUs, the IoU its top click loses against the best one, and the share of
    the oracle's gain over the SRM-confident heuristic (the first proposed cell with the SRM's
    label) that its top click recovers: ``sum(judge - heuristic) / sum(best - heuristic)``.
    Per episode: the final mIoU of the agent, of the same loop with the true-IoU, the
    SRM-agreement and the heuristic choosers, and the share of the oracle's gain over the
    heuristic the agent recovers.
    """
    if agent.judge is None:
        raise ValueError("evaluate_judge needs a fitted judge")
    out: dict[str, Any] = {}
    finals: dict[str, list[float]] = {}
    states: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"judge": [], "oracle": []}
    for chooser in ("judge", "oracle", "agreement", "heuristic"):
        finals[chooser] = []
        bar = progress_bar(items, desc=f"judge eval ({chooser})", unit="img", disable=not progress)
        for emb, gt, load in bar:
            ep = agent.episode(
                emb, load, gt, chooser=chooser, steps=agent.config.steps, record=chooser in states
            )
            full = agent.segmenter.upscale(emb, ep.final.logits)
            finals[chooser].append(mask_iou(full, gt))
            if chooser in states:
                states[chooser] += [(f, y) for f, y, _ in ep.states]
    for name, recorded in states.items():
        scores = [agent.judge.predict(f)[1:] for f, _ in recorded]
        truths = [y[1:] for _, y in recorded]
        q = rank_quality(scores, truths, [0.0] * len(truths))
        chosen = np.array([y[int(np.argmax(s))] for s, y in zip(scores, truths, strict=True)])
        best = np.array([y.max() for y in truths])
        heur = np.array(
            [y[_heuristic_index(f) - 1] for (f, _), y in zip(recorded, truths, strict=True)]
        )
        q["share_of_oracle_gain"] = float((chosen - heur).sum() / max((best - heur).sum(), 1e-9))
        out[f"states_{name}"] = q
    miou = {k: float(np.mean(v)) for k, v in finals.items()}
    out["episodes_miou"] = miou
    gap = miou["oracle"] - miou["heuristic"]
    out["episodes_share_of_oracle_gain"] = (
        (miou["judge"] - miou["heuristic"]) / gap if gap else None
    )
    out["n_images"] = len(items)
    return out
