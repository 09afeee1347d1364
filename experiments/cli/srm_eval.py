"""``alignsam srm-eval``: SRM label accuracy at the grid cells against the majority class
(:mod:`recalibration.evaluate`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import (
    Subcommands,
    UsageError,
    add_segmenter_options,
    build_segmenter_from,
    existing_file,
    non_negative_int,
    positive_int,
    write_json,
)


def add(sub: Subcommands) -> None:
    se = sub.add_parser(
        "srm-eval",
        help="SRM label accuracy at the grid cells vs majority class",
        description="Train an implicit SRM on --train (early stopping on --val) and report its "
        "label accuracy and its map as a mask on --eval, or evaluate a saved SRM file (--srm), "
        "or a trained run (RUN: its SRM, and for a lookahead agent its mask judge).",
    )
    se.add_argument(
        "--run",
        default=None,
        metavar="RUN",
        help="evaluate this run's SRM (and a lookahead agent's judge) on --eval (no training)",
    )
    se.add_argument(
        "--features",
        default="sam",
        help="feature sources the trained SRM reads, comma-separated "
        "(sam, sam_stages, efficientnet_lite0, open_clip:ARCH:TAG, dinov2:ARCH; compact:SOURCE "
        "stores SOURCE 2x2-pooled in 8 bits)",
    )
    se.add_argument(
        "--reduce",
        type=non_negative_int,
        default=0,
        help="project the stacked features to this many channels (0: all)",
    )
    se.add_argument(
        "--limit", type=non_negative_int, default=0, help="first N --eval images (0: all)"
    )
    se.add_argument("--train", default="kvasir:train", help="dataset spec to train on")
    se.add_argument("--val", default="kvasir:val", help="dataset spec for early stopping")
    se.add_argument("--eval", default="kvasir:test", help="dataset spec reported ('' for none)")
    se.add_argument("--epochs", type=positive_int, default=60, help="training epochs")
    se.add_argument("--seed", type=non_negative_int, default=0, help="training seed")
    se.add_argument("--save", default=None, metavar="FILE", help="write the trained SRM here")
    se.add_argument(
        "--srm",
        default=None,
        type=existing_file,
        metavar="FILE",
        help="evaluate this saved SRM file on --eval (no training)",
    )
    se.add_argument("--out", default=None, metavar="FILE", help="write the figures as JSON here")
    add_segmenter_options(se)
    se.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.datasets import load_dataset
    from recalibration.evaluate import evaluate_saved, pretrain_and_evaluate, summarize
    from segmenter import EmbeddingCache

    seg = build_segmenter_from(args)
    evaluated = load_dataset(args.eval) if args.eval else None
    if evaluated is not None and args.limit:
        evaluated = evaluated[: args.limit]
    if args.run:
        return _run_eval(args, seg, evaluated)
    if args.srm:
        if not args.eval:
            raise UsageError("--srm evaluates a saved SRM: give the split to measure with --eval")
        res = evaluate_saved(args.srm, evaluated, seg, cache=EmbeddingCache(args.cache))
        print(f"saved SRM {args.srm} on {args.eval}:")
        print(summarize(res))
        write_json(args.out, res)
        return 0
    from recalibration.srm import SRMConfig

    features = tuple(f.strip() for f in args.features.split(",") if f.strip())
    res = pretrain_and_evaluate(
        load_dataset(args.train),
        load_dataset(args.val),
        evaluated,
        seg,
        SRMConfig(features=features, reduce=args.reduce),
        cache=EmbeddingCache(args.cache),
        epochs=args.epochs,
        seed=args.seed,
        save_path=args.save,
    )
    print(
        f"SRM (implicit, features {', '.join(features)}) trained on {args.train}, "
        f"early-stopped on {args.val}:"
    )
    print(summarize(res))
    write_json(args.out, res)
    return 0


def _run_eval(args: argparse.Namespace, seg: object, evaluated: object) -> int:
    """``--run RUN``: the run's SRM and, for a lookahead agent, its judge, on ``--eval``."""
    import time

    from agents.prompt_agent import PromptAgent
    from recalibration.evaluate import evaluate_srm, summarize
    from segmenter import EmbeddingCache

    if evaluated is None:
        raise UsageError("--run evaluates a trained run: give the split to measure with --eval")
    cache = EmbeddingCache(args.cache)
    agent = PromptAgent.load(args.run, segmenter=seg, cache=cache)
    t0 = time.perf_counter()
    res = evaluate_srm(agent.srm, evaluated, seg, cache=cache, seed=args.seed)
    print(f"{args.run}: SRM on {args.eval}:")
    print(summarize(res))
    if getattr(agent, "kind", "ppo") == "lookahead":
        from agents.lookahead_training import evaluate_judge

        items = [
            (cache.get_or_encode(seg, s.load_image()), s.mask, s.load_image) for s in evaluated
        ]
        judge = evaluate_judge(agent, items)
        res["judge"] = judge
        for name in ("states_judge", "states_oracle"):
            q = judge[name]
            print(
                f"judge on {name[7:]} trajectories: Spearman {q['spearman']:.3f}, top-1 regret "
                f"{q['top1_regret']:.4f}, share of the oracle's gain over the heuristic "
                f"{q['share_of_oracle_gain']:.3f} ({int(q['states'])} states)"
            )
        m = judge["episodes_miou"]
        share = judge["episodes_share_of_oracle_gain"]
        print(
            "episodes (low-res IoU of the final mask, mean): "
            + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
            + ("" if share is None else f"; the agent recovers {share:.3f} of the oracle's gain")
        )
    res["seconds"] = time.perf_counter() - t0
    write_json(args.out, res)
    return 0
