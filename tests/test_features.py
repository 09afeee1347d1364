"""Feature sources for the SRM: the registry, the segmenter's stages, EfficientNet-Lite0 (real
offline weights, hash-pinned), open_clip and DINOv2 towers (random init here), the stacked
feature set and an SRM that reads it, saved and loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recalibration import features as fmod
from recalibration.feature_set import FeatureSet
from recalibration.features import FeatureError, build_feature_source
from recalibration.labelers import EpisodeState
from recalibration.srm import SemanticRecalibrationModule, SRMConfig
from segmenter import EmbeddingCache


def test_registry_names_every_source_and_rejects_unknown(tiny_segmenter):
    assert {"sam", "sam_stages", "efficientnet_lite0", "open_clip", "dinov2"} <= set(
        fmod.FEATURE_SOURCES
    )
    with pytest.raises(FeatureError, match="unknown feature source 'vgg'.*efficientnet_lite0"):
        build_feature_source("vgg", tiny_segmenter)


def test_sam_stages_come_from_the_same_encoder_pass_and_the_cache(
    tiny_segmenter, rgb_image, tmp_path
):
    cache = EmbeddingCache(tmp_path / "emb")
    fs = FeatureSet(["sam", "sam_stages"], tiny_segmenter, cache)
    emb = cache.get_or_encode(tiny_segmenter, rgb_image)
    calls = tiny_segmenter.encoder_calls
    x = fs(emb, lambda: rgb_image)
    assert x.shape == (1, 32 + 48, 16, 16)
    assert tiny_segmenter.encoder_calls == calls + 1  # the stages: one more pass, once
    assert torch.equal(x[0, :32], emb.features[0])
    again = FeatureSet(["sam", "sam_stages"], tiny_segmenter, cache)(emb)  # from the cache
    assert torch.allclose(again, x) and tiny_segmenter.encoder_calls == calls + 1
    with pytest.raises(FeatureError, match="not cached"):
        other = tiny_segmenter.encode(rgb_image[::-1].copy())
        FeatureSet(["sam", "sam_stages"], tiny_segmenter, cache)(other)


def test_efficientnet_lite0_offline_weights_are_pinned(tiny_segmenter, rgb_image, tmp_path):
    src = build_feature_source("efficientnet_lite0", tiny_segmenter)
    assert src.channels == 472 and src.embedding_id.startswith("efficientnet_lite0:579344248a93")
    feats = src.compute(rgb_image)
    assert feats.shape == (472, 16, 16) and torch.isfinite(feats).all()
    # Padding is zero input after normalisation: the grid's last rows see mostly padding.
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(FeatureError, match="not an EfficientNet-Lite0 state dict"):
        fmod.EfficientNetLite0(tiny_segmenter, weights=bad)


def test_open_clip_and_dinov2_towers_build_and_align(tiny_segmenter, rgb_image, tiny_clip_arch):
    clip = fmod.OpenClipDense(tiny_segmenter, tiny_clip_arch, allow_random=True)
    assert clip.compute(rgb_image).shape == (clip.channels, 16, 16)
    dino = fmod.DinoV2(tiny_segmenter, "vit_small_patch14_dinov2", side=56, pretrained=False)
    assert dino.compute(rgb_image).shape == (384, 16, 16)
    with pytest.raises(FeatureError, match="file="):
        fmod.DinoV2(tiny_segmenter, "vit_small_patch14_dinov2.lvd142m", side=56)  # offline


def test_srm_on_a_feature_set_trains_saves_and_loads(tiny_segmenter, rgb_image, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    fs = FeatureSet(["sam", "sam_stages"], tiny_segmenter, cache)
    gt = np.zeros(rgb_image.shape[:2], bool)
    gt[30:80, 50:110] = True
    emb = cache.get_or_encode(tiny_segmenter, rgb_image)
    config = SRMConfig(features=("sam", "sam_stages"), hidden=16)
    srm = SemanticRecalibrationModule(config, int(fs(emb, lambda: rgb_image).shape[1]), features=fs)
    srm.pretrain([(emb, gt, None)], epochs=2, progress=False)
    state = EpisodeState(
        "a", emb, np.zeros(emb.grid_size, np.float32), load_image=lambda: rgb_image
    )
    before = srm.predict(state)
    path = srm.save(tmp_path / "srm.pt")
    with pytest.raises(Exception, match="segmenter="):
        SemanticRecalibrationModule.load(path)
    loaded = SemanticRecalibrationModule.load(path, segmenter=tiny_segmenter, cache=cache)
    assert np.allclose(loaded.predict(state), before, atol=1e-6)
    with pytest.raises(ValueError, match="needs a FeatureSet"):
        SemanticRecalibrationModule(config, 80)


def test_srm_projects_many_channels_to_few_and_keeps_the_projection(
    tiny_segmenter, rgb_image, tmp_path
):
    cache = EmbeddingCache(tmp_path / "emb")
    fs = FeatureSet(["sam", "sam_stages"], tiny_segmenter, cache)
    gt = np.zeros(rgb_image.shape[:2], bool)
    gt[30:80, 50:110] = True
    emb = cache.get_or_encode(tiny_segmenter, rgb_image)
    config = SRMConfig(features=("sam", "sam_stages"), hidden=16, reduce=12)
    srm = SemanticRecalibrationModule(config, 80, features=fs)
    state = EpisodeState(
        "a", emb, np.zeros(emb.grid_size, np.float32), load_image=lambda: rgb_image
    )
    with pytest.raises(RuntimeError, match="projection is not fitted"):
        srm.predict(state)
    srm.pretrain([(emb, gt, None)], epochs=2, progress=False)
    assert srm.head_channels == 12 and srm.input_features(emb).shape == (1, 12, 16, 16)
    path = srm.save(tmp_path / "srm.pt")
    loaded = SemanticRecalibrationModule.load(path, segmenter=tiny_segmenter, cache=cache)
    assert np.allclose(loaded.predict(state), srm.predict(state), atol=1e-6)


def test_bench_perf_reports_each_sources_extra_time_and_cache_bytes(
    tiny_segmenter, rgb_image, monkeypatch
):
    from experiments import perf

    monkeypatch.setattr(perf, "SETTLE_S", 0.0)
    names = ["sam", "sam_stages", "efficientnet_lite0", "compact:sam_stages"]
    fs = FeatureSet(names, tiny_segmenter)
    out = perf.time_feature_sources(tiny_segmenter, fs, [rgb_image, rgb_image[::-1].copy()])
    assert out["images"] == 2 and out["encode_s"] > 0 and "encode_stages_s" in out
    assert set(out["sources"]) == set(names[1:])
    # The stages (48 channels here) and EfficientNet's pyramid add cache entries of their own.
    assert all(v["cache_bytes"] > 0 for v in out["sources"].values())
    assert out["sources"]["efficientnet_lite0"]["extra_s"] > 0
    # Their codes: an eighth of the float16 bytes plus the archive's fixed overhead.
    full, compact = (out["sources"][n]["cache_bytes"] for n in ("sam_stages", names[3]))
    assert compact < full / 2
    text = perf.render_feature_sources(out)
    assert "efficientnet_lite0: +" in text and "MiB cached" in text


def test_items_that_leave_their_features_in_the_cache_train_the_same_srm(tiny_segmenter, tmp_path):
    from envs.synthetic import synthetic_task
    from recalibration.items import collect_items

    cache = EmbeddingCache(tmp_path / "emb")
    samples = synthetic_task("val", 3)
    config = SRMConfig(features=("sam", "sam_stages"), hidden=16, reduce=12)
    states = []
    for keep in (True, False):
        fs = FeatureSet(["sam", "sam_stages"], tiny_segmenter, cache, keep=0)
        items = collect_items(
            samples, tiny_segmenter, cache, progress=False, features=fs, keep_features=keep
        )
        assert ("srm_features" in items[0][0].extras) is keep
        torch.manual_seed(0)
        srm = SemanticRecalibrationModule(config, 80, features=fs)
        srm.pretrain(items, epochs=2, rng=0, progress=False)
        states.append(srm.state_dict())

    def flat(state):
        head = {f"head.{k}": v for k, v in state["head"].items()}
        return {k: v for k, v in {**state, **head}.items() if isinstance(v, torch.Tensor)}

    a, b = flat(states[0]), flat(states[1])
    assert "reduce_matrix" in a and any(k.startswith("head.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
