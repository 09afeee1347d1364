"""What a new user trips over (issue 26), each probe as the exact command with its exit code
and message: values checked up front (1), ``segment`` all or nothing (2), damaged run files (3),
one flag vocabulary and distinct exit codes (4), joinable outputs and the Python API (5)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.cli import COMMANDS, build_parser, version

REPO = Path(__file__).resolve().parents[1]

#: A task that trains in seconds on the tiny random-weight segmenter.
TINY = """\
name: tiny_cli
data: {train: "synthetic:val", val: "synthetic:val"}
segmenter: tiny
env: {max_steps: 3}
srm_pretrain_epochs: 1
ppo: {n_steps: 16, batch_size: 16, n_epochs: 1, features_dim: 32, cnn_channels: 8}
total_timesteps: 16
eval_every: 16
checkpoint_every: 16
"""


def alignsam(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``alignsam ARGS`` in a fresh process (as a user runs it), in ``cwd``."""
    env = {**os.environ, "ALIGNSAM_HOME": str(cwd / "home"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", "--threads", "1", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def _task(tmp_path: Path, **changes: str) -> Path:
    """The tiny task file with some lines replaced (key -> new YAML line)."""
    lines = TINY.splitlines()
    for key, line in changes.items():
        lines = [line if ln.startswith(f"{key}:") else ln for ln in lines]
    path = tmp_path / "task.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- 1. train checks every value before any work ------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timesteps", "-5"], "argument --timesteps: expected a whole number >= 0, got '-5'"),
        (["--steps", "-5"], "argument --steps: expected a whole number >= 0, got '-5'"),
        (["--seed", "x"], "argument --seed: expected a whole number >= 0, got 'x'"),
    ],
)
def test_train_bad_option_value_is_a_usage_error_before_any_work(tmp_path, args, message):
    task = _task(tmp_path)
    t0 = time.monotonic()
    proc = alignsam("train", str(task), "--runs-dir", "runs", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "runs").exists()
    assert time.monotonic() - t0 < 30  # no SRM pretraining, no model


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'ppo: {n_steps: "400", batch_size: 16}',
            "task.yaml: ppo.n_steps: input should be a valid integer, got '400' (a string: write "
            "numbers and true/false without quotes)",
        ),
        ("env: {grid: ten}", "task.yaml: env.grid: input should be a valid integer, got 'ten'"),
        ("env: {grid: 1}", "task.yaml: env.grid: input should be greater than or equal to 2"),
        (
            "ppo: {n_steps: 16, learning_rat: 1e-4}",
            "ppo.learning_rat: unknown key; did you mean 'learning_rate'?",
        ),  # fmt: skip
        ("eval_every: -3", "task.yaml: eval_every: input should be greater than 0, got -3"),
        ("total_timesteps: -5", "total_timesteps: input should be greater than or equal to 0"),
    ],
)
def test_train_bad_task_file_is_named_before_any_work(tmp_path, line, message):
    key = line.split(":")[0]
    task = _task(tmp_path, **{key: line})
    proc = alignsam("train", str(task), "--runs-dir", "runs", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_task_file_lists_every_problem_at_once_and_suggests_nested_keys(tmp_path):
    from agents.config import ConfigError, TaskConfig

    task = _task(tmp_path, env='env: {grid: "ten", max_step: 3}', ppo="grid: 10")
    with pytest.raises(ConfigError) as err:
        TaskConfig.load(task)
    text = str(err.value)
    assert "3 problems" in text
    assert "env.grid: input should be a valid integer" in text
    assert "env.max_step: unknown key; did you mean 'max_steps'?" in text
    assert "grid: unknown key; did you mean 'env.grid'?" in text
    ok = _task(tmp_path, ppo="ppo: {n_steps: 16, batch_size: 16, learning_rate: 1e-4}")
    assert TaskConfig.load(ok).ppo.learning_rate == 1e-4  # YAML 1.2 floats, not strings


def test_sweep_bad_grid_value_is_a_usage_error_before_any_trial(tmp_path):
    task = _task(tmp_path)
    proc = alignsam("sweep", str(task), "--grid", "env.grid=ten", "--runs-dir", "r", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "env.grid: input should be a valid integer, got 'ten'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_train_writes_the_resolved_config_and_resumes_with_a_larger_budget(tmp_path):
    task = _task(tmp_path)
    proc = alignsam("train", str(task), "--runs-dir", "runs", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = (tmp_path / "runs").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == 3 and config["ppo"]["n_steps"] == 16
    fixed = alignsam("train", "--resume", str(run), "--seed", "4", cwd=tmp_path)
    assert fixed.returncode == 2 and "cannot change seed" in fixed.stderr
    more = alignsam("train", "--resume", str(run), "--timesteps", "32", "--no-progress",
                    cwd=tmp_path)  # fmt: skip
    assert more.returncode == 0, more.stderr
    assert "32 steps" in more.stdout


# -- 2. segment: all or nothing ------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run (best and latest checkpoints)."""
    tmp = tmp_path_factory.mktemp("cli_run")
    (tmp / "task.yaml").write_text(TINY.replace("total_timesteps: 16", "total_timesteps: 32"))
    proc = alignsam("train", "task.yaml", "--runs-dir", "runs", "--no-progress", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    (run,) = (tmp / "runs").iterdir()
    assert (run / "checkpoints" / "best" / "meta.json").is_file()
    return run


def _images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_segment_bad_files_late_in_a_folder_are_all_named_and_nothing_is_written(run_dir, tmp_path):
    folder = _images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    (folder / "y_broken.png").write_bytes(b"not a png")
    (folder / "z_empty.jpg").write_bytes(b"")
    proc = alignsam("segment", str(run_dir), "imgs", "--out", "seg", "--no-progress",
                    cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "2 image(s) cannot be used" in proc.stderr
    assert "y_broken.png" in proc.stderr and "z_empty.jpg" in proc.stderr
    assert "--skip-bad" in proc.stderr
    assert not (tmp_path / "seg").exists()
    assert not list(tmp_path.glob(".seg*"))  # no temporary folder left either

    ok = alignsam("segment", str(run_dir), "imgs", "--out", "seg", "--skip-bad", "--no-progress",
                  cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert summary["images"] == 3
    assert sorted(Path(s["id"]).name for s in summary["skipped"]) == ["y_broken.png", "z_empty.jpg"]
    assert sorted(p.name for p in (tmp_path / "seg" / "masks").iterdir()) == [
        "a.png", "b.png", "c.png"
    ]  # fmt: skip


def test_segment_needs_overwrite_for_a_non_empty_out_and_replaces_it_whole(run_dir, tmp_path):
    _images(tmp_path / "imgs", ["a.png"])
    out = tmp_path / "seg"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "old.png").write_bytes(b"stale")
    args = ("segment", str(run_dir), "imgs", "--out", "seg", "--no-progress")
    proc = alignsam(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "--out seg exists and is not empty (1 entries); pass --overwrite" in proc.stderr
    proc = alignsam(*args, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png"]  # old.png is gone
    assert (out / "results.json").is_file() and (out / "summary.json").is_file()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--steps", "-5"], 2, "argument --steps: expected a whole number >= 0, got '-5'"),
        (["--clicks", "-5"], 2, "argument --clicks: expected a whole number >= 0, got '-5'"),
        (["--out", "a_file.txt"], 2, "--out a_file.txt is a file; give a folder"),
        (["--which", "newest"], 2, "argument --which: invalid choice: 'newest'"),
    ],
)
def test_segment_bad_options_are_usage_errors(run_dir, tmp_path, args, code, message):
    _images(tmp_path / "imgs", ["a.png"])
    (tmp_path / "a_file.txt").write_text("x")
    base = ["segment", str(run_dir), "imgs", "--no-progress"]
    if "--out" not in args:
        base += ["--out", "seg"]
    proc = alignsam(*base, *args, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "seg").exists()


# -- 3. damaged run files name the file, what is wrong and the fix -------------------------


def _damage(run_dir: Path, tmp_path: Path, file: str, data: bytes) -> Path:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "best" / file).write_bytes(data)
    _images(tmp_path / "imgs", ["a.png"])
    return run


@pytest.mark.parametrize(
    ("file", "data", "what"),
    [
        ("meta.json", b"\xff\xfe\x00garbage", "meta.json is damaged: not JSON text"),
        ("meta.json", b"[1, 2]", "meta.json is damaged: it holds a JSON list, not an object"),
        ("meta.json", b"{}", "lacks format_version, step, task"),
        ("agent.zip", b"PK\x03\x04garbage", "agent.zip is damaged: not a readable SB3 policy file"),
        ("srm.pt", b"garbage", "srm.pt is damaged: not a readable torch file"),
    ],
)
def test_damaged_best_checkpoint_offers_the_latest(run_dir, tmp_path, file, data, what):
    run = _damage(run_dir, tmp_path, file, data)
    proc = alignsam("segment", str(run), "imgs", "--out", "seg", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert str(run / "checkpoints" / "best" / file) in proc.stderr
    assert what in proc.stderr
    assert "version" not in proc.stderr.split(what)[0][-60:]  # `{}` is not a version mismatch
    assert "try the latest checkpoint instead: --which latest" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "seg").exists()
    fallback = alignsam("segment", str(run), "imgs", "--out", "seg", "--which", "latest",
                        "--no-progress", cwd=tmp_path)  # fmt: skip
    assert fallback.returncode == 0, fallback.stderr


def test_damaged_latest_checkpoint_offers_the_one_before(run_dir, tmp_path):
    from agents.prompt_agent import AgentLoadError, latest_checkpoint, read_meta

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    latest = latest_checkpoint(run)
    (latest / "meta.json").write_text("{not json")
    with pytest.raises(AgentLoadError) as err:
        read_meta(latest)
    text = str(err.value)
    assert str(latest / "meta.json") in text and "an earlier checkpoint is kept" in text
    assert "checkpoints/latest" in text


# -- 4. one vocabulary, help text and defaults, --version, exit codes ----------------------


def test_version(tmp_path):
    proc = alignsam("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"alignsam {version()}"
    assert re.fullmatch(r"alignsam \d+\.\d+\.\d+\S*", proc.stdout.strip())


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return dict(action.choices)


def test_every_option_of_every_command_has_help_and_shows_its_default():
    commands = _subparsers()
    assert len(commands) == 19 and len(COMMANDS) == 18  # train's module also holds evaluate
    for name, sp in commands.items():
        text = " ".join(sp.format_help().split())  # unwrapped
        for action in sp._actions:  # noqa: SLF001
            if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            assert action.help, (name, action.dest)
            shown = action.default not in (None, False, [], argparse.SUPPRESS)
            if shown and action.option_strings:
                assert f"(default: {action.default})" in text or "(default" in action.help, (
                    name,
                    action.dest,
                )
    for option in ("--split", "--limit", "--which"):
        assert option in commands["evaluate"].format_help()


def test_docs_cli_names_every_flag_of_every_command():
    text = (REPO / "docs" / "cli.md").read_text()
    for name, sp in _subparsers().items():
        for action in sp._actions:  # noqa: SLF001
            if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            for flag in action.option_strings:
                assert f"`{flag}`" in text or f"`{flag}`," in text, (name, flag)


@pytest.mark.parametrize(
    ("argv", "dest", "value", "new"),
    [
        (["train", "t", "--steps", "5"], "timesteps", 5, "--timesteps"),
        (["train", "t", "--runs", "r"], "runs_dir", "r", "--runs-dir"),
        (["sweep", "t", "--runs", "r"], "runs_dir", "r", "--runs-dir"),
        (["segment", "R", "i", "--out", "o", "--steps", "3"], "clicks", 3, "--clicks"),
        (["bench", "perf", "--steps", "3"], "clicks", 3, "--clicks"),
        (["benchmark", "t", "--runs", "A", "B"], "agents", ["A", "B"], "--agents"),
    ],
)
def test_renamed_flags_still_work_with_a_warning(capsys, argv, dest, value, new):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert f"is deprecated and will be removed; use {new}" in capsys.readouterr().err


def test_exit_codes_are_distinct(tmp_path):
    usage = alignsam("train", "--no-such-flag", cwd=tmp_path)
    assert usage.returncode == 2 and "unrecognized arguments: --no-such-flag" in usage.stderr
    data = alignsam("embed", "nonsense:thing", "--segmenter", "tiny", cwd=tmp_path)
    assert data.returncode == 3 and "unknown dataset kind 'nonsense'" in data.stderr
    missing = alignsam("evaluate", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 3 and "no such run folder" in missing.stderr
    bench = alignsam("benchmark", "synthetic", cwd=tmp_path)
    assert bench.returncode == 2 and "--agents RUN" in bench.stderr
    assert "exit codes:" in alignsam("--help", cwd=tmp_path).stdout


def test_unexpected_error_is_one_line_and_exit_1(monkeypatch, capsys):
    import experiments.cli as cli

    def boom(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=boom)
    for sp in _parsers_of(parser):
        sp.set_defaults(func=boom)
    assert cli.main(["weights", "list"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "alignsam weights: error: ZeroDivisionError: division by zero (-v prints the traceback)"
    )


def _parsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return list(action.choices.values())


@pytest.mark.slow
def test_ctrl_c_during_train_exits_130_and_says_how_to_resume(tmp_path):
    task = _task(tmp_path, total_timesteps="total_timesteps: 100000")
    env = {**os.environ, "ALIGNSAM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", "--threads", "1", "train", str(task),
         "--runs-dir", "runs", "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job (e.g. `make test &`) inherits SIGINT ignored: Ctrl-C is what
        # this test sends, so the child starts with the default disposition, as in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    t0 = time.monotonic()
    while not list((tmp_path / "runs").glob("*/checkpoints/latest")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 240
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert "alignsam train: interrupted" in err
    assert f"alignsam train: resume with: alignsam train --resume {Path('runs') / run.name}" in err


# -- 5. outputs join back to inputs; the Python API takes what users have -----------------


def test_coco_file_name_is_the_inputs_relative_path_with_extension(run_dir, tmp_path):
    _images(tmp_path / "imgs", ["a.png", "b.jpg"])
    _images(tmp_path / "more", ["a.png"])
    proc = alignsam("segment", str(run_dir), "imgs", "more/a.png", "--out", "seg",
                    "--no-progress", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    images = json.loads((tmp_path / "seg" / "results.json").read_text())["images"]
    rows = {i["mask_file"]: (i["file_name"], i["source"]) for i in images}
    assert rows == {
        "masks/a.png": ("a.png", "imgs"),
        "masks/b.png": ("b.jpg", "imgs"),
        "masks/a__1.png": (str((tmp_path / "more" / "a.png").resolve()), "more/a.png"),
    }
    for mask_file in rows:
        assert (tmp_path / "seg" / mask_file).is_file()


def test_agent_segments_an_array_a_pil_image_or_a_path(first_run, tmp_path):
    from agents.prompt_agent import PromptAgent

    agent = PromptAgent.load(first_run[0]["run_dir"])
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    expected, clicks = agent.segment(array)
    for image in (Image.fromarray(array), tmp_path / "x.png", str(tmp_path / "x.png")):
        mask, c = agent.segment(image)
        np.testing.assert_array_equal(mask, expected)
        np.testing.assert_array_equal(c, clicks)
    gray, _ = agent.segment(Image.fromarray(array[:, :, 0]))
    assert gray.shape == (48, 64)
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB array"):
        agent.segment(array.astype(np.float32))
    with pytest.raises(TypeError, match="a PIL image or a file path"):
        agent.segment(42)
    only_start, start_clicks = agent.segment(array, steps=0)
    assert len(start_clicks) == 2 and only_start.shape == (48, 64)
