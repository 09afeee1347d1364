"""``alignsam bench``: time the encoder, decoder and env steps; ``bench perf``: the stock and
fast paths side by side (:mod:`experiments.perf`, :mod:`experiments.segmenter_bench`)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.cli.common import (
    Subcommands,
    add_segmenter_options,
    build_segmenter_from,
    write_json,
)


def add(sub: Subcommands) -> None:
    b = sub.add_parser("bench", help="time encoder, decoder and env steps")
    b.add_argument(
        "what",
        choices=["segmenter", "env", "all", "perf"],
        nargs="?",
        default="all",
        help="perf: stock vs fast (ONNX Runtime) paths side by side, every figure",
    )
    b.add_argument("--dataset", default="kvasir:train")
    b.add_argument("--limit", type=int, default=10)
    b.add_argument("--decode-calls", type=int, default=40)
    b.add_argument("--episodes", type=int, default=8)
    b.add_argument("--out", default=None, help="write the figures as JSON here")
    b.add_argument("--task", default="kvasir_polyp", help="perf: PPO / env / T settings")
    b.add_argument("--agreement-dataset", default=None, help="perf (default: --dataset)")
    b.add_argument("--agreement-images", type=int, default=50)
    b.add_argument("--ppo-rollouts", type=int, default=1)
    b.add_argument("--segment-images", type=int, default=3)
    b.add_argument("--steps", type=int, default=None, help="perf: segment clicks (task's T)")
    add_segmenter_options(b)
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset
    from experiments.segmenter_bench import time_env, time_segmenter
    from segmenter import EmbeddingCache

    samples = load_dataset(args.dataset)[: args.limit]
    if args.what == "perf":
        return _perf(args, samples)
    seg = build_segmenter_from(args)
    result: dict[str, object] = {"segmenter": seg.model_id, "dataset": args.dataset}
    if args.what in ("segmenter", "all"):
        result["segmenter_timing"] = time_segmenter(seg, samples, decode_calls=args.decode_calls)
        t = result["segmenter_timing"]
        print(
            f"[{seg.model_id}, {t['threads']} threads, {t['images']} images]\n"
            f"  encode cold   {t['encode_cold_s_per_image'] * 1000:8.1f} ms/image "
            f"({t['encode_cold_images_per_s']:.2f} images/s)\n"
            f"  encode cached {t['encode_cached_s_per_image'] * 1000:8.1f} ms/image "
            f"({t['encode_cached_images_per_s']:.1f} images/s)\n"
            f"  decode        {t['decode_ms_per_call']:8.1f} ms/call "
            f"(median of {t['decode_calls']})"
        )
    if args.what in ("env", "all"):
        t = time_env(seg, samples, episodes=args.episodes, cache=EmbeddingCache(args.cache))
        result["env_timing"] = t
        print(
            f"  env step      {t['env_step_ms']:8.1f} ms ({t['env_steps_per_s']:.1f} steps/s, "
            f"{t['labeler']} labels)\n"
            f"  bare decoder  {t['decoder_call_ms']:8.1f} ms "
            f"({t['decoder_calls_per_s']:.1f} calls/s)\n"
            f"  ratio env step / decoder call = {t['ratio_step_over_decoder']:.3f} "
            "(target <= 1.10)"
        )
    write_json(args.out, result)
    return 0


def _perf(args: argparse.Namespace, samples: Any) -> int:
    from experiments.datasets import load_dataset
    from experiments.perf import render, run_perf
    from experiments.train import resolve_task
    from segmenter import build_segmenter

    task = resolve_task(args.task)
    task.device = args.device
    kwargs = {"checkpoint": args.checkpoint, "device": args.device}
    stock = build_segmenter(args.segmenter, backend="torch", **kwargs)
    # The fast path where it applies: ONNX Runtime on the CPU; with --bf16 (or on a GPU, where
    # ONNX Runtime does not run here) the stock graph under bf16 autocast if asked, else stock.
    fast = build_segmenter(args.segmenter, backend="auto", autocast_bf16=args.bf16, **kwargs)
    agree = load_dataset(args.agreement_dataset or args.dataset)[: args.agreement_images]
    t0 = time.perf_counter()
    result = run_perf(
        stock,
        fast,
        task,
        samples,
        agree,
        decode_calls=args.decode_calls,
        episodes=args.episodes,
        ppo_rollouts=args.ppo_rollouts,
        segment_images=args.segment_images,
        steps=args.steps or task.env.max_steps,
    )
    result.update(dataset=args.dataset, task=task.name, seconds=time.perf_counter() - t0)
    print(render(result))
    print(f"({result['seconds']:.0f} s)")
    write_json(args.out, result)
    return 0
