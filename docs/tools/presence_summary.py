"""Summarise docs/tools/presence_learned.sh's folders into ``results.md``: per score (learned,
SRM peak) and set, the threshold chosen on ``val``, the recall on images with a polyp and the
false-positive rate on images without, per shift for the shifted sets.

    python docs/tools/presence_summary.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _shift(image_id: str) -> str:
    """The image shift of an id (``@negative``, the cut without a polyp, is not one)."""
    image_id = image_id.replace("@negative", "")
    return image_id.rsplit("@", 1)[1] if "@" in image_id else "none"


def rows(result: dict) -> list[tuple[str, int, float, int, float]]:
    """``(shift, positives, recall, negatives, false-positive rate)`` per shift, then all."""
    t = result["threshold"]
    pos, neg = result["per_image"]["positives"], result["per_image"]["negatives"]
    shifts = sorted({_shift(r["id"]) for r in pos + neg})
    out = []
    for shift in [*shifts, "all"] if len(shifts) > 1 else shifts:
        p = [r["presence"] for r in pos if shift in ("all", _shift(r["id"]))]
        n = [r["presence"] for r in neg if shift in ("all", _shift(r["id"]))]
        recall = sum(v >= t for v in p) / len(p) if p else float("nan")
        fpr = sum(v >= t for v in n) / len(n) if n else float("nan")
        out.append((shift, len(p), recall, len(n), fpr))
    return out


def main(folder: str) -> None:
    root = Path(folder)
    lines = [
        "# Nothing here: the learned presence score and the SRM peak (issue 31)",
        "",
        "| score | set | shift | with a polyp | recall | without | false-positive rate | AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for score, label in (("learned", "learned"), ("top", "SRM peak (top 0.1 %)")):
        for name in ("val", "test", "test_shifted"):
            path = root / f"{name}_{score}" / "results.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            for shift, n_pos, recall, n_neg, fpr in rows(result):
                lines.append(
                    f"| {label} | {name} | {shift} | {n_pos} | {recall:.3f} | {n_neg} | {fpr:.3f} "
                    f"| {result['auc'] if shift in ('none', 'all') else float('nan'):.3f} |"
                )
    lines += [
        "",
        "Thresholds chosen on `val` (keep 98 % of its polyps), measured on `test` and on "
        "`test`'s shifts (`@hue`, `@jpeg20`, `@border`, `@crop256` with a polyp; `@negative` "
        "cuts with `@hue`, `@jpeg20`, `@border` without). AUC per set (nan per shift).",
    ]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
