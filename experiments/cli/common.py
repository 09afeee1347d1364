"""The set-up every ``alignsam`` command shares: logging, threads, the segmenter and cache
options, Ray options, and how results are printed and written."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

#: The object ``ArgumentParser.add_subparsers()`` returns (argparse keeps its class private).
Subcommands = Any

__all__ = [
    "Subcommands",
    "add_ray_options",
    "add_segmenter_options",
    "build_segmenter_from",
    "fmt",
    "print_skipped",
    "print_table",
    "setup",
    "write_json",
    "yaml_value",
]


def setup(args: argparse.Namespace) -> None:
    """Logging (``-v``: debug) and torch's thread count (``--threads``)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def add_segmenter_options(sp: argparse.ArgumentParser) -> None:
    """``--segmenter --checkpoint --device --bf16 --backend --cache``."""
    sp.add_argument("--segmenter", default="mobile_sam", help="registry name (default mobile_sam)")
    sp.add_argument("--checkpoint", default=None, help="weights file (default: cached/fetched)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument("--bf16", action="store_true", help="bf16 autocast")
    sp.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="torch: stock eager; onnx: ONNX Runtime (CPU); auto: onnx where it applies",
    )
    sp.add_argument("--cache", default=None, help="embedding cache dir ($ALIGNSAM_HOME/embeddings)")


def add_ray_options(sp: argparse.ArgumentParser, workers: bool = True) -> None:
    """``--ray [ADDRESS]`` and (optionally) ``--workers``."""
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


def build_segmenter_from(args: argparse.Namespace) -> Any:
    """The segmenter the :func:`add_segmenter_options` options name."""
    from segmenter import build_segmenter

    return build_segmenter(
        args.segmenter,
        checkpoint=args.checkpoint,
        device=args.device,
        autocast_bf16=args.bf16,
        backend=args.backend,
    )


def fmt(v: object) -> str:
    """A table cell: floats to 4 significant digits, ``None`` empty."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def print_table(rows: list[dict], keys: list[str]) -> None:
    """Rows as aligned columns."""
    widths = {k: max(len(k), *(len(fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(fmt(r.get(k)).ljust(widths[k]) for k in keys))


def print_skipped(skipped: list) -> None:
    """``skipped N file(s)`` and one line per file with the reason (nothing skipped silently)."""
    print(f"skipped {len(skipped)} file(s)")
    for file, reason in skipped:
        print(f"  skipped {file}: {reason}")


def write_json(path: str | None, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` (nothing when ``path`` is empty)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str))
        print(f"wrote {path}")


def yaml_value(text: str) -> object:
    """A command-line value read as YAML (``1e-4`` -> float, ``true`` -> bool)."""
    import yaml

    return yaml.safe_load(text)
