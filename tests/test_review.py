"""``alignsam review``: the review store, its HTTP API (safety cases included) and the page in a
real headless Chromium."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def agent(first_run):
    from agents.prompt_agent import PromptAgent
    from segmenter import EmbeddingCache

    summary, cache = first_run
    return PromptAgent.load(summary["run_dir"], cache=EmbeddingCache(cache))


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = (rng.random((48, 64, 3)) * 60).astype(np.uint8)
        img[12:36, 16 + 8 * i : 40 + 8 * i] = 220  # a bright object
        Image.fromarray(img).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def _store(agent, images, out):
    from experiments.review import ReviewStore
    from experiments.segment import gather_inputs

    return ReviewStore(agent, gather_inputs([str(images)], "skip"), out)


@pytest.fixture()
def client(agent, images, tmp_path):
    from fastapi.testclient import TestClient

    from experiments.review_app import build_app

    store = _store(agent, images, tmp_path / "out")
    return TestClient(build_app(store)), store


def _at(store, name: str) -> str:
    """The API path of image ``name`` (the list is in the folder's order)."""
    return f"/api/items/{next(i for i, s in enumerate(store.samples) if s.id == name)}"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_click_changes_the_mask_with_one_decoder_call_and_undo_reset_clear_go_back(client):
    c, store = client
    a = _at(store, "img0")
    first = c.get(a).json()
    assert first["person_clicks"] == 0 and first["clicks"], "opens with the agent's clicks"
    assert all(k["by"] == "agent" for k in first["clicks"])
    session = store.open(int(a.rsplit("/", 1)[1])).session
    calls = session.decoder_calls
    after = c.post(f"{a}/click", json={"x": 5.0, "y": 5.0, "label": 0}).json()
    assert session.decoder_calls - calls == 1, after
    assert after["person_clicks"] == 1 and after["clicks"][-1]["by"] == "person"
    assert after["status"] == "edited" and after["can_undo"]
    png = c.get(f"{a}/overlay.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    back = c.post(f"{a}/undo").json()
    assert back["clicks"] == first["clicks"] and back["mask_area"] == first["mask_area"]
    assert c.post(f"{a}/undo").status_code == 400  # nothing left to undo
    cleared = c.post(f"{a}/clear").json()
    assert cleared["mask_area"] == 0.0 and cleared["cleared"]
    c.post(f"{a}/click", json={"x": 30.0, "y": 20.0, "label": 1})
    reset = c.post(f"{a}/reset").json()
    assert reset["clicks"] == first["clicks"] and not reset["cleared"]
    x, y = first["clicks"][0]["x"], first["clicks"][0]["y"]
    removed = c.post(f"{a}/remove", json={"x": x + 1, "y": y, "radius": 3}).json()
    assert len(removed["clicks"]) == len(first["clicks"]) - 1


def test_accepted_images_are_written_like_segment_and_a_rerun_resumes(client, agent, images):
    from pycocotools.coco import COCO

    c, store = client
    a, b = _at(store, "img0"), _at(store, "img1")
    c.post(f"{a}/click", json={"x": 30.0, "y": 20.0, "label": 1})
    c.post(f"{a}/accept")
    c.post(f"{b}/clear")
    c.post(f"{b}/accept")
    out = store.out
    assert (out / "masks" / "img0.png").is_file() and (out / "overlays" / "img0.png").is_file()
    coco = COCO(str(out / "results.json"))
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == 1  # no target: no annotation
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert ann["clicks"][-1]["by"] == "person" and ann["person_clicks"] == 1
    assert np.array_equal(
        coco.annToMask(ann) > 0, np.asarray(Image.open(out / "masks/img0.png")) > 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"] == 2 and summary["no_target"] == ["img1"]
    rerun = _store(agent, images, out)
    listing = rerun.listing(0, 50)
    status = {row["id"]: row["status"] for row in listing["items"]}
    assert status["img0"] == "accepted" and status["img1"] == "no target"
    assert status["img2"] == "todo" and listing["accepted"] == 2
    assert rerun.samples[listing["first_todo"]].id in ("broken", "img2")


def test_requests_never_reach_the_file_system_and_bad_ones_get_a_4xx(client, tmp_path):
    c, store = client
    a = _at(store, "img0")
    before = _files(tmp_path)
    for path in (
        "/api/items/..%2F..%2Fetc%2Fpasswd",
        "/api/items/../../etc/passwd",
        "/api/items/%2Fetc%2Fpasswd/overlay.png",
        "/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/api/items/-1",
        "/api/items/99",
        "/static/../../README.md",
    ):
        r = c.get(path)
        assert 400 <= r.status_code < 500, path
        assert "root:" not in r.text
    for body in (
        {"x": 1},
        {"x": 1, "y": 1, "label": 5},
        {"x": -3, "y": 1, "label": 1},
        "][",
        {"x": 1, "y": 1, "label": 1, "path": "/etc/passwd"},
    ):
        r = c.post(
            f"{a}/click",
            content=body if isinstance(body, str) else json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 422 and r.json()["detail"], body
    outside = c.post(f"{a}/click", json={"x": 5000, "y": 1, "label": 1})
    assert outside.status_code == 400 and "outside" in outside.json()["detail"]
    broken = next(i for i, s in enumerate(store.samples) if s.id == "broken")
    r = c.get(f"/api/items/{broken}")
    assert r.status_code == 422 and "broken" in r.json()["detail"]
    c.post(f"{a}/accept")
    written = _files(tmp_path) - before
    assert written and all(p.startswith("out") for p in written), written


def test_the_list_is_paged_and_a_thousand_images_are_not_loaded_to_list_them(agent, tmp_path):
    from experiments.review import ReviewStore

    class Lazy:
        def __init__(self, i):
            self.id, self.file_name = f"frame{i:04d}", f"frame{i:04d}.png"

        def load_image(self):
            raise AssertionError("listing must not read images")

    store = ReviewStore(agent, [Lazy(i) for i in range(1000)], tmp_path / "out")
    page = store.listing(950, 50)
    assert page["total"] == 1000 and len(page["items"]) == 50
    assert page["items"][-1]["id"] == "frame0999" and page["first_todo"] == 0


def test_a_non_local_host_is_warned_about(caplog):
    from experiments.review_app import host_warning

    assert host_warning("127.0.0.1", 8765, "out") is None
    assert host_warning("localhost", 8765, "out") is None
    assert "anyone" in host_warning("0.0.0.0", 8765, "out")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_in_a_real_browser_clicks_sees_the_mask_change_and_accepts(
    agent, images, tmp_path
):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import uvicorn

    from experiments.review_app import build_app

    (images / "broken.png").unlink()  # the page opens at the first image not accepted
    store = _store(agent, images, tmp_path / "out")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(store), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=binary, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(f"http://127.0.0.1:{port}/")
            status = page.locator("#status")
            page.wait_for_function("document.querySelector('#status').dataset.state === 'todo'")
            clicks = int(status.get_attribute("data-clicks"))
            page.wait_for_function("document.querySelector('#view').complete")
            before = page.locator("#view").screenshot()
            box = page.locator("#view").bounding_box()
            page.locator("#view").click(
                button="right", position={"x": box["width"] * 0.05, "y": box["height"] * 0.05}
            )
            page.wait_for_function(
                f"document.querySelector('#status').dataset.clicks === '{clicks + 1}'"
            )
            page.locator("#view").click(
                position={"x": box["width"] * 0.5, "y": box["height"] * 0.5}
            )
            page.wait_for_function(
                f"document.querySelector('#status').dataset.clicks === '{clicks + 2}'"
            )
            assert status.get_attribute("data-state") == "edited"
            page.wait_for_function("document.querySelector('#view').complete")
            assert page.locator("#view").screenshot() != before  # the new overlay is shown
            page.keyboard.press("a")  # accept, then the next image opens
            page.wait_for_function(
                "document.querySelector('#counts').textContent.startsWith('1 of')"
            )
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    rec = json.loads(next((tmp_path / "out" / "records").glob("*.json")).read_text())
    assert rec["person_clicks"] == 2 and [c["by"] for c in rec["clicks"]][-2:] == ["person"] * 2
    assert (tmp_path / "out" / "masks" / f"{Path(rec['mask_file']).name}").is_file()


def test_a_click_is_answered_while_the_agent_prepares_the_next_image(agent, images, tmp_path):
    store = _store(agent, images, tmp_path / "out")
    a, b = (next(i for i, s in enumerate(store.samples) if s.id == n) for n in ("img0", "img1"))
    store.open(a)
    release, started = threading.Event(), threading.Event()
    real = store.agent.segment

    def slow(*args, **kwargs):
        started.set()
        release.wait(30)  # the agent is busy until the click below has been answered
        return real(*args, **kwargs)

    store.agent.segment = slow
    try:
        store.prefetch(b)
        assert started.wait(10)
        done = threading.Event()
        threading.Thread(target=lambda: (store.click(a, 30.0, 20.0, 1), done.set())).start()
        assert done.wait(10), "the click waited for the agent"
        release.set()
        assert store.state(b)["clicks"]  # the prefetched image opens with the agent's clicks
    finally:
        release.set()
        store.agent.segment = real
