"""CLIP Surgery maps on tiny random-init open_clip ViTs (no weights, no network)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip/huggingface_hub are imported

import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from recalibration.clip_surgery import (
    DEFAULT_TEMPLATES,
    REDUNDANT_TEXTS,
    ClipLoadError,
    ClipSpec,
    ClipSurgery,
    feature_surgery,
)

TINY = "alignsam-tiny-vit"
TINY_OTHER = "alignsam-tiny-vit-wide"


def _tiny_config(vision_width: int) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": vision_width,
            "head_width": 32,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,  # SimpleTokenizer's vocabulary
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Register two tiny ViT configs (vision width 64 and 96) with open_clip."""
    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TINY}.json").write_text(json.dumps(_tiny_config(64)))
    (cfg_dir / f"{TINY_OTHER}.json").write_text(json.dumps(_tiny_config(96)))
    open_clip.add_model_config(cfg_dir)
    assert TINY in open_clip.list_models()
    return cfg_dir


@pytest.fixture(scope="module")
def tiny(tiny_configs: Path) -> ClipSurgery:
    return ClipSurgery(ClipSpec(arch=TINY, pretrained=None, allow_random=True))


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force huggingface_hub offline even if it was imported before HF_HUB_OFFLINE was set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:
        return
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)


def _image(seed: int, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def test_map_shape_range_and_determinism(tiny: ClipSurgery) -> None:
    img = _image(0)
    m1 = tiny.similarity_map(img, "dog")
    m2 = tiny.similarity_map(img, "dog")
    assert m1.shape == (64, 64) and m1.dtype == np.float32
    assert 0.0 <= m1.min() and m1.max() <= 1.0 and m1.max() > 0.5
    np.testing.assert_array_equal(m1, m2)
    full = tiny.similarity_map(img, "dog", out_size=None)
    assert full.shape == img.shape[:2]
    small = tiny.similarity_map(img, "dog", out_size=(8, 12), pad_square=False)
    assert small.shape == (8, 12)
    assert tiny.model_id == f"{TINY}/random"


def test_text_embedding_is_memoised(tiny: ClipSurgery, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    encode_text = tiny.model.encode_text

    def counting(*args, **kwargs):
        calls.append(1)
        return encode_text(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "encode_text", counting)
    e1 = tiny.text_embedding("a zebra crossing")
    assert len(calls) == 1
    e2 = tiny.text_embedding("a zebra crossing")
    assert len(calls) == 1
    torch.testing.assert_close(e1, e2)
    assert e1.shape == (32,) and abs(float(e1.norm()) - 1.0) < 1e-5
    tiny.similarity_map(_image(1), "a zebra crossing")  # redundant texts at most once more
    n = len(calls)
    tiny.similarity_map(_image(2), "a zebra crossing")
    assert len(calls) == n
    tiny.text_embedding("a zebra crossing", templates=DEFAULT_TEMPLATES[:2])
    assert len(calls) == n + 1  # different templates -> different key


def test_class_token_path_untouched(tiny: ClipSurgery) -> None:
    pixels, content = tiny.preprocess(_image(3, (30, 64)))
    assert pixels.shape == (1, 3, 64, 64) and content == (30, 64)
    with torch.inference_mode():
        emb, patches = tiny.forward_surgery(pixels)
        ref = tiny.model.encode_image(pixels)
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)
    assert patches.shape == (1, 4, 4, 32)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(1, 4, 4))


def test_feature_surgery_removes_common_part() -> None:
    torch.manual_seed(0)
    patches = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    sim = feature_surgery(patches, texts)
    expected = patches @ (texts - texts.mean(0, keepdim=True)).T
    torch.testing.assert_close(sim, expected)
    torch.testing.assert_close(sim.sum(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        feature_surgery(patches, texts[:1])


def test_map_responds_to_image(tiny: ClipSurgery) -> None:
    a = tiny.similarity_map(_image(4), "cat")
    b = tiny.similarity_map(_image(5), "cat")
    assert np.abs(a - b).max() > 1e-3


def test_pad_square_geometry(tiny_configs: Path) -> None:
    """Wide image: bottom half of the 64x64 grid is padding.

    With the positional embedding zeroed, every fully padded token enters the transformer with
    the same value, so its raw map value is identical; masked, the padding is exactly 0.
    """
    cs = ClipSurgery(ClipSpec(arch=TINY, pretrained=None, allow_random=True))
    with torch.no_grad():
        cs.model.visual.positional_embedding.zero_()
    img = _image(6, (40, 80))  # -> 32 x 64 content in the 64 x 64 CLIP input: 2 of 4 rows
    pixels, content = cs.preprocess(img)
    assert content == (32, 64)
    assert torch.count_nonzero(pixels[..., 32:, :]) == 0  # padded with zeros after normalising
    raw = cs.similarity_map(img, "car", mask_padding=False)
    pad = raw[40:]  # output rows interpolated from padded grid rows only
    assert np.ptp(pad) < 1e-5
    assert np.ptp(raw[:24]) > 1e-2  # content rows vary
    masked = cs.similarity_map(img, "car")
    np.testing.assert_array_equal(masked[40:], 0.0)
    assert masked[:24].max() > 0.5
    full = cs.similarity_map(img, "car", out_size=None)
    assert full.shape == (40, 80)


def test_invalid_inputs(tiny: ClipSurgery) -> None:
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="non-empty"):
            tiny.text_embedding(bad)
        with pytest.raises(ValueError):
            tiny.similarity_map(_image(0), bad)
    with pytest.raises(ValueError, match="RGB"):
        tiny.similarity_map(np.zeros((10, 10), np.uint8), "dog")
    assert "background" in REDUNDANT_TEXTS


def test_unknown_arch(tiny_configs: Path) -> None:
    with pytest.raises(ClipLoadError, match="ViT-B-16"):
        ClipSurgery(ClipSpec(arch="ViT-B-61", pretrained=None, allow_random=True))


def test_non_vit_rejected() -> None:
    with pytest.raises(ClipLoadError, match="only open_clip ViT"):
        ClipSurgery(ClipSpec(arch="RN50", pretrained=None, allow_random=True))


def test_random_needs_opt_in(tiny_configs: Path) -> None:
    with pytest.raises(ClipLoadError, match="allow_random"):
        ClipSurgery(ClipSpec(arch=TINY, pretrained=None))


def test_mismatched_weights_file(tiny_configs: Path, tmp_path: Path) -> None:
    other = open_clip.create_model(TINY_OTHER)
    path = tmp_path / "other_tiny.bin"
    torch.save(other.state_dict(), path)
    with pytest.raises(ClipLoadError, match="other_tiny.bin") as info:
        ClipSurgery(ClipSpec(arch=TINY, pretrained=None, weights=path))
    assert TINY in str(info.value)
    with pytest.raises(ClipLoadError, match="not found"):
        ClipSurgery(ClipSpec(arch=TINY, weights=tmp_path / "missing.bin"))


def test_matching_weights_file(tiny: ClipSurgery, tmp_path: Path) -> None:
    path = tmp_path / "tiny.bin"
    torch.save(tiny.model.state_dict(), path)
    cs = ClipSurgery(ClipSpec(arch=TINY, pretrained=None, weights=path))
    assert cs.model_id.startswith(f"{TINY}/file:") and len(cs.model_id.split(":")[1]) == 12
    img = _image(7)
    np.testing.assert_allclose(cs.similarity_map(img, "dog"), tiny.similarity_map(img, "dog"))


@pytest.mark.parametrize("arch", [TINY, "ViT-B-32"])
def test_pretrained_offline(tiny_configs: Path, offline: None, arch: str) -> None:
    t0 = time.monotonic()
    try:
        ClipSurgery(ClipSpec(arch=arch, pretrained="openai"))
    except ClipLoadError as exc:
        assert "weights=" in str(exc)
    else:  # pragma: no cover - only where the weights are cached or the hub is reachable
        pytest.skip(f"{arch}/openai could be loaded here (cache or network)")
    assert time.monotonic() - t0 < 10.0
