"""Adaptation without labels (issue 31): ``alignsam adapt`` re-estimates the SRM's feature
statistics on the images to be segmented and writes an ordinary, loadable run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.prompt_agent import PromptAgent
from segmenter import EmbeddingCache


def test_adapting_on_the_training_images_gives_back_the_trained_statistics(first_run, tmp_path):
    from experiments.adapt import adapt_run

    summary, cache = first_run
    run = Path(summary["run_dir"])
    source = PromptAgent.load(run, cache=EmbeddingCache(cache))
    # the tiny task trains on synthetic:val: the same images give the same statistics
    record = adapt_run(run, ["synthetic:val"], tmp_path / "same", cache=EmbeddingCache(cache),
                       dark=None, progress=False, statistics="always")  # every cell  # fmt: skip
    same = PromptAgent.load(tmp_path / "same", cache=EmbeddingCache(cache))
    assert torch.allclose(same.srm.channel_mean, source.srm.channel_mean, atol=1e-4)
    assert torch.allclose(same.srm.channel_std, source.srm.channel_std, rtol=1e-3)
    assert record["re_estimated"] == "head inputs" and record["images"] == 12


def test_adapted_run_is_an_ordinary_run_that_records_its_images(first_run, tmp_path):
    from experiments.adapt import adapt_run
    from experiments.segment import gather_inputs, segment_images

    summary, cache = first_run
    run = Path(summary["run_dir"])
    srm_bytes = (run / "checkpoints" / "best" / "srm.pt").read_bytes()
    adapt_run(run, ["synthetic:val@colour"], tmp_path / "a", cache=EmbeddingCache(cache),
              progress=False, statistics="always")  # fmt: skip
    assert (run / "checkpoints" / "best" / "srm.pt").read_bytes() == srm_bytes  # untouched
    record = json.loads((tmp_path / "a" / "adapted.json").read_text())
    assert record["source_run"] == str(run.resolve()) and record["inputs"] == [
        "synthetic:val@colour"
    ]
    assert len(record["image_ids"]) == record["images"] == 12
    adapted = PromptAgent.load(tmp_path / "a", cache=EmbeddingCache(cache))
    source = PromptAgent.load(run, cache=EmbeddingCache(cache))
    assert not torch.allclose(adapted.srm.channel_mean, source.srm.channel_mean)
    for key, value in source.model.policy.state_dict().items():  # only the statistics moved
        assert torch.equal(adapted.model.policy.state_dict()[key], value)
    rep = segment_images(adapted, gather_inputs(["synthetic:val[:2]@colour"]), tmp_path / "seg",
                         progress=False)  # fmt: skip
    assert rep.images == 2
    # an existing --out is kept unless told
    with pytest.raises(FileExistsError, match="--overwrite"):
        adapt_run(run, ["synthetic:val"], tmp_path / "a", cache=EmbeddingCache(cache),
                  progress=False)  # fmt: skip


def test_images_of_the_training_domain_leave_the_run_unchanged(first_run, tmp_path, monkeypatch):
    """``statistics="auto"`` (the default) re-estimates only when the images' features drift
    further than ``SHIFTED`` times the run's own labelled images' from the trained statistics."""
    import experiments.adapt as adapt_module
    from experiments.adapt import adapt_run

    summary, cache = first_run
    run = Path(summary["run_dir"])
    source = PromptAgent.load(run, cache=EmbeddingCache(cache))
    # the tiny task trains on synthetic:val: its own images drift as much as its reference
    record = adapt_run(run, ["synthetic:val"], tmp_path / "same", cache=EmbeddingCache(cache),
                       progress=False)  # fmt: skip
    assert record["statistics"] == "auto" and record["re_estimated"] is None
    assert record["shift"]["ratio"] == pytest.approx(1.0) and "within 1.2" in record["note"]
    same = PromptAgent.load(tmp_path / "same", cache=EmbeddingCache(cache))
    assert torch.equal(same.srm.channel_mean, source.srm.channel_mean)
    assert torch.equal(same.srm.channel_std, source.srm.channel_std)
    monkeypatch.setattr(adapt_module, "SHIFTED", 0.0)  # now every drift is a shift
    record = adapt_run(run, ["synthetic:val@colour"], tmp_path / "moved",
                       cache=EmbeddingCache(cache), progress=False)  # fmt: skip
    assert record["re_estimated"] == "head inputs" and "note" not in record
    moved = PromptAgent.load(tmp_path / "moved", cache=EmbeddingCache(cache))
    assert not torch.allclose(moved.srm.channel_mean, source.srm.channel_mean)
    with pytest.raises(ValueError, match="statistics must be one of"):
        adapt_run(run, ["synthetic:val"], tmp_path / "bad", statistics="never")
    assert not (tmp_path / "bad").exists()


def test_an_srm_that_standardises_each_image_has_nothing_to_adapt():
    from recalibration.srm import SemanticRecalibrationModule, SRMConfig

    srm = SemanticRecalibrationModule(SRMConfig(normalize="image"), embed_channels=8)
    with pytest.raises(ValueError, match="no training statistics to re-estimate"):
        srm.adapt_statistics([])
    dataset = SemanticRecalibrationModule(SRMConfig(), embed_channels=8)
    with pytest.raises(ValueError, match="at least one image"):
        dataset.adapt_statistics(iter(()))
    assert np.isfinite(dataset.channel_mean.numpy()).all()


def test_dark_cells_are_left_out_of_the_statistics_and_mix_pools_them(tiny_segmenter):
    from recalibration.srm import SemanticRecalibrationModule, SRMConfig

    seg = tiny_segmenter
    image = np.random.default_rng(0).integers(60, 220, (96, 128, 3), dtype=np.uint8)
    image[:, :64] = 0  # an endoscope's black border: half the image
    emb = seg.encode(image)
    srm = SemanticRecalibrationModule(SRMConfig(), embed_channels=int(seg.embedding_shape[0]))
    every = srm.adapt_statistics([(emb, lambda: image)])
    full_mean = srm.channel_mean.clone()
    light = srm.adapt_statistics([(emb, lambda: image)], dark=0.06)
    assert 0.3 * every["cells"] < light["cells"] < 0.7 * every["cells"]
    light_mean = srm.channel_mean.clone()
    assert not torch.allclose(light_mean, full_mean)
    # mix: the mean halfway between the statistics held and the new ones
    srm.channel_mean = full_mean.clone()
    srm.adapt_statistics([(emb, lambda: image)], mix=0.5, dark=0.06)
    assert torch.allclose(srm.channel_mean, (full_mean + light_mean) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="mix"):
        srm.adapt_statistics([(emb, lambda: image)], mix=1.5)


def test_feature_drift_is_the_mean_distance_from_the_statistics_in_trained_spreads(
    tiny_segmenter,
):
    from recalibration.srm import SemanticRecalibrationModule, SRMConfig

    seg = tiny_segmenter
    image = np.random.default_rng(1).integers(60, 220, (96, 128, 3), dtype=np.uint8)
    emb = seg.encode(image)
    srm = SemanticRecalibrationModule(SRMConfig(), embed_channels=int(seg.embedding_shape[0]))
    srm.adapt_statistics([(emb, lambda: image)])  # the statistics are this image's own
    assert srm.feature_drift([(emb, lambda: image)]) == pytest.approx(0.0, abs=1e-5)
    own_mean = srm.channel_mean.clone()
    srm.channel_mean = own_mean + 2 * srm.channel_std  # two spreads away on every channel
    assert srm.feature_drift([(emb, lambda: image)]) == pytest.approx(2.0, rel=1e-4)
    # adapting reports the drift from the statistics it replaces, then holds the image's own
    info = srm.adapt_statistics([(emb, lambda: image)])
    assert info["drift"] == pytest.approx(2.0, rel=1e-4)
    assert torch.allclose(srm.channel_mean, own_mean, atol=1e-5)
    with pytest.raises(ValueError, match="at least one image"):
        srm.feature_drift([])


def test_pseudo_labels_are_the_cells_the_map_and_its_mirror_image_are_sure_of(monkeypatch):
    from recalibration.srm import self_training
    from segmenter.base import ImageEmbedding

    emb = ImageEmbedding(torch.zeros(1, 4, 8, 8), (32, 32), (32, 32), "tiny", "a")
    flipped = ImageEmbedding(torch.zeros(1, 4, 8, 8), (32, 32), (32, 32), "tiny", "b")
    p = torch.full((32, 32), 0.5)
    p[:, :8] = 0.95  # sure of the left quarter on the image
    p[:, 24:] = 0.02  # and of the right quarter's background
    q = torch.full((32, 32), 0.5)
    q[:, 24:] = 0.97  # the mirror image's map: its right quarter is the image's left quarter
    q[:, :8] = 0.05
    maps = {"a": p, "b": q}
    monkeypatch.setattr(self_training, "_image_map", lambda srm, e, load: maps[e.image_hash])

    class Head:  # reads nothing the test needs
        def input_features(self, emb, load_image=None):
            return torch.zeros(1, 2, 8, 8)

    item, share = self_training.pseudo_item(Head(), emb, None, flipped, None)
    gt, known = item.gt_grid.numpy(), item.valid.numpy()
    assert known[:, :2].all() and known[:, 6:].all() and not known[:, 2:6].any()
    assert (gt[:, :2] == 1).all() and (gt[:, 6:] == 0).all() and share == pytest.approx(0.5)
    q[:, 24:] = 0.5  # the mirror image is unsure of the left quarter: no label there
    item, share = self_training.pseudo_item(Head(), emb, None, flipped, None)
    assert not item.valid.numpy()[:, :2].any() and share == pytest.approx(0.25)


def test_self_training_moves_only_the_adapted_run_s_head(first_run, tmp_path):
    from experiments.adapt import adapt_run
    from experiments.segment import gather_inputs, segment_images

    summary, cache = first_run
    run = Path(summary["run_dir"])
    record = adapt_run(run, ["synthetic:val@colour"], tmp_path / "st", cache=EmbeddingCache(cache),
                       progress=False, self_train=3, anchors=4)  # fmt: skip
    tuned = record["self_training"]
    assert tuned["steps"] == 3 and tuned["pseudo_images"] == 12 and tuned["labelled_anchors"] == 4
    assert 0.0 <= tuned["labelled_cell_share"] <= 1.0
    source = PromptAgent.load(run, cache=EmbeddingCache(cache))
    adapted = PromptAgent.load(tmp_path / "st", cache=EmbeddingCache(cache))
    head, trained = adapted.srm.head.state_dict(), source.srm.head.state_dict()
    assert any(not torch.equal(head[k], v) for k, v in trained.items())
    rep = segment_images(adapted, gather_inputs(["synthetic:val[:2]@colour"]), tmp_path / "seg",
                         progress=False)  # fmt: skip
    assert rep.images == 2
    with pytest.raises(ValueError, match="anchors >= 1"):
        adapt_run(run, ["synthetic:val"], tmp_path / "none", self_train=3, anchors=0)
    assert not (tmp_path / "none").exists()
