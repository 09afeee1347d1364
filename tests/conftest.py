"""Shared fixtures: isolated cache dir, tiny segmenter, the real MobileSAM when present."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub in tests

import numpy as np
import pytest

from segmenter import build_segmenter, weights


@pytest.fixture(scope="session")
def tiny_segmenter():
    """Random-weight tiny SAM (16 x 16 x 32 embedding, 64 x 64 low-res masks)."""
    return build_segmenter("tiny")


@pytest.fixture(scope="session")
def mobile_sam():
    """The real MobileSAM; skipped when its weights cannot be had (no cache, no registry)."""
    try:
        return build_segmenter("mobile_sam")
    except Exception as exc:  # noqa: BLE001 - any failure to obtain weights means skip
        pytest.skip(f"MobileSAM weights unavailable: {exc}")


@pytest.fixture()
def rgb_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(120, 160, 3), dtype=np.uint8)
    img[30:80, 50:110] = (200, 40, 40)
    return img


@pytest.fixture()
def isolated_home(tmp_path, monkeypatch):
    """Point ALIGNSAM_HOME at a temp dir (weights and embeddings land there)."""
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


#: A random-init ViT CLIP small enough for CPU tests (no weights exist offline).
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_arch(tmp_path_factory) -> str:
    """Register the tiny CLIP config with open_clip (``add_model_config``); returns its name."""
    import json

    import open_clip

    name = "alignsam-srm-tiny-vit"
    cfg_dir = tmp_path_factory.mktemp("clip_cfg")
    (cfg_dir / f"{name}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_dir)
    return name


class FaultTally:
    """What the fault-family tests proved, for the one-line summary at the end of a run.

    Tests record a fault only after their assertions about it passed, so the figures count
    handled faults, not attempts."""

    def __init__(self) -> None:
        self.inputs: set[tuple[str, str]] = set()  # (entry point, kind of bad input)
        self.interruptions: set[str] = set()  # interrupted-run scenarios survived

    def bad_input(self, entry: str, kind: str) -> None:
        self.inputs.add((entry, kind))

    def survived(self, scenario: str) -> None:
        self.interruptions.add(scenario)

    def line(self) -> str | None:
        if not (self.inputs or self.interruptions):
            return None
        entries = sorted({e for e, _ in self.inputs})
        kinds = {k for _, k in self.inputs}
        return (
            f"fault families: {len(self.inputs)} bad-input cases handled ({len(kinds)} kinds "
            f"through {len(entries)} entry points: {', '.join(entries)}); "
            f"{len(self.interruptions)} interrupted-run scenarios survived with nothing lost"
        )


_TALLY = FaultTally()


@pytest.fixture(scope="session")
def faults() -> FaultTally:
    """Record handled faults (see :class:`FaultTally`)."""
    return _TALLY


def pytest_terminal_summary(terminalreporter) -> None:
    line = _TALLY.line()
    if line:
        terminalreporter.write_line(line)


def _tiny_task(steps: int = 64):
    from agents.config import DataConfig, PPOConfig, TaskConfig
    from envs import EnvConfig
    from recalibration.srm import SRMConfig

    return TaskConfig(
        name="tiny",
        data=DataConfig(train="synthetic:val", val="synthetic:val"),
        segmenter="tiny",
        env=EnvConfig(max_steps=4),
        srm=SRMConfig(),
        srm_pretrain_epochs=2,
        ppo=PPOConfig(n_steps=32, batch_size=16, n_epochs=2, features_dim=32, cnn_channels=8),
        total_timesteps=steps,
        eval_every=32,
        checkpoint_every=32,
    )


@pytest.fixture(scope="session")
def tiny_task():
    """``tiny_task(steps)``: a task on the tiny segmenter that trains in seconds."""
    return _tiny_task


@pytest.fixture(scope="session")
def first_run(tmp_path_factory):
    """``(train summary, cache dir)`` of one tiny run, shared by the tests that read it."""
    from experiments.train import train

    runs = tmp_path_factory.mktemp("runs")
    cache = str(tmp_path_factory.mktemp("emb"))
    return train(_tiny_task(64), runs=runs, cache_dir=cache, progress=False), cache
