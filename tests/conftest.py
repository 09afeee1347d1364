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
