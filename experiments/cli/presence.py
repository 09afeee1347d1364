"""``alignsam presence``: the run's "nothing here" score on images with and without the target,
and its threshold (:mod:`experiments.presence`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_cache_option, fraction


def add(sub: Subcommands) -> None:
    p = sub.add_parser(
        "presence",
        help='choose or measure the "nothing here" threshold of a run',
        description="Score images with the target (--positives) and without (--negatives, e.g. "
        "kvasir:val@negative) with the run's presence score (the SRM's map before any click). "
        "With --choose, a threshold that keeps all but --max-recall-loss of the positives and "
        "lets at most --max-false-positive-rate of the negatives through (midway between the "
        "two limits when both can be met, else the recall limit) is written into RUN "
        "(presence.json) and alignsam segment uses it; without, the run's threshold is measured "
        "on these images. Choose on val, measure on test. With "
        "--fit-positives and --fit-negatives (e.g. kvasir:train kvasir:train@crop256 and "
        "kvasir:train@negative) the score is a presence model fitted on those images first.",
    )
    p.add_argument("run", metavar="RUN", help="run folder of the agent (alignsam train)")
    p.add_argument("--positives", required=True, metavar="SPEC", help="images with the target")
    p.add_argument("--negatives", required=True, metavar="SPEC", help="images without it")
    p.add_argument("--choose", action="store_true", help="choose the threshold here, save it")
    p.add_argument(
        "--max-recall-loss",
        type=fraction,
        default=0.02,
        metavar="F",
        help="share of the positives the chosen threshold may call empty (default 0.02)",
    )
    p.add_argument(
        "--max-false-positive-rate",
        type=fraction,
        default=0.05,
        metavar="F",
        help="share of the negatives the chosen threshold may let through (default 0.05)",
    )
    p.add_argument(
        "--fit-positives",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="with --choose: fit a presence model on these images with the target ...",
    )
    p.add_argument(
        "--fit-negatives",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="... and these without (e.g. kvasir:train@negative)",
    )
    p.add_argument("--out", default="presence", metavar="DIR", help="output folder")
    add_cache_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.cli.common import UsageError
    from experiments.presence import run_presence
    from segmenter import EmbeddingCache

    if (args.fit_positives or args.fit_negatives) and not (
        args.choose and args.fit_positives and args.fit_negatives
    ):
        raise UsageError("--fit-positives and --fit-negatives go together, with --choose")
    r = run_presence(
        args.run,
        args.positives,
        args.negatives,
        args.out,
        choose=args.choose,
        max_recall_loss=args.max_recall_loss,
        max_false_positive_rate=args.max_false_positive_rate,
        fit_positives=args.fit_positives,
        fit_negatives=args.fit_negatives,
        cache=EmbeddingCache(args.cache),
        progress=not args.no_progress,
    )
    what = "chosen and saved in the run" if r["chosen_here"] else "the run's"
    what += ", learned score" if r["score"] == "learned" else ""
    print(
        f"threshold {r['threshold']:.4f} ({what}): recall {r['recall']:.3f} on "
        f"{r['n_positives']} images with the target, false-positive rate "
        f"{r['false_positive_rate']:.3f} on {r['n_negatives']} without; AUC {r['auc']:.3f}"
    )
    print(f"results.json, results.md in {args.out}")
    return 0
