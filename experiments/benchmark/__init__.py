"""``alignsam benchmark``: trained agents against manual prompting and the method's ablations.

Every method prompts the same frozen segmenter on the same images with the same cached
embeddings, and is scored on its final full-resolution mask:

* ``agent``: each trained run (SRM start points, T policy clicks, SRM labels);
* ``agent w/o SRM``: the same policy, every click labelled positive (observation and start
  still from the SRM, so the policy sees what it was trained on);
* ``agent single step``: the SRM start and one policy click;
* ``random + SRM (w/o RL)``, ``centre + SRM``, ``grid + SRM``, ``SRM-confident``: fixed click
  policies in the same environment with the same SRM (:class:`~agents.clickers.EnvClicker`);
* ``SRM start only``: the two SRM initial points, no further click;
* ``one-shot similarity``: PerSAM-style points from one training image's prototype, and the
  few-shot variant from every training image (:class:`~agents.clickers.OneShotSimilarity`);
* ``manual @k``: the simulated annotator (RITM protocol, reads the ground truth) after k clicks;
* ``fine-tuned ...`` (``finetuned=`` deltas of ``alignsam finetune``): the fine-tuned segmenter
  (a) with no prompt, (b) with the SRM's two start points, and for a decoder delta (c) the
  reference agent prompting the fine-tuned decoder (same embeddings, so the same policy input);
* ``automatic masks + SRM pick`` and its oracle pick (``amg``): SAM's stock automatic mask
  generator on the cached embedding, then the union of the masks the SRM calls foreground, or
  the mask closest to the ground truth (a ceiling that reads the answer).

Metrics per image (:mod:`segmenter.metrics`): IoU, Dice, F-beta (beta^2 = 0.3), MAE, BER (%),
E-measure; per method their means, a percentile-bootstrap 95 % interval of the mIoU, and for
each method a paired bootstrap interval of its mIoU difference to the first agent. Outputs:
``results.json``, ``results.md``, ``curves.png`` (mIoU vs clicks), ``examples.png`` (best,
median and worst images of the first agent).

Layout: the methods table (:mod:`~experiments.benchmark.methods`), running them
(:mod:`~experiments.benchmark.runner`), per-method results and ``results.json``
(:mod:`~experiments.benchmark.results`), statistics (:mod:`~experiments.benchmark.stats`) and
the reports (:mod:`~experiments.benchmark.report`).
"""

import importlib
from typing import Any

#: Where each public name lives; loaded on first use, so that reading the methods table
#: (``alignsam --help``) does not import torch.
_EXPORTS = {
    "MANUAL_KS": "results",
    "agent_names": "runner",
    "METHODS": "methods",
    "METHOD_GROUPS": "methods",
    "METRICS": "results",
    "MethodContext": "methods",
    "MethodGroup": "methods",
    "MethodOptions": "methods",
    "MethodResult": "results",
    "Shard": "results",
    "bootstrap_ci": "stats",
    "merge_shards": "results",
    "paired_diff_ci": "stats",
    "plot_curves": "report",
    "plot_examples": "report",
    "position_on_curve": "stats",
    "register_method": "methods",
    "render_markdown": "report",
    "run_benchmark": "runner",
    "run_methods": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
