"""Benchmark statistics: bootstrap intervals and the agent's place on the manual curve."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.benchmark import bootstrap_ci, paired_diff_ci, position_on_curve


def test_bootstrap_interval_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(20)
    big = rng.random(2000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    blo, bhi = bootstrap_ci(big)
    assert bhi - blo < (hi - lo) / 3
    assert bootstrap_ci([0.5]) == (0.5, 0.5)


def test_paired_difference_detects_a_shift_but_not_noise():
    rng = np.random.default_rng(1)
    a = rng.random(100)
    d, lo, hi = paired_diff_ci(a + 0.05, a)
    assert d == pytest.approx(0.05) and lo > 0
    d, lo, hi = paired_diff_ci(a + rng.normal(0, 0.01, 100), a)
    assert lo < 0 < hi


def test_position_on_manual_curve():
    curve = [0.4, 0.6, 0.7, 0.8]
    assert position_on_curve(0.6, curve) == pytest.approx(2.0)
    assert position_on_curve(0.65, curve) == pytest.approx(2.5)
    assert position_on_curve(0.4, curve) == 1.0
    assert position_on_curve(0.3, curve) == 0.0  # below one click
    assert position_on_curve(0.9, curve) is None  # beyond the budget
    # A dip in the curve does not make the position ambiguous.
    assert position_on_curve(0.55, [0.4, 0.6, 0.5, 0.8]) == pytest.approx(1.75)


def test_a_registered_method_is_a_benchmark_choice(monkeypatch):
    """Adding a benchmark method is one entry in the methods table: --methods accepts it and
    --help lists it."""
    from experiments.benchmark import methods
    from experiments.cli import build_parser

    group = methods.MethodGroup("centre_once", "one centre click, SRM label", lambda ctx: None)
    monkeypatch.setitem(methods.METHODS, "centre_once", group)
    parser = build_parser()
    args = parser.parse_args(["benchmark", "task", "--agents", "r", "--methods", "centre_once"])
    assert args.methods == ["centre_once"]
    sub = parser._subparsers._group_actions[0].choices["benchmark"]  # noqa: SLF001 - argparse
    assert "one centre click, SRM label" in " ".join(sub.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["benchmark", "task", "--agents", "r", "--methods", "nope"])


def test_the_report_names_the_dataset_a_benchmark_ran_on():
    import json
    from pathlib import Path

    from experiments.benchmark.report import render_markdown

    path = Path(__file__).parents[1] / "docs/results/lookahead_kvasir_test_blur/results.json"
    result = json.loads(path.read_text())
    assert render_markdown(result).startswith(
        "# alignsam benchmark: kvasir_polyp_lookahead (kvasir:test@blur, 100 images,"
    )
    result.pop("dataset")  # results written before the dataset was recorded: the split
    assert "(test, 100 images," in render_markdown(result).splitlines()[0]


def test_the_report_explains_its_star_once_for_both_tables_and_names_agents_in_a_legend(
    tmp_path,
):
    import json
    from pathlib import Path

    from experiments.benchmark.report import render_markdown
    from experiments.benchmark.runner import agent_names, render_legend

    path = Path(__file__).parents[1] / "docs/results/lookahead_kvasir_test/results.json"
    text = render_markdown(json.loads(path.read_text()))
    assert text.count("paired bootstrap interval of the difference") == 1
    assert "mIoU after k clicks" in text  # the second table the footnote covers
    # Two agents: short names (task/kind) for the plots, the run folders in legend.md.
    runs = []
    for name, kind in (("kvasir_polyp", "lookahead"), ("kvasir_polyp", "ppo")):
        run = tmp_path / f"{name}__{kind}__0__20261206-000000"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"name": name, "agent": kind, "seed": 0}))
        runs.append(str(run))
    assert agent_names(runs) == ["agent kvasir_polyp/lookahead", "agent kvasir_polyp/ppo"]
    assert agent_names(runs[:1]) == ["agent"]
    assert agent_names([runs[0], runs[0]]) == [
        "agent kvasir_polyp/lookahead s0 #1",
        "agent kvasir_polyp/lookahead s0 #2",
    ]
    adapted = Path(runs[0]).with_name("adapted")
    adapted.mkdir()
    (adapted / "config.json").write_text((Path(runs[0]) / "config.json").read_text())
    (adapted / "adapted.json").write_text("{}")
    assert agent_names([runs[0], str(adapted)]) == [
        "agent kvasir_polyp/lookahead",
        "agent kvasir_polyp/lookahead adapted",
    ]
    legend = render_legend({"runs": runs})
    assert f"| agent kvasir_polyp/ppo | `{runs[1]}` |" in legend


def test_summary_counts_the_images_a_method_leaves_worse_than_its_own_start():
    from experiments.benchmark.results import MethodResult

    m = MethodResult("agent", "automatic", start_clicks=2)
    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    for i, curve in enumerate([[0.5, 0.5, 0.7], [0.8, 0.8, 0.6], [0.9, 0.9, 0.9]]):
        m.add(f"im{i}", gt, gt, clicks=3, seconds=0.1, calls=2)
        m.curve.append(curve)
    out = m.summary()
    assert out["worse_than_start"] == pytest.approx(1 / 3)  # only im1 ends below its start
    assert out["start_iou"] == pytest.approx((0.5 + 0.8 + 0.9) / 3)
    no_start = MethodResult("grid", "automatic")
    no_start.add("im0", gt, gt, clicks=1, seconds=0.1, calls=1)
    no_start.curve.append([0.4])
    assert "worse_than_start" not in no_start.summary()
