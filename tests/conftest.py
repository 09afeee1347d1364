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
