"""``alignsam bench``: time the encoder, decoder and env steps; ``bench perf``: the stock and
fast paths side by side (:mod:`experiments.perf`, :mod:`experiments.segmenter_bench`)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.cli.common import (
    Subcommands,
    add_deprecated_alias,
    add_segmenter_options,
    build_segmenter_from,
    non_negative_int,
    positive_int,
    write_json,
)


def add(sub: Subcommands) -> None:
    b = sub.add_parser(
        "bench",
        help="time encoder, decoder and env steps",
        description="Timings. segmenter / env / all: the encoder, decoder and env steps; perf: "
        "the stock and fast (ONNX Runtime) paths side by side, every figure; ppo: PPO training "
        "env-steps/s with --task's settings; contention: ppo alone and beside one CPU-bound "
        "process the command starts.",
    )
    b.add_argument(
        "what",
        choices=["segmenter", "env", "all", "perf", "ppo", "contention"],
        nargs="?",
        default="all",
        help="what to time",
    )
    b.add_argument("--dataset", default="kvasir:train", help="dataset spec of the images")
    b.add_argument(
        "--limit", type=positive_int, default=10, metavar="N", help="first N images of --dataset"
    )
    b.add_argument(
        "--decode-calls", type=positive_int, default=40, metavar="N", help="decoder calls timed"
    )
    b.add_argument(
        "--episodes", type=positive_int, default=8, metavar="N", help="env episodes timed"
    )
    b.add_argument("--out", default=None, metavar="FILE", help="write the figures as JSON here")
    b.add_argument(
        "--task",
        default="kvasir_polyp",
        help="perf, ppo, contention: the task whose PPO / env / T settings are timed",
    )
    b.add_argument(
        "--agreement-dataset",
        default=None,
        metavar="SPEC",
        help="perf: dataset spec (default: --dataset)",
    )
    b.add_argument(
        "--agreement-images",
        type=positive_int,
        default=50,
        metavar="N",
        help="perf: images of the fast/stock agreement check",
    )
    b.add_argument(
        "--ppo-rollouts",
        type=positive_int,
        default=1,
        metavar="N",
        help="perf, ppo, contention: PPO rollouts (of the task's n_steps) timed",
    )
    b.add_argument(
        "--segment-images",
        type=positive_int,
        default=3,
        metavar="N",
        help="perf: images segmented at 1024 px",
    )
    b.add_argument(
        "--clicks",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="perf: agent clicks per segmented image (default: the task's T)",
    )
    add_deprecated_alias(b, "--steps", "--clicks", dest="clicks", type=non_negative_int)
    b.add_argument(
        "--n-steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="ppo, contention: PPO rollout length (default: the task's ppo.n_steps)",
    )
    b.add_argument(
        "--agent",
        default=None,
        metavar="RUN",
        help="perf: also time segment with this trained agent (e.g. a lookahead run)",
    )
    b.add_argument(
        "--legacy-threads",
        action="store_true",
        help="contention: also time with the thread settings of alignsam 0.1.0 (torch's "
        "OpenMP threads spinning; as ALIGNSAM_LEGACY_THREADS=1 does), for comparison",
    )
    add_segmenter_options(b)
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset
    from experiments.segmenter_bench import time_env, time_segmenter
    from segmenter import EmbeddingCache

    if args.what == "contention":
        return _contention(args)
    samples = load_dataset(args.dataset)[: args.limit]
    if args.what == "perf":
        return _perf(args, samples)
    if args.what == "ppo":
        return _ppo(args, samples)
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
    agent = None
    if args.agent:
        from agents.prompt_agent import PromptAgent

        agent = PromptAgent.load(args.agent, segmenter=fast)
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
        steps=task.env.max_steps if args.clicks is None else args.clicks,
        agent=agent,
    )
    result.update(dataset=args.dataset, task=task.name, seconds=time.perf_counter() - t0)
    print(render(result))
    print(f"({result['seconds']:.0f} s)")
    write_json(args.out, result)
    return 0


def _ppo_task(args: argparse.Namespace) -> Any:
    """``--task`` with ``--n-steps`` (and a batch that fits it) and ``--device``."""
    from experiments.train import resolve_task

    task = resolve_task(args.task)
    settings: dict[str, Any] = {"device": args.device}
    if args.n_steps:
        settings["ppo.n_steps"] = args.n_steps
        settings["ppo.batch_size"] = max(2, min(task.ppo.batch_size, args.n_steps))
    return task.with_settings(settings, where="command line")


def _ppo(args: argparse.Namespace, samples: Any) -> int:
    import os

    import torch

    from experiments.perf import time_ppo
    from segmenter import EmbeddingCache

    task = _ppo_task(args)
    seg = build_segmenter_from(args)
    cache = EmbeddingCache(args.cache)
    for s in samples:  # embeddings ready before the clock starts
        cache.get_or_encode(seg, s.load_image())
    t = time_ppo(task, seg, samples, cache, args.ppo_rollouts)
    t.update(
        task=task.name,
        segmenter=seg.model_id,
        backend=getattr(seg, "backend", "torch"),
        n_steps=task.ppo.n_steps,
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
    )
    print(
        f"[{seg.model_id}, {t['backend']}, {t['torch_threads']} torch threads, OMP_WAIT_POLICY "
        f"{t['omp_wait_policy']}] PPO training ({task.name}, {t['steps']} steps): "
        f"{t['env_steps_per_s']:.2f} env-steps/s incl. updates (updates "
        f"{100 * t['update_share']:.0f}% of {t['seconds']:.1f} s)"
    )
    write_json(args.out, t)
    return 0


def _contention(args: argparse.Namespace) -> int:
    from experiments.contention import render, run_contention

    ppo_args = ["--task", args.task, "--dataset", args.dataset, "--limit", str(args.limit)]
    ppo_args += ["--ppo-rollouts", str(args.ppo_rollouts), "--segmenter", args.segmenter]
    ppo_args += ["--device", args.device, "--backend", args.backend]
    for flag, value in (
        ("--n-steps", args.n_steps),
        ("--checkpoint", args.checkpoint),
        ("--cache", args.cache),
    ):
        if value is not None:
            ppo_args += [flag, str(value)]
    if args.bf16:
        ppo_args.append("--bf16")
    result = run_contention(ppo_args, threads=args.threads, legacy_too=args.legacy_threads)
    print(render(result))
    write_json(args.out, result)
    return 0
