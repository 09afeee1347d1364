"""Interrupted and concurrent work: SIGKILL during `train` and `embed`, then resume / re-run;
two `embed` processes on one folder. Nothing may be lost or left half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agents.prompt_agent import PromptAgent, latest_checkpoint, read_meta
from segmenter import EmbeddingCache

TASK = """\
name: tiny_kill
data: {train: "synthetic:val", val: "synthetic:val"}
segmenter: tiny
env: {max_steps: 4}
srm_pretrain_epochs: 1
ppo: {n_steps: 32, batch_size: 16, n_epochs: 2, features_dim: 32, cnn_channels: 8}
total_timesteps: 100000
eval_every: 64
checkpoint_every: 32
"""


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ALIGNSAM_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cli", "--threads", "1", *args]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended early ({proc.returncode}):\n{err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the process")
        time.sleep(0.05)


def _all_entries_valid(cache_root: Path) -> list[Path]:
    """Every ``.npz`` entry opens and passes the cache's own checksum check."""
    entries = sorted(cache_root.rglob("*.npz"))
    cache = EmbeddingCache(cache_root)
    for path in entries:
        with np.load(path, allow_pickle=False) as z:  # a half-written zip would raise here
            model_id = json.loads(str(z["meta"]))["model_id"]
        assert cache.path_for(model_id, path.stem) == path
        assert cache.load(model_id, path.stem) is not None, path
    assert cache.recomputed_corrupt == 0
    return entries


def test_sigkill_during_train_then_resume(tmp_path, faults):
    (tmp_path / "task.yaml").write_text(TASK)
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        _cli("train", "task.yaml", "--runs-dir", str(runs), "--no-progress"),
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def has_two_checkpoints() -> bool:
        run = next(runs.glob("tiny_kill__*"), None)
        ckpt = latest_checkpoint(run) if run else None
        return ckpt is not None and read_meta(ckpt)["step"] >= 64

    _wait_for(has_two_checkpoints, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = next(runs.glob("tiny_kill__*"))
    ckpt = latest_checkpoint(run)
    saved = read_meta(ckpt)
    assert saved["step"] >= 64 and saved["task"]["name"] == "tiny_kill"
    PromptAgent.load(run, which="latest")  # the pointed-to checkpoint is complete and loads
    # what a writer killed inside write_checkpoint leaves: a hidden temp folder, half filled
    stale = run / "checkpoints" / f".step_{saved['step'] + 32}.x1y2"
    stale.mkdir()
    (stale / "agent.zip").write_bytes(b"PK\x03\x04 half a zip")

    target = saved["step"] + 32
    done = subprocess.run(
        _cli("train", "--resume", str(run), "--timesteps", str(target), "--no-progress"),
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{target} steps" in done.stdout
    meta = read_meta(latest_checkpoint(run))
    assert meta["step"] == target
    assert meta["task"] == saved["task"]  # same config after the resume
    assert not [p for p in (run / "checkpoints").glob(".*") if p.is_dir()]  # no temp leftovers
    faults.survived("SIGKILL during train, then --resume")
    faults.survived("checkpoint writer killed mid-write")

    wrong = subprocess.run(
        _cli("train", "synthetic", "--resume", str(run)),
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 3 and "is a run of task 'tiny_kill'" in wrong.stderr


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        arr = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    return folder


def test_sigkill_during_embed_leaves_only_complete_entries(tmp_path, image_folder, faults):
    cache = tmp_path / "cache"
    args = _cli("embed", str(image_folder), "--segmenter", "tiny", "--cache", str(cache))
    proc = subprocess.Popen(
        args, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: len(list(cache.rglob("*.npz"))) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _all_entries_valid(cache)
    assert 3 <= len(before) < 30  # killed part-way, every finished entry complete
    again = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{30 - len(before)} encoded, {len(before)} already cached" in again.stdout
    assert len(_all_entries_valid(cache)) == 30
    faults.survived("SIGKILL during embed, then re-run")


def test_two_embed_processes_share_one_cache(tmp_path, image_folder, faults):
    cache = tmp_path / "cache"
    args = _cli("embed", str(image_folder), "--segmenter", "tiny", "--cache", str(cache))
    procs = [
        subprocess.Popen(
            args, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert len(_all_entries_valid(cache)) == 30
    faults.survived("two embed processes on one folder")


def test_a_run_killed_between_a_checkpoint_and_its_pointer_resumes_from_that_checkpoint(tmp_path):
    """The ``latest`` pointer is written after the ``step_N`` folder: a kill in between leaves
    a complete checkpoint without a pointer, which resume must still find."""
    ckpts = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(tmp_path / "run") is None  # nothing yet: a fresh run
    for step in (32, 64, 128):
        (ckpts / f"step_{step:09d}").mkdir(parents=True)
        if step != 128:  # the newest folder is half-written (no meta.json)
            (ckpts / f"step_{step:09d}" / "meta.json").write_text("{}")
    assert latest_checkpoint(tmp_path / "run") == ckpts / "step_000000064"
