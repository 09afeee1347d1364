"""Checkpoint faults: missing, corrupt or mismatched segmenter weights and agent checkpoints
(another task, another segmenter, a newer format) each give a clear error naming the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from agents.prompt_agent import AgentLoadError, PromptAgent, read_meta
from experiments.train import train
from segmenter import SegmenterError, build_segmenter
from segmenter import weights as W
from segmenter.registry import build_tiny_sam, load_state_dict


def test_missing_segmenter_checkpoint_is_clear(tmp_path, faults):
    with pytest.raises(SegmenterError, match="does not exist"):
        build_segmenter("mobile_sam", checkpoint=tmp_path / "nope.pt")
    faults.bad_input("checkpoints", "missing segmenter weights")


def test_corrupt_segmenter_checkpoint_is_clear(tmp_path, faults):
    bad = tmp_path / "mobile_sam.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SegmenterError, match="corrupt"):
        build_segmenter("mobile_sam", checkpoint=bad)
    faults.bad_input("checkpoints", "corrupt segmenter weights")


def test_wrong_architecture_checkpoint_is_clear(tmp_path, faults):
    seg = build_tiny_sam()
    path = tmp_path / "tiny.pt"
    torch.save(seg.model.state_dict(), path)
    with pytest.raises(SegmenterError, match="does not fit the mobile_sam"):
        build_segmenter("mobile_sam", checkpoint=path)
    # and the right one loads strictly
    fresh = build_tiny_sam(seed=5).model
    load_state_dict(fresh, path, "tiny")
    faults.bad_input("checkpoints", "weights of another architecture")


def test_fetch_from_local_file_verifies_hash(isolated_home, tmp_path, faults):
    fake = tmp_path / "mobile_sam.pt"
    fake.write_bytes(b"x" * 100)
    with pytest.raises(SegmenterError, match="SHA-256"):
        W.fetch("mobile_sam", source=fake)
    assert not W.checkpoint_path("mobile_sam").exists()
    faults.bad_input("checkpoints", "weights file with the wrong hash")


def test_agent_load_errors(tmp_path, faults):
    with pytest.raises(AgentLoadError, match="no alignsam checkpoint"):
        PromptAgent.load(tmp_path)
    with pytest.raises(AgentLoadError, match="no checkpoint"):
        train(None, resume=tmp_path, progress=False)
    faults.bad_input("checkpoints", "folder without a checkpoint")


def test_agent_checkpoint_mismatches_are_clear(first_run, tiny_task, tmp_path, faults):
    summary, cache = first_run
    run = Path(summary["run_dir"])
    other = tiny_task()
    other.name = "another_task"
    with pytest.raises(AgentLoadError, match="is a run of task 'tiny'"):
        train(other, resume=run, cache_dir=cache, progress=False)
    faults.bad_input("checkpoints", "resume with another task")

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "best", ckpt)
    meta = read_meta(ckpt)
    assert meta["versions"]["torch"] and meta["task"]["name"] == "tiny"  # carried along
    meta["segmenter_model_id"] = "mobile_sam:0123456789ab"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(AgentLoadError, match="trained with segmenter mobile_sam"):
        PromptAgent.load(ckpt)
    faults.bad_input("checkpoints", "agent of another segmenter")
    meta["format_version"] = 99
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(AgentLoadError, match="format 99"):
        PromptAgent.load(ckpt)
    faults.bad_input("checkpoints", "newer checkpoint format")
    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(AgentLoadError, match="meta.json is damaged: not JSON text"):
        PromptAgent.load(ckpt)
    faults.bad_input("checkpoints", "corrupt checkpoint metadata")


def test_a_checkpoint_folder_that_fails_midway_leaves_the_old_one_whole(tmp_path):
    from segmenter.io import atomic_folder

    def fill(text):
        def write(folder):
            (folder / "agent.zip").write_text(text)
            if text == "broken":
                raise OSError("disk full")
            (folder / "meta.json").write_text(text)

        return write

    best = atomic_folder(tmp_path / "best", fill("old"))
    with pytest.raises(OSError, match="disk full"):
        atomic_folder(best, fill("broken"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no hidden half-folder
    kept = {p.name: p.read_text() for p in best.iterdir()}
    assert kept == {"agent.zip": "old", "meta.json": "old"}
    atomic_folder(best, fill("new"))
    assert (best / "meta.json").read_text() == "new" and len(list(tmp_path.iterdir())) == 1
