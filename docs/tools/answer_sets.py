"""Score a lookahead run's answer rules on several image sets from the same episodes: the rule
chosen on ``val`` under two bounds on the images made worse (``--max-worse``), the rule the run
had before (``last`` after its clicks) and the start, per set: mIoU with its 95 % interval, the
share of images whose answer is worse than their start (true IoU), and the paired difference
to the old rule. The rules are read off ``val`` only (``RUN/summary.json``'s ``val_answers``);
the sets are never used to choose.

    python docs/tools/answer_sets.py RUN OUT --sets kvasir:test kvasir:test@hue ...
        [--max-worse 0.1 0.05] [--old last:3] [--clicks 3]

Each set's episodes are kept in ``OUT/sets/`` (a rerun skips the sets already there);
``OUT/results.json`` and ``OUT/results.md`` are rewritten after every set.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from agents.answers import answers, best_answer
from agents.prompt_agent import PromptAgent
from experiments.benchmark.stats import bootstrap_ci
from experiments.datasets import load_dataset
from experiments.lookahead import evaluate_lookahead
from segmenter import EmbeddingCache


def set_name(spec: str) -> str:
    """The file stem of a set's episodes and outputs: ``kvasir:test@hue`` -> ``kvasir_test_hue``."""
    return spec.replace(":", "_").replace("@", "_")


def per_image(
    episodes: dict, keep: str, margin: float, k: int, veto: float | None = None
) -> np.ndarray:
    """Each image's true IoU of the answer after ``k`` clicks under ``keep`` and ``margin``
    (and ``veto``: the decoder's scores are those of ``best_predicted``)."""
    out = []
    for i, path in enumerate(episodes["paths"]):
        scores = episodes["path_scores"][keep][i] if keep != "last" else None
        decoder = episodes["path_scores"]["best_predicted"][i] if veto is not None else None
        idx = answers(scores, keep, margin, len(path), decoder, veto)
        out.append(path[idx[min(k, len(idx) - 1)]])
    return np.array(out)


def summarize(episodes: dict, rules: dict[str, tuple[str, float, int]], old: str) -> dict:
    start = np.array([p[0] for p in episodes["paths"]])
    rows = {"start": {"miou": float(start.mean()), "ci95": bootstrap_ci(start.tolist())}}
    base = per_image(episodes, *rules[old])
    for name, (keep, margin, k) in rules.items():
        v = per_image(episodes, keep, margin, k)
        rows[name] = {
            "keep": keep,
            "margin": margin,
            "clicks": k,
            "miou": float(v.mean()),
            "ci95": bootstrap_ci(v.tolist()),
            "worse_than_start": float(np.mean(v < start - 1e-6)),
            "below_start_by_0.05": float(np.mean(v < start - 0.05)),
            "vs_old": float((v - base).mean()),
            "vs_old_ci95": bootstrap_ci((v - base).tolist()),
        }
    return {"n": len(start), "rows": rows}


def markdown(result: dict) -> str:
    names = list(result["rules"])
    lines = [
        "# Answer rules across image sets (issue 31, do no harm)",
        "",
        f"Run `{result['run']}`; rules chosen on val: "
        + "; ".join(
            f"{n} = {r[0]}, margin {r[1]}, {r[2]} clicks" for n, r in result["rules"].items()
        ),
        "",
        "| set | n | start | "
        + " | ".join(f"{n} mIoU [95 %] / worse than start" for n in names)
        + " | "
        + " | ".join(f"{n} - {result['old']}" for n in names if n != result["old"])
        + " |",
        "|---" * (3 + len(names) + len(names) - 1) + "|",
    ]
    for spec, s in result["sets"].items():
        r = s["rows"]
        cells = [spec, str(s["n"]), f"{r['start']['miou']:.3f}"]
        for n in names:
            lo, hi = r[n]["ci95"]
            worse = 100 * r[n]["worse_than_start"]
            cells.append(f"{r[n]['miou']:.3f} [{lo:.3f}, {hi:.3f}] / {worse:.0f} %")
        for n in names:
            if n != result["old"]:
                lo, hi = r[n]["vs_old_ci95"]
                cells.append(f"{r[n]['vs_old']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--sets", nargs="+", required=True)
    ap.add_argument("--max-worse", nargs="+", type=float, default=[0.10, 0.05])
    ap.add_argument("--old", default="last:3", help="KEEP:CLICKS of the rule before")
    ap.add_argument("--clicks", type=int, default=3, help="clicks the episodes run")
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    (out / "sets").mkdir(parents=True, exist_ok=True)
    summary = json.loads((Path(args.run) / "summary.json").read_text())
    old_keep, old_k = args.old.split(":")
    rules = {f"old ({args.old})": (old_keep, 0.0, int(old_k))}
    for bound in args.max_worse:
        keep, margin, k = best_answer(summary["val_answers"], "last", bound)
        k = min(k, args.clicks)
        rules[f"val-chosen, max_worse {bound:g}"] = (keep, margin, k)
    old = f"old ({args.old})"
    agent = PromptAgent.load(args.run, cache=EmbeddingCache(args.cache))
    agent.config.clicks = args.clicks
    result = {"run": args.run, "rules": rules, "old": old, "clicks_run": args.clicks, "sets": {}}
    for spec in args.sets:
        f = out / "sets" / (set_name(spec) + ".json")
        if not f.is_file():
            t0 = time.perf_counter()
            ev = evaluate_lookahead(agent, load_dataset(spec), progress=True)
            keep = {k: ev[k] for k in ("paths", "path_scores", "miou")}
            keep["seconds"] = time.perf_counter() - t0
            f.write_text(json.dumps(keep))
        result["sets"][spec] = summarize(json.loads(f.read_text()), rules, old)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        (out / "results.md").write_text(markdown(result))
        print(markdown(result).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
