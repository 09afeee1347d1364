"""Compact feature storage (``compact:SOURCE``, :mod:`segmenter.codec`): the codes, the cache
entries they make, the encoder's stages from the same pass without their full-size entry, and an
SRM that reads compact features, saved and loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recalibration.feature_set import FeatureSet
from recalibration.features import FeatureError, build_feature_source
from recalibration.labelers import EpisodeState
from recalibration.srm import SemanticRecalibrationModule, SRMConfig
from segmenter import EmbeddingCache
from segmenter.codec import Packed, pack


def test_codes_hold_each_channel_to_half_a_step_of_its_pooled_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, 16, generator=g) * torch.tensor([1, 10, 0.01, 3, 1, 1]).view(6, 1, 1)
    x[4] = 2.5  # a constant channel
    p = pack(x.half())
    assert p.codes.shape == (6, 8, 8) and p.codes.dtype == np.uint8
    assert p.nbytes == 6 * 64 + 2 * 6 * 4  # an eighth of float16's 6 * 256 * 2, plus scales
    pooled = F.avg_pool2d(x.half().float()[None], 2)[0]
    decoded = torch.from_numpy(p.codes).float() * torch.from_numpy(p.step)[:, None, None]
    decoded += torch.from_numpy(p.low)[:, None, None]
    err = (decoded - pooled).abs().amax(dim=(1, 2))
    assert torch.all(err <= torch.from_numpy(p.step) / 2 + 1e-6)
    assert torch.equal(decoded[4], pooled[4])
    out = p.unpack()
    assert out.shape == (6, 16, 16) and torch.equal(out, p.unpack())  # deterministic
    with pytest.raises(ValueError, match="NaN"):
        pack(torch.full((2, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        pack(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="uint8"):
        Packed(np.zeros((2, 4, 4), np.float32), p.low[:2], p.step[:2], (8, 8))


@pytest.mark.parametrize("grid", [(16, 16), (15, 13), (3, 5), (64, 64), (2, 1)])
def test_unpacking_upsamples_as_torch_bilinear_interpolation(grid):
    x = torch.randn(5, *grid, generator=torch.Generator().manual_seed(1)) * 4.0
    p = pack(x)
    codes = torch.from_numpy(p.codes).float() * torch.from_numpy(p.step)[:, None, None]
    codes += torch.from_numpy(p.low)[:, None, None]
    expected = F.interpolate(codes[None], size=grid, mode="bilinear", align_corners=False)[0]
    out = p.unpack()
    assert out.shape == (5, *grid)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_compact_stages_come_from_the_same_pass_and_only_their_codes_are_cached(
    tiny_segmenter, rgb_image, tmp_path
):
    cache = EmbeddingCache(tmp_path / "emb")
    fs = FeatureSet(["sam", "compact:sam_stages"], tiny_segmenter, cache)
    assert fs.wants_stages and not fs.keeps_stages
    calls = tiny_segmenter.encoder_calls
    emb = fs.embed(rgb_image, cache)
    x = fs(emb)  # no pixels needed: the stages came with the embedding
    assert tiny_segmenter.encoder_calls == calls + 1 and x.shape == (1, 32 + 48, 16, 16)
    assert not (tmp_path / "emb" / tiny_segmenter.stages_id).exists()  # no full-size entry
    stages_id = fs.sources[1].embedding_id
    assert stages_id.endswith("|pool2-u8")
    entry = cache.path_for(stages_id, emb.image_hash)
    full_bytes = 48 * 16 * 16 * 2
    assert entry.stat().st_size < full_bytes / 2  # codes 48 * 8 * 8 bytes + archive overhead
    # A second process: the embedding and the codes are cached, nothing is encoded again.
    again = FeatureSet(["sam", "compact:sam_stages"], tiny_segmenter, cache)
    emb2 = again.embed(rgb_image, cache)
    assert "stages" not in emb2.extras and tiny_segmenter.encoder_calls == calls + 1
    assert torch.equal(again(emb2), x)  # cold and warm read the same numbers
    # Without a cache the stages are packed the same way.
    nocache = FeatureSet(["sam", "compact:sam_stages"], tiny_segmenter)
    assert torch.allclose(nocache(nocache.embed(rgb_image))[:, 32:], x[:, 32:], atol=1e-6)
    # The stages themselves differ from the compact map by at most what pooling removes.
    full = tiny_segmenter.encode(rgb_image, stages=True).extras["stages"][0]
    assert torch.corrcoef(torch.stack([full.flatten(), x[0, 32:].flatten()]))[0, 1] > 0.5


def test_a_damaged_compact_entry_is_recomputed(tiny_segmenter, rgb_image, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    fs = FeatureSet(["sam", "compact:efficientnet_lite0"], tiny_segmenter, cache, keep=0)
    emb = cache.get_or_encode(tiny_segmenter, rgb_image)
    x = fs(emb, lambda: rgb_image)
    plain = build_feature_source("efficientnet_lite0", tiny_segmenter).compute(rgb_image)
    assert torch.equal(x[0, 32:], pack(plain).unpack())  # exactly the codes' values
    entry = cache.path_for(fs.sources[1].embedding_id, emb.image_hash)
    blob = bytearray(entry.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    entry.write_bytes(bytes(blob))
    with pytest.raises(FeatureError, match="not cached"):
        fs(emb)  # the damaged entry is dropped, and there are no pixels to recompute from
    assert cache.recomputed_corrupt == 1
    assert torch.equal(fs(emb, lambda: rgb_image), x) and entry.is_file()


def test_compact_names_its_source_and_refuses_the_embedding(tiny_segmenter):
    with pytest.raises(FeatureError, match="compact:sam_stages"):
        build_feature_source("compact", tiny_segmenter)
    with pytest.raises(FeatureError, match="decoder reads"):
        build_feature_source("compact:sam", tiny_segmenter)
    with pytest.raises(FeatureError, match="unknown feature source 'vgg'"):
        build_feature_source("compact:vgg", tiny_segmenter)


def test_an_srm_on_compact_features_saves_and_loads(tiny_segmenter, rgb_image, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    names = ("sam", "compact:sam_stages", "compact:efficientnet_lite0")
    fs = FeatureSet(names, tiny_segmenter, cache)
    gt = np.zeros(rgb_image.shape[:2], bool)
    gt[30:80, 50:110] = True
    emb = fs.embed(rgb_image, cache)
    config = SRMConfig(features=names, hidden=16, reduce=12)
    srm = SemanticRecalibrationModule(config, fs.channels(emb, lambda: rgb_image), features=fs)
    srm.pretrain([(emb, gt, None)], epochs=2, progress=False)
    state = EpisodeState(
        "a", emb, np.zeros(emb.grid_size, np.float32), load_image=lambda: rgb_image
    )
    path = srm.save(tmp_path / "srm.pt")
    loaded = SemanticRecalibrationModule.load(path, segmenter=tiny_segmenter, cache=cache)
    assert loaded.feature_set.names == names
    assert np.allclose(loaded.predict(state), srm.predict(state), atol=1e-6)


@pytest.mark.parametrize("stages", ["sam_stages", "compact:sam_stages"])
def test_training_items_encode_each_image_once(tiny_segmenter, tmp_path, stages, monkeypatch):
    import recalibration.items
    from envs.synthetic import synthetic_task
    from recalibration.items import collect_items

    trims = []  # the heap is trimmed after every image (1.73 -> 1.29 GB after 100 Kvasir images)
    monkeypatch.setattr(recalibration.items, "trim_heap", lambda: trims.append(1))

    cache = EmbeddingCache(tmp_path / "emb")
    fs = FeatureSet(["sam", stages], tiny_segmenter, cache, keep=0)
    samples = synthetic_task("val", 3)
    calls = tiny_segmenter.encoder_calls
    items = collect_items(
        samples, tiny_segmenter, cache, progress=False, features=fs, keep_features=False
    )
    assert tiny_segmenter.encoder_calls == calls + 3  # the stages came with the embedding
    assert len(trims) == 3
    for emb, _, _ in items:
        assert "stages" not in emb.extras  # not held in memory for the whole training set
        assert fs(emb).shape == (1, 32 + 48, 16, 16)  # from the cache, no pixels needed
