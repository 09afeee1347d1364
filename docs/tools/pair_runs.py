"""Two lookahead runs on the same image sets, paired per image: each run answers with its own
rule chosen on ``val`` (``docs/tools/answer_sets.py``'s ``val-chosen, max_worse B`` row), and per
set the table gives the start, mIoU [95 %] and the share of images worse than their start of
both runs, and the paired difference B - A with its 95 % interval.

    python docs/tools/pair_runs.py A_OUT B_OUT OUT --names "as shipped" "shifted copies"
        [--bound 0.05]

``A_OUT`` and ``B_OUT`` are ``answer_sets.py`` output folders (``results.json`` and ``sets/``)
of the two runs over the same sets; ``OUT/results.json`` and ``OUT/results.md`` are written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from answer_sets import per_image, set_name

from experiments.benchmark.stats import bootstrap_ci


def _side(folder: Path, bound: float) -> tuple[dict, tuple[str, float, int]]:
    result = json.loads((folder / "results.json").read_text())
    keep, margin, k = result["rules"][f"val-chosen, max_worse {bound:g}"]
    return result, (keep, float(margin), int(k))


def _episodes(folder: Path, spec: str) -> dict:
    return json.loads((folder / "sets" / (set_name(spec) + ".json")).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("out")
    ap.add_argument("--names", nargs=2, default=["A", "B"])
    ap.add_argument("--bound", type=float, default=0.05, help="the val rule's max_worse")
    args = ap.parse_args()
    folders = [Path(args.a), Path(args.b)]
    (ra, rule_a), (rb, rule_b) = (_side(f, args.bound) for f in folders)
    sets = [s for s in ra["sets"] if s in rb["sets"]]
    out: dict = {
        "runs": {args.names[0]: ra["run"], args.names[1]: rb["run"]},
        "rules": {args.names[0]: rule_a, args.names[1]: rule_b},
        "bound": args.bound,
        "sets": {},
    }
    na, nb = args.names
    lines = [
        f"# {nb} against {na}, per image",
        "",
        f"Rules chosen on val (max_worse {args.bound:g}): {na} = {rule_a[0]}, "
        f"margin {rule_a[1]:g}, {rule_a[2]} clicks (`{ra['run']}`); {nb} = {rule_b[0]}, "
        f"margin {rule_b[1]:g}, "
        f"{rule_b[2]} clicks (`{rb['run']}`). mIoU [95 %] / share of images worse than their "
        "start; the difference is paired per image.",
        "",
        f"| set | n | start: {na} / {nb} | {na} | {nb} | {nb} - {na} [95 %] |",
        "|---|---|---|---|---|---|",
    ]
    for spec in sets:
        row = {}
        values = []
        for name, folder, rule in ((na, folders[0], rule_a), (nb, folders[1], rule_b)):
            ep = _episodes(folder, spec)
            start = np.array([p[0] for p in ep["paths"]])
            v = per_image(ep, *rule)
            values.append(v)
            row[name] = {
                "start": float(start.mean()),
                "miou": float(v.mean()),
                "ci95": bootstrap_ci(v.tolist()),
                "worse_than_start": float(np.mean(v < start - 1e-6)),
            }
        if len(values[0]) != len(values[1]):
            raise SystemExit(f"{spec}: {len(values[0])} images in {na}, {len(values[1])} in {nb}")
        d = values[1] - values[0]
        row["difference"] = float(d.mean())
        row["difference_ci95"] = bootstrap_ci(d.tolist())
        out["sets"][spec] = row
        a, b = row[na], row[nb]
        lo, hi = row["difference_ci95"]
        cell = [
            f"{r['miou']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] / "
            f"{100 * r['worse_than_start']:.0f} %"
            for r in (a, b)
        ]
        lines.append(
            f"| `{spec}` | {len(d)} | {a['start']:.3f} / {b['start']:.3f} | {cell[0]} | {cell[1]} "
            f"| {row['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )
    target = Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(out, indent=2))
    (target / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
