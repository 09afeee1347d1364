"""Semantic recalibration module on the tiny segmenter and a tiny random CLIP (no weights)."""

from __future__ import annotations

import copy
import logging
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip/huggingface_hub are imported

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from envs import EnvConfig, PointPromptEnv
from recalibration.clip_surgery import ClipLoadError, ClipSpec, ClipSurgery
from recalibration.evaluate import action_cell_centres, cell_metrics, label_accuracy
from recalibration.labelers import EpisodeState
from recalibration.srm import (
    SemanticRecalibrationModule,
    SRMConfig,
    SRMLoadError,
    simulate_mask_states,
)
from segmenter.base import ImageEmbedding
from segmenter.registry import build_tiny_sam

CHANNELS = 32  # tiny SAM embedding: (1, 32, 16, 16)


@dataclass(frozen=True)
class ArraySample:
    id: str
    image: np.ndarray
    mask: np.ndarray

    def load_image(self) -> np.ndarray:
        return self.image


def make_samples(n: int = 3, seed: int = 0) -> list[ArraySample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(90, 130)), int(rng.integers(110, 160))
        img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        y0, x0 = int(rng.integers(5, h // 2)), int(rng.integers(5, w // 2))
        mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = True
        img[mask] = (220, 60, 60)
        out.append(ArraySample(f"s{i}", img, mask))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and avoids OpenMP spin-waiting when the
    (shared) CPU is oversubscribed, which made these tests 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seg():
    return build_tiny_sam()


@pytest.fixture(scope="module")
def items(seg):
    return [(seg.encode(s.image), s.mask, None) for s in make_samples(4)]


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_arch: str) -> ClipSurgery:
    return ClipSurgery(ClipSpec(arch=tiny_clip_arch, pretrained=None, allow_random=True))


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:
        return
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)


def make_srm(**kw) -> SemanticRecalibrationModule:
    torch.manual_seed(0)
    return SemanticRecalibrationModule(SRMConfig(hidden=16, **kw), CHANNELS)


def state_of(item, mask_prob=None, with_gt=True) -> EpisodeState:
    emb, gt, _ = item
    he, we = emb.grid_size
    return EpisodeState(
        sample_id="x",
        embedding=emb,
        mask_prob=np.zeros((he, we), np.float32) if mask_prob is None else mask_prob,
        gt_grid=emb.to_frame(gt, emb.grid_size) if with_gt else None,
        gt_full=gt if with_gt else None,
    )


def head_params(srm: SemanticRecalibrationModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in srm.head.parameters()]


# -- shapes and the labeler API -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "paper"])
def test_shapes_and_labels(items, mode: str) -> None:
    srm = make_srm(input_mode=mode)
    st = state_of(items[0], mask_prob=np.full((16, 16), 0.3, np.float32))
    srm.begin(st)
    prob = srm.predict(st)
    assert prob.shape == (16, 16) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    np.testing.assert_array_equal(srm.foreground_map(st), prob)
    h, w = items[0][1].shape
    for x, y in action_cell_centres((h, w), 10)[::7]:
        assert srm.label(st, float(x), float(y)) in (0, 1)
    # padding rows/cols (wide image -> bottom rows are padding) are 0
    vh, vw = items[0][0].valid_shape((16, 16))
    assert np.all(prob[vh:] == 0) and np.all(prob[:, vw:] == 0)


def test_label_follows_threshold(items) -> None:
    srm = make_srm(threshold=0.0)
    st = state_of(items[0])
    assert srm.label(st, 10.0, 10.0) == 1
    srm.config.threshold = 1.0
    assert srm.label(st, 10.0, 10.0) == 0


def test_paper_mode_sees_nothing_without_mask(items) -> None:
    """s_t = E * M: with M = 0 the prediction does not depend on the image."""
    srm = make_srm(input_mode="paper", normalize="none")
    a = srm.predict(state_of(items[0]))
    b = srm.predict(state_of(items[1]))
    vh, vw = (
        min(x, y)
        for x, y in zip(
            items[0][0].valid_shape((16, 16)), items[1][0].valid_shape((16, 16)), strict=True
        )
    )
    np.testing.assert_allclose(a[:vh, :vw], b[:vh, :vw], atol=1e-6)


# -- online learning ------------------------------------------------------------------------------
def test_online_update_reduces_loss(items) -> None:
    srm = make_srm(q_steps=1, lr=3e-3, dropout=0.0)
    st = state_of(items[0])
    before = srm.loss(st)
    p0 = srm.predict(st).copy()
    logs = [srm.after_step(st) for _ in range(8)]
    assert all(set(d) == {"loss"} for d in logs)
    assert srm.loss(st) < before - 1e-3
    assert srm.online_updates == 8
    assert not np.array_equal(srm.predict(st), p0)  # prediction cache invalidated


def test_q_steps_default_follows_paper() -> None:
    assert SRMConfig().effective_q_steps == 1
    assert SRMConfig(branch="explicit", text="car").effective_q_steps == 5
    assert SRMConfig(q_steps=3).effective_q_steps == 3


@pytest.mark.parametrize("case", ["no_gt", "offline"])
def test_no_update_without_gt_or_when_offline(items, case: str) -> None:
    srm = make_srm(online=case != "offline")
    st = state_of(items[0], with_gt=case != "no_gt")
    before = head_params(srm)
    assert srm.after_step(st) == {}
    for a, b in zip(before, head_params(srm), strict=True):
        assert torch.equal(a, b)


# -- persistence ----------------------------------------------------------------------------------
def test_save_load_round_trip(items, tmp_path: Path) -> None:
    srm = make_srm()
    srm.pretrain(items[:3], epochs=2, batch_size=2, rng=0, val_items=items[3:], progress=False)
    st = state_of(items[0], mask_prob=np.full((16, 16), 0.2, np.float32))
    path = srm.save(tmp_path / "sub" / "srm.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = SemanticRecalibrationModule.load(path, branch="implicit", embed_channels=CHANNELS)
    np.testing.assert_array_equal(loaded.predict(st), srm.predict(st))
    assert loaded.config == srm.config
    torch.testing.assert_close(loaded.calibration, srm.calibration)
    # load_state_dict on a fresh module of the same config
    other = make_srm()
    other.load_state_dict(srm.state_dict())
    np.testing.assert_array_equal(other.predict(st), srm.predict(st))
    # run-time overrides that do not touch the weights
    frozen = SemanticRecalibrationModule.load(path, online=False)
    assert frozen.config.online is False
    with pytest.raises(ValueError, match="define the weights"):
        SemanticRecalibrationModule.load(path, hidden=32)


def test_load_errors(tmp_path: Path, tiny_clip: ClipSurgery) -> None:
    with pytest.raises(SRMLoadError, match="does not exist"):
        SemanticRecalibrationModule.load(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    make_srm().save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    with pytest.raises(SRMLoadError, match="corrupt.pt is damaged: not a readable torch file"):
        SemanticRecalibrationModule.load(corrupt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(SRMLoadError, match="damaged: not a readable torch file"):
        SemanticRecalibrationModule.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(SRMLoadError, match="not an SRM file"):
        SemanticRecalibrationModule.load(foreign)

    explicit = SemanticRecalibrationModule(
        SRMConfig(branch="explicit", text="car", hidden=16), CHANNELS, clip=tiny_clip
    )
    exp_path = explicit.save(tmp_path / "explicit.pt")
    with pytest.raises(SRMLoadError, match="explicit SRM, not an implicit"):
        SemanticRecalibrationModule.load(exp_path, branch="implicit")
    with pytest.raises(SRMLoadError, match="this module is implicit"):
        make_srm().load_state_dict(explicit.state_dict())
    reloaded = SemanticRecalibrationModule.load(exp_path, clip=tiny_clip)
    assert reloaded.branch == "explicit"

    imp_path = make_srm().save(tmp_path / "implicit.pt")
    with pytest.raises(SRMLoadError, match="256"):
        SemanticRecalibrationModule.load(imp_path, embed_channels=256)
    wide = SemanticRecalibrationModule(SRMConfig(hidden=16), 256)
    with pytest.raises(SRMLoadError, match="another segmenter"):
        wide.load_state_dict(torch.load(imp_path, weights_only=True))


# -- explicit branch ------------------------------------------------------------------------------
def test_explicit_in_env(seg, tiny_clip: ClipSurgery) -> None:
    srm = SemanticRecalibrationModule(
        SRMConfig(branch="explicit", text="red square", hidden=16, attn_grid=8),
        CHANNELS,
        clip=tiny_clip,
    )
    assert srm.config.effective_q_steps == 5
    env = PointPromptEnv(make_samples(2), seg, srm, EnvConfig(max_steps=3, start="labeler"))
    obs, _ = env.reset(seed=0, options={"index": 0})
    assert obs["fg"].shape == (1, 10, 10)
    before = head_params(srm)
    for a in (3, 47, 88):
        obs, reward, term, trunc, info = env.step(a)
        assert info["click"][2] in (0, 1)
        assert np.isfinite(info["labeler/loss"])
    assert srm.online_updates == 15
    assert any(not torch.equal(a, b) for a, b in zip(before, head_params(srm), strict=True))
    assert len(srm._semantic) == 1  # CLIP map memoised per (image, text)
    env.reset(seed=1, options={"index": 0})
    assert len(srm._semantic) == 1
    env.reset(seed=1, options={"index": 1})
    assert len(srm._semantic) == 2


def test_explicit_pretrain_with_semantic_maps(items, tiny_clip: ClipSurgery) -> None:
    srm = SemanticRecalibrationModule(
        SRMConfig(branch="explicit", text="polyp", hidden=16, attn_grid=4),
        CHANNELS,
        clip=tiny_clip,
    )
    rng = np.random.default_rng(0)
    sem_items = [(e, g, rng.random((16, 16)).astype(np.float32)) for e, g, _ in items]
    hist = srm.pretrain(sem_items[:3], epochs=2, batch_size=2, rng=0, progress=False)
    assert len(hist) == 2 and all(np.isfinite(hist))
    with pytest.raises(ValueError, match="semantic map"):
        srm.pretrain(items[:2], epochs=1, progress=False)
    res = label_accuracy(srm, sem_items, grid=5)
    assert res["n_cells"] == 4 * 25


def test_explicit_without_clip_raises(offline: None) -> None:
    cfg = SRMConfig(branch="explicit", text="car", clip=ClipSpec("ViT-B-32", "openai"))
    try:
        with pytest.raises(ClipLoadError, match="weights="):
            SemanticRecalibrationModule(cfg, CHANNELS)
    except pytest.fail.Exception:  # pragma: no cover - only where the weights are cached
        pytest.skip("ViT-B-32/openai could be loaded here")
    with pytest.raises(ClipLoadError, match="needs a CLIP"):
        SemanticRecalibrationModule(SRMConfig(branch="explicit", text="car"), CHANNELS)


def test_explicit_fallback_warns(offline: None, caplog: pytest.LogCaptureFixture) -> None:
    cfg = SRMConfig(
        branch="explicit",
        text="car",
        clip=ClipSpec("ViT-B-32", "openai"),
        allow_implicit_fallback=True,
    )
    with caplog.at_level(logging.WARNING, logger="recalibration.srm"):
        srm = SemanticRecalibrationModule(cfg, CHANNELS)
    if srm.clip is not None:  # pragma: no cover - only where the weights are cached
        pytest.skip("ViT-B-32/openai could be loaded here")
    assert srm.branch == "implicit"
    assert any(
        r.levelno == logging.WARNING and "FALLING BACK" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text_rejected(text) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        SRMConfig(branch="explicit", text=text)


# -- pretraining ----------------------------------------------------------------------------------
def test_pretrain_with_mask_states(seg, items) -> None:
    rng = np.random.default_rng(0)
    states = [
        simulate_mask_states(seg, e, g, rng, episodes=1, steps=2, record_at=(0, 2))
        for e, g, _ in items
    ]
    assert all(len(s) == 2 and s[0].shape == (16, 16) for s in states)
    assert all(0.0 <= s.min() and s.max() <= 1.0 for ss in states for s in ss)
    srm = make_srm(normalize="dataset")
    hist = srm.pretrain(
        items[:3],
        epochs=6,
        batch_size=3,
        rng=0,
        val_items=items[3:],
        mask_states=states[:3],
        val_mask_states=states[3:],
        progress=False,
    )
    assert len(hist) >= 1 and hist[-1] < hist[0]
    assert float(srm.calibration[0]) > 0
    assert float(srm.channel_std.min()) > 0 and srm.channel_mean.abs().sum() > 0


def test_prepared_features_half_the_memory(items) -> None:
    """Pretraining holds each image's input features in float16 (2 bytes a value, the largest
    per-image tensor of a 400-image run) and trains on them as float32."""
    srm = make_srm()
    prepared = srm._prepare_items(items[:2], None)
    full = srm.input_features(items[0][0])[0].detach().float()
    assert prepared[0].features.dtype == torch.float16
    assert torch.allclose(prepared[0].features.float(), full, rtol=1e-3, atol=1e-3)
    e, maps, _, _ = srm._batch(prepared, [0, 1], np.random.default_rng(0), True, 1.0, 0.0)
    assert e.dtype == torch.float32 and maps.dtype == torch.float32


# -- evaluation -----------------------------------------------------------------------------------
def test_label_accuracy_hand_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """100 x 100 image, 10 x 10 action grid; GT: the top 3 cell rows (30 fg / 70 bg cells).

    The SRM says 0.9 on embedding rows 0-2 (pixels y < 18.75: action rows 0 and 1) and 0.1
    elsewhere: 20 TP, 10 FN, 70 TN. Accuracy 0.9, majority 0.7, precision 1, recall 2/3,
    balanced (2/3 + 1) / 2, Brier (20 * 0.01 + 10 * 0.81 + 70 * 0.01) / 100 = 0.09.
    """
    emb = ImageEmbedding(torch.zeros(1, CHANNELS, 16, 16), (100, 100), (256, 256), "toy", "t")
    gt = np.zeros((100, 100), bool)
    gt[:30] = True
    srm = make_srm()
    fake = np.full((16, 16), 0.1, np.float32)
    fake[:3] = 0.9
    monkeypatch.setattr(srm, "predict", lambda state, semantic=None: fake)
    res = label_accuracy(srm, [(emb, gt, None)], grid=10)
    assert res["n_cells"] == 100
    assert res["accuracy"] == pytest.approx(0.9)
    assert res["majority_accuracy"] == pytest.approx(0.7)
    assert res["fg_precision"] == pytest.approx(1.0)
    assert res["fg_recall"] == pytest.approx(2 / 3)
    assert res["balanced_accuracy"] == pytest.approx(5 / 6)
    assert res["brier"] == pytest.approx(0.09)
    assert res["fg_fraction"] == pytest.approx(0.3)
    # pooled over images: a second, mostly-foreground image flips the majority class
    gt2 = np.ones((100, 100), bool)
    gt2[:10] = False
    res2 = label_accuracy(srm, [(emb, gt, None), (emb, gt2, None)], grid=10)
    assert res2["majority_accuracy"] == pytest.approx(120 / 200)  # 30 + 90 fg of 200


def test_cell_metrics_edge_cases() -> None:
    m = cell_metrics(np.array([0.2, 0.8, 0.6, 0.1]), np.array([False, True, False, False]))
    assert m["accuracy"] == pytest.approx(0.75) and m["majority_accuracy"] == pytest.approx(0.75)
    assert m["fg_precision"] == pytest.approx(0.5) and m["fg_recall"] == 1.0
    none = cell_metrics(np.zeros(3), np.zeros(3, bool))
    assert none["accuracy"] == 1.0 and none["fg_precision"] == 1.0 and none["ece"] == 0.0


def test_label_accuracy_with_decoded_states(seg, items) -> None:
    srm = make_srm()
    for mode in ("self_start", "gt_start"):
        res = label_accuracy(srm, items[:2], grid=5, mask_state=mode, segmenter=seg, clicks=2)
        assert res["n_cells"] == 50 and 0.0 <= res["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="segmenter"):
        label_accuracy(srm, items[:1], mask_state="self_start")


def test_tta_is_equivariant(seg) -> None:
    """With all 8 dihedral transforms the prediction commutes with rotating the input."""
    img = np.random.default_rng(3).integers(0, 255, size=(96, 96, 3), dtype=np.uint8)
    emb = seg.encode(img)  # square image: no padding, so the grid is rotation-symmetric
    mask = np.random.default_rng(4).random((16, 16)).astype(np.float32)
    srm = make_srm(tta=8, normalize="none")
    rot = ImageEmbedding(
        torch.rot90(emb.features, 1, dims=(-2, -1)).contiguous(),
        emb.original_size,
        emb.input_size,
        emb.model_id,
        "rotated",
    )
    a = srm.predict(EpisodeState("a", emb, mask))
    b = srm.predict(EpisodeState("b", rot, np.ascontiguousarray(np.rot90(mask, 1))))
    np.testing.assert_allclose(np.rot90(a, 1), b, atol=1e-5)
    plain = make_srm(tta=1, normalize="none")
    c = plain.predict(EpisodeState("c", rot, np.ascontiguousarray(np.rot90(mask, 1))))
    assert np.abs(np.rot90(plain.predict(EpisodeState("a", emb, mask)), 1) - c).max() > 1e-4
    with pytest.raises(ValueError, match="tta"):
        SRMConfig(tta=9)


def test_evaluate_saved_srm_matches_label_accuracy(seg, items, tmp_path) -> None:
    from recalibration.evaluate import evaluate_saved

    srm = make_srm()
    srm.pretrain(items, epochs=2, rng=0, progress=False)
    path = srm.save(tmp_path / "srm.pt")
    samples = make_samples(4)
    res = evaluate_saved(path, samples, seg, eval_mask_states=("zeros",), progress=False)
    direct = label_accuracy(srm, [(seg.encode(s.image), s.mask, None) for s in samples])
    assert res["eval"]["zeros"]["accuracy"] == pytest.approx(direct["accuracy"])
    assert res["eval"]["zeros"]["n_cells"] == 4 * 100


# -- fast head (ONNX Runtime) ---------------------------------------------------------------------
def _srm_graphs(home: Path) -> list[Path]:
    return sorted((home / "onnx").glob("srm-*.onnx"))


@pytest.mark.parametrize("tta", [1, 4])
def test_fast_head_matches_torch(items, isolated_home, tta: int) -> None:
    srm, ref = make_srm(context=2, tta=tta), make_srm(context=2, tta=tta)
    srm.pretrain(items[:2], epochs=1, batch_size=2, rng=0, progress=False)
    ref.load_state_dict(srm.state_dict())
    assert srm.use_fast_head() and srm.fast_head and not ref.fast_head
    rng = np.random.default_rng(0)
    for item in items:
        mask = rng.random(item[0].grid_size).astype(np.float32)
        np.testing.assert_allclose(
            srm.predict(state_of(item, mask)), ref.predict(state_of(item, mask)), atol=1e-5
        )
    assert srm.fast_head and srm._fast_head.verified and len(_srm_graphs(isolated_home)) == 1


def test_fast_head_follows_weight_changes(items, isolated_home, caplog) -> None:
    srm = make_srm(q_steps=1, lr=3e-3, dropout=0.0)
    srm.use_fast_head()
    st = state_of(items[0])
    before = srm.predict(st).copy()
    with caplog.at_level(logging.INFO):
        srm.after_step(st)  # online learning: back to torch
    assert not srm.fast_head and "fast head off" in caplog.text
    trained = make_srm()
    trained.load_state_dict(srm.state_dict())
    srm.use_fast_head()
    fresh = make_srm()
    srm.load_state_dict(fresh.state_dict())  # new weights: a new export, still equal to torch
    np.testing.assert_allclose(srm.predict(st), before, atol=1e-5)
    assert srm.fast_head and len(_srm_graphs(isolated_home)) == 1  # same weights, same file
    srm.load_state_dict(trained.state_dict())
    np.testing.assert_allclose(srm.predict(st), trained.predict(st), atol=1e-5)
    assert len(_srm_graphs(isolated_home)) == 2


def test_fast_head_falls_back_on_mismatch(items, isolated_home, monkeypatch, caplog) -> None:
    from recalibration.srm.fast_head import OnnxHead

    real = OnnxHead.run
    monkeypatch.setattr(OnnxHead, "run", lambda self, p, m: real(self, p, m) + 1.0)
    srm, ref = make_srm(), make_srm()
    srm.use_fast_head()
    with caplog.at_level(logging.WARNING):
        out = srm.predict(state_of(items[0]))
    assert "fast head off" in caplog.text and not srm.fast_head
    np.testing.assert_array_equal(out, ref.predict(state_of(items[0])))


def test_fast_head_only_where_it_applies(items, isolated_home, tiny_clip: ClipSurgery) -> None:
    explicit = SemanticRecalibrationModule(
        SRMConfig(branch="explicit", text="car", hidden=16), CHANNELS, clip=tiny_clip
    )
    assert not explicit.use_fast_head() and not explicit.fast_head
    srm = make_srm()
    assert srm.use_fast_head() and not srm.use_fast_head(False) and not srm.fast_head
    srm.use_fast_head()
    st = state_of(items[0])
    srm.predict(st)
    st = state_of(items[0], np.full(items[0][0].grid_size, 0.5, np.float32))  # not memoised
    out = make_srm().predict(st)
    for twin in (copy.deepcopy(srm), pickle.loads(pickle.dumps(srm))):  # sessions stay behind
        assert twin.fast_head and twin._fast_head._session is None
        np.testing.assert_allclose(twin.predict(st), out, atol=1e-6)
        assert twin._fast_head._session is not None
