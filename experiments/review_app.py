"""The web side of ``alignsam review`` (:mod:`experiments.review` holds the state): a FastAPI
application serving the page (:mod:`experiments.review_page`) and its JSON / PNG endpoints, and
:func:`serve`, which runs it with uvicorn on 127.0.0.1 unless told otherwise.

Requests address images by their index in the list given on the command line: no part of a
request becomes a path. Bodies are validated (unknown fields, labels other than 0 / 1 and
negative coordinates are refused with a 422 and the reason); the store's refusals come back as
a 4xx with their message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from envs.data import DataError
from experiments.review import ReviewError, ReviewStore
from experiments.segment import gather_inputs

logger = logging.getLogger(__name__)

__all__ = ["build_app", "host_warning", "serve"]


class Click(BaseModel):
    """A person's click in image pixels."""

    model_config = ConfigDict(extra="forbid")
    x: float = Field(ge=0)
    y: float = Field(ge=0)
    label: int = Field(ge=0, le=1)


class Remove(BaseModel):
    """Remove the click nearest to ``(x, y)`` within ``radius`` image pixels."""

    model_config = ConfigDict(extra="forbid")
    x: float = Field(ge=0)
    y: float = Field(ge=0)
    radius: float = Field(default=12.0, gt=0, le=500)


def build_app(store: ReviewStore) -> Any:
    """The FastAPI application of ``store``: the page and its JSON / PNG endpoints."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from experiments.review_page import PAGE

    app = FastAPI(title="alignsam review", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ReviewError)
    async def review_error(_: Request, exc: ReviewError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/items")
    def items(offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=200)) -> dict:
        return store.listing(offset, limit)

    @app.get("/api/items/{index}")
    def item(index: int) -> dict:
        out = store.state(index)
        store.prefetch(index + 1)
        return out

    @app.get("/api/items/{index}/overlay.png")
    def picture(index: int) -> Response:
        return Response(
            store.overlay_png(index), media_type="image/png", headers={"Cache-Control": "no-store"}
        )

    @app.post("/api/items/{index}/click")
    def click(index: int, body: Click) -> dict:
        return store.click(index, body.x, body.y, body.label)

    @app.post("/api/items/{index}/remove")
    def remove(index: int, body: Remove) -> dict:
        return store.remove(index, body.x, body.y, body.radius)

    @app.post("/api/items/{index}/undo")
    def undo(index: int) -> dict:
        return store.undo(index)

    @app.post("/api/items/{index}/reset")
    def reset(index: int) -> dict:
        return store.reset(index)

    @app.post("/api/items/{index}/clear")
    def clear(index: int) -> dict:
        return store.clear(index)

    @app.post("/api/items/{index}/accept")
    def accept(index: int) -> dict:
        out = store.accept(index)
        store.prefetch(index + 1)
        return out

    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_warning(host: str, port: int, out: str | Path) -> str | None:
    """The warning for listening on ``host`` (``None`` for this machine only)."""
    if host in LOOPBACK:
        return None
    return (
        f"serving on {host}: anyone who can reach this machine on port {port} can see these "
        f"images and write masks into {out} (the default 127.0.0.1 keeps it to this machine)"
    )


def serve(
    run: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    steps: int | None = None,
    cache: Any = None,
    device: str | None = None,
) -> None:
    """Load the agent and the image list, then serve the review page until interrupted."""
    import uvicorn

    from agents.prompt_agent import PromptAgent

    samples = gather_inputs(inputs, "skip")  # unreadable files are shown as such, not fatal
    if not len(samples):
        raise DataError(f"no images in {' '.join(inputs)} (give image files, folders or specs)")
    agent = PromptAgent.load(run, device=device, cache=cache)
    store = ReviewStore(agent, samples, out, steps)
    warning = host_warning(host, port, out)
    if warning:
        logger.warning(warning)
    print(
        f"reviewing {len(store)} images ({len(store.records)} accepted already) of {run}; "
        f"open http://{'localhost' if host in LOOPBACK else host}:{port}/ ; Ctrl+C stops "
        f"(accepted images are in {out})",
        flush=True,
    )
    uvicorn.run(build_app(store), host=host, port=port, log_level="warning")
