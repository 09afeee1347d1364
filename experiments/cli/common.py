"""The set-up every ``alignsam`` command shares: the parser class (defaults shown in
``--help``), value checks for options (a bad value is a usage error before any work), deprecated
aliases, logging, threads, the segmenter and cache options, Ray options, and how results are
printed and written."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The object ``ArgumentParser.add_subparsers()`` returns (argparse keeps its class private).
Subcommands = Any

__all__ = [
    "EXIT_DATA",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "HelpFormatter",
    "Parser",
    "Subcommands",
    "UsageError",
    "add_cache_option",
    "add_deprecated_alias",
    "existing_file",
    "fraction",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
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


#: Exit codes (``alignsam --help`` and docs/cli.md list them).
EXIT_OK = 0
EXIT_FAILED = 1  # the job ran but failed its goal (a sweep trial failed), or an unexpected error
EXIT_USAGE = 2  # bad command line: argparse errors and bad option values
EXIT_DATA = 3  # bad input data or files: images, masks, task files, run files, checkpoints
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); resumable jobs print how to resume


class UsageError(ValueError):
    """A command line that cannot work as given (exit code 2); says what to pass instead."""


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default (unless it is unset, off or already in the text);
    a description or epilog with line breaks is printed as written, others are wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "(default" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not (action.option_strings or action.nargs in ("?", "*"))
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser of ``alignsam`` and of each command: :class:`HelpFormatter` by default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _checked(name: str, cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str):
    def check(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    check.__name__ = name  # argparse names the type in some messages
    return check


positive_int = _checked("positive_int", int, lambda v: v > 0, "a whole number > 0")
non_negative_int = _checked("non_negative_int", int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _checked("positive_float", float, lambda v: v > 0, "a number > 0")
non_negative_float = _checked("non_negative_float", float, lambda v: v >= 0, "a number >= 0")
fraction = _checked("fraction", float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
_veto_number = _checked("veto", float, lambda v: v >= 0, "a number >= 0 or none")


def veto(text: str) -> float | None:
    """A ``--veto`` value (``lookahead.veto``): a number >= 0, or ``none`` for no veto."""
    return None if text.lower() == "none" else _veto_number(text)


def existing_file(text: str) -> str:
    """An option value that must name an existing file."""
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


class _DeprecatedAlias(argparse.Action):
    """A renamed option's old spelling: works as the new one, with a warning on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        print(
            f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use "
            f"{self.new} (see docs/cli.md)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_deprecated_alias(
    sp: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any
) -> None:
    """Accept ``old`` as a hidden, warned alias of the option ``new`` (stored in ``dest``;
    ``kwargs``: the new option's ``type`` / ``nargs``)."""
    sp.add_argument(
        old, dest=dest, new=new, action=_DeprecatedAlias, help=argparse.SUPPRESS, **kwargs
    )


def setup(args: argparse.Namespace) -> None:
    """Logging (``-v``: debug); threads are set before, by ``tune_threads`` (runtime)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def add_segmenter_options(sp: argparse.ArgumentParser) -> None:
    """``--segmenter --checkpoint --device --bf16 --backend --cache``."""
    sp.add_argument("--segmenter", default="mobile_sam", help="segmenter registry name")
    sp.add_argument(
        "--checkpoint",
        default=None,
        type=existing_file,
        metavar="FILE",
        help="segmenter weights file (default: the cached or fetched one)",
    )
    sp.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    sp.add_argument("--bf16", action="store_true", help="bf16 autocast")
    sp.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="torch: stock eager; onnx: ONNX Runtime (CPU); auto: onnx where it applies",
    )
    add_cache_option(sp)


def add_cache_option(sp: argparse.ArgumentParser, shared: bool = False) -> None:
    """``--cache DIR``: the embedding cache folder."""
    sp.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="embedding cache folder"
        + (", shared by the trials" if shared else "")
        + " (default $ALIGNSAM_HOME/embeddings)",
    )


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
        sp.add_argument(
            "--workers",
            type=positive_int,
            default=None,
            metavar="N",
            help="--ray: number of workers (default: the cluster's CPUs)",
        )


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
    """A command-line value read as YAML, as task files are (``1e-4`` -> float, ``true`` ->
    bool)."""
    from agents.schema import load_yaml

    return load_yaml(text)
