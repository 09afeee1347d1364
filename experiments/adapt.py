"""``alignsam adapt RUN IMAGES... --out RUN2``: fit a run to the images it is about to segment,
without labels.

The SRM standardises its features with statistics of the training images; images from another
endoscope, camera or season move those statistics and everything downstream (the start points,
the judge's inputs, the presence score) with them. ``adapt`` re-estimates them on the target
images (:meth:`~recalibration.srm.training.TrainingMixin.adapt_statistics`), every weight stays
as trained; a lookahead agent answering with its last state answers with the best state its
decoder predicts instead (``keep="best_predicted"``: on shifted images its clicks more often make
the mask worse than its start, see ``docs/results.md``); one that scores its states already
(``valued`` or ``best_predicted``, chosen on val with a margin) keeps its rule. It writes an
ordinary run folder: ``segment``, ``review``, ``benchmark`` and ``corrections`` take it as they
take the source run.

An agent answering with its value model (``keep: valued``) also gets a veto (``--veto auto``):
when the target's features lie clearly further from the trained statistics than the run's own
labelled images do (:data:`SHIFTED`), a clicked state is kept only when the frozen decoder does
not predict it worse than the start (:func:`agents.answers.answers`). The value model learned
from the SRM's maps on the training domain; where that SRM is wrong it is confidently wrong with
it (on Kvasir 256-px crops it kept clicks that cost 0.08 mIoU), while the decoder's own IoU head
was trained on a billion masks of every kind.

Images that lie no further from the trained statistics than the run's own labelled images do
(``--statistics auto``, the default) are the training domain's: the statistics stay as trained
and the run is written unchanged (re-estimating them there only traded the trained statistics
for noisier ones). ``RUN2/adapted.json`` records the source run, the checkpoint, the inputs, the
drift and what was re-estimated on how many images.

Each image costs one encoding (through the cache) and one pass of the SRM's feature sources, as
do the (up to) 50 labelled images the drift's reference is measured on; no decoder call.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.io import atomic_folder
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["ADAPTED_FILE", "DARK", "STATISTICS", "adapt_run"]

#: Cells darker than this (mean pixel value, 0-1) are left out of the re-estimated statistics:
#: an endoscope's black border says nothing of the images' domain (on Kvasir ``val@border``
#: adapting with them lost 0.090 mIoU, without them gained 0.008; docs/results.md).
DARK = 0.06
#: ``--veto auto``: the veto goes on (0: a click is kept only when the decoder does not predict
#: it worse than the start) when the target's features lie further than this many times the
#: training domain's own from the trained statistics (:meth:`feature_drift`). Chosen on Kvasir
#: ``val`` and its shifted copies (400-image agent: ``val`` at 1.02 times the training images'
#: drift, its copies at 1.49 (border) to 2.32 (crop256); docs/results.md).
SHIFTED = 1.2
#: ``--statistics``: re-estimate only when the images drift as :data:`SHIFTED` says, or always.
#: On images of the training domain re-estimating only swaps the trained statistics for noisier
#: ones (the 400-image Kvasir agent: ``test@colour``, drift 1.09 x, -0.021 mIoU; ``val@down384``,
#: 1.17 x, -0.011; docs/results.md).
STATISTICS = ("auto", "always")
#: Labelled training images ``--veto auto`` measures the training domain's drift on.
REFERENCE_IMAGES = 50
#: What an adapted run folder records about its adaptation.
ADAPTED_FILE = "adapted.json"
_CARRIED = ("config.json", "summary.json", "presence.json")


def adapt_run(
    run: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    *,
    which: str = "best",
    keep: str | None = "auto",
    mix: float = 1.0,
    dark: float | None = DARK,
    cache: Any = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    self_train: int = 0,
    anchors: int = 50,
    veto: float | str | None = "auto",
    statistics: str = "auto",
) -> dict[str, Any]:
    """Re-estimate the SRM's input statistics of ``run`` on the images of ``inputs`` (files,
    folders, dataset specs; masks, where present, are not read) and write the adapted run into
    ``out``. ``keep`` sets a lookahead agent's answer state (:data:`~agents.lookahead.KEEPS`,
    with no margin; ``None``: the source run's; ``auto``: the source run's when it scores its
    states, else ``best_predicted``); ``mix`` is the target's share of the new statistics; cells
    darker than ``dark`` (mean pixel value, 0-1) are left out of them (``None``: none).
    ``self_train`` steps of self-training follow (:mod:`recalibration.srm.self_training`: the
    SRM's head fine-tuned on the cells it is sure of in the target images and their mirror
    images, with ``anchors`` of the run's labelled training images in every batch; 0: none).
    ``veto`` sets a lookahead agent's ``lookahead.veto`` (a clicked state kept only when the
    decoder predicts it at most this much worse than the start, :func:`agents.answers.answers`;
    ``None``: none; ``"source"``: the source run's; ``"auto"``: 0 when the target's features
    lie more than :data:`SHIFTED` times further from the trained statistics than the run's own
    labelled images do, else the source run's: on images from elsewhere a click must convince
    both judges). ``statistics``: ``"auto"`` re-estimates only when the images lie that far
    (closer, they are the training domain's: the run is written unchanged, its answer rule
    included, unless ``keep``, ``veto`` or ``self_train`` say otherwise); ``"always"``
    re-estimates whatever the drift.

    Returns:
        The ``adapted.json`` content.
    """
    from agents.lookahead import KEEPS, LookaheadAgent
    from agents.prompt_agent import PromptAgent, checkpoint_of
    from experiments.segment import check_inputs, check_out, gather_inputs
    from segmenter import EmbeddingCache

    if statistics not in STATISTICS:  # before any work
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    if keep not in (*KEEPS, "auto", None):
        raise ValueError(f"keep must be one of {KEEPS} or auto, got {keep!r}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix}")
    if veto not in ("source", "auto", None) and not float(veto) >= 0:
        raise ValueError(f"veto must be >= 0, None, 'auto' or 'source', got {veto!r}")
    if self_train < 0 or (self_train and anchors < 1):
        raise ValueError(
            f"self-training needs steps >= 0 and anchors >= 1, got {self_train}, {anchors}: it "
            "keeps labelled training images in every batch"
        )
    t0 = time.perf_counter()
    run = Path(run)
    out = check_out(out, overwrite)
    on_error = "skip" if skip_bad else "raise"
    samples = check_inputs(gather_inputs(inputs, on_error), on_error)
    ckpt = checkpoint_of(run, which)
    cache = cache if cache is not None else EmbeddingCache()
    agent = PromptAgent.load(ckpt, cache=cache)
    srm = agent.srm
    lookahead = isinstance(agent, LookaheadAgent)
    keep_auto = keep == "auto"
    if keep_auto:
        keep = "best_predicted" if lookahead and agent.config.keep == "last" else None
    if lookahead and keep == "valued" and agent.value is None:
        raise ValueError(f"{run} has no value model for keep=valued: run alignsam answer "
                         f"{run} --fit-value first")  # fmt: skip
    if lookahead and keep == agent.config.keep:
        keep = None  # the source's rule, with its margin
    if veto == "auto" and not (lookahead and (keep or agent.config.keep) == "valued"):
        veto = "source"  # the veto acts on valued answers alone
    if veto == "source" or not lookahead:
        veto = agent.config.veto if lookahead else None
    shift: dict[str, Any] | None = None
    if veto == "auto" or statistics == "auto":
        shift = {"threshold": SHIFTED, **_reference_drift(agent, cache, dark, progress)}

    def shifted(drift: float) -> bool:  # unknown reference: nothing says the images are alike
        ref = shift["reference_drift"] if shift is not None else None
        return ref is None or drift / ref > SHIFTED

    labelled = _anchors(agent, cache, anchors, progress) if self_train else []
    info = srm.adapt_statistics(
        _embedded(agent, cache, samples, "adapt", progress),
        mix,
        dark,
        when=shifted if statistics == "auto" else None,
    )
    if shift is not None:
        ref = shift["reference_drift"]
        shift.update(drift=info["drift"], ratio=None if ref is None else info["drift"] / ref)
        if veto == "auto":
            veto = 0.0 if shifted(info["drift"]) else agent.config.veto
        logger.info("feature drift %.3f (%s the training images'): statistics %s, veto %s",
                    info["drift"], "unknown" if ref is None else f"{shift['ratio']:.2f} x",
                    "re-estimated" if info["statistics"] else "kept", veto)  # fmt: skip
    if info["statistics"] is None and keep_auto:
        keep = None  # the training domain's images: the source run's answer too
    if lookahead:
        agent.config.veto = veto = None if veto is None else float(veto)
    tuned = (
        _self_train(agent, cache, samples, labelled, self_train, progress) if self_train else None
    )
    record = {
        "source_run": str(run.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "inputs": [str(i) for i in inputs],
        "image_ids": [str(s.id) for s in samples],
        "skipped": [{"id": f, "reason": r} for f, r in getattr(samples, "skipped", [])],
        "statistics": statistics,
        "re_estimated": info["statistics"],
        "mix": mix,
        "dark": dark,
        "images": info["images"],
        "cells": info["cells"],
        "keep": (keep or agent.config.keep) if lookahead else None,
        "veto": veto,
        "drift": info["drift"],
        "shift": shift,
        "self_training": tuned,
        "carried_over": [n for n in _CARRIED if (run / n).is_file()],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if info["statistics"] is None:
        record["note"] = (
            f"the images' feature drift is within {SHIFTED:g} times the training images': they "
            "are read with the trained statistics (--statistics always re-estimates anyway)"
        )
    elif "presence.json" in record["carried_over"]:
        record["note"] = (
            "presence.json is the source run's threshold, chosen before adaptation; the adapted "
            "SRM's maps (and presence scores) differ, so check it where labelled images exist"
        )

    def fill(tmp: Path) -> None:
        for name in record["carried_over"]:
            shutil.copy2(run / name, tmp / name)
        best = tmp / "checkpoints" / "best"
        shutil.copytree(ckpt, best, ignore=shutil.ignore_patterns("srm.pt"))
        srm.save(best / "srm.pt")
        if lookahead:
            settings = json.loads((best / "lookahead.json").read_text())
            if keep is not None:
                settings["keep"], settings["margin"] = keep, 0.0
            settings["veto"] = veto
            (best / "lookahead.json").write_text(json.dumps(settings, indent=2))
        (tmp / "checkpoints" / "latest").write_text("best")
        (tmp / ADAPTED_FILE).write_text(json.dumps(record, indent=2))

    atomic_folder(out, fill)
    logger.info("adapted %s on %d images into %s", run, info["images"], out)
    return record


def _reference_drift(agent: Any, cache: Any, dark: float | None, progress: bool) -> dict:
    """The feature drift (:meth:`feature_drift`) of up to :data:`REFERENCE_IMAGES` of the run's
    labelled training images (a seeded sample): where the training domain itself lies from the
    trained statistics. ``None`` with the reason when they cannot be read (the veto then goes
    on: nothing says the target images are like them)."""
    from agents.config import ConfigError
    from envs.data import DataError

    try:
        sample = _training_sample(agent, REFERENCE_IMAGES)
    except (ConfigError, DataError, OSError) as e:
        logger.warning("the training images cannot be read (%s): the veto goes on", e)
        return {"reference_drift": None, "reference_images": 0, "reference_error": str(e)}
    images = _embedded(agent, cache, sample, "training domain", progress)
    return {
        "reference_drift": agent.srm.feature_drift(images, dark),
        "reference_images": len(sample),
    }


def _training_sample(agent: Any, n: int) -> list[Any]:
    """``n`` of the run's labelled training images, a sample seeded by the task."""
    from experiments.runs import load_train_split

    train = load_train_split(agent.task)
    return [
        train[int(i)] for i in np.random.default_rng(agent.task.seed).permutation(len(train))[:n]
    ]


def _embedded(
    agent: Any, cache: Any, samples: Any, desc: str, progress: bool
) -> Iterator[tuple[Any, Any]]:
    """``(embedding, load_image)`` of each sample as the run's SRM reads it (through the cache)."""
    from agents.lookahead import srm_embedding

    for s in progress_bar(samples, desc=desc, unit="img", disable=not progress):
        image = s.load_image()
        emb, _ = srm_embedding(agent.srm, agent.segmenter, cache, image)
        yield emb, (lambda image=image: image)


def _anchors(agent: Any, cache: Any, n: int, progress: bool) -> list[Any]:
    """``n`` of the run's labelled training images (a seeded sample) as the SRM's head reads
    them with the training statistics: self-training's anchors."""
    from recalibration.srm.self_training import labelled_item

    sample = _training_sample(agent, n)
    pairs = _embedded(agent, cache, sample, "labelled anchors", progress)
    return [
        labelled_item(agent.srm, emb, s.mask, load)
        for s, (emb, load) in zip(sample, pairs, strict=True)
    ]


def _self_train(
    agent: Any, cache: Any, samples: Any, labelled: list[Any], steps: int, progress: bool
) -> dict[str, Any]:
    """Pseudo-label every target image (and its mirror image) with the adapted SRM, then
    fine-tune its head (:func:`recalibration.srm.self_training.self_train`); the record."""
    from agents.lookahead import srm_embedding
    from recalibration.srm.self_training import SURE, pseudo_item, self_train

    t0 = time.perf_counter()
    srm, pseudo, shares = agent.srm, [], []
    for s in progress_bar(samples, desc="pseudo-labels", unit="img", disable=not progress):
        image = s.load_image()
        flipped = np.ascontiguousarray(image[:, ::-1])
        emb, _ = srm_embedding(srm, agent.segmenter, cache, image)
        emb_f, _ = srm_embedding(srm, agent.segmenter, cache, flipped)
        item, share = pseudo_item(srm, emb, lambda i=image: i, emb_f, lambda f=flipped: f)
        pseudo.append(item)
        shares.append(share)
    losses = self_train(srm, labelled, pseudo, steps, seed=agent.task.seed, progress=progress)
    return {
        "steps": steps,
        "sure": SURE,
        "pseudo_images": len(pseudo),
        "labelled_anchors": len(labelled),
        "labelled_cell_share": float(np.mean(shares)),
        "loss_first_last": [losses[0], losses[-1]],
        "seconds": round(time.perf_counter() - t0, 2),
    }
