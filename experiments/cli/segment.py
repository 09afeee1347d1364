"""``alignsam segment``: automatic segmentation of images with a trained agent
(:mod:`experiments.segment`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import (
    Subcommands,
    UsageError,
    add_cache_option,
    add_deprecated_alias,
    fraction,
    non_negative_int,
)


def add(sub: Subcommands) -> None:
    sg = sub.add_parser(
        "segment",
        help="automatic segmentation of images with a trained agent",
        description="Segment every image of the INPUTs with the agent of RUN, with no human "
        "input. All or nothing: every input is decoded first (all unusable files are named at "
        "once) and --out is written as a whole at the end.",
    )
    sg.add_argument(
        "run", metavar="RUN", help="run folder made by alignsam train (or one of its checkpoints)"
    )
    sg.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders of images, dataset specs"
    )
    sg.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (new, empty, or --overwrite)"
    )
    sg.add_argument("--overwrite", action="store_true", help="replace a non-empty --out as a whole")
    sg.add_argument(
        "--clicks",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="agent clicks per image after the SRM's two start points (default: the task's T)",
    )
    add_deprecated_alias(sg, "--steps", "--clicks", dest="clicks", type=non_negative_int)
    sg.add_argument(
        "--which",
        choices=["best", "latest"],
        default="best",
        help="checkpoint of RUN: best on val, or the latest written",
    )
    sg.add_argument("--device", default=None, help="torch device (default: the run's)")
    add_cache_option(sg)
    sg.add_argument("--no-cache", action="store_true", help="encode without the cache")
    sg.add_argument("--no-overlays", action="store_true", help="write no overlay images")
    sg.add_argument(
        "--delta",
        default=None,
        metavar="DIR",
        help="a decoder fine-tuning (alignsam finetune --out) to load onto the segmenter",
    )
    sg.add_argument(
        "--skip-bad", action="store_true", help="skip unusable images and list them in the summary"
    )
    sg.add_argument(
        "--presence-threshold",
        type=fraction,
        default=None,
        metavar="P",
        help="images whose presence score is below P get an empty mask and are listed as "
        "no_target (default: the run's presence.json from alignsam presence --choose; 0: off)",
    )
    sg.add_argument("--no-progress", action="store_true", help="no progress bar")
    sg.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agents.prompt_agent import PromptAgent
    from experiments.segment import check_inputs, check_out, gather_inputs, segment_images
    from segmenter import EmbeddingCache

    on_error = "skip" if args.skip_bad else "raise"
    out = check_out(args.out, args.overwrite)  # before any work
    samples = check_inputs(gather_inputs(args.inputs, on_error), on_error)
    cache = None if args.no_cache else EmbeddingCache(args.cache)
    agent = PromptAgent.load(args.run, device=args.device, cache=cache, which=args.which)
    if args.delta:
        from segmenter.finetune import apply_delta, load_delta

        if load_delta(args.delta)["level"] != "decoder":
            raise UsageError(
                f"--delta {args.delta}: an agent reads its segmenter's embeddings, so only a "
                "decoder delta can go under it (LoRA / full deltas change the encoder)"
            )
        apply_delta(agent.segmenter, args.delta)
    rep = segment_images(
        agent,
        samples,
        out,
        steps=args.clicks,
        overlays=not args.no_overlays,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        checked=True,
        progress=not args.no_progress,
        presence_threshold=args.presence_threshold,
    )
    iou = f", mean IoU vs ground truth {rep.mean_iou:.4f}" if rep.mean_iou is not None else ""
    print(
        f"segmented {rep.images} images in {rep.seconds:.1f} s ({rep.images_per_s:.2f} images/s; "
        f"encoding {rep.encode_seconds:.1f} s, {rep.decoder_calls} decoder calls, "
        f"{rep.clicks_per_image:.1f} clicks/image){iou}; skipped {len(rep.skipped)}"
    )
    for s in rep.skipped:
        print(f"  skipped {s['id']}: {s['reason']}")
    if rep.presence_threshold is not None:
        print(
            f"nothing here (presence < {rep.presence_threshold:.3f}, empty mask): "
            f"{len(rep.no_target)} of {rep.images} images"
        )
    print(f"masks, overlays, results.json (COCO RLE), summary.json in {rep.out}")
    return 0
