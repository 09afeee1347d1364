"""``alignsam presence RUN --positives SPEC --negatives SPEC``: how well a run's presence score
(:mod:`recalibration.presence`) tells images with the target from images without, and, with
``--choose``, the "nothing here" threshold written into the run (``presence.json``).

Each image costs one encoding (through the cache) and one SRM map, no decoder call. Writes
``results.json`` (per image the score; per set the count; the AUC, the threshold, and the
recall on the positives and the false-positive rate on the negatives at it) and ``results.md``
into ``--out``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from experiments.datasets import load_dataset, readable
from recalibration.presence import (
    PRESENCE_TOP,
    PresenceGate,
    choose_threshold,
    initial_srm_map,
    presence_score,
    separation,
)
from segmenter.io import atomic_write
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["presence_scores", "render_presence_markdown", "run_presence"]


def presence_scores(
    agent: Any, spec: str, top: float = PRESENCE_TOP, progress: bool = True
) -> list[dict[str, Any]]:
    """``[{"id", "presence", "target"}]`` of every image of dataset ``spec`` (``target``: its
    mask has a foreground pixel; ``None`` without masks); ``top`` as in
    :func:`~recalibration.presence.presence_score`."""
    task = getattr(agent, "task", None)
    on_error = task.data.on_error if task is not None else "raise"
    samples = readable(load_dataset(spec, on_error), on_error, name=spec)
    from agents.lookahead import srm_embedding

    rows = []
    for s in progress_bar(samples, desc=f"presence {spec}", unit="img", disable=not progress):
        image = s.load_image()
        emb, _ = srm_embedding(agent.srm, agent.segmenter, agent.cache, image)
        s_map = initial_srm_map(agent.srm, agent.segmenter, emb, lambda image=image: image)
        mask = getattr(s, "mask", None)
        rows.append(
            {
                "id": str(s.id),
                "presence": round(presence_score(s_map, emb.valid_shape(emb.grid_size), top), 6),
                "target": None if mask is None else bool(mask.any()),
            }
        )
    return rows


def run_presence(
    run: str | Path,
    positives: str,
    negatives: str,
    out: str | Path,
    *,
    choose: bool = False,
    max_recall_loss: float = 0.02,
    cache: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``positives`` (images with the target) and ``negatives`` (without) with the run's
    presence score; with ``choose`` pick the threshold here (:func:`choose_threshold`) and write
    it into ``run``, else measure the run's own threshold (``presence.json``) on these images.

    Returns:
        The ``results.json`` content.
    """
    from agents.prompt_agent import PromptAgent
    from segmenter import EmbeddingCache

    t0 = time.perf_counter()
    agent = PromptAgent.load(run, cache=cache if cache is not None else EmbeddingCache())
    if not choose and agent.presence is None:
        raise ValueError(
            f"{run} has no presence threshold (presence.json) to measure: choose one on val "
            f"first, alignsam presence {run} --positives VAL --negatives VAL@negative --choose"
        )
    top = PRESENCE_TOP if choose else agent.presence.top  # a new choice uses today's score
    pos = presence_scores(agent, positives, top, progress)
    neg = presence_scores(agent, negatives, top, progress)
    if any(r["target"] is False for r in pos):
        logger.warning("%s: %d images without target among the positives", positives,
                       sum(r["target"] is False for r in pos))  # fmt: skip
    if any(r["target"] for r in neg):
        raise ValueError(
            f"--negatives {negatives}: {sum(bool(r['target']) for r in neg)} images hold the "
            "target; give images without it (e.g. SPEC@negative)"
        )
    p_scores = [r["presence"] for r in pos]
    n_scores = [r["presence"] for r in neg]
    if choose:
        chosen = choose_threshold(p_scores, n_scores, max_recall_loss)
        gate = PresenceGate(
            chosen["threshold"],
            top,
            {"positives": positives, "negatives": negatives, "max_recall_loss": max_recall_loss,
             **{k: chosen[k] for k in ("recall", "false_positive_rate", "auc")}},
        )  # fmt: skip
        gate.save(run)
        threshold = gate.threshold
    else:
        threshold = agent.presence.threshold
    result = {
        "run": str(run),
        "positives": positives,
        "negatives": negatives,
        "threshold": threshold,
        "chosen_here": choose,
        "max_recall_loss": max_recall_loss if choose else None,
        "auc": separation(p_scores, n_scores),
        "recall": sum(v >= threshold for v in p_scores) / len(p_scores),
        "false_positive_rate": sum(v >= threshold for v in n_scores) / len(n_scores),
        "n_positives": len(pos),
        "n_negatives": len(neg),
        "top": top,
        "per_image": {"positives": pos, "negatives": neg},
        "seconds": time.perf_counter() - t0,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(result, indent=1).encode()
    atomic_write(out / "results.json", lambda fh: fh.write(data))
    (out / "results.md").write_text(render_presence_markdown(result))
    return result


def render_presence_markdown(result: dict[str, Any]) -> str:
    """``results.md``: the threshold, recall, false-positive rate and AUC."""
    how = (
        f"chosen here (keep >= {1 - result['max_recall_loss']:.0%} of the positives)"
        if result["chosen_here"]
        else "the run's (presence.json)"
    )
    return (
        f"# Presence: {result['run']}\n\n"
        f"| images with the target | without | threshold | recall | false-positive rate | AUC |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {result['positives']} ({result['n_positives']}) | {result['negatives']} "
        f"({result['n_negatives']}) | {result['threshold']:.4f} ({how}) | "
        f"{result['recall']:.3f} | {result['false_positive_rate']:.3f} | {result['auc']:.3f} |\n\n"
        f"Presence score: mean SRM foreground probability of the top {result['top']:.1%} of the "
        "cells before any click; below the threshold `alignsam segment` writes an empty mask "
        "and lists the image under `no_target`.\n"
    )
