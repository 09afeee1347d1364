"""``alignsam segment``: automatic segmentation of images with a trained agent
(:mod:`experiments.segment`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands


def add(sub: Subcommands) -> None:
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
    sg.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
