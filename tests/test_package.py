"""Packaging guards and subprocess smoke tests of every CLI command with tiny budgets."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["envs", "agents", "segmenter", "recalibration", "experiments"]


@pytest.mark.parametrize("name", PACKAGES)
def test_project_packages_come_from_this_repo(name):
    """Generic names like ``envs`` collide with other distributions: make sure we import ours."""
    mod = importlib.import_module(name)
    assert Path(mod.__file__).resolve().is_relative_to(REPO), mod.__file__


def test_library_never_imports_experiments():
    for pkg in ("envs", "agents", "segmenter", "recalibration"):
        for path in (REPO / pkg).rglob("*.py"):
            text = path.read_text()
            assert "from experiments" not in text and "import experiments" not in text, path


def test_no_sys_path_hacks():
    needle = "sys.path." + "insert"
    for pkg in [*PACKAGES, "tests"]:
        for path in (REPO / pkg).rglob("*.py"):
            assert needle not in path.read_text(), path


def run_cli(*args: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGNSAM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=timeout,
    )


def test_cli_weights_list(tmp_path):
    proc = run_cli("weights", "list", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mobile_sam" in proc.stdout and "sam_vit_h" in proc.stdout


def test_cli_weights_fetch_bad_file_is_clear(tmp_path):
    bad = tmp_path / "fake.pt"
    bad.write_bytes(b"123")
    proc = run_cli("weights", "fetch", "mobile_sam", "--from", str(bad), tmp_path=tmp_path)
    assert proc.returncode == 3  # a bad file
    assert "SHA-256" in proc.stderr


def test_cli_embed_oneclick_bench_tiny(tmp_path):
    cache = str(tmp_path / "emb")
    embed = ("embed", "synthetic:val", "--segmenter", "tiny", "--limit", "3", "--cache", cache)
    proc = run_cli(*embed, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 images" in proc.stdout and "3 encoded" in proc.stdout
    again = run_cli(*embed, tmp_path=tmp_path)
    assert "3 already cached" in again.stdout, again.stdout

    out = tmp_path / "oneclick.json"
    proc = run_cli(
        "oneclick",
        "synthetic:val",
        "--segmenter",
        "tiny",
        "--limit",
        "2",
        "--out",
        str(out),
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["n"] == 2

    proc = run_cli(
        "bench",
        "all",
        "--segmenter",
        "tiny",
        "--dataset",
        "synthetic:val",
        "--limit",
        "2",
        "--decode-calls",
        "3",
        "--episodes",
        "1",
        "--cache",
        cache,
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ratio env step / decoder call" in proc.stdout


def test_cli_unknown_dataset_is_clear(tmp_path):
    proc = run_cli("embed", "nonsense:thing", "--segmenter", "tiny", tmp_path=tmp_path)
    assert proc.returncode == 3 and "unknown dataset kind" in proc.stderr


def test_cli_demo_quick_tiny(tmp_path):
    proc = run_cli("demo", "--quick", "--segmenter", "tiny", "--out", "demo", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo" / "benchmark" / "examples.png").is_file()
    assert "lookahead agent" in proc.stdout and "PPO agent" in proc.stdout
    assert "manual @3" in proc.stdout and "mIoU" in proc.stdout
    # The benchmark command on the demo's PPO run, with the labeler abstaining near p = 0.5.
    runs = sorted((tmp_path / "demo" / "runs").iterdir())
    assert [r.name.split("__")[1] for r in runs] == ["lookahead", "ppo"]
    run = runs[1]
    task = tmp_path / "tiny_synthetic.yaml"
    task.write_text(
        "name: synthetic\ndata: {train: 'synthetic:val', test: 'synthetic:test'}\nsegmenter: tiny\n"
    )
    args = ("benchmark", str(task), "--agents", str(run), "--limit", "2", "--methods", "random")
    args += ("--manual-clicks", "2", "--abstain-margin", "0.3", "--out", "bm", "--no-progress")
    proc = run_cli(*args, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "bm" / "results.json").read_text())
    assert result["env"]["abstain_margin"] == 0.3 and result["n_images"] == 2
    assert [m["method"] for m in result["methods"]][:2] == ["agent", "random + SRM (w/o RL)"]


def test_cli_bench_perf_tiny(tmp_path):
    """Stock and fast paths side by side, every figure, on the tiny segmenter."""
    out = tmp_path / "perf.json"
    proc = run_cli(
        "bench", "perf", "--segmenter", "tiny", "--dataset", "synthetic:val", "--limit", "2",
        "--agreement-images", "2", "--decode-calls", "4", "--episodes", "1",
        "--segment-images", "1", "--task", "synthetic", "--out", str(out), tmp_path=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["fast_backend"] == res["fast_backend_after"] == "onnx"
    assert res["agreement"]["annotator_mean_iou"] > 0.99
    assert 0 < res["ppo_fast"]["update_share"] < 1 and res["ppo_fast"]["steps"] == 400
    for line in ("encoder ms/image", "decoder ms/call", "PPO training env-steps/s", "agreement"):
        assert line in proc.stdout
    for name in ("stock", "fast"):  # segment's budget: its own encoder + decoder calls replayed
        seg = res[f"segment_{name}"]
        assert seg["decoder_calls"] >= 2 and seg["replay_decoder_ms"] > 0
        assert seg["ratio_over_budget"] > 0 and "replayed bare" in proc.stdout
