"""``alignsam answer``: choose on ``val`` which state of a lookahead episode is its answer, with
what margin and after how many clicks (:func:`experiments.answering.choose_clicks`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_cache_option, fraction, veto


def add(sub: Subcommands) -> None:
    p = sub.add_parser(
        "answer",
        help="choose a lookahead run's answer rule, margin and clicks on val",
        description="Run the lookahead agent of RUN on its task's val images (every click "
        "budgeted), score every answer rule (the last state; the best state by the decoder's "
        "predicted IoU or by the value model, a clicked state kept only when its score beats "
        "the start's by the margin) after every number of clicks, and write the best into "
        "RUN among those that leave at most --max-worse of the val images worse than their "
        "start. Training does this when the task sets lookahead.choose_clicks; this is for "
        "runs trained before, or another bound.",
    )
    p.add_argument("run", metavar="RUN", help="run folder of a lookahead agent (alignsam train)")
    p.add_argument(
        "--max-worse",
        type=fraction,
        default=None,
        metavar="F",
        help="share of the val images the answer may leave worse than their start "
        "(default: the run's lookahead.max_worse; none: the best mean)",
    )
    p.add_argument(
        "--fit-value",
        action="store_true",
        help="fit the value model (keep: valued) first when the run has none: one round of "
        "the judge's episodes on its training images",
    )
    p.add_argument(
        "--shifts",
        nargs="*",
        default=None,
        metavar="SHIFT",
        help="also choose on these shifted copies of the val images (hue, jpeg20, crop256, "
        "border, ...): the best mean over the sets, at most --max-worse worse on average, no "
        "set's mean below its start (default: the run's lookahead.choose_shifts; none given: "
        "val alone)",
    )
    p.add_argument(
        "--veto",
        type=veto,
        default=argparse.SUPPRESS,
        metavar="D",
        help="keep a clicked state (keep: valued) only when the decoder's own predicted IoU "
        "for it is at least the start's minus D: a second judge for images unlike the "
        "training images (0: never below the start's; none: no veto; default: the run's "
        "lookahead.veto)",
    )
    add_cache_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.answering import choose_clicks

    s = choose_clicks(
        args.run,
        args.cache,
        progress=not args.no_progress,
        max_worse=args.max_worse,
        value=args.fit_value,
        shifts=args.shifts,
        veto=getattr(args, "veto", "run"),
    )
    for name, r in s.get("shifted_val", {}).items():
        print(f"  {name}: mIoU {r['miou']:.3f} (start {r['start']:.3f}), "
              f"{100 * r['worse']:.0f} % worse than their start")  # fmt: skip
    veto = "" if s.get("veto") is None else f", veto {s['veto']:g}"
    print(
        f"{s['clicks']} clicks, keep {s['keep']} (margin {s['margin']:.3f}{veto}): val mIoU "
        f"{s['best_val_miou']:.3f}, {100 * s['val_worse']:.0f} % of the val images worse than "
        f"their start; written into {args.run}"
    )
    return 0
