"""Clickers: the simulated annotator's protocol, metrics, fixed env policies, one-shot baseline.

Protocol mechanics are checked against a fake segmenter whose masks are set by hand (so the
error region is known exactly); the environment policies run on the tiny random SAM; one test
checks the annotator converges with the real MobileSAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import ndimage

from agents.clickers import (
    ClickTrace,
    EnvClicker,
    OneShotSimilarity,
    SimulatedAnnotator,
    deepest_point,
    grid_order,
    grid_to_pixel,
    miou_at_k,
    noc,
    spiral_order,
    summarize,
)
from envs.prompt_env import EnvConfig, PointPromptEnv
from recalibration.labelers import AlwaysPositiveLabeler, EpisodeState, Labeler, OracleLabeler
from segmenter import EmbeddingCache
from segmenter.base import ImageEmbedding, Prediction

# --------------------------------------------------------------------------------------------
# Fakes
# --------------------------------------------------------------------------------------------


def fake_embedding(
    size: tuple[int, int] = (60, 60), channels: int = 4, grid: int = 8
) -> ImageEmbedding:
    """An embedding whose input frame is the original image (no resize)."""
    return ImageEmbedding(
        features=torch.zeros(1, channels, grid, grid),
        original_size=size,
        input_size=size,
        model_id="fake",
    )


def logits_of(mask: np.ndarray) -> torch.Tensor:
    return torch.where(torch.from_numpy(mask), 5.0, -5.0)


class FakeSegmenter:
    """Returns fixed masks whatever the prompt; the low-res frame is the original image.

    Args:
        single: ``(H, W)`` bool mask of the single-mask head.
        candidates: ``(3, H, W)`` bool multimask candidates (default: three copies of single).
        scores: Predicted IoUs of the candidates.
    """

    model_id = embedding_id = "fake"
    device = torch.device("cpu")

    def __init__(
        self,
        single: np.ndarray,
        candidates: list[np.ndarray] | None = None,
        scores: tuple[float, float, float] = (0.9, 0.5, 0.1),
    ) -> None:
        self.single = logits_of(single)
        cands = candidates if candidates is not None else [single] * 3
        self.candidates = torch.stack([logits_of(m) for m in cands])
        self.scores = torch.tensor(scores)
        self.calls: list[dict] = []

    def decode(self, embedding, points, labels, mask_input=None, multimask=False, **_):
        self.calls.append(
            {
                "points": np.asarray(points, np.float32).copy(),
                "labels": np.asarray(labels).copy(),
                "mask_input": None if mask_input is None else mask_input.clone(),
                "multimask": multimask,
            }
        )
        if multimask:
            best = int(torch.argmax(self.scores))
            return Prediction(
                self.candidates[best], float(self.scores[best]), self.candidates, self.scores
            )
        return Prediction(self.single, 0.5, self.single[None], torch.tensor([0.5]))

    def upscale(self, embedding, low_res_logits):
        return (low_res_logits > 0).numpy()


def square(size: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros(size, bool)
    m[r0:r1, c0:c1] = True
    return m


def padded_dt(region: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


# --------------------------------------------------------------------------------------------
# Simulated annotator
# --------------------------------------------------------------------------------------------


def test_deepest_point_counts_image_border_as_boundary():
    # A 21 x 21 square in the top-left corner: unpadded, the farthest point from any background
    # pixel would be the image corner (0, 0); with the border as boundary it is the centre.
    mask = square((50, 50), 0, 21, 0, 21)
    assert deepest_point(mask) == (10.5, 10.5)
    disc = np.hypot(*np.mgrid[:50, :50] - np.array([31, 17])[:, None, None]) <= 9
    assert deepest_point(disc | square((50, 50), 0, 3, 0, 3)) == (17.5, 31.5)


@pytest.mark.parametrize("selection", ["score", "oracle", "single"])
def test_first_click_is_deepest_gt_point(selection):
    gt = square((50, 50), 0, 21, 0, 21)
    seg = FakeSegmenter(np.zeros_like(gt))
    trace = SimulatedAnnotator(seg, max_clicks=1, selection=selection).run(
        fake_embedding((50, 50)), gt, "a"
    )
    assert trace.points.tolist() == [[10.5, 10.5]]
    assert trace.labels.tolist() == [1]
    assert seg.calls[0]["multimask"] is (selection != "single")
    assert seg.calls[0]["mask_input"] is None
    assert trace.ious == [0.0] and trace.decoder_calls == 1


def test_second_click_deepest_in_false_negatives_is_positive():
    size = (60, 60)
    gt = square(size, 10, 40, 10, 40)
    # prediction covers the left part of the object; misses cols 25..39 (FN, 30 x 15) and
    # spills onto a 3-row strip below the object (FP): the FN block is the deeper error.
    pred = square(size, 10, 40, 10, 25) | square(size, 50, 53, 0, 60)
    seg = FakeSegmenter(pred)
    trace = SimulatedAnnotator(seg, max_clicks=2).run(fake_embedding(size), gt)
    (x, y), label = trace.points[1], trace.labels[1]
    fn = gt & ~pred
    row, col = int(y), int(x)
    assert label == 1 and fn[row, col]
    assert x == 32.5  # the middle column of cols 25..39
    assert padded_dt(fn)[row, col] == padded_dt(fn).max() == 8.0
    assert trace.ious[0] == pytest.approx((gt & pred).sum() / (gt | pred).sum())


def test_second_click_deepest_in_false_positives_is_negative():
    size = (60, 60)
    gt = square(size, 10, 40, 10, 40)
    # the whole object plus a 15 x 15 FP block; the FN is a 2-pixel-wide sliver.
    pred = (gt & ~square(size, 10, 40, 38, 40)) | square(size, 42, 57, 5, 20)
    trace = SimulatedAnnotator(FakeSegmenter(pred), max_clicks=2).run(fake_embedding(size), gt)
    (x, y), label = trace.points[1], trace.labels[1]
    assert label == 0
    assert (x, y) == (12.5, 49.5)  # centre of rows 42..56, cols 5..19
    assert pred[int(y), int(x)] and not gt[int(y), int(x)]


def test_clicked_pixels_are_never_clicked_twice():
    size = (40, 40)
    gt = square(size, 5, 30, 5, 30)
    pred = square(size, 5, 30, 5, 12)  # fixed: the error region never shrinks
    trace = SimulatedAnnotator(FakeSegmenter(pred), max_clicks=20).run(fake_embedding(size), gt)
    assert trace.n_clicks == 20 and trace.decoder_calls == 20
    pts = {tuple(p) for p in trace.points.tolist()}
    assert len(pts) == 20
    fn = gt & ~pred
    assert all(fn[int(y), int(x)] for x, y in trace.points[1:])
    assert trace.labels[1:].tolist() == [1] * 19


def test_stops_when_error_region_is_empty():
    size = (40, 40)
    gt = square(size, 5, 30, 8, 30)
    seg = FakeSegmenter(gt)
    trace = SimulatedAnnotator(seg, max_clicks=20, selection="single").run(fake_embedding(size), gt)
    assert trace.n_clicks == 1 and trace.ious == [1.0] and trace.decoder_calls == 1
    assert trace.info["stop"] == "empty_error"
    assert np.array_equal(trace.final_mask, gt)


def test_mask_input_feedback_and_single_mask_after_first_click():
    size = (40, 40)
    gt = square(size, 5, 30, 5, 30)
    first = square(size, 5, 30, 5, 15)  # the highest-scoring candidate
    cands = [first, square(size, 0, 40, 0, 40), square(size, 0, 2, 0, 2)]
    seg = FakeSegmenter(square(size, 5, 30, 5, 20), cands)
    SimulatedAnnotator(seg, max_clicks=3).run(fake_embedding(size), gt)
    assert [c["multimask"] for c in seg.calls] == [True, False, False]
    assert seg.calls[0]["mask_input"] is None
    assert torch.equal(seg.calls[1]["mask_input"], logits_of(first))
    assert torch.equal(seg.calls[2]["mask_input"], seg.single)

    seg = FakeSegmenter(square(size, 5, 30, 5, 20), cands)
    SimulatedAnnotator(seg, max_clicks=3, use_mask_input=False).run(fake_embedding(size), gt)
    assert all(c["mask_input"] is None for c in seg.calls)


def test_oracle_selection_takes_best_true_iou_of_three():
    size = (40, 40)
    gt = square(size, 5, 30, 5, 30)
    cands = [square(size, 5, 10, 5, 10), gt, np.zeros(size, bool)]  # scores 0.9, 0.5, 0.1
    pred_later = square(size, 5, 30, 5, 20)
    by_score = SimulatedAnnotator(FakeSegmenter(pred_later, cands), selection="score")
    oracle = SimulatedAnnotator(FakeSegmenter(pred_later, cands), selection="oracle")
    t_score = by_score.run(fake_embedding(size), gt)
    t_oracle = oracle.run(fake_embedding(size), gt)
    assert t_score.ious[0] == pytest.approx(25 / 625)
    assert t_score.info["first_candidate"] == 0
    assert t_oracle.ious == [1.0] and t_oracle.info["first_candidate"] == 1  # then: no error


def test_annotator_rejects_bad_ground_truth():
    ann = SimulatedAnnotator(FakeSegmenter(np.zeros((40, 40), bool)))
    with pytest.raises(ValueError, match="does not match"):
        ann.run(fake_embedding((40, 40)), np.ones((30, 40), bool))
    with pytest.raises(ValueError, match="empty ground truth"):
        ann.run(fake_embedding((40, 40)), np.zeros((40, 40), bool))
    with pytest.raises(ValueError, match="selection"):
        SimulatedAnnotator(FakeSegmenter(np.zeros((4, 4), bool)), selection="best")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def trace(ious: list[float]) -> ClickTrace:
    n = len(ious)
    return ClickTrace(
        "t",
        np.zeros((n, 2), np.float32),
        np.ones(n, np.int64),
        ious,
        np.zeros((2, 2), bool),
        n,
        0.1,
    )


def test_noc_on_hand_computed_numbers():
    ious = [0.5, 0.86, 0.95]
    assert noc(ious, 0.85) == 2
    assert noc(ious, 0.90) == 3
    assert noc(ious, 0.5) == 1
    assert noc(ious, 0.99) == 20
    assert noc(ious, 0.99, max_clicks=5) == 5
    assert noc(ious, 0.9, max_clicks=2) == 2  # reached only at click 3, beyond the budget
    assert noc([], 0.85) == 20


def test_miou_at_k_carries_last_value_forward():
    traces = [trace([0.2, 0.6, 0.9]), trace([0.4, 1.0])]  # the second stopped early
    assert miou_at_k(traces, 1) == pytest.approx(0.3)
    assert miou_at_k(traces, 2) == pytest.approx(0.8)
    assert miou_at_k(traces, 3) == pytest.approx(0.95)
    assert miou_at_k(traces, 20) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        miou_at_k(traces, 0)
    with pytest.raises(ValueError):
        miou_at_k([trace([])], 1)
    row = summarize(traces, ks=(1, 3), thresholds=(0.85, 0.95))
    assert row["miou@1"] == pytest.approx(0.3) and row["miou@3"] == pytest.approx(0.95)
    assert row["noc@85"] == pytest.approx((3 + 2) / 2)
    assert row["noc@95"] == pytest.approx((20 + 2) / 2)


# --------------------------------------------------------------------------------------------
# Fixed policies inside the environment (tiny SAM)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArraySample:
    id: str
    image: np.ndarray
    mask: np.ndarray

    def load_image(self) -> np.ndarray:
        return self.image


def make_samples(n: int = 2) -> list[ArraySample]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        h, w = 96 + 8 * i, 128
        img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        mask = square((h, w), 20, 70, 30 + 10 * i, 100)
        img[mask] = (220, 60, 60)
        out.append(ArraySample(f"s{i}", img, mask))
    return out


@pytest.fixture()
def env(tiny_segmenter):
    cfg = EnvConfig(grid=5, max_steps=6, start="gt")
    return PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), cfg)


def cells_of(points: np.ndarray, shape: tuple[int, int], g: int) -> list[int]:
    """Action cells of ``(x, y)`` points in an image of ``shape`` on a ``g x g`` grid."""
    h, w = shape
    return [int(y * g // h) * g + int(x * g // w) for x, y in points]


@pytest.mark.parametrize("policy", ["random", "centre", "grid", "srm_confident"])
@pytest.mark.parametrize("start", ["gt", "none"])
def test_env_policies_click_t_unvisited_cells(env, policy, start):
    clicker = EnvClicker(env, policy, seed=0, start=start)
    tr = clicker.run(1, steps=4)
    n_start = 2 if start == "gt" else 0
    assert tr.start_clicks == n_start and tr.n_clicks == n_start + 4
    actions = tr.info["actions"]
    assert len(set(actions)) == 4
    gt = env.samples[1].mask
    assert cells_of(tr.points[n_start:], gt.shape, 5) == actions  # points: the cells' centres
    assert tr.labels[n_start:].tolist() == [int(gt[int(y), int(x)]) for x, y in tr.points[n_start:]]
    assert tr.decoder_calls == 4 + (1 if n_start else 0)
    assert len(tr.ious) == tr.n_clicks and len(tr.info["env_iou"]) == 4
    assert tr.final_mask.shape == gt.shape and tr.sample_id == "s1"
    if policy == "centre":
        assert actions[0] == 12  # the centre of a 5 x 5 grid
    if policy == "srm_confident" and start == "none":
        # empty mask: score = |p - 0.5| * p peaks where the oracle map is 1: a foreground cell
        assert tr.labels[0] == 1


def test_env_policies_are_seeded_and_order_independent(env):
    a = EnvClicker(env, "random", seed=0).run(0, steps=4).info["actions"]
    EnvClicker(env, "random", seed=0).run(1, steps=2)
    b = EnvClicker(env, "random", seed=0).run(0, steps=4).info["actions"]
    c = EnvClicker(env, "random", seed=1).run(0, steps=4).info["actions"]
    assert a == b and a != c
    g1 = EnvClicker(env, "grid", seed=0).run(0, steps=3)
    g2 = EnvClicker(env, "grid", seed=5).run(0, steps=3)
    assert g1.info["actions"] == g2.info["actions"]
    assert np.array_equal(g1.points[2:], g2.points[2:])


def test_env_clicker_default_steps_and_more_steps_than_cells(tiny_segmenter):
    cfg = EnvConfig(grid=2, max_steps=5, start="none")
    small = PointPromptEnv(make_samples(1), tiny_segmenter, OracleLabeler(), cfg)
    tr = EnvClicker(small, "centre").run(0)  # steps default: max_steps
    actions = tr.info["actions"]
    assert len(actions) == 5 and sorted(actions[:4]) == [0, 1, 2, 3]


def test_srm_confident_picks_most_confident_disagreement(env):
    clicker = EnvClicker(env, "srm_confident", seed=0, start="gt")
    obs, _ = env.reset(seed=0, options={"index": 0, "start": "gt"})
    p, m = obs["fg"][0].ravel(), obs["mask"][0].ravel()
    score = np.abs(p - 0.5) * np.abs(p - m)
    action = clicker.run(0, steps=1).info["actions"][0]
    assert score[action] == pytest.approx(score.max())
    assert score.max() > 0


class FixedMapLabeler(Labeler):
    """A labeler with a hand-made foreground map (as the SRM has), labels ``p >= 0.5``."""

    name = "fixed"

    def __init__(self, fg: np.ndarray) -> None:
        self.fg = fg

    def foreground_map(self, state: EpisodeState) -> np.ndarray:
        return self.fg

    def label(self, state: EpisodeState, x: float, y: float) -> int:
        return int(self.fg[state.grid_cell(x, y)] >= 0.5)


def test_srm_confident_needs_confidence_not_just_disagreement(tiny_segmenter):
    # Empty mask (start "none"): a cell at p = 0.5 disagrees most with the mask (|p - m| = 0.5)
    # but is not confident (|p - 0.5| = 0); the policy must prefer a confident cell (p < 0.5).
    fg = np.full((16, 16), 0.5, np.float32)
    fg[6:12, 8:14] = 0.2
    lab_env = PointPromptEnv(
        make_samples(1), tiny_segmenter, FixedMapLabeler(fg), EnvConfig(grid=5, start="none")
    )
    obs, _ = lab_env.reset(seed=0, options={"index": 0})
    tr = EnvClicker(lab_env, "srm_confident").run(0, steps=1)
    p = obs["fg"][0].ravel()
    action = tr.info["actions"][0]
    assert p[action] < 0.5 and tr.labels.tolist() == [0]
    assert np.abs(p[action] - 0.5) * p[action] == pytest.approx(np.max(np.abs(p - 0.5) * p))


def test_env_clicker_rejects_bad_policy_and_labeler(tiny_segmenter, env):
    with pytest.raises(ValueError, match="policy"):
        EnvClicker(env, "zigzag")
    plain = PointPromptEnv(make_samples(1), tiny_segmenter, AlwaysPositiveLabeler())
    with pytest.raises(ValueError, match="foreground map"):
        EnvClicker(plain, "srm_confident")


def test_fixed_orders_are_permutations_and_spread():
    for g in (2, 5, 10):
        for order in (spiral_order(g), grid_order(g)):
            assert sorted(order.tolist()) == list(range(g * g))
    s = spiral_order(10)
    r, c = np.divmod(s, 10)
    dist = np.hypot(r - 4.5, c - 4.5)
    assert set(s[:4].tolist()) == {44, 45, 54, 55} and np.all(np.diff(dist) >= -1e-9)
    o = grid_order(10)
    r, c = np.divmod(o[:10], 10)
    d = np.hypot(r[:, None] - r, c[:, None] - c) + np.eye(10) * 99
    assert d.min() >= 2.0  # the first ten cells are spread out
    assert {(r[i] < 5, c[i] < 5) for i in range(4)} == {(a, b) for a in (0, 1) for b in (0, 1)}


def test_grid_to_pixel_inverts_grid_cell():
    emb = ImageEmbedding(torch.zeros(1, 2, 16, 16), (90, 160), (576, 1024), "fake")
    state = EpisodeState("x", emb, np.zeros((16, 16), np.float32))
    vh, vw = emb.valid_shape(emb.grid_size)
    for row in range(vh):
        for col in range(vw):
            assert state.grid_cell(*grid_to_pixel(emb, row, col)) == (row, col)


# --------------------------------------------------------------------------------------------
# One-shot similarity baseline
# --------------------------------------------------------------------------------------------


def unit_vec(c: int, dim: int = 8) -> torch.Tensor:
    v = torch.zeros(dim)
    v[c] = 1.0
    return v


def feature_map(background: torch.Tensor, grid: int = 16) -> torch.Tensor:
    return background[:, None, None].repeat(1, grid, grid).clone()


def test_one_shot_prototype_and_points():
    a, b = unit_vec(1), unit_vec(0)
    ref = feature_map(b)
    ref[:, 2:6, 2:6] = a[:, None, None]
    ref_mask = square((64, 64), 8, 24, 8, 24)  # grid cells 2..5 at 4 px a cell
    ref_emb = ImageEmbedding(ref[None], (64, 64), (64, 64), "fake")

    tgt = feature_map(b) + 0.05 * torch.randn(8, 16, 16, generator=torch.Generator().manual_seed(0))
    tgt[:, 9:13, 10:14] = (a + 0.1 * b)[:, None, None]
    tgt[:, 0:2, 14:16] = -a[:, None, None]  # the least similar region
    tgt[:, 12:16, 0:4] = (3 * (a + b))[:, None, None]  # larger dot product, lower cosine
    tgt_emb = ImageEmbedding(tgt[None], (64, 64), (64, 64), "fake")
    gt = square((64, 64), 36, 52, 40, 56)

    seg = FakeSegmenter(gt)
    model = OneShotSimilarity(seg, n_pos=2, n_neg=1).fit(ref_emb, ref_mask)
    assert torch.allclose(model.target_feature, a, atol=1e-6)
    assert torch.allclose(model.background_feature, b, atol=1e-6)
    tr = model.run(tgt_emb, gt, "t")
    assert tr.labels.tolist() == [1, 1, 0]
    for x, y in tr.points[:2]:
        assert gt[int(y), int(x)]
    x, y = tr.points[2]
    assert 0 <= y < 8 and 56 <= x < 64
    assert tr.ious == [1.0] * 3 and tr.decoder_calls == 1 and tr.start_clicks == 3
    assert seg.calls[0]["multimask"] is True
    assert model.run(tgt_emb).ious == []


def test_one_shot_ignores_padding_and_averages_references():
    a, b = unit_vec(1), unit_vec(0)
    ref = feature_map(b)
    ref[:, 2:6, 2:6] = a[:, None, None]
    ref_emb = ImageEmbedding(ref[None], (64, 64), (64, 64), "fake")
    ref_mask = square((64, 64), 8, 24, 8, 24)
    # a 48 x 64 target: grid rows 12..15 are padding. They hold a perfect match, the valid
    # region only a partial one; the positive point must stay inside the image.
    tgt = feature_map(b)
    tgt[:, 12:16, :] = a[:, None, None]
    tgt[:, 3:5, 3:5] = (a + 0.5 * b)[:, None, None]
    tgt_emb = ImageEmbedding(tgt[None], (48, 64), (48, 64), "fake")
    model = OneShotSimilarity(FakeSegmenter(np.zeros((48, 64), bool))).fit(ref_emb, ref_mask)
    (x, y), _ = model.run(tgt_emb).points
    assert 12 <= y < 20 and 12 <= x < 20

    ref2 = feature_map(b)
    ref2[:, 2:6, 2:6] = unit_vec(2)[:, None, None]
    ref2_emb = ImageEmbedding(ref2[None], (64, 64), (64, 64), "fake")
    model.fit_many([(ref_emb, ref_mask), (ref2_emb, ref_mask)])
    expected = (a + unit_vec(2)) / np.sqrt(2)
    assert model.n_references == 2
    assert torch.allclose(model.target_feature, expected, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        model.fit(ref_emb, np.zeros((64, 64), bool))


# --------------------------------------------------------------------------------------------
# Real MobileSAM
# --------------------------------------------------------------------------------------------


@pytest.mark.mobilesam
def test_annotator_converges_with_mobile_sam(mobile_sam):
    from envs.synthetic import synthetic_task

    ann = SimulatedAnnotator(mobile_sam, max_clicks=20, selection="score")
    for s in synthetic_task("val", n=2):
        tr = ann.run(mobile_sam.encode(s.image), s.mask, s.id)
        assert tr.decoder_calls == tr.n_clicks == len(tr.ious)
        assert tr.ious[min(4, len(tr.ious) - 1)] >= tr.ious[0]
        assert max(tr.ious) > 0.7, tr.ious
        assert tr.labels[0] == 1 and s.mask[int(tr.points[0, 1]), int(tr.points[0, 0])]


@pytest.mark.mobilesam
def test_synthetic_task_rewards_click_placement(mobile_sam, tmp_path):
    """The embedded task is one where placement matters: with perfect labels, clicks on
    uncovered foreground beat random clicks by a wide margin (several targets per scene)."""
    from envs.synthetic import synthetic_task

    samples = synthetic_task("val", n=6)
    cfg = EnvConfig(start="labeler", max_steps=8, labeler_learns=False, sample_order="sequential")
    env = PointPromptEnv(samples, mobile_sam, OracleLabeler(), cfg, cache=EmbeddingCache(tmp_path))
    final = {
        policy: np.mean([EnvClicker(env, policy).run(i).ious[-1] for i in range(len(samples))])
        for policy in ("random", "srm_confident")
    }
    assert final["srm_confident"] > 0.85 and final["srm_confident"] - final["random"] > 0.3, final


# --------------------------------------------------------------------------------------------
# The annotator taking over an automatic method's final state
# --------------------------------------------------------------------------------------------


def _agent_state(seg, size=(60, 60)):
    """A session that ended on ``seg``'s mask after a right and a wrong foreground click."""
    from segmenter.session import PromptSession

    s = PromptSession(seg, fake_embedding(size))
    s.prompt(np.array([[20.5, 20.5], [55.5, 55.5]]), np.array([1, 1]))
    return s


@pytest.mark.parametrize(
    ("handover", "first_points"),
    [
        ("keep", [[20.5, 20.5], [55.5, 55.5]]),
        ("mask", []),
        ("prune", [[20.5, 20.5]]),  # the foreground click outside the object is dropped
    ],
)
def test_corrections_hand_over_the_methods_prompts_and_mask(handover, first_points):
    size = (60, 60)
    gt = square(size, 10, 40, 10, 40)
    seg = FakeSegmenter(square(size, 10, 40, 10, 30))  # misses the right third of the object
    start = _agent_state(seg, size)
    start_logits = start.logits.clone()
    seg.calls.clear()
    trace = SimulatedAnnotator(seg, max_clicks=2).correct(start, gt, "a", handover=handover)
    first = seg.calls[0]
    click = trace.points[0].tolist()
    assert first["points"].tolist() == [*first_points, click]
    assert torch.equal(first["mask_input"], start_logits)  # the method's mask goes on
    assert first["multimask"] is False
    assert trace.labels[0] == 1 and gt[int(click[1]), int(click[0])]  # a click in the miss
    assert trace.info["start_iou"] == pytest.approx(600 / 900)
    assert trace.info["dropped"] == {"keep": 0, "mask": 2, "prune": 1}[handover]
    assert start.points.tolist() == [[20.5, 20.5], [55.5, 55.5]]  # the start is not changed
    assert len(trace.ious) == 2 == trace.decoder_calls


def test_corrections_stop_at_once_when_the_start_is_good_enough():
    size = (60, 60)
    gt = square(size, 10, 40, 10, 40)
    seg = FakeSegmenter(gt)
    trace = SimulatedAnnotator(seg, max_clicks=5).correct(_agent_state(seg, size), gt, stop_iou=0.9)
    assert trace.n_clicks == 0 and trace.info["start_iou"] == 1.0
    from agents.clickers import noc_from

    assert noc_from(1.0, [], 0.9) == 0
    assert noc_from(0.5, [0.6, 0.95], 0.9) == 2
    assert noc_from(0.5, [0.6, 0.7], 0.9, max_clicks=20) == 20
    with pytest.raises(ValueError, match="handover"):
        SimulatedAnnotator(seg).correct(_agent_state(seg, size), gt, handover="drop")
