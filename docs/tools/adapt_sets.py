"""The lookahead run adapted on each set's own images (``alignsam adapt``, no labels) against
the run as trained, per set: mIoU with 95 % intervals, the paired difference, the start and the
share of images worse than their start, under the run's answer rule and under the old ``last``
rule (both read off ``val``; the sets are never used to choose).

    python docs/tools/adapt_sets.py RUN OUT --plain DIR --sets kvasir:test kvasir:test@hue ...

``--plain DIR`` is ``docs/tools/answer_sets.py``'s ``OUT/sets`` for the same run and sets (the
episodes of the run as trained); the adapted runs go to ``OUT/runs/``, their episodes to
``OUT/sets/`` (a rerun skips what is there); ``OUT/results.json`` and ``results.md`` are
rewritten after every set.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from answer_sets import per_image, set_name

from agents.answers import best_answer
from agents.prompt_agent import PromptAgent
from experiments.adapt import adapt_run
from experiments.benchmark.stats import bootstrap_ci
from experiments.cli.common import veto as cli_veto
from experiments.datasets import load_dataset
from experiments.lookahead import evaluate_lookahead
from segmenter import EmbeddingCache


def compare(plain: dict, adapted: dict, rules: dict[str, tuple[str, float, int]]) -> dict:
    out: dict = {}
    for tag, ep in (("plain", plain), ("adapted", adapted)):
        start = np.array([p[0] for p in ep["paths"]])
        out[f"start_{tag}"] = float(start.mean())
    for name, rule in rules.items():
        row: dict = {}
        vals = {}
        for tag, ep in (("plain", plain), ("adapted", adapted)):
            start = np.array([p[0] for p in ep["paths"]])
            v = per_image(ep, *rule)
            vals[tag] = v
            row[tag] = {
                "miou": float(v.mean()),
                "ci95": bootstrap_ci(v.tolist()),
                "worse_than_start": float(np.mean(v < start - 1e-6)),
                "below_start": bool(v.mean() < start.mean()),
            }
        d = vals["adapted"] - vals["plain"]
        row["adapted_minus_plain"] = float(d.mean())
        row["adapted_minus_plain_ci95"] = bootstrap_ci(d.tolist())
        out[name] = row
    return out


def markdown(result: dict) -> str:
    a, b = result.get("names", ["plain", "adapted"])
    lines = [f"# The run {b} on each set's images vs {a} (issue 31)", ""]
    for name, rule in result["rules"].items():
        lines += [
            f"## {name}: {rule[0]}, margin {rule[1]}, {rule[2]} clicks",
            "",
            f"| set | start: {a} / {b} | {a} | {b} | {b} - {a} [95 %] "
            f"| worse than start: {a} / {b} |",
            "|---|---|---|---|---|---|",
        ]
        for spec, s in result["sets"].items():
            r = s[name]
            lo, hi = r["adapted_minus_plain_ci95"]
            lines.append(
                f"| {spec} | {s['start_plain']:.3f} / {s['start_adapted']:.3f} "
                f"| {r['plain']['miou']:.3f} | {r['adapted']['miou']:.3f} "
                f"| {r['adapted_minus_plain']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                f"| {100 * r['plain']['worse_than_start']:.0f} % / "
                f"{100 * r['adapted']['worse_than_start']:.0f} % |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--plain", required=True)
    ap.add_argument("--sets", nargs="+", required=True)
    ap.add_argument("--max-worse", type=float, default=0.05)
    ap.add_argument("--clicks", type=int, default=3)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--self-train", type=int, default=0, help="alignsam adapt --self-train")
    ap.add_argument(
        "--veto",
        default="source",
        help="alignsam adapt --veto (default source: the statistics alone, as measured before "
        "adapt chose a veto; the answers here are read off the episodes by rule anyway)",
    )
    ap.add_argument(
        "--statistics",
        choices=("auto", "always"),
        default="always",
        help="alignsam adapt --statistics (default always: what re-estimating does, whatever "
        "the drift; adapt's own default leaves runs unchanged at a drift like the training "
        "images')",
    )
    ap.add_argument(
        "--names",
        nargs=2,
        default=["plain", "adapted"],
        metavar=("PLAIN", "NEW"),
        help="what --plain's and this run's episodes are called in results.md",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out, cache = Path(args.out), EmbeddingCache(args.cache)
    (out / "sets").mkdir(parents=True, exist_ok=True)
    summary = json.loads((Path(args.run) / "summary.json").read_text())
    rules = {
        "old (last:3)": ("last", 0.0, 3),
        f"val-chosen, max_worse {args.max_worse:g}": best_answer(
            summary["val_answers"], "last", args.max_worse
        ),
    }
    result = {"run": args.run, "rules": rules, "sets": {}, "names": args.names,
              "self_train": args.self_train}  # fmt: skip
    for spec in args.sets:
        f = out / "sets" / (set_name(spec) + ".json")
        if not f.is_file():
            t0 = time.perf_counter()
            adapted = out / "runs" / set_name(spec)
            if not adapted.is_dir():
                veto = args.veto if args.veto in ("source", "auto") else cli_veto(args.veto)
                adapt_run(args.run, [spec], adapted, cache=cache, self_train=args.self_train,
                          veto=veto, statistics=args.statistics)  # fmt: skip
            agent = PromptAgent.load(adapted, cache=cache)
            agent.config.clicks = args.clicks
            ev = evaluate_lookahead(agent, load_dataset(spec), progress=True)
            keep = {k: ev[k] for k in ("paths", "path_scores", "miou")}
            keep["seconds"] = time.perf_counter() - t0
            f.write_text(json.dumps(keep))
        plain = json.loads((Path(args.plain) / (set_name(spec) + ".json")).read_text())
        result["sets"][spec] = compare(plain, json.loads(f.read_text()), rules)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        (out / "results.md").write_text(markdown(result))
        print(f"{spec}: done", flush=True)


if __name__ == "__main__":
    main()
