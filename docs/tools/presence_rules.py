"""Which threshold rule carries "nothing here" from ``val`` to new images, from recorded
presence scores (``alignsam presence`` results, no new forward pass): for each rule, the
threshold chosen on a ``val`` result and the recall / false-positive rate it gives on the
measured results; then, on ``val`` alone, the same for 200 random halves (choose on one half,
measure on the other).

    python docs/tools/presence_rules.py OUT --val RESULTS.json --measure RESULTS.json ... \
        [--val ... --measure ...] [--max-recall-loss 0.02] [--max-false-positive-rate 0.05]

Rules (:func:`recalibration.presence.choose_threshold`): ``recall``, the highest threshold that
keeps all but ``max_recall_loss`` of the positives (the rule before issue 31's last round);
``false positives``, the lowest that lets at most ``max_false_positive_rate`` of the negatives
through; ``chosen``, what ``choose_threshold`` returns (midway between the two when both goals
can be met). Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from veto_sets import write_report

from recalibration.presence import choose_threshold

HALVES = 200


def _scores(path: str) -> tuple[np.ndarray, np.ndarray]:
    per = json.loads(Path(path).read_text())["per_image"]
    return tuple(np.array([r["presence"] for r in per[k]]) for k in ("positives", "negatives"))


def _thresholds(p: np.ndarray, n: np.ndarray, loss: float, fpr: float) -> dict[str, float]:
    c = choose_threshold(p, n, loss, fpr)
    return {
        "recall": c["recall_limit"],
        "false positives": c["false_positive_limit"],
        "chosen": c["threshold"],
    }


def _rates(p: np.ndarray, n: np.ndarray, t: float) -> dict[str, float]:
    return {"recall": float(np.mean(p >= t)), "false_positive_rate": float(np.mean(n >= t))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--val", action="append", required=True, help="a val results.json")
    ap.add_argument(
        "--measure", action="append", nargs="+", required=True, help="results.json per --val"
    )
    ap.add_argument("--max-recall-loss", type=float, default=0.02)
    ap.add_argument("--max-false-positive-rate", type=float, default=0.05)
    args = ap.parse_args()
    if len(args.val) != len(args.measure):
        ap.error("give one --measure list after each --val")
    loss, fpr = args.max_recall_loss, args.max_false_positive_rate
    rng = np.random.default_rng(0)
    out: dict = {"max_recall_loss": loss, "max_false_positive_rate": fpr, "val": {}}
    lines = [
        '# "Nothing here": which threshold rule carries from val (issue 31)',
        "",
        f"Goals: recall >= {1 - loss:.0%}, false-positive rate <= {fpr:.0%}. Recorded presence "
        "scores; recall / false-positive rate per rule.",
    ]
    for val, measured in zip(args.val, args.measure, strict=True):
        p, n = _scores(val)
        rules = _thresholds(p, n, loss, fpr)
        rec: dict = {"thresholds": rules, "measured": {}, "halves": {}}
        lines += ["", f"## Chosen on `{val}` ({len(p)} / {len(n)})", ""]
        lines += ["| measured on | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
        lines.append("| (threshold) | " + " | ".join(f"{t:.4f}" for t in rules.values()) + " |")
        for m in measured:
            mp, mn = _scores(m)
            rates = {k: _rates(mp, mn, t) for k, t in rules.items()}
            rec["measured"][m] = rates
            cells = [f"{r['recall']:.3f} / {r['false_positive_rate']:.3f}" for r in rates.values()]
            lines.append(f"| `{m}` ({len(mp)} / {len(mn)}) | " + " | ".join(cells) + " |")
        halves: dict[str, list] = {k: [] for k in rules}
        for _ in range(HALVES):
            a, b = rng.permutation(len(p)), rng.permutation(len(n))
            (pa, pb), (na, nb) = np.array_split(p[a], 2), np.array_split(n[b], 2)
            for k, t in _thresholds(pa, na, loss, fpr).items():
                r = _rates(pb, nb, t)
                halves[k].append((r["recall"], r["false_positive_rate"]))
        for k, v in halves.items():
            arr = np.array(v)
            rec["halves"][k] = {
                "recall": float(arr[:, 0].mean()),
                "false_positive_rate": float(arr[:, 1].mean()),
                "recall_met": float(np.mean(arr[:, 0] >= 1 - loss - 1e-12)),
                "false_positive_rate_met": float(np.mean(arr[:, 1] <= fpr + 1e-12)),
                "both_met": float(
                    np.mean((arr[:, 0] >= 1 - loss - 1e-12) & (arr[:, 1] <= fpr + 1e-12))
                ),
            }
        cells = [
            f"{h['recall']:.3f} / {h['false_positive_rate']:.3f} (both met {h['both_met']:.0%})"
            for h in rec["halves"].values()
        ]
        lines.append(f"| val's random halves ({HALVES}), mean | " + " | ".join(cells) + " |")
        out["val"][val] = rec
    write_report(Path(args.out), "results", out, lines)


if __name__ == "__main__":
    main()
