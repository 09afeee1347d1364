"""The answer rule chosen on ``val`` alone against the rule chosen on ``val`` and shifted copies
of it (``lookahead.choose_shifts``, :func:`agents.answers.best_answer` over the sets), both
measured on other sets from the same episodes (no new decoder call).

    python docs/tools/shift_choice.py OUT --choose DIR --measure DIR [DIR ...] \
        [--max-worse 0.05 0.1]

``--choose`` holds the episodes of the run on ``val`` and its shifted copies, ``--measure``
those of the sets to report, as ``docs/tools/answer_sets.py`` writes them (``OUT/sets/*.json``:
per image the true IoU and the scores of every path state). Besides the rule chosen on every
shift (``val + shifts``), each measured set ``SPEC@SHIFT`` gets the rule chosen without that
shift's copy of val (``val + other shifts``): what choosing on shifts buys on a shift it never
saw, the situation of an image source nobody made a copy of. Writes ``OUT/results.json`` and
``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from answer_sets import per_image  # the answer of each image under a rule

from agents.answers import WORSE, answer_table, best_answer
from experiments.benchmark.stats import bootstrap_ci


def load_sets(folder: Path) -> dict[str, dict]:
    """``{spec: episodes}`` of a folder of episode files (``kvasir_val_hue.json``: the spec
    is read back from the file name: ``kvasir:val@hue``)."""
    out = {}
    for f in sorted(folder.glob("*.json")):
        head, _, rest = f.stem.partition("_")
        split, _, shift = rest.partition("_")
        if shift == "rest":  # test_rest
            split, shift = f"{split}_rest", ""
        out[f"{head}:{split}" + (f"@{shift}" if shift else "")] = json.loads(f.read_text())
    return out


def tables(sets: dict[str, dict]) -> dict[str, list]:
    return {spec: answer_table(ep["paths"], ep["path_scores"]) for spec, ep in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--choose", required=True, help="episodes on val and its shifted copies")
    ap.add_argument("--measure", nargs="+", required=True, help="episodes of the sets reported")
    ap.add_argument("--max-worse", nargs="+", type=float, default=[0.05, 0.10])
    args = ap.parse_args()
    choose = tables(load_sets(Path(args.choose)))
    val = next(s for s in choose if "@" not in s)
    measure: dict[str, dict] = {}
    for folder in args.measure:
        measure.update(load_sets(Path(folder)))
    result: dict = {"choose_on": list(choose), "bounds": {}}
    lines = ["# Answer rule chosen on val alone vs on val and its shifted copies (issue 31)", ""]
    for bound in args.max_worse:
        rules = {"val": best_answer({val: choose[val]}, "valued", bound)}
        rules["val + shifts"] = best_answer(choose, "valued", bound)
        rec: dict = {"rules": {k: list(v) for k, v in rules.items()}, "sets": {}}
        lines += [
            f"## max_worse {bound:g}",
            "",
            "Chosen: "
            + "; ".join(f"on {k}: {r[0]}, margin {r[1]:g}, {r[2]} clicks" for k, r in rules.items())
            + ".",  # fmt: skip
            "",
            "| set | n | start | chosen on val: mIoU / worse | on val + shifts | difference "
            "[95 %] | on val + the other shifts (rule) | difference [95 %] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for spec, ep in measure.items():
            start = np.array([p[0] for p in ep["paths"]])
            a = per_image(ep, *rules["val"])
            b = per_image(ep, *rules["val + shifts"])
            row = {
                "n": len(start),
                "start": float(start.mean()),
                "val": {"miou": float(a.mean()), "worse": float(np.mean(a < start - 1e-6))},
                "val + shifts": {
                    "miou": float(b.mean()),
                    "worse": float(np.mean(b < start - 1e-6)),
                },
                "difference": float((b - a).mean()),
                "difference_ci95": bootstrap_ci((b - a).tolist()),
            }
            cells = [
                spec, str(len(start)), f"{start.mean():.3f}",
                f"{a.mean():.3f} / {100 * row['val']['worse']:.0f} %",
                f"{b.mean():.3f} / {100 * row['val + shifts']['worse']:.0f} %",
                "{:+.3f} [{:+.3f}, {:+.3f}]".format(row["difference"], *row["difference_ci95"]),
            ]  # fmt: skip
            shift = spec.partition("@")[2]
            others = {s: t for s, t in choose.items() if s.partition("@")[2] != shift}
            if shift and len(others) < len(choose):
                rule = best_answer(others, "valued", bound)
                c = per_image(ep, *rule)
                row["val + other shifts"] = {
                    "rule": list(rule),
                    "miou": float(c.mean()),
                    "worse": float(np.mean(c < start - WORSE)),
                    "difference": float((c - a).mean()),
                    "difference_ci95": bootstrap_ci((c - a).tolist()),
                }
                o = row["val + other shifts"]
                cells += [
                    f"{c.mean():.3f} / {100 * o['worse']:.0f} % ({rule[0]} {rule[1]:g}, {rule[2]})",
                    "{:+.3f} [{:+.3f}, {:+.3f}]".format(o["difference"], *o["difference_ci95"]),
                ]
            else:
                cells += ["-", "-"]
            rec["sets"][spec] = row
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        result["bounds"][f"{bound:g}"] = rec
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
