"""The decoder's veto on the value model's answer (``lookahead.veto``), measured from recorded
episodes (no new decoder call): for each veto, the answer rule chosen on ``val`` alone and on
``val`` with its shifted copies, then each measured set's mIoU, share of images worse than
their start, and the paired difference from the same choice without a veto.

    python docs/tools/veto_sets.py OUT --choose DIR --measure DIR [DIR ...] \
        [--vetoes none 0.05 0.02 0] [--max-worse 0.05]

``--choose`` and ``--measure`` hold episode files as ``docs/tools/answer_sets.py`` writes them
(per image the true IoU and the scores of every path state, ``best_predicted`` being the
decoder's own predicted IoU); a ``--measure`` folder's name is prefixed to its sets' names
when several are given (``adapt_n400/sets`` -> ``adapt_n400:kvasir:test@hue``). Writes
``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from answer_sets import per_image
from shift_choice import load_sets

from agents.answers import WORSE, answer_table, best_answer
from experiments.benchmark.stats import bootstrap_ci


def _veto(text: str) -> float | None:
    return None if text == "none" else float(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--choose", required=True, help="episodes on val and its shifted copies")
    ap.add_argument("--measure", nargs="+", required=True, help="episodes of the sets reported")
    ap.add_argument("--vetoes", nargs="+", type=_veto, default=[None, 0.05, 0.02, 0.0])
    ap.add_argument("--max-worse", type=float, default=0.05)
    args = ap.parse_args()
    choose = load_sets(Path(args.choose))
    val = next(s for s in choose if "@" not in s)
    measure: dict[str, dict] = {}
    for folder in args.measure:
        prefix = f"{Path(folder).parent.name}:" if len(args.measure) > 1 else ""
        measure.update({prefix + k: v for k, v in load_sets(Path(folder)).items()})
    rules: dict[str, dict[str, tuple]] = {}
    for veto in args.vetoes:
        tables = {
            s: answer_table(e["paths"], e["path_scores"], veto=veto) for s, e in choose.items()
        }
        rules[str(veto)] = {
            "val": (*best_answer({val: tables[val]}, "valued", args.max_worse), veto),
            "val + shifts": (*best_answer(tables, "valued", args.max_worse), veto),
        }
    result: dict = {"choose_on": list(choose), "max_worse": args.max_worse, "rules": rules}
    lines = [
        "# The decoder's veto on the value model's answer (issue 31)",
        "",
        f"Answer rules chosen under max_worse {args.max_worse:g} (keep, margin, clicks, veto):",
        "",
    ]
    for veto, r in rules.items():
        lines.append(f"- veto {veto}: " + "; ".join(f"on {k}: {v}" for k, v in r.items()))
    result["sets"] = {}
    for basis in ("val", "val + shifts"):
        lines += [
            "",
            f"## Chosen on {basis}",
            "",
            "mIoU / share worse than the start; the difference from no veto, paired, 95 %; "
            "`<` marks a mean below the start.",
            "",
            "| set | n | start | " + " | ".join(f"veto {v}" for v in rules) + " |",
            "|---|---|---|" + "---|" * len(rules),
        ]
        for spec, ep in measure.items():
            start = np.array([p[0] for p in ep["paths"]])
            base = None
            cells = [spec, str(len(start)), f"{start.mean():.3f}"]
            for veto, r in rules.items():
                v = per_image(ep, *r[basis])
                rec = {
                    "miou": float(v.mean()),
                    "worse": float(np.mean(v < start - WORSE)),
                    "below_start": bool(v.mean() < start.mean()),
                }
                text = f"{v.mean():.3f} / {100 * rec['worse']:.0f} %"
                if base is None:
                    base = v
                else:
                    d = v - base
                    rec["vs_no_veto"] = float(d.mean())
                    rec["vs_no_veto_ci95"] = bootstrap_ci(d.tolist())
                    text += " ({:+.3f} [{:+.3f}, {:+.3f}])".format(
                        d.mean(), *rec["vs_no_veto_ci95"]
                    )
                cells.append(text + (" <" if rec["below_start"] else ""))
                result["sets"].setdefault(basis, {}).setdefault(
                    spec, {"start": float(start.mean())}
                )
                result["sets"][basis][spec][veto] = rec
            lines.append("| " + " | ".join(cells) + " |")
    write_report(Path(args.out), "results", result, lines)


def write_report(folder: Path, stem: str, result: dict, lines: list[str]) -> None:
    """``FOLDER/STEM.json`` and ``FOLDER/STEM.md`` (the lines, also printed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
