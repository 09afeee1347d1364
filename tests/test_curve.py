"""``alignsam curve`` (issue 30): nested training sets, every row an ordinary folder, the
curve's files, and a rerun that resumes instead of training again; on the tiny segmenter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from experiments.curve import CurveConfig, curve_task
from experiments.runs import load_train_split, resolve_task

TASK = """\
name: tiny_curve
data: {train: "synthetic:train[:6]", pool: "synthetic:train[6:]", val: "synthetic:val[:4]",
       test: "synthetic:test"}
segmenter: tiny
env: {max_steps: 2}
srm_pretrain_epochs: 2
agent: lookahead
lookahead: {steps: 2, proposals: 2, folds: 2, episodes: 1, rounds: 1, judge_images: 4}
"""
#: The paper's PPO agent on the same data, for the PPO row.
PPO = (
    TASK.replace("tiny_curve", "tiny_curve_ppo").split("agent: lookahead")[0]
    + "ppo: {n_steps: 16, batch_size: 16, n_epochs: 1, features_dim: 32, cnn_channels: 8}\n"
    + "total_timesteps: 16\neval_every: 16\ncheckpoint_every: 16\n"
)


def _curve(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGNSAM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    args = ["curve", "task.yaml", "--sizes", "3", "10", "--extra-seeds", "1"]
    args += ["--extra-seeds-max-size", "3", "--ppo-task", "ppo.yaml", "--ppo-sizes", "10"]
    args += ["--finetune-steps", "10", "--limit", "2", "--manual-clicks", "3", "--out", "curve"]
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", "--threads", "1", *args, *extra],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=900,
    )


def test_training_sets_are_nested_train_then_pool(tmp_path):
    (tmp_path / "task.yaml").write_text(TASK)
    task = resolve_task(str(tmp_path / "task.yaml"))
    ids = {n: [s.id for s in load_train_split(curve_task(task, n))] for n in (3, 6, 10)}
    train = [s.id for s in load_train_split(task)]
    assert ids[3] == train[:3] and ids[6] == train
    assert ids[10][:6] == train and len(set(ids[10])) == 10
    assert CurveConfig(sizes=[3, 10], extra_seeds=[1], extra_seeds_max_size=3).points() == [
        (3, 0),
        (10, 0),
        (3, 1),
    ]


def test_curve_writes_every_row_and_resumes(tmp_path):
    (tmp_path / "task.yaml").write_text(TASK)
    (tmp_path / "ppo.yaml").write_text(PPO)
    proc = _curve(tmp_path, "--confirm", "synthetic:val[:3]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "curve"
    result = json.loads((out / "results.json").read_text())
    # the largest size's rows on a second set
    confirm = result["confirm"]
    assert confirm["size"] == 10 and confirm["n_images"] == 3
    assert {"agent", "ppo", "srm_confident", "finetuned_b", "manual_1"} <= set(confirm["rows"])
    assert "ceiling" not in confirm["rows"] and "diff_vs_agent" in confirm["rows"]["ppo"]
    assert "on `synthetic:val[:3]` (3 images" in (out / "results.md").read_text()
    assert [s["size"] for s in result["sizes"]] == [3, 10]
    assert result["sizes"][0]["seeds"] == [0, 1] and result["sizes"][1]["seeds"] == [0]
    small, large = (s["rows"] for s in result["sizes"])
    for rows in (small, large):
        for key in ("agent", "srm_confident", "finetuned_b", "ceiling", "manual_1", "manual_3"):
            lo, hi = rows[key]["ci95"]
            assert 0 <= lo <= rows[key]["miou"] <= hi <= 1, (key, rows[key])
        assert "diff_vs_agent" in rows["srm_confident"] and rows["agent"]["train_minutes"] > 0
    assert "ppo" in large and "ppo" not in small
    assert (out / "curve.png").stat().st_size > 10_000
    assert "| 10 (seeds 0) |" in (out / "results.md").read_text()
    # Each row is an ordinary folder: a run (config, checkpoints), a delta, a benchmark.
    point = out / "n0010_s0"
    assert (point / "agent" / "checkpoints" / "best" / "meta.json").is_file()
    assert (point / "ppo" / "checkpoints" / "latest").exists()
    assert (point / "finetune" / "delta.pt").is_file()
    # Trained once on 10 images (train + pool), benchmarked on the same 3 test images.
    assert json.loads((point / "agent" / "config.json").read_text())["data"]["train_size"] == 10
    # A rerun after a lost benchmark redoes that step alone.
    trained = (point / "agent" / "summary.json").stat().st_mtime_ns
    (point / "benchmark" / "results.json").unlink()
    again = _curve(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (point / "agent" / "summary.json").stat().st_mtime_ns == trained
    assert (point / "benchmark" / "results.json").is_file()
    # A finished point keeps its record: with its heavy row folders deleted it is not retrained.
    before = json.loads((out / "results.json").read_text())["sizes"]
    for row in ("agent", "ppo", "finetune"):
        shutil.rmtree(point / row)
    third = _curve(tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert not (point / "agent").exists() and (point / "point.json").is_file()
    after = json.loads((out / "results.json").read_text())["sizes"]
    assert [s["rows"] for s in after] == [s["rows"] for s in before]
    # A row asked for later (PPO at 3 images too) is trained and scored with the others, and
    # agents trained before the task chose its clicks on val get them chosen and re-scored.
    fourth = _curve(tmp_path, "--ppo-sizes", "3", "10", "--set", "lookahead.choose_clicks=true")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert "ppo" in result["sizes"][0]["rows"]
    small, large = result["sizes"]
    assert all(c in (0, 1, 2) for c in small["agent_clicks"]), small["agent_clicks"]
    assert (out / "n0003_s0" / "benchmark" / "results.before.json").is_file()
    # the point of 10, its agent deleted above, keeps its record rather than train again
    assert large["agent_clicks"] == [None] and not (point / "agent").exists()
    assert "clicks (chosen on val, per seed)" in (out / "results.md").read_text()
    # a bound on the images made worse asks for the answer to be chosen again under it (with
    # the value model) and the point to be scored again
    fifth = _curve(tmp_path, "--ppo-sizes", "3", "10", "--set", "lookahead.choose_clicks=true",
                   "lookahead.max_worse=0")  # fmt: skip
    assert fifth.returncode == 0, fifth.stderr[-3000:]
    record = json.loads((out / "n0003_s0" / "point.json").read_text())
    assert record["agent_max_worse"] == 0 and record["agent_answer"]["val_worse"] == 0
    assert (out / "n0003_s0" / "agent" / "checkpoints" / "best" / "value.json").is_file()
    assert "; answer: " in (out / "results.md").read_text()


def test_a_row_that_one_seed_lacks_is_summarised_over_the_seeds_that_have_it():
    from experiments.curve_report import _cell, _row_stats

    seed0 = {"agent": [0.5, 0.7, 0.9], "srm_confident": [0.4, 0.6, 0.8]}
    seed1 = {"agent": [0.3, 0.5, 0.7], "srm_confident": [0.2, 0.4, 0.6], "ppo": [0.1, 0.3, 0.5]}
    rows = _row_stats([seed0, seed1], seed=0, seeds=[0, 1])
    assert np.isclose(rows["agent"]["miou"], 0.6) and "seeds" not in rows["agent"]
    # PPO on seed 1 alone: its mean, and its difference to seed 1's agent (not both seeds')
    assert np.isclose(rows["ppo"]["miou"], 0.3) and rows["ppo"]["seeds"] == [1]
    assert np.isclose(rows["ppo"]["diff_vs_agent"][0], -0.2)
    assert np.isclose(rows["srm_confident"]["diff_vs_agent"][0], -0.1)
    assert _cell(rows["ppo"]).endswith("(seed 1 only)")


def test_results_md_gives_each_seed_s_budget_where_the_seeds_differ():
    from experiments.curve_report import render_curve_markdown

    row = {"miou": 0.6, "ci95": [0.5, 0.7]}
    b60 = {"srm_epochs": 60, "srm_pretrain_steps": None, "judge_images": None}
    b840 = {"srm_epochs": 210, "srm_pretrain_steps": 840, "judge_images": 100}
    size = {"n_images": 3, "rows": {"agent": row}, "agent_clicks": [3, 5]}
    result = {
        "task": "t",
        "split": "test",
        "sizes": [
            {**size, "size": 25, "seeds": [0, 1], "budgets": b60, "budgets_by_seed": [b60, b840]},
            {**size, "size": 50, "seeds": [0, 1], "budgets": b840, "budgets_by_seed": [b840, b840]},
            {**size, "size": 100, "seeds": [0], "budgets": b840},  # written before per-seed
        ],
    }
    text = render_curve_markdown(result)
    assert (
        "- 25: seed 0: 60 SRM epochs; judge on all images per round; seed 1: 210 SRM epochs "
        "(840 steps); judge on 100 images per round" in text
    )
    assert "- 50: 210 SRM epochs (840 steps); judge on 100 images per round" in text
    assert "- 100: 210 SRM epochs (840 steps); judge on 100 images per round" in text
