"""An idea for adapted runs, measured from recorded episodes and not built: per image, start
from the source run's SRM map or the adapted one's, whichever start mask the frozen decoder
predicts better. Only the SRM's statistics differ between the two runs and the episode reads
the SRM through its map before the first click, so an image's episode from the picked map is
the recorded episode of that run; the answer takes the adapted run's rule and veto.

    PYTHONPATH=docs/tools python docs/tools/start_pick.py OUT \
        --plain docs/results/unseen/noharm_n400/sets \
        --adapted docs/results/unseen/adapt_n400/sets \
        --auto docs/results/unseen/veto_n400/auto.json

``--auto``: ``auto_veto.py``'s record (the answer rule, each set's veto). Writes
``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from answer_sets import per_image
from shift_choice import load_sets
from veto_sets import write_report

from agents.answers import WORSE
from experiments.benchmark.stats import bootstrap_ci


def _start(episodes: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each image's true IoU of the start and the decoder's predicted IoU of it."""
    true = np.array([p[0] for p in episodes["paths"]])
    predicted = np.array([s[0] for s in episodes["path_scores"]["best_predicted"]])
    return true, predicted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--plain", required=True)
    ap.add_argument("--adapted", required=True)
    ap.add_argument("--auto", required=True)
    args = ap.parse_args()
    plain, adapted = load_sets(Path(args.plain)), load_sets(Path(args.adapted))
    auto = json.loads(Path(args.auto).read_text())
    rule = tuple(auto["rule"])
    lines = [
        "# Picking the start per image between the source and the adapted SRM (issue 31)",
        "",
        f"Answer rule {rule}, each set's veto as `adapt --veto auto` set it. mIoU / share of "
        "images worse than their own start; the last column: picked minus adapted, paired.",
        "",
        "| set | start: source / adapted / picked | picked adapted | not adapted | adapted | "
        "picked | picked - adapted [95 %] |",
        "|---|---|---|---|---|---|---|",
    ]
    out: dict = {"rule": list(rule), "sets": {}}
    for spec, rec in auto["sets"].items():
        veto = rec["veto"]
        (s_src, q_src), (s_ad, q_ad) = _start(plain[spec]), _start(adapted[spec])
        pick = q_ad >= q_src
        start = np.where(pick, s_ad, s_src)
        not_adapted = per_image(plain[spec], *rule)
        ad = per_image(adapted[spec], *rule, veto)
        picked = np.where(pick, ad, per_image(plain[spec], *rule, veto))
        ci = bootstrap_ci((picked - ad).tolist())

        def cell(v: np.ndarray, s: np.ndarray) -> str:
            return f"{v.mean():.3f} / {100 * np.mean(v < s - WORSE):.0f} %"

        lines.append(
            f"| {spec} | {s_src.mean():.3f} / {s_ad.mean():.3f} / {start.mean():.3f} | "
            f"{100 * pick.mean():.0f} % | {cell(not_adapted, s_src)} | {cell(ad, s_ad)} | "
            f"{cell(picked, start)} | {(picked - ad).mean():+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] |"
        )
        out["sets"][spec] = {
            "veto": veto,
            "start": {"source": s_src.mean(), "adapted": s_ad.mean(), "picked": start.mean()},
            "picked_adapted_share": pick.mean(),
            "not_adapted": not_adapted.mean(),
            "adapted": ad.mean(),
            "picked": picked.mean(),
            "picked_worse_than_start": np.mean(picked < start - WORSE),
            "picked_minus_adapted": (picked - ad).mean(),
            "picked_minus_adapted_ci95": ci,
        }
    out = json.loads(json.dumps(out, default=float))
    write_report(Path(args.out), "results", out, lines)


if __name__ == "__main__":
    main()
