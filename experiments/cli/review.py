"""``alignsam review``: a local web page to review the agent's masks and correct them with
clicks (:mod:`experiments.review`)."""

from __future__ import annotations

import argparse

from experiments.cli.common import Subcommands, add_cache_option, non_negative_int, positive_int


def add(sub: Subcommands) -> None:
    r = sub.add_parser(
        "review",
        help="a local web page to review the agent's masks and fix them with clicks",
        description="Serve a page that shows each image with the agent's mask and clicks; add "
        "foreground / background clicks, undo, reset to the agent's mask, mark 'no target' and "
        "accept. Accepted images are written into --out as alignsam segment writes them (masks, "
        "overlays, COCO results.json with every click and who made it); a rerun with the same "
        "--out resumes.",
    )
    r.add_argument("run", metavar="RUN", help="run folder of the agent (alignsam train)")
    r.add_argument(
        "inputs", nargs="+", metavar="IMAGES", help="image files, folders of images, dataset specs"
    )
    r.add_argument("--out", required=True, metavar="DIR", help="where accepted images go")
    r.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (another than 127.0.0.1 lets other machines in: warned)",
    )
    r.add_argument("--port", type=positive_int, default=8765, help="port to listen on")
    r.add_argument(
        "--clicks",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="agent clicks per image after the SRM's two start points (default: the task's T)",
    )
    r.add_argument("--device", default=None, help="torch device (default: the run's)")
    add_cache_option(r)
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.review_app import serve
    from segmenter import EmbeddingCache

    serve(
        args.run,
        args.inputs,
        args.out,
        host=args.host,
        port=args.port,
        steps=args.clicks,
        cache=EmbeddingCache(args.cache),
        device=args.device,
    )
    return 0
