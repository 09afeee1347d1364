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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.datasets import load_dataset, readable
from recalibration.presence import (
    PRESENCE_TOP,
    PresenceGate,
    PresenceModel,
    choose_threshold,
    image_presence,
    initial_srm_map,
    presence_features,
    separation,
)
from segmenter.io import atomic_write
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["fit_presence_model", "presence_scores", "render_presence_markdown", "run_presence"]


def _images(agent: Any, spec: str, progress: bool) -> Iterator[tuple[Any, np.ndarray, Any]]:
    """``(sample, SRM map before any click, embedding)`` of every image of dataset ``spec``."""
    from agents.lookahead import srm_embedding

    task = getattr(agent, "task", None)
    on_error = task.data.on_error if task is not None else "raise"
    samples = readable(load_dataset(spec, on_error), on_error, name=spec)
    for s in progress_bar(samples, desc=f"presence {spec}", unit="img", disable=not progress):
        image = s.load_image()
        emb, _ = srm_embedding(agent.srm, agent.segmenter, agent.cache, image)
        yield s, initial_srm_map(agent.srm, agent.segmenter, emb, lambda i=image: i), emb


def _target(s: Any) -> bool | None:
    mask = getattr(s, "mask", None)
    return None if mask is None else bool(np.asarray(mask).any())


def presence_scores(
    agent: Any, spec: str, gate: PresenceGate | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """``[{"id", "presence", "target"}]`` of every image of dataset ``spec`` (``target``: its
    mask has a foreground pixel; ``None`` without masks); the score as ``gate`` computes it
    (:func:`~recalibration.presence.image_presence`)."""
    return [
        {
            "id": str(s.id),
            "presence": round(image_presence(gate, s_map, emb), 6),
            "target": _target(s),
        }
        for s, s_map, emb in _images(agent, spec, progress)
    ]


def fit_presence_model(
    agent: Any,
    positives: Sequence[str],
    negatives: Sequence[str],
    l2: float = 1e-2,
    progress: bool = True,
) -> PresenceModel:
    """A :class:`~recalibration.presence.PresenceModel` on the run's SRM and segmenter, fitted
    on the images of the ``positives`` datasets (with the target) and the ``negatives``
    (without; an image of the wrong kind is an error naming its set)."""
    feats: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for want, specs in ((True, positives), (False, negatives)):
        for spec in specs:
            for s, s_map, emb in _images(agent, spec, progress):
                if _target(s) is not want:
                    kind = "with" if want else "without"
                    raise ValueError(
                        f"presence fit: {spec} image {s.id} is not an image {kind} the target; "
                        "give labelled images, and cuts without it as negatives (SPEC@negative)"
                    )
                feats[want].append(presence_features(s_map, emb))
    return PresenceModel.fit(
        np.stack(feats[True]),
        np.stack(feats[False]),
        l2,
        {"positives_from": list(positives), "negatives_from": list(negatives)},
    )


def run_presence(
    run: str | Path,
    positives: str,
    negatives: str,
    out: str | Path,
    *,
    choose: bool = False,
    max_recall_loss: float = 0.02,
    max_false_positive_rate: float = 0.05,
    fit_positives: Sequence[str] = (),
    fit_negatives: Sequence[str] = (),
    cache: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``positives`` (images with the target) and ``negatives`` (without) with the run's
    presence score; with ``choose`` pick the threshold here (:func:`choose_threshold`) and write
    it into ``run``, else measure the run's own threshold (``presence.json``) on these images.
    With ``fit_positives`` and ``fit_negatives`` (and ``choose``) the score is a
    :class:`~recalibration.presence.PresenceModel` fitted on those images first (fit on
    ``train``, choose on ``val``, measure on ``test``).

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
    if bool(fit_positives) != bool(fit_negatives) or (fit_positives and not choose):
        raise ValueError(
            "fitting a presence model needs --fit-positives and --fit-negatives, and --choose "
            "(its threshold is chosen on --positives / --negatives)"
        )
    if choose:  # a new choice uses today's score, learned when asked
        model = None
        if fit_positives:
            model = fit_presence_model(agent, fit_positives, fit_negatives, progress=progress)
        gate = PresenceGate(0.0, PRESENCE_TOP, model=model)
    else:
        gate = agent.presence
    pos = presence_scores(agent, positives, gate, progress)
    neg = presence_scores(agent, negatives, gate, progress)
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
        chosen = choose_threshold(p_scores, n_scores, max_recall_loss, max_false_positive_rate)
        gate.threshold = chosen["threshold"]
        gate.chosen_on = {
            "positives": positives,
            "negatives": negatives,
            "max_recall_loss": max_recall_loss,
            "max_false_positive_rate": max_false_positive_rate,
            **{k: chosen[k] for k in ("rule", "recall", "false_positive_rate", "auc")},
        }
        gate.save(run)
    threshold = gate.threshold
    result = {
        "run": str(run),
        "positives": positives,
        "negatives": negatives,
        "threshold": threshold,
        "chosen_here": choose,
        "max_recall_loss": max_recall_loss if choose else None,
        "max_false_positive_rate": max_false_positive_rate if choose else None,
        "rule": chosen["rule"] if choose else None,
        "auc": separation(p_scores, n_scores),
        "recall": sum(v >= threshold for v in p_scores) / len(p_scores),
        "false_positive_rate": sum(v >= threshold for v in n_scores) / len(n_scores),
        "n_positives": len(pos),
        "n_negatives": len(neg),
        "top": gate.top,
        "score": "learned" if gate.model is not None else "srm_top",
        "fitted_on": None if gate.model is None else gate.model.fitted_on,
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
    how = "the run's (presence.json)"
    if result["chosen_here"]:
        goals = (
            f"keep >= {1 - result['max_recall_loss']:.0%} of the positives, let <= "
            f"{result['max_false_positive_rate']:.0%} of the negatives through"
        )
        how = f"chosen here: {goals}; " + (
            "midway between the two limits"
            if result["rule"] == "middle"
            else "the recall limit, the other cannot be met with it"
        )
    return (
        f"# Presence: {result['run']}\n\n"
        f"| images with the target | without | threshold | recall | false-positive rate | AUC |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {result['positives']} ({result['n_positives']}) | {result['negatives']} "
        f"({result['n_negatives']}) | {result['threshold']:.4f} ({how}) | "
        f"{result['recall']:.3f} | {result['false_positive_rate']:.3f} | {result['auc']:.3f} |\n\n"
        f"Presence score: {_score_text(result)}, before any click; below the threshold "
        "`alignsam segment` writes an empty mask and lists the image under `no_target`.\n"
    )


def _score_text(result: dict[str, Any]) -> str:
    fitted = result.get("fitted_on")
    if fitted:
        return (
            "the learned presence model (SRM-map statistics and the pooled embedding) fitted on "
            f"{', '.join(fitted['positives_from'])} ({fitted['positives']} images with the "
            f"target) and {', '.join(fitted['negatives_from'])} ({fitted['negatives']} without)"
        )
    return f"mean SRM foreground probability of the top {result['top']:.1%} of the cells"
