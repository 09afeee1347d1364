"""``alignsam corrections RUN --split val --out DIR``: how many clicks a person still needs after
the agent, against prompting from nothing.

The simulated annotator (RITM's protocol, :class:`~agents.clickers.SimulatedAnnotator`) takes
over each automatic start and clicks in the largest error region until 20 clicks of its own
(:meth:`~agents.clickers.SimulatedAnnotator.correct`); beside it, the same annotator from
scratch. Starts:

- ``agent``: the run's agent, its final prompts and mask;
- ``srm_start``: the agent's two SRM start points alone (0 agent clicks);
- ``finetuned_b``: the fine-tuned decoder (``--delta``, a decoder delta) on those start points;
  the annotator goes on with that decoder.

Every start is continued with each hand-over of :data:`~agents.clickers.HANDOVERS` (the
agent's prompts kept, only its mask, or its contradicted clicks pruned). Per start and hand-over:
NoC@85 / NoC@90 counted from the start (0 when the start already reaches the threshold, 20 when
never), mIoU after k corrective clicks, the clicks saved per image against scratch with a paired
95 % interval, ``clicks_saved_90`` (the share of scratch's clicks to 90 % IoU that the start
saves, with a bootstrap interval over images) and the images on which the start costs clicks.
Writes ``results.json``, ``results.md`` and ``corrections.png`` under ``--out``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.clickers import HANDOVERS, SimulatedAnnotator, noc, noc_from
from experiments.benchmark.stats import bootstrap_ci, paired_diff_ci
from experiments.datasets import load_dataset, readable
from segmenter.base import mask_iou
from segmenter.io import atomic_write
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["STARTS", "render_corrections_markdown", "run_corrections", "summarize_corrections"]

#: The automatic starts the annotator continues from, with their labels in tables.
STARTS: dict[str, str] = {
    "agent": "the agent",
    "srm_start": "SRM start points alone",
    "finetuned_b": "fine-tuned decoder (b), SRM start",
}
THRESHOLDS = (0.85, 0.9)
#: Corrective-click counts reported as mIoU@k (0: the start's own mask).
KS = (0, 1, 2, 3, 5, 10, 20)


def _iou_after(start_iou: float, ious: Sequence[float], k: int) -> float:
    """IoU after ``k`` corrective clicks (the last one where the annotator stopped early)."""
    if k == 0 or not len(ious):
        return float(start_iou)
    return float(ious[min(k, len(ious)) - 1])


def _starts(agent: Any, image: np.ndarray, tuned: Any | None) -> dict[str, Any]:
    """Each automatic start's final session on ``image``: the agent's, its start points alone
    (the agent's session after its first commit, the start prompt) and, with ``tuned``, those
    start points decoded by the tuned decoder (one call, no mask input, as a fresh session)."""
    session = agent.segment(image, return_session=True)[2]
    start = session.fork(commits=1)
    out = {"agent": session, "srm_start": start}
    if tuned is not None:
        on_tuned = session.fork(tuned, commits=0)
        on_tuned.prompt(start.points, start.labels)
        out["finetuned_b"] = on_tuned
    return out


def run_corrections(
    run: str | Path,
    split: str = "val",
    out: str | Path = "corrections",
    *,
    limit: int | None = None,
    dataset_spec: str | None = None,
    delta: str | Path | None = None,
    handovers: Sequence[str] = HANDOVERS,
    chosen_handover: str | None = None,
    max_clicks: int = 20,
    stop_iou: float | None = max(THRESHOLDS),
    cache: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Corrective clicks after each automatic start vs from scratch; writes ``out``.

    Args:
        run: The agent's run folder (its task gives the data and the segmenter).
        split: ``train``, ``val`` or ``test`` of the run's task.
        out: Output folder (``results.json``, ``results.md``, ``corrections.png``).
        limit: Only the first ``limit`` images.
        dataset_spec: These images instead of ``split`` (a dataset spec).
        delta: A decoder fine-tuning (``alignsam finetune --out``) for the ``finetuned_b``
            start (``None``: no such start).
        handovers: Hand-overs to measure (:data:`~agents.clickers.HANDOVERS`).
        chosen_handover: The hand-over chosen elsewhere (on ``val``), marked in the table and
            drawn in the plot (``None``: the one with the lowest NoC@90 after the agent here).
        max_clicks: The annotator's click budget (from scratch and after a start).
        stop_iou: The annotator stops at this IoU (RITM's evaluation: its highest NoC
            threshold; later mIoU@k keep the last mask's IoU); ``None``: all ``max_clicks``.
        cache: Embedding cache (default: the user cache).
        seed: Seed of the bootstrap intervals.
        progress: Progress bar.

    Returns:
        The ``results.json`` content.
    """
    from agents.prompt_agent import PromptAgent
    from segmenter import EmbeddingCache

    bad = [h for h in handovers if h not in HANDOVERS]
    if bad or not handovers:
        raise ValueError(f"handovers must be among {', '.join(HANDOVERS)}, got {list(handovers)}")
    if chosen_handover is not None and chosen_handover not in handovers:
        raise ValueError(f"the chosen hand-over {chosen_handover!r} is not among {list(handovers)}")
    t_start = time.perf_counter()
    out = Path(out)
    cache = cache if cache is not None else EmbeddingCache()
    agent = PromptAgent.load(run, cache=cache)
    task = agent.task
    spec = dataset_spec or getattr(task.data, split, None)
    if not spec:
        raise ValueError(f"task {task.name} has no {split!r} split; pick another --split")
    dataset = load_dataset(spec, task.data.on_error)
    samples = readable(dataset[:limit] if limit else dataset, task.data.on_error, name=spec)
    tuned = None
    if delta is not None:
        from segmenter.finetune import apply_delta, load_delta

        if load_delta(delta)["level"] != "decoder":
            raise ValueError(
                f"--delta {delta}: the start points come from the agent's SRM, which reads the "
                "frozen encoder's embeddings; give a decoder delta (alignsam finetune --level "
                "decoder)"
            )
        tuned = apply_delta(copy.deepcopy(agent.segmenter), delta)
    annotator = SimulatedAnnotator(agent.segmenter, max_clicks=max_clicks, selection="score")
    per_image = []
    for s in progress_bar(samples, desc="corrections", unit="img", disable=not progress):
        image = s.load_image()
        gt = np.asarray(s.mask, bool)
        if not gt.any():
            logger.warning("%s: empty ground truth, left out (nothing to correct)", s.id)
            continue
        sessions = _starts(agent, image, tuned)
        emb = sessions["agent"].embedding
        scratch = annotator.run(emb, gt, str(s.id), stop_iou=stop_iou)
        record: dict[str, Any] = {
            "id": str(s.id),
            "scratch": {"ious": [round(v, 5) for v in scratch.ious]},
            "starts": {},
        }
        for name, session in sessions.items():
            start_iou = mask_iou(session.current_mask(), gt)
            rec: dict[str, Any] = {
                "start_iou": round(start_iou, 5),
                "start_prompts": int(len(session.points)),
            }
            for h in handovers:
                tr = annotator.correct(session, gt, str(s.id), handover=h, stop_iou=stop_iou)
                rec[h] = {"ious": [round(v, 5) for v in tr.ious], "dropped": tr.info["dropped"]}
            record["starts"][name] = rec
        per_image.append(record)
    result = summarize_corrections(per_image, handovers, max_clicks, seed)
    result.update(
        {
            "task": task.name,
            "run": str(run),
            "delta": None if delta is None else str(delta),
            "split": split,
            "dataset": spec,
            "limit": limit,
            "max_clicks": max_clicks,
            "stop_iou": stop_iou,
            "handover_chosen": chosen_handover or result["best_handover_agent"],
            "handover_chosen_on": "given" if chosen_handover else "this set",
            "per_image": per_image,
            "seconds": time.perf_counter() - t_start,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(result, indent=1).encode()
    atomic_write(out / "results.json", lambda fh: fh.write(data))
    (out / "results.md").write_text(render_corrections_markdown(result))
    plot_corrections(result, out / "corrections.png")
    return result


def summarize_corrections(
    per_image: Sequence[dict[str, Any]],
    handovers: Sequence[str] = HANDOVERS,
    max_clicks: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Per start and hand-over: NoC@85 / @90 with intervals, mIoU after k clicks, clicks saved
    against scratch (paired), ``clicks_saved_90`` and where the start costs clicks."""
    if not per_image:
        raise ValueError("no image to summarise (every ground truth was empty?)")
    scratch = {
        t: np.array([noc(r["scratch"]["ious"], t, max_clicks) for r in per_image], float)
        for t in THRESHOLDS
    }
    summary: dict[str, Any] = {
        "n_images": len(per_image),
        "scratch": {
            **{f"noc@{round(t * 100)}": _mean_ci(scratch[t], seed) for t in THRESHOLDS},
            "miou_at": {
                str(k): float(
                    np.mean([_iou_after(0.0, r["scratch"]["ious"], k) for r in per_image])
                )
                for k in KS
                if k > 0
            },
        },
        "starts": {},
    }
    starts = [s for s in STARTS if all(s in r["starts"] for r in per_image)]
    for name in starts:
        recs = [r["starts"][name] for r in per_image]
        entry: dict[str, Any] = {
            "label": STARTS[name],
            "start_miou": _mean_ci(np.array([r["start_iou"] for r in recs]), seed),
        }
        for h in handovers:
            row: dict[str, Any] = {}
            for t in THRESHOLDS:
                key = round(t * 100)
                n = np.array(
                    [noc_from(r["start_iou"], r[h]["ious"], t, max_clicks) for r in recs], float
                )
                row[f"noc@{key}"] = _mean_ci(n, seed)
                d, lo, hi = paired_diff_ci(scratch[t], n, seed=seed)
                row[f"clicks_saved_per_image_{key}"] = [d, lo, hi]
                row[f"clicks_saved_{key}"] = _share_saved(scratch[t], n, seed)
                row[f"costs_clicks_{key}"] = int((n > scratch[t]).sum())
                row[f"done_at_start_{key}"] = int((n == 0).sum())
            row["miou_at"] = {
                str(k): float(np.mean([_iou_after(r["start_iou"], r[h]["ious"], k) for r in recs]))
                for k in KS
            }
            row["dropped_per_image"] = float(np.mean([r[h]["dropped"] for r in recs]))
            entry[h] = row
        summary["starts"][name] = entry
    best = min(handovers, key=lambda h: summary["starts"]["agent"][h]["noc@90"][0])
    summary["best_handover_agent"] = best
    return summary


def _mean_ci(values: np.ndarray, seed: int) -> list[float]:
    lo, hi = bootstrap_ci(values, seed=seed)
    return [float(np.mean(values)), lo, hi]


def _share_saved(scratch: np.ndarray, start: np.ndarray, seed: int) -> list[float]:
    """``1 - sum(start) / sum(scratch)`` with a percentile-bootstrap interval over images."""
    share = 1.0 - start.sum() / max(scratch.sum(), 1e-9)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(scratch), (2000, len(scratch)))
    boot = 1.0 - start[idx].sum(1) / np.maximum(scratch[idx].sum(1), 1e-9)
    return [float(share), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def render_corrections_markdown(result: dict[str, Any]) -> str:
    """``results.md``: NoC and clicks saved per start and hand-over, scratch beside them."""
    sc = result["scratch"]
    lines = [
        f"# Corrective clicks: {result['task']} on {result['dataset']} "
        f"({result['n_images']} images, the annotator's budget {result['max_clicks']} clicks)",
        "",
        "| start | hand-over | start mIoU | NoC@85 | NoC@90 | clicks saved to 90 % "
        "| saved per image (90) | costs clicks (90) | done at start (90) | mIoU after 1 / 3 / 5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| scratch (annotator alone) | - | - | {_fmt(sc['noc@85'])} | {_fmt(sc['noc@90'])} "
        f"| - | - | - | - | {sc['miou_at']['1']:.3f} / {sc['miou_at']['3']:.3f} / "
        f"{sc['miou_at']['5']:.3f} |",
    ]
    for name, entry in result["starts"].items():
        for h in HANDOVERS:
            row = entry.get(h)
            if row is None:
                continue
            m = row["miou_at"]
            star = " (chosen)" if name == "agent" and h == result.get("handover_chosen") else ""
            lines.append(
                f"| {entry['label']} | {h}{star} | {_fmt(entry['start_miou'], 3)} "
                f"| {_fmt(row['noc@85'])} | {_fmt(row['noc@90'])} "
                f"| {_fmt(row['clicks_saved_90'], pct=True)} "
                f"| {_fmt(row['clicks_saved_per_image_90'])} | {row['costs_clicks_90']} "
                f"| {row['done_at_start_90']} | {m['1']:.3f} / {m['3']:.3f} / {m['5']:.3f} |"
            )
    lines += [
        "",
        "NoC@t: the annotator's clicks to reach IoU >= t, counted from the start (0 when the "
        f"start reaches it, {result['max_clicks']} when never); mean [bootstrap 95 % interval "
        "over images]. Clicks saved to 90 %: 1 - (clicks after the start) / (clicks from "
        "scratch), summed over images. Saved per image: scratch minus start, paired. Costs "
        "clicks: images where the start needs more clicks than scratch. Hand-overs: keep = the "
        "start's prompts stay and its mask is the mask input; mask = only its mask; prune = "
        "keep, minus the start's clicks the ground truth contradicts. Lowest mean NoC@90 after "
        f"the agent here: {result['best_handover_agent']}; (chosen): "
        f"{result['handover_chosen']}, chosen on {result['handover_chosen_on']}.",
    ]
    return "\n".join(lines) + "\n"


def _fmt(v: Sequence[float], digits: int = 2, pct: bool = False) -> str:
    if pct:
        return f"{100 * v[0]:.0f} % [{100 * v[1]:.0f}, {100 * v[2]:.0f}]"
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def plot_corrections(result: dict[str, Any], path: Path) -> None:
    """``corrections.png``: mIoU against the annotator's clicks, from scratch and after each
    start (its best hand-over for the agent's start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["per_image"]
    k_max = result["max_clicks"]
    ks = np.arange(0, k_max + 1)
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=120)
    scratch = [np.mean([_iou_after(0.0, r["scratch"]["ious"], k) for r in per]) for k in ks]
    ax.plot(ks, scratch, "k-", lw=1.8, label="annotator from scratch")
    handover = result.get("handover_chosen", result["best_handover_agent"])
    for name, entry in result["starts"].items():
        h = handover if handover in entry else next(x for x in HANDOVERS if x in entry)
        recs = [r["starts"][name] for r in per]
        ys = [np.mean([_iou_after(r["start_iou"], r[h]["ious"], k) for r in recs]) for k in ks]
        ax.plot(ks, ys, "o-", ms=3, label=f"after {entry['label']} ({h})")
    for t in THRESHOLDS:
        ax.axhline(t, color="0.6", ls=":", lw=1)
    ax.set_xlabel("the annotator's clicks")
    ax.set_ylabel("mIoU")
    ax.set_xticks([k for k in (0, 1, 2, 3, 5, 10, 15, 20) if k <= k_max])
    ax.set_title(f"{result['task']} on {result['dataset']}: corrective clicks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
