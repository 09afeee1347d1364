"""The ``alignsam`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from experiments.runtime import tune_malloc

logger = logging.getLogger("alignsam")


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _segmenter(args: argparse.Namespace):
    from segmenter import build_segmenter

    return build_segmenter(
        args.segmenter,
        checkpoint=args.checkpoint,
        device=args.device,
        autocast_bf16=args.bf16,
        backend=args.backend,
    )


def _print_table(rows: list[dict], keys: list[str]) -> None:
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# -- weights --------------------------------------------------------------------------------
def cmd_weights(args: argparse.Namespace) -> int:
    from segmenter import weights as W

    if args.action == "list":
        _print_table(
            W.listing(verify=args.verify), ["name", "present", "size_mb", "verified", "file"]
        )
        print(f"cache: {W.weights_dir()}  (override with ${W.CACHE_ENV})")
        return 0
    names = [args.name] if args.name else ["mobile_sam"]
    for name in names:
        path = W.fetch(name, source=args.source, force=args.force)
        print(f"{name}: {path} (SHA-256 verified)")
    return 0


# -- embed ------------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from experiments.datasets import load_dataset, load_or_skip
    from segmenter import EmbeddingCache

    if args.ray is not None:
        return _embed_ray(args)
    samples = load_dataset(args.dataset, on_error="skip" if args.skip_bad else "raise")
    if args.limit:
        samples = samples[: args.limit]
    skipped = [tuple(item) for item in getattr(samples, "skipped", [])]
    seg = _segmenter(args)
    cache = EmbeddingCache(args.cache)
    t0 = time.perf_counter()
    n = 0
    for s in tqdm(samples, desc=f"embed {args.dataset}", unit="img"):
        image = load_or_skip(s, "skip" if args.skip_bad else "raise", skipped)
        if image is not None:
            cache.get_or_encode(seg, image)
            n += 1
    dt = time.perf_counter() - t0
    print(
        f"{n} images in {dt:.1f} s ({n / max(dt, 1e-9):.2f} images/s): {cache.misses} encoded, "
        f"{cache.hits} already cached, {cache.recomputed_corrupt} corrupt entries recomputed; "
        f"cache {cache.root}"
    )
    _print_skipped(skipped)
    return 0


def _embed_ray(args: argparse.Namespace) -> int:
    from experiments.distributed import embed
    from segmenter import EmbeddingCache

    root = EmbeddingCache(args.cache).root
    seg = {
        "name": args.segmenter,
        "checkpoint": args.checkpoint,
        "device": args.device,
        "autocast_bf16": args.bf16,
        "backend": args.backend,
    }
    res = embed(
        args.dataset,
        seg,
        root,
        address=args.ray,
        limit=args.limit or None,
        workers=args.workers,
        threads_per_worker=args.worker_threads,
        gpus_per_worker=args.worker_gpus,
    )
    c = res["counts"]
    n = res["images"]
    print(
        f"{n} images in {res['seconds']:.1f} s ({n / max(res['seconds'], 1e-9):.2f} images/s) on "
        f"{res['workers']} Ray workers: {c.get('encoded', 0)} encoded, {c.get('cached', 0)} "
        f"already cached; cache {root}"
    )
    unreadable = res["unreadable"]
    if unreadable and not args.skip_bad:
        raise ValueError(
            f"{len(unreadable)} unreadable images, first {unreadable[0][0]}: "
            f"{unreadable[0][1]} (repair or remove them, or pass --skip-bad)"
        )
    _print_skipped(res["skipped"] + [list(u) for u in unreadable])
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.distributed import sweep

    grid: dict[str, list] = {}
    for item in args.grid:
        key, _, values = item.partition("=")
        if not values:
            raise ValueError(
                f"--grid {item!r}: expected KEY=V1,V2 (e.g. ppo.learning_rate=1e-4,3e-4)"
            )
        grid[key] = [yaml_value(v) for v in values.split(",")]
    rows = sweep(
        args.tasks,
        range(args.seed0, args.seed0 + args.seeds),
        grid=grid,
        runs=args.runs,
        name=args.name,
        cache_dir=args.cache,
        address=args.ray,
        threads_per_trial=args.trial_threads,
        max_failures=args.max_failures,
    )
    keys = ["task", "seed", *sorted({k for r in rows for k in r if k.startswith("hp/")})]
    keys += ["status", "steps", "start_step", "best_val_miou", "wall_seconds", "run_dir"]
    _print_table(rows, keys)
    return 0 if all(r["status"] == "TERMINATED" for r in rows) else 1


def yaml_value(text: str) -> object:
    import yaml

    return yaml.safe_load(text)


# -- bench -----------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset
    from experiments.segmenter_bench import time_env, time_segmenter
    from segmenter import EmbeddingCache

    samples = load_dataset(args.dataset)[: args.limit]
    if args.what == "perf":
        return _bench_perf(args, samples)
    seg = _segmenter(args)
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
    _write_json(args.out, result)
    return 0


def _print_skipped(skipped: list) -> None:
    """``skipped N file(s)`` and one line per file with the reason (nothing skipped silently)."""
    print(f"skipped {len(skipped)} file(s)")
    for file, reason in skipped:
        print(f"  skipped {file}: {reason}")


def _write_json(path: str | None, obj: object) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str))
        print(f"wrote {path}")


def _bench_perf(args: argparse.Namespace, samples) -> int:
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
    _write_json(args.out, result)
    return 0


# -- oneclick ----------------------------------------------------------------------------------
def cmd_oneclick(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset
    from experiments.segmenter_bench import one_click_iou
    from segmenter import EmbeddingCache

    samples = load_dataset(args.dataset)
    if args.limit:
        samples = samples[: args.limit]
    seg = _segmenter(args)
    res = one_click_iou(seg, samples, EmbeddingCache(args.cache))
    m = res["mean_iou"]
    print(
        f"{seg.model_id} on {args.dataset} ({res['n']} images), one positive click at the deepest "
        f"interior point:\n  mean IoU single-mask head {m['single']:.4f} | multimask, best "
        f"predicted score {m['score']:.4f} | multimask, oracle best-of-3 {m['oracle']:.4f}"
    )
    _write_json(args.out, res)
    return 0


# -- train / evaluate -------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from experiments.train import resolve_task, train

    if not args.task and not args.resume:
        raise ValueError("give a TASK (YAML file or shipped name) or --resume RUN_DIR")
    if args.resume:
        task = resolve_task(args.task) if args.task else None  # checked against the run's
    else:
        task = resolve_task(args.task)
        overrides = {
            "segmenter": args.segmenter,
            "device": args.device,
            "seed": args.seed,
            "total_timesteps": args.steps,
        }
        for key, value in overrides.items():
            if value is not None:
                setattr(task, key, value)
        if args.branch:
            task.srm.branch = args.branch
        if args.imitation_rounds is not None:
            task.imitation = dataclasses.replace(task.imitation, rounds=args.imitation_rounds)
    if task is not None and args.skip_bad:
        task.data.on_error = "skip"
    summary = train(
        task,
        runs=Path(args.runs),
        resume=Path(args.resume) if args.resume else None,
        cache_dir=args.cache,
        progress=not args.no_progress,
        total_timesteps=args.steps if args.resume else None,
    )
    print(
        f"run {summary['run_dir']}: {summary['steps']} steps in {summary['wall_seconds']:.0f} s "
        f"(PPO learn {summary['learn_seconds']:.0f} s), best val mIoU "
        f"{summary['best_val_miou']:.4f}"
    )
    for r in summary["imitation"].get("rounds", []):
        val = "n/a" if r["val_miou"] is None else f"{r['val_miou']:.4f}"
        print(
            f"imitation round {r['round']}: {r['states']} states, {r['collect_decoder_calls']} "
            f"decoder calls, {r['seconds']:.0f} s, val mIoU {val}"
        )
    for split, skipped in summary["skipped"].items():
        print(f"{split}:", end=" ")
        _print_skipped(skipped)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from experiments.train import evaluate_run

    res = evaluate_run(Path(args.run), args.split, args.limit)
    print(f"{args.run} on {args.split}: mIoU {res['miou']:.4f} over {len(res['per_image'])} images")
    _write_json(args.out, res)
    return 0


def cmd_ceiling(args: argparse.Namespace) -> int:
    from agents.prompt_agent import PromptAgent
    from experiments.ceiling import placement_ceiling
    from experiments.train import load_split
    from segmenter import EmbeddingCache

    agent = PromptAgent.load(args.run, cache=EmbeddingCache(args.cache))
    samples = list(load_split(agent.task, args.split))[: args.limit]
    res = placement_ceiling(agent, samples, progress=not args.no_progress)
    m = res["mean_iou"]
    print(
        f"{args.run} on {args.split} ({res['n']} images, labels from its SRM): mean IoU greedy "
        f"(reads the ground truth to place) {m['greedy']:.4f} | agent {m['agent']:.4f} | "
        f"random {m['random']:.4f}"
    )
    _write_json(args.out, res)
    return 0


# -- segment -----------------------------------------------------------------------------------
def cmd_segment(args: argparse.Namespace) -> int:
    from agents.prompt_agent import PromptAgent
    from experiments.segment import gather_inputs, segment_images
    from segmenter import EmbeddingCache

    samples = gather_inputs(args.inputs, on_error="skip" if args.skip_bad else "raise")
    cache = None if args.no_cache else EmbeddingCache(args.cache)
    agent = PromptAgent.load(args.run, device=args.device, cache=cache, which=args.which)
    if args.delta:
        from segmenter.finetune import apply_delta, load_delta

        if load_delta(args.delta)["level"] != "decoder":
            raise ValueError(
                f"{args.delta}: an agent reads its segmenter's embeddings, so only a decoder "
                "delta can go under it (LoRA / full deltas change the encoder)"
            )
        apply_delta(agent.segmenter, args.delta)
    rep = segment_images(
        agent,
        samples,
        args.out,
        steps=args.steps,
        overlays=not args.no_overlays,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    iou = f", mean IoU vs ground truth {rep.mean_iou:.4f}" if rep.mean_iou is not None else ""
    print(
        f"segmented {rep.images} images in {rep.seconds:.1f} s ({rep.images_per_s:.2f} images/s; "
        f"encoding {rep.encode_seconds:.1f} s, {rep.decoder_calls} decoder calls, "
        f"{rep.clicks_per_image:.1f} clicks/image){iou}; skipped {len(rep.skipped)}"
    )
    for s in rep.skipped:
        print(f"  skipped {s['id']}: {s['reason']}")
    print(f"masks, overlays, results.json (COCO RLE), summary.json in {rep.out}")
    return 0


# -- fine-tuning baselines -------------------------------------------------------------------------
def cmd_finetune(args: argparse.Namespace) -> int:
    from experiments.finetune import run_finetune
    from experiments.train import resolve_task
    from segmenter import EmbeddingCache
    from segmenter.finetune import FinetuneConfig

    task = resolve_task(args.task)
    if args.skip_bad:
        task.data.on_error = "skip"
    if args.segmenter:
        task.segmenter = args.segmenter
    defaults = FinetuneConfig(level=args.level)
    config = FinetuneConfig(
        level=args.level,
        epochs=args.epochs or (defaults.epochs if args.level == "decoder" else 4),
        lr=args.lr or defaults.lr,
        patience=args.patience,
        lora_rank=args.rank,
        seed=args.seed if args.seed is not None else task.seed,
    )
    s = run_finetune(
        task,
        args.out,
        config,
        val_limit=args.val_limit or None,
        device=args.device,
        cache=EmbeddingCache(args.cache),
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(
        f"{s['level']} fine-tuning of {s['base_model_id']} on {s['train_images']} {task.name} "
        f"images: {s['trainable_params']:,} trainable parameters, {s['epochs_run']} epochs in "
        f"{s['train_seconds']:.0f} s; best val (mean low-res IoU, no prompt / one point) "
        f"{s['best_val']:.4f} at epoch {s['best_epoch']}; delta {s['delta']}"
    )
    return 0


# -- benchmark ---------------------------------------------------------------------------------
def cmd_benchmark(args: argparse.Namespace) -> int:
    from experiments.benchmark import render_markdown, run_benchmark
    from experiments.train import resolve_task
    from segmenter import EmbeddingCache

    task = resolve_task(args.task)
    if args.device:
        task.device = args.device
    result = run_benchmark(
        task,
        args.runs,
        split=args.split,
        limit=args.limit,
        out=args.out,
        seed=args.seed,
        cache=EmbeddingCache(args.cache),
        manual_clicks=args.manual_clicks,
        methods=args.methods,
        progress=not args.no_progress,
        abstain_margin=args.abstain_margin,
        skip_bad=args.skip_bad,
        finetuned=args.finetuned,
        amg_points_per_side=args.amg_points,
        amg_tune_images=args.amg_tune,
        ray_address=args.ray,
        ray_workers=args.workers,
    )
    print(render_markdown(result))
    _print_skipped(result["skipped"])
    print(
        f"wrote results.json, results.md, curves.png, examples.png to {args.out} "
        f"({result['seconds']:.0f} s)"
    )
    return 0


# -- SRM label accuracy ---------------------------------------------------------------------------
def cmd_srm_eval(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset
    from recalibration.evaluate import pretrain_and_evaluate, summarize
    from segmenter import EmbeddingCache

    seg = _segmenter(args)
    if args.srm:
        from recalibration.evaluate import evaluate_saved

        if not args.eval:
            raise ValueError("--srm evaluates a saved SRM: give the split to measure with --eval")
        res = evaluate_saved(
            args.srm, load_dataset(args.eval), seg, cache=EmbeddingCache(args.cache)
        )
        print(f"saved SRM {args.srm} on {args.eval}:")
        print(summarize(res))
        _write_json(args.out, res)
        return 0
    res = pretrain_and_evaluate(
        load_dataset(args.train),
        load_dataset(args.val),
        load_dataset(args.eval) if args.eval else None,
        seg,
        cache=EmbeddingCache(args.cache),
        epochs=args.epochs,
        seed=args.seed,
        save_path=args.save,
    )
    print(f"SRM (implicit) trained on {args.train}, early-stopped on {args.val}:")
    print(summarize(res))
    _write_json(args.out, res)
    return 0


# -- demo ------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignsam", description="Automatic prompting of a frozen Segment Anything model."
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    sub = p.add_subparsers(dest="command", required=True)

    def seg_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--segmenter", default="mobile_sam", help="registry name (default mobile_sam)"
        )
        sp.add_argument("--checkpoint", default=None, help="weights file (default: cached/fetched)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
        sp.add_argument("--bf16", action="store_true", help="bf16 autocast")
        sp.add_argument(
            "--backend",
            choices=["auto", "torch", "onnx"],
            default="auto",
            help="torch: stock eager; onnx: ONNX Runtime (CPU); auto: onnx where it applies",
        )
        sp.add_argument(
            "--cache", default=None, help="embedding cache dir ($ALIGNSAM_HOME/embeddings)"
        )

    def ray_opts(sp: argparse.ArgumentParser, workers: bool = True) -> None:
        sp.add_argument(
            "--ray",
            nargs="?",
            const="",
            default=None,
            metavar="ADDRESS",
            help="run on Ray (pip install 'alignsam[ray]'): the cluster's address, or none for "
            "$RAY_ADDRESS / a local instance",
        )
        if workers:
            sp.add_argument("--workers", type=int, default=None, help="--ray: workers (its CPUs)")

    w = sub.add_parser("weights", help="list or fetch segmenter checkpoints")
    w.add_argument("action", choices=["list", "fetch"])
    w.add_argument("name", nargs="?", help="checkpoint name (default mobile_sam)")
    w.add_argument("--from", dest="source", default=None, help="import a local file instead")
    w.add_argument("--force", action="store_true", help="fetch again even if present")
    w.add_argument("--verify", action="store_true", help="check SHA-256 of present files")
    w.set_defaults(func=cmd_weights)

    e = sub.add_parser("embed", help="pre-compute image embeddings into the cache")
    e.add_argument("dataset", help="dataset spec, e.g. kvasir:train or a folder of images")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable files (counted)")
    ray_opts(e)
    e.add_argument("--worker-threads", type=int, default=1, help="--ray: CPUs per actor")
    e.add_argument("--worker-gpus", type=float, default=0.0, help="--ray: GPUs per actor")
    seg_opts(e)
    e.set_defaults(func=cmd_embed)

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
    seg_opts(b)
    b.set_defaults(func=cmd_bench)

    o = sub.add_parser("oneclick", help="mean IoU of one click at the deepest interior point")
    o.add_argument("dataset", nargs="?", default="kvasir:train")
    o.add_argument("--limit", type=int, default=0)
    o.add_argument("--out", default=None)
    seg_opts(o)
    o.set_defaults(func=cmd_oneclick)

    t = sub.add_parser("train", help="train a prompt agent (PPO + SRM) for a task")
    t.add_argument("task", nargs="?", help="task YAML or shipped task name (experiments/tasks)")
    t.add_argument(
        "--resume", default=None, help="continue this run folder from its last checkpoint"
    )
    t.add_argument("--runs", default="runs", help="parent folder of run folders")
    t.add_argument("--steps", type=int, default=None, help="override total_timesteps")
    t.add_argument(
        "--imitation-rounds",
        type=int,
        default=None,
        help="override imitation.rounds (0: PPO only, the paper's training)",
    )
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--segmenter", default=None, help="override the task's segmenter")
    t.add_argument(
        "--branch", choices=["implicit", "explicit"], default=None, help="override the SRM branch"
    )
    t.add_argument("--device", default=None)
    t.add_argument("--cache", default=None, help="embedding cache dir")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--skip-bad", action="store_true", help="leave out unusable images/masks (listed)"
    )
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a run's best agent on a split")
    ev.add_argument("run")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--out", default=None)
    ev.set_defaults(func=cmd_evaluate)

    ce = sub.add_parser(
        "ceiling", help="how much click placement can matter with a run's SRM labels"
    )
    ce.add_argument("run")
    ce.add_argument("--split", default="val", choices=["train", "val", "test"])
    ce.add_argument("--limit", type=int, default=20, help="first N images (greedy is slow)")
    ce.add_argument("--cache", default=None, help="embedding cache dir")
    ce.add_argument("--out", default=None, help="write per-image IoUs as JSON here")
    ce.add_argument("--no-progress", action="store_true")
    ce.set_defaults(func=cmd_ceiling)

    sg = sub.add_parser("segment", help="automatic segmentation of images with a trained agent")
    sg.add_argument("run", help="run folder of alignsam train (or a checkpoint folder)")
    sg.add_argument("inputs", nargs="+", help="image files, folders, or dataset specs")
    sg.add_argument("--out", required=True, help="output folder")
    sg.add_argument("--steps", type=int, default=None, help="agent clicks (default: task's T)")
    sg.add_argument("--which", choices=["best", "latest"], default="best")
    sg.add_argument("--device", default=None, help="default: the run's device")
    sg.add_argument("--cache", default=None, help="embedding cache dir")
    sg.add_argument("--no-cache", action="store_true", help="encode without the cache")
    sg.add_argument("--no-overlays", action="store_true")
    sg.add_argument(
        "--delta", default=None, help="a decoder fine-tuning delta to load onto the segmenter"
    )
    sg.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed)")
    sg.add_argument("--no-progress", action="store_true")
    sg.set_defaults(func=cmd_segment)

    ft = sub.add_parser(
        "finetune", help="fine-tune the segmenter on the task's training images (a baseline)"
    )
    ft.add_argument("task", help="task YAML or shipped task name (its data and segmenter)")
    ft.add_argument("--level", choices=["decoder", "lora", "full"], default="decoder")
    ft.add_argument("--out", required=True, help="folder for delta.pt, summary.json, tb/")
    ft.add_argument("--epochs", type=int, default=None, help="default 20 (decoder) or 4")
    ft.add_argument("--lr", type=float, default=None, help="AdamW learning rate (1e-4)")
    ft.add_argument("--patience", type=int, default=5, help="early stopping on val (0: off)")
    ft.add_argument("--rank", type=int, default=4, help="LoRA rank")
    ft.add_argument("--val-limit", type=int, default=20, help="val images for early stopping")
    ft.add_argument("--seed", type=int, default=None)
    ft.add_argument("--segmenter", default=None, help="override the task's segmenter")
    ft.add_argument("--device", default=None, help="cpu, cuda, ... (default: the task's)")
    ft.add_argument("--cache", default=None, help="embedding cache dir")
    ft.add_argument("--resume", action="store_true", help="continue after the last epoch")
    ft.add_argument("--skip-bad", action="store_true", help="leave out unusable images/masks")
    ft.add_argument("--no-progress", action="store_true")
    ft.set_defaults(func=cmd_finetune)

    bm = sub.add_parser("benchmark", help="agents vs manual clicks, ablations and baselines")
    bm.add_argument("task", help="task YAML or shipped task name (its data and segmenter)")
    bm.add_argument("--runs", nargs="+", required=True, help="run folders of trained agents")
    bm.add_argument("--split", default="test", choices=["train", "val", "test"])
    bm.add_argument("--limit", type=int, default=None, help="first N images only")
    bm.add_argument("--out", default="benchmark", help="output folder")
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument("--manual-clicks", type=int, default=20, help="annotator click budget")
    bm.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset besides agents and manual: wo_srm single_step random heuristics "
        "start_only oneshot amg (default: all)",
    )
    bm.add_argument(
        "--finetuned",
        nargs="+",
        default=[],
        help="fine-tuning deltas (alignsam finetune --out folders) to benchmark as methods",
    )
    bm.add_argument(
        "--amg-points", type=int, default=32, help="automatic mask generator grid side (32)"
    )
    bm.add_argument(
        "--amg-tune",
        type=int,
        default=10,
        help="val images to choose the generator's filter thresholds on (0: SAM's defaults)",
    )
    ray_opts(bm)
    bm.add_argument(
        "--abstain-margin",
        type=float,
        default=None,
        help="the SRM abstains on clicks with |p - 0.5| below this (all env-based methods)",
    )
    bm.add_argument("--device", default=None)
    bm.add_argument("--cache", default=None, help="embedding cache dir")
    bm.add_argument("--no-progress", action="store_true")
    bm.add_argument(
        "--skip-bad", action="store_true", help="leave out unusable images/masks (listed)"
    )
    bm.set_defaults(func=cmd_benchmark)

    sw = sub.add_parser("sweep", help="train every task x seed x grid point (Ray Tune with --ray)")
    sw.add_argument("tasks", nargs="+", help="task YAML files or shipped task names")
    sw.add_argument("--seeds", type=int, default=1, help="seeds per task (seed0 ... seed0+N-1)")
    sw.add_argument("--seed0", type=int, default=0)
    sw.add_argument(
        "--grid",
        nargs="*",
        default=[],
        help="KEY=V1,V2 task settings, e.g. ppo.learning_rate=1e-4,3e-4",
    )
    sw.add_argument("--runs", default="runs", help="parent folder of the run folders")
    sw.add_argument("--name", default=None, help="sweep name (default sweep-TIME)")
    sw.add_argument("--cache", default=None, help="embedding cache dir (shared by workers)")
    sw.add_argument("--trial-threads", type=int, default=1, help="CPUs per trial")
    sw.add_argument("--max-failures", type=int, default=2, help="--ray: retries of a trial")
    ray_opts(sw, workers=False)
    sw.set_defaults(func=cmd_sweep)

    se = sub.add_parser("srm-eval", help="SRM label accuracy at the grid cells vs majority class")
    se.add_argument("--train", default="kvasir:train")
    se.add_argument("--val", default="kvasir:val")
    se.add_argument("--eval", default="kvasir:test", help="reported split ('' for none)")
    se.add_argument("--epochs", type=int, default=60)
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--save", default=None, help="write the trained SRM here")
    se.add_argument(
        "--srm", default=None, help="evaluate this saved SRM file on --eval (no training)"
    )
    se.add_argument("--out", default=None)
    seg_opts(se)
    se.set_defaults(func=cmd_srm_eval)

    d = sub.add_parser("demo", help="end-to-end run on the embedded synthetic task")
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    seg_opts(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_malloc()
    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"alignsam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
