"""``alignsam finetune``: fine-tune the segmenter on the task's training images, a baseline
(:mod:`experiments.finetune`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands


def add(sub: Subcommands) -> None:
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
