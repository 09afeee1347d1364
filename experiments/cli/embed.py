"""``alignsam embed``: pre-compute image embeddings into the cache (locally or as a Ray Data
job, :func:`experiments.distributed.embed`)."""

from __future__ import annotations

import argparse
import time

from experiments.cli.common import (
    Subcommands,
    add_ray_options,
    add_segmenter_options,
    build_segmenter_from,
    non_negative_float,
    positive_int,
    print_skipped,
)


def add(sub: Subcommands) -> None:
    e = sub.add_parser(
        "embed",
        help="pre-compute image embeddings into the cache",
        description="Encode every image of DATASET once into the embedding cache (safe to "
        "interrupt and run again: finished entries are kept).",
    )
    e.add_argument(
        "dataset", metavar="DATASET", help="dataset spec, e.g. kvasir:train, or a folder of images"
    )
    e.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="first N images (default: all)",
    )
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable files (listed)")
    add_ray_options(e)
    e.add_argument(
        "--worker-threads", type=positive_int, default=1, metavar="N", help="--ray: CPUs per actor"
    )
    e.add_argument(
        "--worker-gpus",
        type=non_negative_float,
        default=0.0,
        metavar="N",
        help="--ray: GPUs per actor",
    )
    add_segmenter_options(e)
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset, load_or_skip
    from segmenter import EmbeddingCache
    from segmenter.progress import progress_bar

    if args.ray is not None:
        return _run_ray(args)
    samples = load_dataset(args.dataset, on_error="skip" if args.skip_bad else "raise")
    if args.limit:
        samples = samples[: args.limit]
    skipped = [tuple(item) for item in getattr(samples, "skipped", [])]
    seg = build_segmenter_from(args)
    cache = EmbeddingCache(args.cache)
    t0 = time.perf_counter()
    n = 0
    for s in progress_bar(samples, desc=f"embed {args.dataset}", unit="img"):
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
    print_skipped(skipped)
    return 0


def _run_ray(args: argparse.Namespace) -> int:
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
    print_skipped(res["skipped"] + [list(u) for u in unreadable])
    return 0
