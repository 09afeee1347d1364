"""Segmenter contract, checkpoint loading, weights registry and embedding cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segmenter import EmbeddingCache, SegmenterError, build_segmenter, mask_iou
from segmenter import weights as W
from segmenter.registry import build_tiny_sam


def test_encode_records_geometry(tiny_segmenter, rgb_image):
    emb = tiny_segmenter.encode(rgb_image)
    assert emb.features.shape == (1, 32, 16, 16)
    assert emb.original_size == (120, 160)
    assert emb.input_size == (192, 256)  # longest side to 256
    assert emb.valid_shape((64, 64)) == (48, 64)


def test_decode_shapes_and_counts(tiny_segmenter, rgb_image):
    emb = tiny_segmenter.encode(rgb_image)
    before = tiny_segmenter.decoder_calls
    pred = tiny_segmenter.decode(emb, np.array([[80, 50]]), np.array([1]), return_full=True)
    assert pred.low_res_logits.shape == (64, 64)
    assert pred.candidates.shape == (1, 64, 64)
    assert pred.mask is not None and pred.mask.shape == (120, 160) and pred.mask.dtype == bool
    multi = tiny_segmenter.decode(emb, [[80, 50], [10, 10]], [1, 0], multimask=True)
    assert multi.candidates.shape == (3, 64, 64)
    assert multi.score == pytest.approx(float(multi.candidate_scores.max()))
    again = tiny_segmenter.decode(emb, [[80, 50]], [1], mask_input=pred.low_res_logits)
    assert again.low_res_logits.shape == (64, 64)
    assert tiny_segmenter.decoder_calls - before == 3


def test_points_are_scaled_to_input_frame(tiny_segmenter, rgb_image):
    """A click at the image's bottom-right corner must land at the resized corner."""
    emb = tiny_segmenter.encode(rgb_image)
    coords = tiny_segmenter._coords(emb, np.array([[160.0, 120.0]]))
    assert torch.allclose(coords[0, 0], torch.tensor([256.0, 192.0]))


def test_decode_rejects_bad_input(tiny_segmenter, rgb_image):
    emb = tiny_segmenter.encode(rgb_image)
    with pytest.raises(ValueError, match="labels"):
        tiny_segmenter.decode(emb, [[1, 2], [3, 4]], [1])
    other = build_tiny_sam(seed=1)
    with pytest.raises(SegmenterError, match="re-encode"):
        other.decode(emb, [[1, 2]], [1])
    with pytest.raises(ValueError, match="uint8 RGB"):
        tiny_segmenter.encode(rgb_image[..., 0])


def test_segmenter_is_frozen(tiny_segmenter):
    assert not any(p.requires_grad for p in tiny_segmenter.model.parameters())
    assert not tiny_segmenter.model.training


def test_to_frame_aligns_with_upscale(tiny_segmenter, rgb_image):
    """A mask taken to the low-res frame and upscaled back must match the original."""
    emb = tiny_segmenter.encode(rgb_image)
    mask = np.zeros((120, 160), bool)
    mask[30:80, 50:110] = True
    low = emb.to_frame(mask, tiny_segmenter.low_res_size)
    assert low.shape == (64, 64)
    assert low[48:].max() == 0 and low[:, 64:].size == 0  # padding rows stay empty
    logits = torch.from_numpy(low * 20 - 10)
    back = tiny_segmenter.upscale(emb, logits)
    assert mask_iou(back, mask) > 0.9


def test_mask_iou_edge_cases():
    a = np.zeros((4, 4), bool)
    assert mask_iou(a, a) == 1.0
    b = a.copy()
    b[0, 0] = True
    assert mask_iou(a, b) == 0.0
    assert mask_iou(b, b) == 1.0
    with pytest.raises(ValueError):
        mask_iou(a, np.zeros((3, 3), bool))


def test_unknown_segmenter_name():
    with pytest.raises(SegmenterError, match="choose one of"):
        build_segmenter("sam_vit_z")


def test_weights_listing(isolated_home):
    rows = W.listing()
    assert {r["name"] for r in rows} == {"mobile_sam", "sam_vit_b", "sam_vit_l", "sam_vit_h"}
    assert not any(r["present"] for r in rows)


# -- embedding cache ------------------------------------------------------------------------


def test_cache_roundtrip_and_hits(tiny_segmenter, rgb_image, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    cold = cache.get_or_encode(tiny_segmenter, rgb_image)
    warm = cache.get_or_encode(tiny_segmenter, rgb_image)
    assert (cache.misses, cache.hits) == (1, 1)
    assert torch.equal(cold.features, warm.features)
    assert warm.original_size == cold.original_size and warm.input_size == cold.input_size
    files = list((tmp_path / "emb").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]


# -- the real MobileSAM ---------------------------------------------------------------------


@pytest.mark.mobilesam
def test_mobile_sam_segments_an_obvious_object(mobile_sam):
    img = np.full((300, 400, 3), 235, np.uint8)
    yy, xx = np.mgrid[:300, :400]
    disk = (yy - 150) ** 2 + (xx - 200) ** 2 < 60**2
    img[disk] = (30, 60, 160)
    emb = mobile_sam.encode(img)
    assert emb.features.shape == (1, 256, 64, 64)
    pred = mobile_sam.decode(emb, [[200, 150]], [1], multimask=True, return_full=True)
    assert mask_iou(pred.mask, disk) > 0.9


@pytest.mark.mobilesam
def test_fp16_cache_agrees_with_fp32(mobile_sam, tmp_path):
    rng = np.random.default_rng(3)
    img = (rng.random((200, 260, 3)) * 60 + 100).astype(np.uint8)
    img[50:150, 80:200] = (200, 90, 40)
    emb32 = mobile_sam.encode(img)
    emb16 = EmbeddingCache(tmp_path).get_or_encode(mobile_sam, img)
    for pt in ([[140, 100]], [[20, 20]], [[100, 60]]):
        a = mobile_sam.decode(emb32, pt, [1], return_full=True).mask
        b = mobile_sam.decode(emb16, pt, [1], return_full=True).mask
        assert mask_iou(a, b) > 0.98


# -- the fast (ONNX Runtime) path -----------------------------------------------------------


def _prompts(emb, rng, n):
    h, w = emb.original_size
    return rng.uniform([0, 0], [w, h], size=(n, 2)), rng.integers(0, 2, n)


def test_fast_backend_matches_stock(tiny_segmenter, rgb_image, isolated_home):
    fast = build_segmenter("tiny", backend="onnx")
    assert fast.backend == "onnx" and tiny_segmenter.backend in ("onnx", "torch")
    stock = build_segmenter("tiny", backend="torch")
    e_stock, e_fast = stock.encode(rgb_image), fast.encode(rgb_image)
    assert torch.allclose(e_stock.features, e_fast.features, atol=1e-4)
    rng = np.random.default_rng(0)
    prev = None
    for n in (1, 2, 5, 9):
        pts, lbl = _prompts(e_stock, rng, n)
        for multimask in (False, True):
            a = stock.decode(e_stock, pts, lbl, mask_input=prev, multimask=multimask)
            b = fast.decode(e_stock, pts, lbl, mask_input=prev, multimask=multimask)
            assert a.candidates.shape == b.candidates.shape
            assert torch.allclose(a.candidates, b.candidates, atol=1e-4)
            assert torch.allclose(a.candidate_scores, b.candidate_scores, atol=1e-4)
        prev = a.low_res_logits
    no_points = fast.decode(e_stock, np.zeros((0, 2)), [], mask_input=prev)  # stock rule
    assert torch.equal(no_points.low_res_logits, stock.decode(e_stock, [], [], prev).low_res_logits)
    assert fast.backend == "onnx" and fast.decoder_calls == 9
    # encoder, decoder prep, 2 decoders
    assert len(list((isolated_home / "onnx").glob("tiny-*.onnx"))) == 4
    assert fast._fast.prep_calls == 1  # the image-only part of the decoder, once per embedding


def test_decoder_prep_is_per_embedding(rgb_image, isolated_home):
    fast = build_segmenter("tiny", backend="onnx")
    stock = build_segmenter("tiny", backend="torch")
    parts = fast._fast
    first = fast.encode(rgb_image)
    pts, lbl = [[40.0, 50.0], [100.0, 30.0]], [1, 0]
    fast.decode(first, pts, lbl)
    other = fast.encode(np.ascontiguousarray(rgb_image[::-1]))
    for emb in (other, first, other):  # both kept: no new prep
        b = fast.decode(emb, pts, lbl)
        assert torch.allclose(
            b.low_res_logits, stock.decode(emb, pts, lbl).low_res_logits, atol=1e-4
        )
    assert parts.prep_calls == 2
    # a copy of the same features is another tensor: its prep is computed, and equal
    copy = dataclasses.replace(first, features=first.features.clone())
    a = fast.decode(copy, pts, lbl)
    assert parts.prep_calls == 3
    assert torch.allclose(a.low_res_logits, fast.decode(first, pts, lbl).low_res_logits)
    alive = [fast.encode(np.roll(rgb_image, k + 1, axis=0)) for k in range(parts.PREPS_KEPT + 2)]
    for emb in alive:  # only the last few are kept
        fast.decode(emb, pts, lbl)
    assert len(parts._preps) == parts.PREPS_KEPT
    # a freed embedding's prep is dropped at the next new prep (its id may come back)
    del alive, emb, copy, a
    fast.decode(fast.encode(np.roll(rgb_image, -1, axis=0)), pts, lbl)
    assert len(parts._preps) == 1  # first and other were pushed out by the ten above


def test_fast_backend_falls_back_on_mismatch(rgb_image, isolated_home, monkeypatch, caplog):
    from segmenter import onnx_backend

    fast = build_segmenter("tiny", backend="onnx")
    stock = build_segmenter("tiny", backend="torch")
    emb = stock.encode(rgb_image)
    real = onnx_backend.OnnxParts.decode

    def wrong(self, *args):
        masks, ious = real(self, *args)
        return masks + 1.0, ious

    monkeypatch.setattr(onnx_backend.OnnxParts, "decode", wrong)
    with caplog.at_level("WARNING"):
        pred = fast.decode(emb, [[10.0, 20.0]], [1])
    assert "fast decode path off" in caplog.text and fast.backend == "torch"
    assert torch.equal(pred.low_res_logits, stock.decode(emb, [[10.0, 20.0]], [1]).low_res_logits)


def test_backend_choice_is_explicit(isolated_home):
    with pytest.raises(SegmenterError, match="bf16"):
        build_segmenter("tiny", backend="onnx", autocast_bf16=True)
    assert build_segmenter("tiny", autocast_bf16=True).backend == "torch"
    with pytest.raises(SegmenterError, match="unknown backend"):
        build_segmenter("tiny", backend="tensorrt")


def test_exported_graphs_are_keyed_by_weights(rgb_image, isolated_home):
    for seed in (0, 1):
        seg = build_segmenter("tiny", backend="onnx") if seed == 0 else build_tiny_sam(seed=1)
        seg.decode(seg.encode(rgb_image), [[5.0, 5.0]], [1])
    assert len(list((isolated_home / "onnx").glob("tiny-decoder-*.onnx"))) == 2


def test_prefetch_encodes_in_the_background_once(tmp_path, rgb_image):
    seg = build_segmenter("tiny", backend="torch")
    cache = EmbeddingCache(tmp_path / "emb")
    images = [np.roll(rgb_image, k, axis=1) for k in range(4)]
    future = cache.prefetch(seg, [lambda im=im: im for im in images])
    embs = [cache.get_or_encode(seg, im) for im in images]  # races the worker on purpose
    future.result(timeout=60)
    assert seg.encoder_calls == 4  # each image encoded exactly once, by whichever got it first
    assert cache.prefetched + cache.misses == 4
    for im, emb in zip(images, embs, strict=True):
        assert torch.equal(cache.get_or_encode(seg, im).features, emb.features)


@pytest.mark.mobilesam
def test_mobile_sam_fast_path_agrees_with_stock(mobile_sam):
    from agents.clickers import SimulatedAnnotator

    stock = build_segmenter("mobile_sam", backend="torch")
    fast = build_segmenter("mobile_sam", backend="onnx")
    img = np.full((300, 400, 3), 235, np.uint8)
    yy, xx = np.mgrid[:300, :400]
    blob = ((yy - 150) / 70) ** 2 + ((xx - 180) / 110) ** 2 < 1
    img[blob] = (150, 60, 90)
    a = SimulatedAnnotator(stock, max_clicks=3).run(stock.encode(img), blob, keep_masks=(1, 2, 3))
    b = SimulatedAnnotator(fast, max_clicks=3).run(fast.encode(img), blob, keep_masks=(1, 2, 3))
    assert fast.backend == "onnx"
    for k in (1, 2, 3):
        assert mask_iou(a.info["masks"][k], b.info["masks"][k]) > 0.99


def test_fast_segmenter_copies_and_pickles(rgb_image, isolated_home):
    import copy
    import pickle

    seg = build_segmenter("tiny", backend="onnx")
    emb = seg.encode(rgb_image)
    want = seg.decode(emb, [[5.0, 5.0]], [1]).low_res_logits
    for other in (copy.deepcopy(seg), pickle.loads(pickle.dumps(seg))):
        assert other.backend == "onnx"
        assert torch.equal(other.decode(emb, [[5.0, 5.0]], [1]).low_res_logits, want)


def test_small_torch_ops_run_on_one_thread_beside_an_outside_decoder(rgb_image, isolated_home):
    """Around an ONNX Runtime decoder the env's torch work runs on one thread (and the count is
    restored); the decoder's own sessions keep the thread count of their segmenter's creation,
    even when first made inside such a block; a torch decoder leaves the count alone."""
    from envs import EnvConfig, PointPromptEnv
    from segmenter.base import small_torch_ops

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = build_segmenter("tiny", backend="onnx")
        with small_torch_ops(fast):
            assert torch.get_num_threads() == 1
            fast.decode(fast.encode(rgb_image), [[5.0, 5.0]], [1])  # sessions made here
        assert torch.get_num_threads() == 2
        sessions = [*fast._fast._decoders.values(), fast._fast._encoder]
        assert [s.get_session_options().intra_op_num_threads for s in sessions] == [2, 2]
        with small_torch_ops(build_segmenter("tiny", backend="torch")):
            assert torch.get_num_threads() == 2

        class Recording:  # the oracle's labels, recording the threads of each call
            name = "recording"
            seen: dict[str, set[int]] = {"label": set(), "after_step": set()}

            def begin(self, state):
                pass

            def foreground_map(self, state):
                return None

            def label(self, state, x, y):
                self.seen["label"].add(torch.get_num_threads())
                return 1

            def after_step(self, state):
                self.seen["after_step"].add(torch.get_num_threads())
                return {}

        class Sample:
            id, mask = "s", np.zeros(rgb_image.shape[:2], bool)
            mask[10:30, 10:30] = True

            def load_image(self):
                return rgb_image

        labeler = Recording()
        env = PointPromptEnv([Sample()], fast, labeler, EnvConfig(max_steps=2), cache=None)
        env.reset(seed=0)
        env.step(5)
        # The labeler's online update is a real backward pass: it keeps every thread.
        assert labeler.seen == {"label": {1}, "after_step": {2}}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
