"""``alignsam adapt``: fit a run to unlabelled images before segmenting them
(:mod:`experiments.adapt`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_cache_option, fraction, veto


def add(sub: Subcommands) -> None:
    a = sub.add_parser(
        "adapt",
        help="fit a run to the (unlabelled) images it will segment",
        description="Re-estimate the SRM's feature statistics on the INPUT images (no labels "
        "read), keep every weight, and write the adapted run into --out: an ordinary run folder "
        "for segment, review, benchmark and corrections, with adapted.json saying what it was "
        "adapted on. Adapt on the images you segment (a few dozen are enough to estimate means "
        "and spreads).",
    )
    a.add_argument("run", metavar="RUN", help="run folder made by alignsam train")
    a.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders of images, dataset specs"
    )
    a.add_argument("--out", required=True, metavar="RUN2", help="the adapted run folder")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a.add_argument(
        "--which", choices=["best", "latest"], default="best", help="checkpoint of RUN to adapt"
    )
    a.add_argument(
        "--keep",
        choices=["auto", "best_predicted", "valued", "last", "source"],
        default="auto",
        help="a lookahead agent's answer: auto (the source run's rule when it scores its "
        "states, e.g. valued chosen on val, else best_predicted), the state its decoder "
        "predicts best, the start included, the state its value model scores best, the last, "
        "or the source run's setting",
    )
    a.add_argument(
        "--mix",
        type=fraction,
        default=1.0,
        metavar="F",
        help="the target images' share of the new statistics (1: theirs alone)",
    )
    a.add_argument(
        "--dark",
        type=fraction,
        default=0.06,
        metavar="V",
        help="leave cells darker than V (mean pixel value, 0-1; an endoscope's black border) "
        "out of the statistics; 0: keep every cell (default 0.06)",
    )
    a.add_argument(
        "--self-train",
        type=int,
        default=0,
        metavar="STEPS",
        help="then fine-tune the SRM's head for STEPS steps on the cells it is sure of in the "
        "images and their mirror images, with labelled training images in every batch "
        "(0: none; e.g. 200; on Kvasir shifts it did worse than the statistics alone, "
        "see docs/results.md)",
    )
    a.add_argument(
        "--anchors",
        type=int,
        default=50,
        metavar="N",
        help="--self-train: labelled training images of RUN's task kept in the mix (default 50)",
    )
    a.add_argument(
        "--veto",
        type=_veto,
        default=argparse.SUPPRESS,
        metavar="auto|source|none|D",
        help="a lookahead agent answering with its value model keeps a clicked state only when "
        "its decoder does not predict the mask more than D (IoU) worse than the start's: a "
        "second judge whose errors do not follow the SRM's. auto (default): D = 0 when the "
        "images' features lie further from the trained statistics than 1.2 times the run's "
        "own labelled images do, else the source run's setting; source: the source run's "
        "lookahead.veto; none: no veto (see docs/results.md)",
    )
    a.add_argument(
        "--statistics",
        choices=("auto", "always"),
        default="auto",
        help="auto: re-estimate only when the images' features lie further from the trained "
        "statistics than 1.2 times the run's own labelled images do (closer, the statistics "
        "stay as trained, and with the default --keep and --veto the answer rule too); always: "
        "whatever the drift (default: auto)",
    )
    add_cache_option(a)
    a.add_argument("--skip-bad", action="store_true", help="skip unusable images and list them")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.adapt import adapt_run
    from segmenter import EmbeddingCache

    r = adapt_run(
        args.run,
        args.inputs,
        args.out,
        which=args.which,
        keep=None if args.keep == "source" else args.keep,
        mix=args.mix,
        dark=args.dark or None,
        cache=EmbeddingCache(args.cache),
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        self_train=args.self_train,
        anchors=args.anchors,
        veto=getattr(args, "veto", "auto"),
        statistics=args.statistics,
    )
    if r.get("self_training"):
        t = r["self_training"]
        print(f"self-trained {t['steps']} steps on {t['pseudo_images']} images "
              f"({100 * t['labelled_cell_share']:.0f} % of their cells pseudo-labelled) and "
              f"{t['labelled_anchors']} labelled images")  # fmt: skip
    if r.get("shift"):
        t = r["shift"]
        ratio = "unknown" if t["ratio"] is None else f"{t['ratio']:.2f} x the training images'"
        moved = "re-estimated" if r["re_estimated"] else "kept"
        print(f"feature drift {t['drift']:.3f} ({ratio}; shifted above {t['threshold']:g} x): "
              f"statistics {moved}, veto {r['veto']}")  # fmt: skip
    what = f"{r['re_estimated']} re-estimated" if r["re_estimated"] else "statistics kept"
    print(f"adapted {args.run} on {r['images']} images ({what}, {r['seconds']:.1f} s): {args.out}")
    if r.get("note"):
        print(f"note: {r['note']}")
    return 0


def _veto(text: str) -> float | str | None:
    """``--veto``: ``auto``, ``source``, ``none`` or a number >= 0."""
    return text.lower() if text.lower() in ("auto", "source") else veto(text)
