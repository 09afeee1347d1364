"""Summarise docs/tools/unseen.sh's benchmarks into ``benchmarks.json`` and ``benchmarks.md``
(issue 31; the folder's ``results.*`` are ``docs/tools/unseen_standing.py``'s).

Per set: the agent's and the adapted agent's mIoU with intervals, their paired difference,
each one's start and the share of images it leaves worse than its start; on images without a
polyp, the presence threshold's false-positive rate and the recall it keeps.

    python docs/tools/unseen_summary.py docs/results/unseen
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from experiments.benchmark.stats import bootstrap_ci, paired_diff_ci


def _agents(result: dict[str, Any]) -> tuple[str, str]:
    names = [m["method"] for m in result["methods"] if m["method"].startswith("agent")]
    adapted = [n for n in names if n.endswith(" adapted")]
    source = [n for n in names if not n.endswith(" adapted")]
    if len(adapted) != 1 or len(source) != 1:
        raise ValueError(f"expected one agent and its adapted run, got {names}")
    return source[0], adapted[0]


def summarise_set(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one set's benchmark (two agents: a run and its adaptation)."""
    source, adapted = _agents(result)
    methods = {m["method"]: m for m in result["methods"]}
    ious = {
        name: {r["id"]: r["iou"] for r in result["per_image"][name]} for name in (source, adapted)
    }
    ids = sorted(ious[source])
    a = [ious[source][i] for i in ids]
    b = [ious[adapted][i] for i in ids]
    diff, lo, hi = paired_diff_ci(b, a)
    row: dict[str, Any] = {"dataset": result.get("dataset"), "n": len(ids)}
    for key, name, values in (("agent", source, a), ("adapted", adapted, b)):
        m = methods[name]
        row[key] = {
            "miou": sum(values) / len(values),
            "ci95": list(bootstrap_ci(values)),
            "start_miou": m.get("start_iou"),
            "worse_than_start": m.get("worse_than_start"),
        }
    row["adapted_minus_agent"] = {"mean": diff, "ci95": [lo, hi]}
    return row


def main(folder: str) -> None:
    root = Path(folder)
    sets = {}
    for path in sorted(root.glob("*/results.json")):
        result = json.loads(path.read_text())
        if "methods" in result:  # a benchmark (presence_* folders hold other results)
            sets[path.parent.name] = summarise_set(result)
    out: dict[str, Any] = {"sets": sets}
    presence = root / "presence_test" / "results.json"
    if presence.is_file():
        p = json.loads(presence.read_text())
        out["negatives"] = {
            k: p[k]
            for k in (
                "positives",
                "negatives",
                "n_positives",
                "n_negatives",
                "threshold",
                "recall",
                "false_positive_rate",
                "auc",
            )  # fmt: skip
        }
    (root / "benchmarks.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# Images from elsewhere: Kvasir `test` and its shifts (issue 31)",
        "",
        "| set | n | agent | adapted | adapted - agent [95 %] | start: agent / adapted | "
        "worse than start: agent / adapted |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in sets.items():
        ag, ad, d = r["agent"], r["adapted"], r["adapted_minus_agent"]
        lines.append(
            f"| {r['dataset'] or name} | {r['n']} | {ag['miou']:.3f} | {ad['miou']:.3f} | "
            f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | "
            f"{ag['start_miou']:.3f} / {ad['start_miou']:.3f} | "
            f"{ag['worse_than_start']:.0%} / {ad['worse_than_start']:.0%} |"
        )
    lines += [
        "",
        "adapted: `alignsam adapt RUN SET` on the set's own images (no labels: the SRM's "
        "statistics re-estimated, `keep: best_predicted`); start: the agent's two SRM points; "
        "worse than start: share of images whose final mask has a lower IoU than that start; "
        "intervals: paired bootstrap over the images.",
    ]
    if "negatives" in out:
        n = out["negatives"]
        lines += [
            "",
            f"Nothing here: threshold {n['threshold']:.4f} (chosen on val); on the "
            f"{n['n_negatives']} images of `{n['negatives']}` (no polyp), false-positive rate "
            f"{n['false_positive_rate']:.3f}; on the {n['n_positives']} of `{n['positives']}`, "
            f"recall {n['recall']:.3f} (AUC {n['auc']:.3f}).",
        ]
    (root / "benchmarks.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/unseen")
