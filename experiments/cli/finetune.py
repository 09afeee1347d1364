"""``alignsam finetune``: fine-tune the segmenter on the task's training images, a baseline
(:mod:`experiments.finetune`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import (
    Subcommands,
    add_cache_option,
    non_negative_int,
    positive_float,
    positive_int,
)


def add(sub: Subcommands) -> None:
    ft = sub.add_parser(
        "finetune",
        help="fine-tune the segmenter on the task's training images (a baseline)",
        description="Fine-tune the frozen segmenter's decoder, LoRA adapters or every weight on "
        "TASK's training images; writes the change as a delta into --out. --resume continues "
        "the fine-tuning in --out after its last finished epoch.",
    )
    ft.add_argument(
        "task", metavar="TASK", help="task YAML or shipped task name (its data and segmenter)"
    )
    ft.add_argument(
        "--level", choices=["decoder", "lora", "full"], default="decoder", help="what is trained"
    )
    ft.add_argument(
        "--out", required=True, metavar="DIR", help="folder for delta.pt, summary.json, tb/"
    )
    ft.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        metavar="N",
        help="training epochs (default: 20 for decoder, 4 for lora and full)",
    )
    ft.add_argument(
        "--lr", type=positive_float, default=None, help="AdamW learning rate (default 1e-4)"
    )
    ft.add_argument(
        "--patience",
        type=non_negative_int,
        default=5,
        metavar="N",
        help="early stopping on val after N epochs without gain (0: off)",
    )
    ft.add_argument("--rank", type=positive_int, default=4, help="LoRA rank")
    ft.add_argument(
        "--val-limit",
        type=non_negative_int,
        default=20,
        metavar="N",
        help="val images for early stopping (0: all)",
    )
    ft.add_argument(
        "--seed", type=non_negative_int, default=None, help="seed (default: the task's)"
    )
    ft.add_argument("--segmenter", default=None, help="override the task's segmenter")
    ft.add_argument("--device", default=None, help="torch device (default: the task's)")
    add_cache_option(ft)
    ft.add_argument(
        "--resume", action="store_true", help="continue the run in --out after its last epoch"
    )
    ft.add_argument(
        "--skip-bad", action="store_true", help="leave out unusable images/masks (listed)"
    )
    ft.add_argument("--no-progress", action="store_true", help="no progress bars")
    ft.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
