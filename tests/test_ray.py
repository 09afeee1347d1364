"""Scale-out on a two-node Ray cluster started on this machine (head plus a second node
process, CPU only): embeddings and benchmark numbers identical to the plain path, and a
2-task x 2-seed sweep that survives a killed worker.

Ray binds to the machine's own address, not 127.0.0.1: its clients turn a loopback address into
the node's address before they connect, so a head bound to loopback alone is unreachable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 150 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    c.add_node(**node)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _entries(root: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(root.rglob("*.npz")):
        with zipfile.ZipFile(path) as z:
            out[path.name] = z.read("features.npy")
    return out


def test_without_ray_installed_the_error_names_the_install(monkeypatch):
    from experiments import distributed

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeError, match=r"pip install 'alignsam\[ray\]'"):
        distributed.require_ray()


def test_embed_on_ray_writes_the_local_entries(cluster, tmp_path):
    from experiments.datasets import load_dataset
    from experiments.distributed import embed
    from segmenter import EmbeddingCache, build_segmenter

    local = EmbeddingCache(tmp_path / "local")
    seg = build_segmenter("tiny")
    for s in load_dataset("synthetic:val")[:6]:
        local.get_or_encode(seg, s.load_image())
    res = embed(
        "synthetic:val",
        {"name": "tiny"},
        tmp_path / "ray",
        address=cluster.address,
        limit=6,
        workers=2,
    )
    assert res["counts"] == {"encoded": 6} and res["workers"] == 2
    a, b = _entries(tmp_path / "local"), _entries(tmp_path / "ray")
    assert len(a) == 6 and a == b  # same files, byte for byte
    again = embed(
        "synthetic:val", {"name": "tiny"}, tmp_path / "ray", address=cluster.address, limit=6
    )
    assert again["counts"] == {"cached": 6}


def test_benchmark_on_ray_gives_the_local_numbers(cluster, first_run, tmp_path):
    from agents.prompt_agent import PromptAgent
    from experiments.benchmark import run_benchmark
    from segmenter import EmbeddingCache

    summary, cache = first_run
    task = PromptAgent.load(summary["run_dir"]).task
    kwargs = dict(
        split="val",
        limit=5,
        cache=EmbeddingCache(cache),
        manual_clicks=3,
        methods=["random", "start_only"],
        progress=False,
    )
    local = run_benchmark(task, [summary["run_dir"]], out=tmp_path / "local", **kwargs)
    sharded = run_benchmark(
        task,
        [summary["run_dir"]],
        out=tmp_path / "ray",
        ray_address=cluster.address,
        ray_workers=2,
        **kwargs,
    )
    assert sharded["workers"] == 2 and local["workers"] == 1
    strip = ("seconds", "decoder_calls")
    for a, b in zip(local["methods"], sharded["methods"], strict=True):
        assert {k: v for k, v in a.items() if k not in strip} == {
            k: v for k, v in b.items() if k not in strip
        }
    for name, rows in local["per_image"].items():
        assert [r["iou"] for r in rows] == [r["iou"] for r in sharded["per_image"][name]]
    assert local["manual"] == sharded["manual"] and local["headline"] == sharded["headline"]


TASK = """name: {name}
data: {{train: "synthetic:val", val: "synthetic:val"}}
segmenter: tiny
env: {{max_steps: 4}}
srm_pretrain_epochs: 2
ppo: {{n_steps: 32, batch_size: 16, n_epochs: 2, features_dim: 32, cnn_channels: 8}}
total_timesteps: {steps}
eval_every: 96
checkpoint_every: 32
"""


def test_sweep_survives_a_killed_worker(cluster, tmp_path):
    """2 tasks x 2 seeds as Ray Tune trials; one trial's worker is SIGKILLed after its first
    checkpoint and the trial resumes from that step."""
    for name in ("tiny_a", "tiny_b"):
        (tmp_path / f"{name}.yaml").write_text(TASK.format(name=name, steps=192))
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "experiments.cli",
        "sweep",
        "tiny_a.yaml",
        "tiny_b.yaml",
        "--seeds",
        "2",
        "--runs-dir",
        str(runs),
        "--name",
        "sw",
        "--cache",
        str(tmp_path / "emb"),
        "--ray",
        cluster.address,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGNSAM_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    victim = runs / "tiny_a__ppo__0__sw"
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        ckpts = [p for p in (victim / "checkpoints").glob("step_*") if (p / "meta.json").is_file()]
        if ckpts and (victim / "worker.pid").is_file():
            killed = int((victim / "worker.pid").read_text())
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=300)
    assert killed is not None, f"the trial finished before it could be killed:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-3000:]
    rows = json.loads((runs / "sw.json").read_text())
    assert len(rows) == 4 and {r["status"] for r in rows} == {"TERMINATED"}
    assert {(r["task"], r["seed"]) for r in rows} == {
        (t, s) for t in ("tiny_a", "tiny_b") for s in (0, 1)
    }
    assert all(r["steps"] == 192 for r in rows)
    (resumed,) = [r for r in rows if Path(r["run_dir"]).name == victim.name]
    assert resumed["start_step"] >= 32  # continued from its checkpoint, not from scratch
    assert int((victim / "worker.pid").read_text()) != killed  # a new worker finished it
    assert np.isfinite([r["best_val_miou"] for r in rows]).all()
    assert "tiny_a" in out and "TERMINATED" in out


def test_curve_on_ray_gives_the_points_of_the_plain_path(cluster, tmp_path):
    """``alignsam curve --ray``: each (size, seed) a Ray Tune trial; the same curve rows and
    run folders as the plain path."""
    from test_curve import TASK

    (tmp_path / "task.yaml").write_text(TASK)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGNSAM_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "experiments.cli", "curve", "task.yaml", "--sizes", "3", "6"]
    cmd += ["--extra-seeds", "--no-finetune", "--limit", "1", "--manual-clicks", "2"]
    cmd += ["--cache", str(tmp_path / "emb"), "--out", "curve", "--ray", cluster.address]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "curve" / "results.json").read_text())
    assert [s["size"] for s in result["sizes"]] == [3, 6]
    assert result["points_done"] == 2
    for s in result["sizes"]:
        assert {"agent", "srm_confident", "ceiling", "manual_1"} <= set(s["rows"])
    for point in ("n0003_s0", "n0006_s0"):
        assert (tmp_path / "curve" / point / "agent" / "summary.json").is_file()
