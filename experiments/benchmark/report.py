"""The benchmark's reports: ``results.md`` (tables and headline), ``curves.png`` (mIoU vs clicks)
and ``examples.png`` (best, median and worst images)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.clickers import (
    ClickTrace,
)
from envs.render import overlay
from experiments.benchmark.results import MANUAL_KS, MethodResult

logger = logging.getLogger(__name__)


def _clicks_phrase(k: float | None, manual_clicks: int) -> str:
    if k is None:
        return f"more than {manual_clicks}"
    if k < 1:
        return "less than 1"
    return f"{k:.1f}"


def _opt(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_markdown(result: dict[str, Any]) -> str:
    """The ``results.md`` table and headline."""
    h = result["headline"]
    mc = result["manual"]["max_clicks"]
    lo_k, hi_k = h["ci_equals_manual_clicks"]
    lines = [
        f"# alignsam benchmark: {result['task']} ({result.get('dataset') or result['split']},"
        f" {result['n_images']} images,"
        f" {result['segmenter']})",
        "",
        f"**Headline:** the agent's mIoU {h['agent_miou']:.3f} (95% CI "
        f"{h['agent_miou_ci95'][0]:.3f}-{h['agent_miou_ci95'][1]:.3f}) equals "
        f"**{_clicks_phrase(h['agent_equals_manual_clicks'], mc)} manual clicks** of the simulated"
        f" annotator (CI: {_clicks_phrase(lo_k, mc)} to {_clicks_phrase(hi_k, mc)}).",
        "",
        "| method | mIoU [95% CI] | Δ vs agent [95% CI] | Dice | F-beta | MAE | BER % | E-measure"
        " | clicks | s/image | training s | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["methods"]:
        lo, hi = r["iou_ci95"]
        if "diff_vs_agent" in r:
            d, dlo, dhi = r["diff_vs_agent"]
            sig = "" if dlo <= 0 <= dhi else " *"
            diff = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]{sig}"
        else:
            diff = "reference"
        lines.append(
            f"| {r['method']} | {r['iou']:.3f} [{lo:.3f}, {hi:.3f}] | {diff} | {r['dice']:.3f} | "
            f"{r['f_beta']:.3f} | {r['mae']:.3f} | {r['ber']:.2f} | {r['e_measure']:.3f} | "
            f"{r['clicks']:.1f} | {r['seconds']:.2f} | {_opt(r.get('train_seconds'), '.0f')} | "
            f"{_opt(r.get('trainable_params'), ',d')} |"
        )
    lines += _by_click_lines(result.get("by_click"))
    m = result["manual"]
    curve = m["miou_at_k"]
    marks = ", ".join(f"@{k} {curve[str(k)]:.3f}" for k in MANUAL_KS if str(k) in curve)
    enc = result.get("encode_seconds_per_image")
    lines += [
        "",
        f"Manual annotator (RITM protocol, {mc} clicks): mIoU {marks}; NoC@85 {m['noc@85']:.2f},"
        f" NoC@90 {m['noc@90']:.2f}.",
        "",
        "`*` (both tables): the paired bootstrap interval of the difference excludes 0 (a real"
        " difference);"
        " without `*` the two methods are within noise. Clicks include the SRM's two start"
        " points. s/image: prompting and decoding with the embedding cached"
        + (f"; encoding costs {enc:.2f} s/image once, shared by all methods." if enc else "."),
        "Manual @k reads the ground truth (a human's clicks), and so does an oracle pick; every"
        " other method is automatic. Training s: wall time of the agent's run (SRM pretraining"
        " and PPO) or of the fine-tuning; '-' for methods that learn nothing of their own"
        " (random + SRM reuses the agent's SRM). Automatic masks: decoder calls count the"
        " generator's single-point prompts.",
    ]
    return "\n".join(lines) + "\n"


def _by_click_lines(by_click: dict[str, Any] | None) -> list[str]:
    """The by-budget table: each automatic method's mIoU after k clicks past the start, with
    its paired difference to the agent (``*`` where the interval excludes 0)."""
    if not by_click or len(by_click["methods"]) < 2:
        return []
    budgets = by_click["clicks_after_start"]
    shown = [i for i, k in enumerate(budgets) if k in (0, 1, 2, 3, 5, 10) or i == len(budgets) - 1]
    lines = [
        "",
        "mIoU after k clicks past the start (the same start prompts and images; Δ vs the agent"
        " at that budget in brackets):",
        "",
        "| method | " + " | ".join(f"k={budgets[i]}" for i in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for name, row in by_click["methods"].items():
        cells = []
        for i in shown:
            cell = f"{row['miou'][i]:.3f}"
            if "diff_vs_agent" in row:
                d, lo, hi = row["diff_vs_agent"][i]
                cell += f" ({d:+.3f}{'' if lo <= 0 <= hi else '*'})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(
    result: dict[str, Any], methods: list[MethodResult], traces: list[ClickTrace], path: Path
) -> None:
    """mIoU vs number of clicks: the manual annotator's curve with the automatic methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    mc = result["manual"]["max_clicks"]
    curve = [result["manual"]["miou_at_k"][str(k)] for k in range(1, mc + 1)]
    ax.plot(range(1, mc + 1), curve, "k-o", ms=3, label="manual (simulated annotator)")
    for m in methods:
        if m.kind != "automatic" or not m.curve or not all(m.curve):
            continue
        n = min(len(c) for c in m.curve)
        start = len(m.curve[0]) - n + 1 if n else 1
        ys = [float(np.mean([c[i] for c in m.curve])) for i in range(n)]
        ax.plot(range(start, start + n), ys, "-", lw=1.5, label=m.name)
    for m in methods:
        if m.kind == "automatic" and not m.curve:
            ax.scatter([np.mean(m.values("clicks"))], [np.mean(m.values("iou"))], marker="s", s=25)
            ax.annotate(m.name, (np.mean(m.values("clicks")), np.mean(m.values("iou"))), fontsize=7)
    ax.set_xlabel("clicks (automatic methods: SRM start points + agent / policy clicks)")
    ax.set_ylabel("mIoU")
    ax.set_title(f"{result['task']} {result['split']} ({result['n_images']} images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_examples(
    samples: Sequence[Any],
    gts: Sequence[np.ndarray],
    methods: list[MethodResult],
    path: Path,
    columns: Sequence[str] = ("random + SRM (w/o RL)", "manual @3"),
    height: int = 240,
) -> None:
    """Best, median and worst images of the first agent, beside other methods on the same image."""
    from PIL import Image, ImageDraw, ImageFont

    try:  # Pillow's own scalable font (FreeType); the small bitmap font where it is missing
        font = ImageFont.load_default(size=12)
    except (ImportError, OSError, TypeError):
        font = ImageFont.load_default()
    ref = methods[0]
    by_name = {m.name: m for m in methods}
    cols = [ref] + [by_name[c] for c in columns if c in by_name]
    order = np.argsort(ref.values("iou"))
    picks = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
    rows = []
    for label, idx in picks.items():
        s, gt = samples[int(idx)], gts[int(idx)]
        image = s.load_image()
        tiles = []
        for m in cols:
            mask = m.mask(s.id, gt.shape)
            pts = m.clicks_points.get(s.id, np.zeros((0, 3), np.float32))
            tile = overlay(image, mask, pts[:, :2], pts[:, 2], outline=gt)
            iou = next(r["iou"] for r in m.per_image if r["id"] == s.id)
            pil = Image.fromarray(tile)
            pil = pil.resize((max(1, round(pil.width * height / pil.height)), height))
            draw = ImageDraw.Draw(pil)
            for row, text in enumerate((f"{label} | IoU {iou:.2f}", m.name)):  # name: own line
                draw.text((5, 5 + 14 * row), text, fill="black", font=font)
                draw.text((4, 4 + 14 * row), text, fill="white", font=font)
            tiles.append(np.asarray(pil))
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
