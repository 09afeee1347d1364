"""How the Kvasir lookahead settings were chosen: every variant on `val` (and on colour-shifted
and downscaled `val`), never on `test`. Not part of the package; run from the repo root:

    python docs/results/lookahead_val/choose_on_val.py RUN [OUT.json]

RUN is a `kvasir_polyp_lookahead` run trained with the judge alone and the stop rule on (the
settings before this choice). Each line is (val mIoU, mean clicks after the start).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from agents.lookahead import JUDGE_FEATURES
from agents.prompt_agent import PromptAgent
from experiments.datasets import load_dataset
from experiments.lookahead import evaluate_lookahead
from experiments.runs import load_split
from segmenter import EmbeddingCache

DICE = JUDGE_FEATURES.index("soft_dice")


def main(run: str, out: str | None) -> None:
    agent = PromptAgent.load(run, cache=EmbeddingCache())
    judge = agent.judge
    val = load_split(agent.task, "val")
    results: dict[str, tuple[float, float]] = {}

    def z(v: np.ndarray) -> np.ndarray:
        s = float(v.std())
        return (v - v.mean()) / (s if s > 1e-9 else 1.0)

    class Blend:  # the judge plus the SRM agreement (what lookahead.agreement now does)
        @staticmethod
        def predict(f: np.ndarray) -> np.ndarray:
            return z(np.asarray(judge.predict(f), float)) + z(f[:, DICE])

    def ev(name: str, data=val, chooser: str = "judge", blend: bool = False, **cfg) -> None:
        old = {k: getattr(agent.config, k) for k in cfg}
        for k, v in cfg.items():
            setattr(agent.config, k, v)
        agent.judge = Blend() if blend else judge
        r = evaluate_lookahead(agent, data, progress=False, chooser=chooser)
        agent.judge = judge
        for k, v in old.items():
            setattr(agent.config, k, v)
        results[name] = (round(r["miou"], 4), r["mean_steps"])
        print(name, results[name], flush=True)

    ev("judge, stop")
    ev("judge, no stop", stop=False)
    ev("judge, stop, k=8", proposals=8)
    ev("judge, stop, T=12", steps=12)
    ev("judge, no stop, k=8", stop=False, proposals=8)
    ev("judge + agreement, stop", blend=True)
    ev("judge + agreement, no stop", blend=True, stop=False)
    ev("agreement, no stop", chooser="agreement", stop=False)
    ev("SRM-confident heuristic", chooser="heuristic", stop=False)
    ev("true IoU (ceiling), stop", chooser="oracle")
    for spec in ("kvasir:val@colour", "kvasir:val@down384"):
        data = load_dataset(spec)
        ev(f"{spec}: judge + agreement, stop", data, blend=True)
        ev(f"{spec}: judge + agreement, no stop", data, blend=True, stop=False)
        ev(f"{spec}: SRM-confident heuristic", data, chooser="heuristic", stop=False)
    if out:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
