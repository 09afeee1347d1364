"""The ``alignsam`` command line: one module per command, each holding its options and the
handler that starts the job (imported only when that command runs, so ``--help`` stays fast),
with the set-up every command shares in :mod:`experiments.cli.common`."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from experiments.cli import (
    adapt,
    answer,
    bench,
    benchmark,
    ceiling,
    corrections,
    curve,
    demo,
    embed,
    finetune,
    oneclick,
    presence,
    review,
    segment,
    srm_eval,
    sweep,
    train,
    weights,
)
from experiments.cli.common import (
    EXIT_DATA,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Parser,
    non_negative_int,
    setup,
)
from experiments.runtime import sticky_ctrl_c, tune_malloc, tune_threads

__all__ = ["build_parser", "main"]

#: Command modules in ``--help`` order; each has ``add(subparsers)``.
COMMANDS = (
    weights,
    embed,
    bench,
    oneclick,
    train,
    answer,
    ceiling,
    segment,
    adapt,
    presence,
    review,
    finetune,
    benchmark,
    corrections,
    curve,
    sweep,
    srm_eval,
    demo,
)


EPILOG = """\
exit codes:
  0    done
  1    the job ran but failed its goal (e.g. a sweep trial failed), or an unexpected error
       (one line; -v prints the traceback)
  2    usage error: unknown option, bad option value, options that do not go together
  3    bad input data or files: images, masks, dataset specs, task files, run folders,
       checkpoints (the message names the file and the fix)
  130  interrupted (Ctrl-C); resumable jobs print how to resume

A run folder (RUN) is what `alignsam train` makes; --runs-dir is the parent of new ones.
Every flag of every command: docs/cli.md."""

#: ``(module, class)`` of the errors that mean bad input data or files (exit code 3). Looked up
#: in ``sys.modules`` when an error arrives: a module not loaded cannot have raised its error,
#: and ``alignsam --help`` imports none of them.
DATA_ERRORS = (
    ("envs.data.images", "DataError"),
    ("agents.config", "ConfigError"),
    ("agents.prompt_agent", "AgentLoadError"),
    ("recalibration.srm.persistence", "SRMLoadError"),
    ("recalibration.clip_models", "ClipLoadError"),
    ("segmenter.base", "SegmenterError"),
    ("builtins", "FileNotFoundError"),
    ("builtins", "IsADirectoryError"),
    ("builtins", "PermissionError"),
)
USAGE_ERRORS = (("experiments.cli.common", "UsageError"), ("builtins", "FileExistsError"))


def _is_one_of(exc: BaseException, table: tuple[tuple[str, str], ...]) -> bool:
    for module, name in table:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def exit_code(exc: BaseException) -> int:
    """The exit code of an error that ended a command (see :data:`EPILOG`)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if _is_one_of(exc, USAGE_ERRORS):
        return EXIT_USAGE
    if _is_one_of(exc, DATA_ERRORS):
        return EXIT_DATA
    return EXIT_FAILED


def version() -> str:
    """The installed package's version (``unknown`` when running from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("alignsam")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``alignsam`` parser with every command."""
    p = Parser(
        prog="alignsam",
        description="Automatic prompting of a frozen Segment Anything model.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"alignsam {version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    p.add_argument(
        "--threads",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="torch and ONNX Runtime threads (0: the cores this process may use)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add(sub)
    return p


def _message(exc: BaseException, code: int) -> str:
    text = str(exc).strip() or type(exc).__name__
    if code == EXIT_FAILED:  # unexpected: one line, with the error's type
        text = f"{type(exc).__name__}: {text.splitlines()[0]} (-v prints the traceback)"
    return text


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_malloc()
    args = build_parser().parse_args(argv)
    tune_threads(args.threads)  # before any command imports torch: OpenMP reads it once
    setup(args)
    try:
        with sticky_ctrl_c():
            return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        code = exit_code(exc)
        if args.verbose:
            traceback.print_exc()
        head = f"alignsam {args.command}:"
        if code == EXIT_INTERRUPTED:
            print(f"{head} interrupted", file=sys.stderr)
        else:
            print(f"{head} error: {_message(exc, code)}", file=sys.stderr)
        for note in getattr(exc, "__notes__", []):
            print(f"{head} {note}", file=sys.stderr)
        return code
