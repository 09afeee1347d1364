"""The prompting session: one decoder call per prompt set, the mask input, previews that do
not commit, commits that do not decode, and the coordinate rules of segmenter.geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmenter import geometry
from segmenter.session import PromptSession, Target


@pytest.fixture()
def image_and_gt():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(90, 130, 3), dtype=np.uint8)
    gt = np.zeros((90, 130), bool)
    gt[20:60, 30:80] = True
    img[gt] = (230, 40, 40)
    return img, gt


def test_click_decodes_once_with_the_previous_mask_as_input(tiny_segmenter, image_and_gt):
    img, gt = image_and_gt
    emb = tiny_segmenter.encode(img)
    s = PromptSession(tiny_segmenter, emb, Target.of(emb, gt, tiny_segmenter.low_res_size))
    calls = tiny_segmenter.decoder_calls
    s.prompt(np.array([[50.0, 40.0], [5.0, 5.0]]), np.array([1, 0]))
    first = s.logits.clone()
    s.click(70.0, 50.0, 1)
    assert tiny_segmenter.decoder_calls - calls == 2 == s.decoder_calls
    # The same prompts decoded bare with the first mask as input give the same logits.
    bare = tiny_segmenter.decode(emb, s.points, s.labels, mask_input=first)
    assert np.allclose(bare.low_res_logits.numpy(), s.logits.numpy())
    assert s.points.dtype == np.float32 and s.labels.tolist() == [1, 0, 1]
    assert 0.0 <= s.iou <= 1.0 and s.mask_prob.shape == emb.grid_size


def test_preview_does_not_commit_and_commit_does_not_decode(tiny_segmenter, image_and_gt):
    img, gt = image_and_gt
    emb = tiny_segmenter.encode(img)
    s = PromptSession(tiny_segmenter, emb, Target.of(emb, gt, tiny_segmenter.low_res_size))
    s.prompt(np.array([[50.0, 40.0]]), np.array([1]))
    points, iou = s.points.copy(), s.iou
    outs = s.preview([(10.0, 10.0, 0), (60.0, 30.0, 1)])
    assert np.array_equal(s.points, points) and s.iou == iou and len(outs) == 2
    calls = tiny_segmenter.decoder_calls
    s.commit(outs[1])
    assert tiny_segmenter.decoder_calls == calls
    assert s.iou == outs[1].iou and len(s.points) == 2
    # The committed outcome is what clicking would have given.
    t = PromptSession(tiny_segmenter, emb, Target.of(emb, gt, tiny_segmenter.low_res_size))
    t.prompt(np.array([[50.0, 40.0]]), np.array([1]))
    t.click(60.0, 30.0, 1)
    assert np.array_equal(t.logits.numpy(), s.logits.numpy())


def test_without_target_there_is_no_iou(tiny_segmenter, image_and_gt):
    img, _ = image_and_gt
    s = PromptSession(tiny_segmenter, tiny_segmenter.encode(img))
    assert s.current_mask().shape == img.shape[:2] and not s.current_mask().any()
    assert s.mask_score() == 0.0
    with pytest.raises(RuntimeError, match="no ground truth"):
        _ = s.iou


def test_geometry_round_trips(tiny_segmenter, image_and_gt):
    img, _ = image_and_gt
    emb = tiny_segmenter.encode(img)
    he, we = emb.grid_size
    vh, vw = emb.valid_shape((he, we))
    for row in range(vh):
        for col in range(vw):
            assert emb.cell_at(*emb.cell_centre(row, col)) == (row, col)
    centres = geometry.action_centres(img.shape[:2], 10)
    for a in (0, 37, 99):
        assert tuple(centres[a]) == pytest.approx(geometry.action_centre(img.shape[:2], 10, a))
    mask = np.zeros((4, 5), bool)
    mask[3, 4] = True
    assert geometry.value_at(mask, 4.9, 3.2) and geometry.value_at(mask, 5.0, 4.0)


def test_batched_preview_matches_single_decodes_on_both_paths(image_and_gt):
    """A preview's candidates decode in one batched call on the stock path (within float
    rounding of one call each) and one graph run each on the fast path (the same numbers)."""
    from segmenter.registry import build_tiny_sam

    img, gt = image_and_gt
    clicks = [(10.0, 12.0, 1), (60.0, 30.0, 0), (70.0, 50.0, 1)]
    for backend in ("torch", "onnx"):
        seg = build_tiny_sam(backend=backend)
        emb = seg.encode(img)
        s = PromptSession(seg, emb, Target.of(emb, gt, seg.low_res_size))
        s.prompt(np.array([[50.0, 40.0], [5.0, 5.0]]), np.array([1, 0]))
        calls = seg.decoder_calls
        outs = s.preview(clicks)
        assert seg.decoder_calls - calls == 3 and s.decoder_calls == 4
        for (x, y, lab), out in zip(clicks, outs, strict=True):
            single = seg.decode(emb, out.points, out.labels, mask_input=s.logits)
            assert np.allclose(out.logits.numpy(), single.low_res_logits.numpy(), atol=1e-4)
            assert out.points[-1].tolist() == [x, y] and out.labels[-1] == lab


def test_undo_goes_back_without_decoding_and_fork_and_drop_prompts_keep_the_mask(
    tiny_segmenter, image_and_gt
):
    img, _ = image_and_gt
    s = PromptSession(tiny_segmenter, tiny_segmenter.encode(img))
    assert not s.can_undo
    s.prompt(np.array([[50.0, 40.0]]), np.array([1]))
    first = s.logits.clone()
    s.click(70.0, 50.0, 0)
    calls = s.decoder_calls
    back = s.undo()
    assert s.decoder_calls == calls and torch.equal(back.logits, first)
    assert s.points.tolist() == [[50.0, 40.0]] and s.labels.tolist() == [1]
    s.undo()
    assert s.outcome is None and len(s.points) == 0 and not s.can_undo
    with pytest.raises(IndexError, match="nothing to undo"):
        s.undo()
    s.prompt(np.array([[50.0, 40.0], [5.0, 5.0]]), np.array([1, 0]))
    s.click(20.0, 20.0, 1)
    start = s.fork(commits=1)  # the state after the start prompt, before the click
    assert start.points.tolist() == [[50.0, 40.0], [5.0, 5.0]] and start.outcome is not None
    assert s.fork(commits=0).outcome is None and len(s.fork().points) == 3
    with pytest.raises(ValueError, match="commits"):
        s.fork(commits=3)
    s.undo()
    other = s.fork()
    other.drop_prompts(np.array([True, False]))
    assert other.points.tolist() == [[50.0, 40.0]] and torch.equal(other.logits, s.logits)
    assert len(s.points) == 2  # the fork's edits stay in the fork
    other.click(60.0, 30.0, 1)  # decodes with the kept mask as input
    bare = tiny_segmenter.decode(other.embedding, other.points, other.labels, mask_input=s.logits)
    assert np.allclose(bare.low_res_logits.numpy(), other.logits.numpy())
    other.undo()
    other.undo()
    assert len(other.points) == 2  # drop_prompts is undone too
