"""The one progress layer (segmenter.progress): live bars on a terminal, a few plain lines in a
log file, and a long-ish command whose output goes to a file stays readable (issue 29)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from segmenter import progress as progress_mod
from segmenter.progress import LineProgress, progress_bar, progress_mode

REPO = Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_where_the_output_goes(monkeypatch):
    monkeypatch.delenv("ALIGNSAM_PROGRESS", raising=False)
    assert progress_mode(io.StringIO()) == "lines"
    assert progress_mode(_Tty()) == "bar"
    monkeypatch.setenv("ALIGNSAM_PROGRESS", "lines")
    assert progress_mode(_Tty()) == "lines"
    monkeypatch.setenv("ALIGNSAM_PROGRESS", "off")
    assert progress_bar(range(3), desc="x").disable


def test_a_short_stage_is_one_closing_line():
    out = io.StringIO()
    for _ in LineProgress(range(50), desc="encode", unit="img", stream=out):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert re.fullmatch(r"encode: 50/50 img in 00:0\d \(.*img/s\)", lines[0]), lines


def test_a_long_stage_prints_a_line_per_tenth_with_rate_and_time_left(monkeypatch):
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL", 0.0)  # as if every step took > 30 s
    monkeypatch.setattr(progress_mod, "CHECK_INTERVAL", 0.0)
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="PPO", unit="step", stream=out)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    bar.close()  # a second close prints nothing more
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert len(lines) == 10, lines  # every 10 % but the last, then the closing line
    assert not any("(100%)" in line for line in lines)
    assert re.fullmatch(r"PPO: 100/1000 step \(10%\), .*step/s, .* left", lines[0]), lines[0]
    assert lines[-1].startswith("PPO: 1000/1000 step in ")


def test_lines_give_the_stage_s_average_rate_not_its_last_burst(monkeypatch):
    # PPO's steps come in bursts (a rollout, then an update and an evaluation): a line's rate
    # and time left are the whole stage's average, so they do not swing with the last burst.
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL", 0.0)
    monkeypatch.setattr(progress_mod, "CHECK_INTERVAL", 0.0)
    clock = [1000.0]
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="PPO", unit="step", stream=out)
    for i in range(1000):
        clock[0] += 9.901 if i % 100 == 99 else 0.001  # 100 steps in 10 s, 99 % of it in one
        bar.update(1)
    bar.close()
    running = out.getvalue().splitlines()[:-1]
    assert len(running) == 9, running
    for k, line in enumerate(running, start=1):
        rate, minutes, seconds = re.search(r"([\d.]+)step/s, (\d+):(\d+) left", line).groups()
        assert abs(float(rate) - 10) < 0.02, line  # the average, 10 steps/s
        assert abs(60 * int(minutes) + int(seconds) - (1000 - 100 * k) / 10) <= 1, line


def test_a_resumed_stage_counts_from_where_it_was(monkeypatch):
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL", 0.0)
    monkeypatch.setattr(progress_mod, "CHECK_INTERVAL", 0.0)
    out = io.StringIO()
    bar = LineProgress(total=100, initial=95, desc="teacher", unit="ep", stream=out)
    bar.update(5)
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # no 10 % step
    assert out.getvalue().startswith("teacher: 100/100 ep in ")


def test_train_into_a_log_file_is_a_few_plain_lines_per_stage(tmp_path):
    """``alignsam train TASK > train.log 2>&1`` (PPO and lookahead on the tiny segmenter): no
    carriage return, and each stage's progress in at most a few lines."""
    task = tmp_path / "task.yaml"
    task.write_text(
        "name: tiny_log\n"
        'data: {train: "synthetic:val", val: "synthetic:val"}\n'
        "segmenter: tiny\nenv: {max_steps: 3}\nsrm_pretrain_epochs: 3\n"
        "ppo: {n_steps: 32, batch_size: 32, n_epochs: 1, features_dim: 32, cnn_channels: 8}\n"
        "total_timesteps: 96\neval_every: 32\ncheckpoint_every: 32\n"
        "lookahead: {steps: 2, proposals: 2, folds: 2, episodes: 1, rounds: 2}\n"
    )
    env = {**os.environ, "ALIGNSAM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("ALIGNSAM_PROGRESS", None)
    look_task = tmp_path / "look.yaml"
    look_task.write_text(task.read_text().replace("tiny_log", "tiny_look") + "agent: lookahead\n")
    texts = []
    for path in (task, look_task):
        log = tmp_path / f"{path.stem}.log"
        with log.open("w") as fh:
            cmd = [sys.executable, "-m", "experiments.cli", "--threads", "1", "train", str(path)]
            proc = subprocess.run(
                [*cmd, "--runs-dir", "runs"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                env=env,
                timeout=600,
            )
        text = log.read_text()
        assert proc.returncode == 0, text
        texts.append(text)
    ppo, look = texts
    for text in texts:
        assert "\r" not in text and "\x1b" not in text, text
        stages = Counter(
            m.group(1) for m in re.finditer(r"^([A-Za-z][^:\n]{0,40}): \d+/\d+ ", text, re.M)
        )
        assert stages and max(stages.values()) <= 3, stages
        assert len(text.splitlines()) <= 60, text
    assert re.search(r"^PPO: 96/96 step in ", ppo, re.M), ppo
    assert re.search(r"PPO agent, 96 steps in \d+ s .*peak memory [\d.]+ GiB", ppo), ppo
    assert re.search(r"lookahead agent, 2 judge rounds \(\d+ decoder calls\) in \d+ s", look), look
    assert "0 steps" not in look and "PPO" not in look


def test_every_loop_goes_through_the_one_layer():
    """Only segmenter/progress.py imports tqdm; nothing imports rich; no SB3 bar of its own."""
    offenders = []
    for pkg in ("segmenter", "recalibration", "envs", "agents", "experiments"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            text = path.read_text()
            rel = path.relative_to(REPO).as_posix()
            if re.search(r"^\s*(from|import) (tqdm|rich)\b", text, re.M) and rel != (
                "segmenter/progress.py"
            ):
                offenders.append(rel)
            if "progress_bar=True" in text or re.search(r"progress_bar=(?!False)\w", text):
                offenders.append(f"{rel} (SB3 progress_bar)")
    assert not offenders, offenders
