"""The learning curve's report (:mod:`experiments.curve`): each size's rows summarised over
seeds from its points' benchmarks, ``results.md`` and ``curve.png``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmark.stats import bootstrap_ci, paired_diff_ci

__all__ = [
    "MANUAL_LINES",
    "ROWS",
    "plot_curve",
    "render_curve_markdown",
    "summarize",
    "summarize_confirm",
]

#: The curve's rows: key -> (the benchmark's method name or a rule, the label in tables).
ROWS: dict[str, str] = {
    "agent": "the agent (the task's)",
    "ppo": "PPO agent (the paper's)",
    "srm_confident": "SRM-confident heuristic",
    "finetuned_b": "fine-tuned decoder (b), SRM start",
    "ceiling": "lookahead ceiling (reads GT)",
}
#: Benchmark method names of the fixed rows.
_METHOD = {
    "srm_confident": "SRM-confident",
    "finetuned_b": "fine-tuned decoder (b) SRM start points",
    "ceiling": "lookahead, true-IoU judge (ceiling: reads GT)",
}
#: The annotator's budgets drawn as horizontal lines.
MANUAL_LINES = (1, 3, 5)


def _rows_of(result: dict[str, Any]) -> dict[str, list[float]]:
    """Per-image IoUs of each curve row in one benchmark's ``results.json`` (ids in order)."""
    per = result["per_image"]
    names = [m["method"] for m in result["methods"][: len(result["runs"])]]  # agents come first
    wanted = {"agent": names[0], **({"ppo": names[1]} if len(names) > 1 else {}), **_METHOD}
    rows = {}
    for key, method in wanted.items():
        if method in per:
            rows[key] = [float(r["iou"]) for r in per[method]]
    for k in MANUAL_LINES:
        if f"manual @{k}" in per:
            rows[f"manual_{k}"] = [float(r["iou"]) for r in per[f"manual @{k}"]]
    return rows


def _row_stats(
    per_seed: list[dict[str, list[float]]], seed: int, seeds: Sequence[int] | None = None
) -> dict[str, Any]:
    """Every row of any seed: mIoU of the per-image mean over the seeds that have it, its
    bootstrap interval, each seed's mIoU and the paired difference to the agent of the same
    seeds (``seeds``: those seeds, where not every seed has the row; ``seeds`` names the
    points of ``per_seed``)."""
    names = list(range(len(per_seed))) if seeds is None else list(seeds)
    keys = list(dict.fromkeys(k for p in per_seed for k in p))
    rows: dict[str, Any] = {}
    for key in keys:
        have = [i for i, p in enumerate(per_seed) if key in p]
        ious = np.mean([per_seed[i][key] for i in have], axis=0)
        lo, hi = bootstrap_ci(ious, seed=seed)
        row: dict[str, Any] = {
            "miou": float(ious.mean()),
            "ci95": [lo, hi],
            "per_seed": [float(np.mean(per_seed[i][key])) for i in have],
        }
        if len(have) < len(per_seed):
            row["seeds"] = [names[i] for i in have]
        if key != "agent":
            agent = np.mean([per_seed[i]["agent"] for i in have], axis=0)
            d, dlo, dhi = paired_diff_ci(ious, agent, seed=seed)
            row["diff_vs_agent"] = [d, dlo, dhi]
        rows[key] = row
    return rows


def summarize_confirm(bench: Path, spec: str, size: int, seed: int = 0) -> dict[str, Any]:
    """The largest size's rows scored on a second set (``alignsam curve --confirm``)."""
    per = _rows_of(json.loads((Path(bench) / "results.json").read_text()))
    return {
        "spec": spec,
        "size": size,
        "n_images": len(per["agent"]),
        "rows": _row_stats([per], seed),
        "benchmark": str(bench),
    }


def summarize(records: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """The curve from its points' benchmarks: per size and row the mIoU over seeds (each
    image's IoU averaged over the seeds, then a bootstrap interval over images) and the paired
    interval of its difference to the agent."""
    by_size: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_size.setdefault(int(r["size"]), []).append(r)
    sizes = []
    for size in sorted(by_size):
        recs = by_size[size]
        per_seed = [
            _rows_of(json.loads((Path(r["benchmark"]) / "results.json").read_text())) for r in recs
        ]
        rows = _row_stats(per_seed, seed, [int(r["seed"]) for r in recs])
        for key, row in rows.items():
            minutes = [r["minutes"].get(key) for r in recs if r["minutes"].get(key) is not None]
            if minutes:
                row["train_minutes"] = float(np.mean(minutes))
        memory = [r.get("peak_memory_mb", {}).get("agent") for r in recs]
        sizes.append(
            {
                "size": size,
                "seeds": [int(r["seed"]) for r in recs],
                "n_images": len(per_seed[0]["agent"]),
                "rows": rows,
                "agent_peak_memory_mb": max((m for m in memory if m), default=None),
                "budgets": recs[0].get("budgets"),
                "budgets_by_seed": [r.get("budgets") for r in recs],
                "agent_clicks": [r.get("agent_clicks") for r in recs],
                "agent_answers": [r.get("agent_answer") for r in recs],
                "benchmarks": [r["benchmark"] for r in recs],
            }
        )
    return {"sizes": sizes}


def render_curve_markdown(result: dict[str, Any]) -> str:
    """``results.md``: mIoU [95 % CI] of every row at every size, training minutes."""
    keys = [k for k in (*ROWS, *(f"manual_{k}" for k in MANUAL_LINES))]
    keys = [k for k in keys if any(k in s["rows"] for s in result["sizes"])]
    label = {**ROWS, **{f"manual_{k}": f"manual @{k} (reads GT)" for k in MANUAL_LINES}}
    head = ["labelled images"] + [label[k] for k in keys] + ["agent training min"]
    lines = [
        f"# Learning curve: {result['task']} on {result['split']}"
        f" ({result['sizes'][0]['n_images'] if result['sizes'] else 0} images)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for s in result["sizes"]:
        cells = [f"{s['size']} (seeds {', '.join(map(str, s['seeds']))})"]
        cells += [_cell(s["rows"].get(k)) for k in keys]
        minutes = s["rows"].get("agent", {}).get("train_minutes")
        cells.append("-" if minutes is None else f"{minutes:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "mIoU over the images [bootstrap 95 % interval]; with two seeds each image's IoU is the"
        " mean of the seeds' (of those that have the row). In brackets: the paired difference to"
        " the agent (of the same seeds), `*` where its interval excludes 0. Rows that read the"
        " ground truth are not automatic.",
    ]
    confirm = result.get("confirm")
    if confirm:
        shown = [k for k in keys if k in confirm["rows"]]
        lines += [
            "",
            f"The {confirm['size']}-image rows on `{confirm['spec']}` ({confirm['n_images']} "
            "images, `--confirm`; the same agents, no ceiling row):",
            "",
            "| " + " | ".join(label[k] for k in shown) + " |",
            "|" + "---|" * len(shown),
            "| " + " | ".join(_cell(confirm["rows"][k]) for k in shown) + " |",
        ]
    budgets = [(s["size"], s.get("budgets_by_seed") or [s.get("budgets")]) for s in result["sizes"]]
    seeds = {s["size"]: s.get("seeds", []) for s in result["sizes"]}
    clicks = {s["size"]: s.get("agent_clicks") for s in result["sizes"]}
    answers = {s["size"]: s.get("agent_answers") for s in result["sizes"]}
    if any(any(b) for _, b in budgets):
        lines += ["", "Agent training budgets per size (SRM pretraining; judge-training images):"]
        for size, bs in budgets:
            texts = [_budget_text(b) for b in bs]
            if len(set(texts)) > 1:  # the seeds of a size trained on different budgets
                texts = [f"seed {sd}: {t}" for sd, t in zip(seeds[size], texts, strict=False)]
            line = f"- {size}: " + "; ".join(dict.fromkeys(texts))
            lines.append(line + _clicks_text(clicks.get(size)) + _answers_text(answers.get(size)))
    return "\n".join(lines) + "\n"


def _budget_text(b: dict[str, Any] | None) -> str:
    if not b:
        return "not recorded"
    srm = f"{b['srm_epochs']} SRM epochs"
    if b.get("srm_pretrain_steps"):
        srm += f" ({b['srm_pretrain_steps']} steps)"
    return f"{srm}; judge on {b.get('judge_images') or 'all'} images per round"


def _cell(r: dict[str, Any] | None) -> str:
    """``mIoU [CI] (difference to the agent, * where significant)`` of one row."""
    if r is None:
        return "-"
    cell = f"{r['miou']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
    if "diff_vs_agent" in r:
        d, lo, hi = r["diff_vs_agent"]
        cell += f" ({d:+.3f}{'' if lo <= 0 <= hi else '*'})"
    if "seeds" in r:  # not every seed of the size has this row
        cell += f" (seed {', '.join(map(str, r['seeds']))} only)"
    return cell


def _clicks_text(clicks: list[int | None] | None) -> str:
    """The agent's clicks at one size: chosen on val per seed, or every step of its task."""
    if not clicks or all(c is None for c in clicks):
        return "; the agent takes all its steps"
    said = ", ".join("all" if c is None else str(c) for c in clicks)
    per_seed = ", per seed" if len(clicks) > 1 else ""
    return f"; the agent takes {said} clicks (chosen on val{per_seed})"


def _answers_text(answers: list[dict[str, Any] | None] | None) -> str:
    """The agent's answer rule at one size, per seed (chosen on val; none: the last state)."""
    if not answers or all(not a or not a.get("keep") for a in answers):
        return ""
    said = ", ".join(
        "last" if not a or not a.get("keep") else f"{a['keep']} (margin {a.get('margin') or 0:g})"
        for a in answers
    )
    return f"; answer: {said}"


def plot_curve(result: dict[str, Any], path: Path) -> None:
    """``curve.png``: mIoU against labelled images (log axis) with 95 % intervals, the
    annotator's @k as horizontal lines, agent training minutes on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s["size"] for s in result["sizes"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for key, label in ROWS.items():
        pts = [(s["size"], s["rows"][key]) for s in result["sizes"] if key in s["rows"]]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        ys = np.array([r["miou"] for _, r in pts])
        lo = ys - np.array([r["ci95"][0] for _, r in pts])
        hi = np.array([r["ci95"][1] for _, r in pts]) - ys
        style = "--" if key == "ceiling" else "-"
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style + "o", ms=4, capsize=3, label=label)
    for k, colour in zip(MANUAL_LINES, ("0.75", "0.5", "0.25"), strict=True):
        vals = [
            s["rows"][f"manual_{k}"]["miou"] for s in result["sizes"] if f"manual_{k}" in s["rows"]
        ]
        if vals:
            ax.axhline(float(np.mean(vals)), color=colour, ls=":", lw=1.2)
            ax.annotate(f"manual @{k}", (sizes[0], float(np.mean(vals))), fontsize=7, va="bottom")
    lines = [s["rows"][k]["miou"] for s in result["sizes"] for k in s["rows"] if "manual" in k]
    if lines:  # room above the highest line for its label
        ax.set_ylim(top=max(ax.get_ylim()[1], max(lines) + 0.04))
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlim(min(sizes) / 1.4, max(sizes) * 1.4)
    ax.set_xlabel("labelled training images")
    ax.set_ylabel(f"mIoU on {result['split']}")
    ax.set_title(f"{result['task']}: learning curve")
    ax.grid(alpha=0.3)
    minutes = [s["rows"].get("agent", {}).get("train_minutes") for s in result["sizes"]]
    if any(m is not None for m in minutes):
        ax2 = ax.twinx()
        pts = [(x, m) for x, m in zip(sizes, minutes, strict=True) if m is not None]
        ax2.plot(*zip(*pts, strict=True), "k^:", alpha=0.45, ms=5, label="agent training (min)")
        ax2.set_ylabel("agent training minutes (triangles)")
        ax2.set_ylim(0, max(m for _, m in pts) * 1.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
