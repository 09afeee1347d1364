"""``alignsam demo``: the whole job, end to end, on the embedded synthetic task.

On a fresh machine with nothing but the package: generate the task (spotted target blobs among
striped look-alikes, :mod:`envs.synthetic`), fetch the segmenter's weights if needed, train a
lookahead agent (a mask judge picks among decoded candidate clicks, :mod:`agents.lookahead`)
and a small PPO agent (the paper's agent) on the 24 training scenes, the two sharing one SRM
(pretrained once, by the lookahead run; PPO then updates its copy online), then segment the 24
held-out test scenes automatically and compare, on the same frozen segmenter and cached
embeddings, with random clicks labelled by the same SRM and with the simulated manual
annotator. Prints a short table and the paths of the run folders, overlays and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from agents.lookahead import LookaheadConfig
from experiments.benchmark import agent_names, run_benchmark
from experiments.train import resolve_task, train
from segmenter import EmbeddingCache

logger = logging.getLogger(__name__)

#: The demo's PPO budget (the shipped task's own budget is for ``alignsam train``): three PPO
#: updates of 400 steps, validated after the second and the third.
DEMO_BUDGET = {"total_timesteps": 1200, "eval_every": 600, "checkpoint_every": 400}
QUICK_BUDGET = {
    "total_timesteps": 32,
    "eval_every": 32,
    "checkpoint_every": 32,
    "srm_pretrain_epochs": 2,
}
#: The demo's lookahead agent: its judge from 3 folds, one episode per scene and round.
DEMO_LOOKAHEAD = LookaheadConfig(steps=8, proposals=5, folds=3, episodes=1, rounds=2)
QUICK_LOOKAHEAD = LookaheadConfig(steps=2, proposals=2, folds=2, episodes=1, rounds=1)


def run_demo(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = resolve_task("synthetic")
    task.segmenter = args.segmenter
    task.checkpoint = args.checkpoint
    task.device = args.device
    task.bf16 = bool(args.bf16)
    for key, value in (QUICK_BUDGET if args.quick else DEMO_BUDGET).items():
        setattr(task, key, value)
    if args.quick:
        task.env = dataclasses.replace(task.env, max_steps=3)
        task.ppo = dataclasses.replace(task.ppo, n_steps=16, batch_size=16, n_epochs=1)

    runs = Path(args.runs_dir) if args.runs_dir else out / "runs"
    look_task = dataclasses.replace(
        task, agent="lookahead", lookahead=QUICK_LOOKAHEAD if args.quick else DEMO_LOOKAHEAD
    )
    look = train(look_task, runs=runs, cache_dir=args.cache, progress=not args.quick)
    t_look = time.perf_counter() - t_start
    t0 = time.perf_counter()
    shared_srm = Path(look["run_dir"]) / "stages" / "srm.pt"
    summary = train(
        task, runs=runs, cache_dir=args.cache, progress=not args.quick, srm_init=shared_srm
    )
    t_ppo = time.perf_counter() - t0
    result = run_benchmark(
        task,
        [look["run_dir"], summary["run_dir"]],
        split="test",
        limit=4 if args.quick else None,
        out=out / "benchmark",
        cache=EmbeddingCache(args.cache),
        manual_clicks=3 if args.quick else 10,
        methods=["random"],
        progress=not args.quick,
    )
    rows = {r["method"]: r for r in result["methods"]}
    look_name, ppo_name = agent_names([look["run_dir"], summary["run_dir"]])
    labels = {
        look_name: "lookahead agent",
        ppo_name: "PPO agent (paper)",
        "random + SRM (w/o RL)": "random + SRM (w/o RL)",
    }
    labels.update({m: m for m in rows if m.startswith("manual @")})
    print(
        f"\nalignsam demo: synthetic task ({result['n_images']} held-out test scenes), "
        f"{result['segmenter']}; lookahead agent trained in {t_look:.0f} s "
        f"({len(look['judge_rounds'])} judge rounds), PPO agent for {summary['steps']} steps in "
        f"{t_ppo:.0f} s (on the lookahead run's SRM)"
    )
    print(f"{'method':26s} {'clicks':>6s} {'mIoU':>6s}  95% CI          vs lookahead agent")
    for name, label in labels.items():
        r = rows[name]
        lo, hi = r["iou_ci95"]
        diff = ""
        if "diff_vs_agent" in r:
            d, dlo, dhi = r["diff_vs_agent"]
            diff = f"{d:+.3f}" + ("" if dlo <= 0 <= dhi else " (significant)")
        print(f"{label:26s} {r['clicks']:6.1f} {r['iou']:6.3f}  [{lo:.3f}, {hi:.3f}]  {diff}")
    k = result["headline"]["agent_equals_manual_clicks"]
    where = (
        "above the manual budget"
        if k is None
        else ("below one manual click" if k < 1 else f"{k:.1f} manual clicks")
    )
    bench = out / "benchmark"
    print(f"The lookahead agent's mIoU equals {where} (simulated annotator on the same SAM).")
    print(f"run folders: {look['run_dir']}, {summary['run_dir']}  (tensorboard --logdir RUN/tb)")
    print(f"overlays:   {bench / 'examples.png'}\nplot:       {bench / 'curves.png'}")
    print(f"table:      {bench / 'results.md'}")
    print(f"Wall time {time.perf_counter() - t_start:.0f} s.")
    return 0
