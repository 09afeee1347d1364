"""Mask metrics (segmenter.metrics): ranges, symmetry, edge cases, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segmenter.base import mask_iou
from segmenter.metrics import ber, dice, e_measure, f_beta, iou, mae, mask_metrics

_shape = st.tuples(st.integers(1, 12), st.integers(1, 12))
_pairs = _shape.flatmap(lambda s: st.tuples(arrays(bool, s), arrays(bool, s)))


@settings(max_examples=150, deadline=None)
@given(pair=_pairs)
def test_ranges_and_identities(pair):
    p, g = pair
    m = mask_metrics(p, g)
    for key in ("iou", "dice", "f_beta", "mae", "e_measure"):
        assert 0.0 <= m[key] <= 1.0 + 1e-12, key
    assert 0.0 <= m["ber"] <= 100.0
    assert m["iou"] == pytest.approx(mask_iou(p, g))
    # Dice and IoU are monotone transforms of each other.
    assert m["dice"] == pytest.approx(2 * m["iou"] / (1 + m["iou"]))
    # Symmetric measures.
    assert iou(g, p) == pytest.approx(m["iou"]) and dice(g, p) == pytest.approx(m["dice"])
    assert mae(g, p) == pytest.approx(m["mae"])
    # A perfect prediction is perfect under every measure.
    perfect = mask_metrics(g, g)
    assert perfect["iou"] == perfect["dice"] == perfect["f_beta"] == 1.0
    assert perfect["mae"] == 0.0 and perfect["ber"] == 0.0
    assert perfect["e_measure"] == pytest.approx(1.0)


@settings(max_examples=100, deadline=None)
@given(g=arrays(bool, _shape))
def test_empty_and_inverted_predictions(g):
    empty = np.zeros_like(g)
    m = mask_metrics(empty, g)
    if g.any():
        assert m["iou"] == m["dice"] == m["f_beta"] == 0.0
        assert m["ber"] == 50.0  # every foreground pixel missed, every background one right
    else:
        assert m["iou"] == m["f_beta"] == 1.0 and m["ber"] == 0.0
    inv = mask_metrics(~g, g)
    assert inv["mae"] == 1.0 and inv["iou"] == 0.0
    # An absent class counts as fully right, so only a two-class target reaches 100 %.
    assert inv["ber"] == (100.0 if g.any() and (~g).any() else 50.0)


def test_hand_computed_values():
    g = np.zeros((4, 4), bool)
    g[:2, :2] = True  # 4 fg pixels
    p = np.zeros((4, 4), bool)
    p[:2, :3] = True  # 6 predicted, 4 correct
    assert iou(p, g) == pytest.approx(4 / 6)
    assert dice(p, g) == pytest.approx(8 / 10)
    prec, rec = 4 / 6, 1.0
    assert f_beta(p, g) == pytest.approx(1.3 * prec * rec / (0.3 * prec + rec))
    assert mae(p, g) == pytest.approx(2 / 16)
    assert ber(p, g) == pytest.approx(100 * (1 - 0.5 * (1.0 + 10 / 12)))
    # E-measure of the all-background cases (the paper's special cases).
    assert e_measure(np.zeros((3, 3)), np.zeros((3, 3), bool)) == 1.0
    assert e_measure(np.full((3, 3), 0.25), np.ones((3, 3), bool)) == pytest.approx(0.25)
    # Soft maps: MAE uses the values, the binary measures threshold at 0.5.
    soft = np.where(g, 0.8, 0.1)
    assert mae(soft, g) == pytest.approx((4 * 0.2 + 12 * 0.1) / 16)
    assert iou(soft, g) == 1.0
    assert e_measure(soft, g) < 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same"):
        iou(np.zeros((3, 4), bool), np.zeros((4, 3), bool))
