"""Make ``docs/review.png``: the review page in headless Chromium on a Kvasir `val` image, after
the corrections a person would make (the agent's clicks the ground truth contradicts removed with
shift+click, then clicks where the simulated annotator would click). Prints each action's round
trip as the page measured it (request, decoder call, new overlay PNG shown).

    ALIGNSAM_DATA=../shared/data python docs/tools/review_screenshot.py RUN [--image 16]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time

import numpy as np
import uvicorn
from playwright.sync_api import sync_playwright

from agents.clickers import SimulatedAnnotator
from agents.prompt_agent import PromptAgent
from experiments.review import ReviewStore
from experiments.review_app import build_app
from experiments.segment import gather_inputs
from segmenter import EmbeddingCache
from segmenter.base import mask_iou


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--image", type=int, default=16, help="index in kvasir:val")
    ap.add_argument("--clicks", type=int, default=1, help="annotator clicks after the pruning")
    ap.add_argument("--out", default="docs/review.png")
    args = ap.parse_args()
    samples = gather_inputs([f"kvasir:val[{args.image}:{args.image + 2}]"])
    agent = PromptAgent.load(args.run, cache=EmbeddingCache())
    folder = tempfile.mkdtemp()
    store = ReviewStore(agent, samples, folder)
    gt = np.asarray(samples[0].sample.mask, bool)
    server = uvicorn.Server(uvicorn.Config(build_app(store), port=8799, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto("http://127.0.0.1:8799/")
        page.wait_for_function("document.querySelector('#status').dataset.state === 'todo'")
        print("agent IoU", round(mask_iou(store.mask(0), gt), 3))

        def at(x: float, y: float) -> dict:
            box = page.locator("#view").bounding_box()
            st = store.state(0)
            return {
                "x": float(x) / st["width"] * box["width"],
                "y": float(y) / st["height"] * box["height"],
            }

        times: list[float] = []

        def wait(n: int) -> None:
            page.wait_for_function(f"document.querySelector('#status').dataset.clicks === '{n}'")
            page.wait_for_function("document.querySelector('#view').complete")
            times.append(float(page.locator("#view").get_attribute("data-ms")))

        session = store.open(0).session
        agent_clicks = list(zip(session.points.tolist(), session.labels.tolist(), strict=True))
        for (x, y), label in agent_clicks:
            if gt[int(y), int(x)] != bool(label):  # contradicted by the ground truth
                n = len(store.open(0).session.points)
                page.locator("#view").click(position=at(x, y), modifiers=["Shift"])
                wait(n - 1)
        clicked = np.zeros(gt.shape, bool)
        for _ in range(args.clicks):
            row, col, label = SimulatedAnnotator.next_click(gt, store.mask(0), clicked)
            clicked[row, col] = True
            n = len(store.open(0).session.points)
            page.locator("#view").click(
                position=at(col + 0.5, row + 0.5), button="left" if label else "right"
            )
            wait(n + 1)
        print("corrected IoU", round(mask_iou(store.mask(0), gt), 3))
        print(f"round trips (ms): {times}; mean {np.mean(times):.0f}, max {max(times):.0f}")
        page.screenshot(path=args.out)
        browser.close()
    server.should_exit = True
    thread.join(timeout=10)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
