"""The probe behind issue 31's choices on Kvasir ``val`` and its shifts (docs/results.md, "Images
from elsewhere"): per image, the lookahead agent's episode (every state's IoU and the decoder's
predicted IoU), optionally after re-estimating the SRM's statistics on the set's own images.

    python docs/tools/shift_probe.py RUN OUT.json [--mix F --dark D] SPEC [SPEC ...]

Prints per set the start, the last state and the best-predicted state (mIoU, share of images
worse than the start); OUT.json keeps the per-image paths.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from agents.prompt_agent import PromptAgent
from experiments.datasets import load_dataset
from segmenter import EmbeddingCache
from segmenter.base import mask_iou


def probe(agent, spec: str, mix: float, dark: float | None) -> list[dict]:
    """Per image: ``ious`` and ``predicted`` of every state of the episode (``keep="last"``)."""
    items = []
    for s in load_dataset(spec):
        image = s.load_image()
        emb, _ = agent._embedding(image)
        items.append((s, image, emb))
    if mix > 0:
        pairs = [(emb, (lambda image=image: image)) for _, image, emb in items]
        agent.srm.adapt_statistics(pairs, mix=mix, dark=dark)
    rows = []
    for s, image, emb in items:
        gt = np.asarray(s.mask, bool)
        ep = agent.episode(emb, lambda image=image: image, gt, keep="last")
        rows.append(
            {
                "id": str(s.id),
                "ious": [mask_iou(agent.segmenter.upscale(emb, o.logits), gt) for o in ep.path],
                "predicted": [float(o.prediction.score) for o in ep.path],
            }
        )
    return rows


def report(spec: str, rows: list[dict]) -> str:
    start = np.array([r["ious"][0] for r in rows])
    last = np.array([r["ious"][-1] for r in rows])
    best = np.array([r["ious"][int(np.argmax(r["predicted"]))] for r in rows])
    return (
        f"{spec}: n {len(rows)}, start {start.mean():.3f}, last {last.mean():.3f} "
        f"(worse than start {np.mean(last < start - 1e-6):.0%}), best predicted "
        f"{best.mean():.3f} ({np.mean(best < start - 1e-6):.0%})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("specs", nargs="+")
    p.add_argument("--mix", type=float, default=0.0, help="adapt first with this mix (0: no)")
    p.add_argument("--dark", type=float, default=None, help="adapt: leave out darker cells")
    args = p.parse_args()
    results = {}
    for spec in args.specs:
        agent = PromptAgent.load(args.run, cache=EmbeddingCache())  # fresh statistics per set
        results[spec] = probe(agent, spec, args.mix, args.dark)
        print(report(spec, results[spec]), flush=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
