"""The README as a user reads it: its Python snippets run as written, in order; its command
lines parse with the current flags (no renamed ones); its figures match the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from envs.data import shared_data_root
from experiments.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", TEXT, re.S)


def _command_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("alignsam "):
                lines.append(line)
    return lines


def test_readme_is_short():
    assert len(TEXT.encode()) < 15_000


@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_lines_parse_with_the_current_flags(line, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # files the lines name under ~ exist here
    (tmp_path / "Downloads").mkdir()
    (tmp_path / "Downloads" / "sam_vit_b_01ec64.pth").write_bytes(b"")
    argv = [a for a in shlex.split(line)[1:] if a != "[--skip-bad]"]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{line}: exit {exc.code}\n{capsys.readouterr().err}")
    assert "deprecated" not in capsys.readouterr().err, line


def test_readme_observation_size_is_the_default_envs(tiny_segmenter):
    import envs
    from envs.synthetic import synthetic_task
    from recalibration.labelers import OracleLabeler

    env = envs.make_env(synthetic_task("val")[:1], tiny_segmenter, OracleLabeler())
    floats = sum(int(np.prod(space.shape)) for space in env.observation_space.spaces.values())
    assert floats == 6801 and f"{floats:,} floats per step" in TEXT
    arch = (README.parent / "docs" / "architecture.md").read_text()
    assert f"{floats:,} floats\n({4 * floats / 1000:.1f} kB) per step" in arch


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.mobilesam
def test_readme_python_snippets_run_as_written(mobile_sam, tmp_path, monkeypatch):
    root = shared_data_root()
    if root is None or not (root / "kvasir-seg").is_dir():
        pytest.skip("the README's snippets read Kvasir-SEG from the shared data")
    blocks = _blocks("python")
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # the agent snippet trains into ./runs
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    sample = namespace["sample"]
    assert namespace["pred"].mask.shape == sample.size
    assert namespace["allowed"].shape == (100,) and namespace["allowed"].dtype == bool
    mask, clicks = namespace["mask"], namespace["clicks"]
    assert mask.shape == sample.size and mask.dtype == bool
    assert clicks.shape[1] == 3 and len(clicks) == 2 + namespace["task"].env.max_steps
    assert (tmp_path / "runs").is_dir()
