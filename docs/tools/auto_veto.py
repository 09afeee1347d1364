"""``alignsam adapt --veto auto`` on the shifted Kvasir sets, from recorded episodes: per set the
feature drift ratio ``adapt`` measured (``adapted.json``), the veto it turned on, and the mIoU
of the adapted agent with that veto against the agent not adapted (no new decoder call).

    python docs/tools/auto_veto.py OUT --choose DIR --plain DIR --adapted DIR \
        --runs RUN2 [RUN2 ...] [--max-worse 0.05]

``--choose``: the episodes on ``val`` the source run's answer rule is chosen on (as training
does; the adapted run keeps that rule and adds the veto); ``--plain`` / ``--adapted``: the test
sets' episodes of the source run and of the runs adapted on each set
(``docs/tools/answer_sets.py``, ``docs/tools/adapt_sets.py``);
``--runs``: adapted run folders, or their ``adapted.json`` files, made by ``alignsam adapt``
with the default ``--veto auto``, one per measured set (others are listed with their drift), or
an ``auto.json`` this script wrote (the drifts it records). ``--statistics auto`` (as ``adapt``'s
default) scores a set whose drift is within the threshold with the episodes of the run not
adapted (``adapt`` writes the run unchanged there); ``always``: with the adapted episodes.
Writes ``OUT/auto.json`` and
``OUT/auto.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from answer_sets import per_image
from shift_choice import load_sets
from veto_sets import write_report

from agents.answers import WORSE, answer_table, best_answer
from experiments.benchmark.stats import bootstrap_ci


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--choose", required=True)
    ap.add_argument("--plain", required=True)
    ap.add_argument("--adapted", required=True)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--max-worse", type=float, default=0.05)
    ap.add_argument("--statistics", choices=("auto", "always"), default="auto")
    args = ap.parse_args()
    choose = load_sets(Path(args.choose))
    val = next(s for s in choose if "@" not in s)
    # the source run's rule, chosen on val as training chooses it; adapt keeps it and adds the
    # veto where it turns the veto on
    table = answer_table(choose[val]["paths"], choose[val]["path_scores"])
    rule = best_answer({val: table}, "valued", args.max_worse)
    plain, adapted = load_sets(Path(args.plain)), load_sets(Path(args.adapted))
    records = {}
    for r in args.runs:
        f = Path(r) / "adapted.json" if Path(r).is_dir() else Path(r)
        rec = json.loads(f.read_text())
        if "inputs" not in rec:  # an earlier auto.json: its drift records
            records.update(rec["drift"])
            continue
        (spec,) = rec["inputs"]
        records[spec] = {k: rec[k] for k in ("veto", "drift", "shift", "images")}
    lines = [
        "# `alignsam adapt --veto auto` on shifted Kvasir test sets (issue 31)",
        "",
        f"The source run's answer rule, chosen on {val} (max_worse {args.max_worse:g}): "
        f"{rule}; the adapted run keeps it, with the veto `adapt` set.",
        *(
            [
                "Statistics re-estimated only where the drift exceeds the threshold "
                "(`adapt --statistics auto`); below it the run is unchanged: its episodes are "
                "the ones not adapted.",
            ]
            if args.statistics == "auto"
            else []
        ),
        "",
        "| set | drift (x training images') | veto | start | not adapted | adapted, no veto | "
        "adapted, auto veto | auto vs not adapted [95 %] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out: dict = {"rule": list(rule), "statistics": args.statistics, "sets": {}}
    for spec, rec in records.items():
        if spec not in plain or spec not in adapted:
            continue
        start = np.array([p[0] for p in plain[spec]["paths"]])
        ratio = rec["shift"]["ratio"]
        kept = (
            args.statistics == "auto" and ratio is not None and ratio <= rec["shift"]["threshold"]
        )
        ran = plain[spec] if kept else adapted[spec]  # the statistics kept: the run unchanged
        a = per_image(plain[spec], *rule)
        b = per_image(ran, *rule)
        c = per_image(ran, *rule, rec["veto"])
        ci = bootstrap_ci((c - a).tolist())

        def cell(v: np.ndarray, s: np.ndarray) -> str:
            return f"{v.mean():.3f} / {100 * np.mean(v < s - WORSE):.0f} %"

        a_start = np.array([p[0] for p in ran["paths"]])
        lines.append(
            f"| {spec} | {rec['drift']:.3f} ({ratio:.2f}) | {rec['veto']} | {start.mean():.3f} | "
            f"{cell(a, start)} | {cell(b, a_start)} | {cell(c, a_start)} | "
            f"{(c - a).mean():+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] |"
        )
        out["sets"][spec] = {
            **rec,
            "statistics_re_estimated": not kept,
            "start": float(start.mean()),
            "adapted_start": float(a_start.mean()),
            "not_adapted": float(a.mean()),
            "not_adapted_ci95": list(bootstrap_ci(a.tolist())),
            "not_adapted_worse": float(np.mean(a < start - WORSE)),
            "adapted_no_veto": float(b.mean()),
            "adapted_auto": float(c.mean()),
            "adapted_auto_ci95": list(bootstrap_ci(c.tolist())),
            "adapted_auto_worse": float(np.mean(c < a_start - WORSE)),
            "auto_vs_not_adapted": float((c - a).mean()),
            "auto_vs_not_adapted_ci95": ci,
        }
    lines += [
        "",
        "mIoU / share of images worse than their start (the adapted run's start for the adapted "
        "columns).",
        "",
        "## The drift `adapt` measured, every run given",
        "",
        "| images | n | drift | x the training images' | veto |",
        "|---|---|---|---|---|",
    ]
    for spec, rec in records.items():
        t = rec["shift"] or {}
        ratio = "-" if t.get("ratio") is None else f"{t['ratio']:.2f}"
        lines.append(f"| {spec} | {rec['images']} | {rec['drift']:.3f} | {ratio} | {rec['veto']} |")
    out["drift"] = records
    write_report(Path(args.out), "auto", out, lines)


if __name__ == "__main__":
    main()
