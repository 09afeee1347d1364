"""'Nothing here' (issue 31): the presence score, its threshold chosen on images with and
without the target, and ``segment`` writing an empty mask below it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recalibration.presence import (
    PresenceGate,
    choose_threshold,
    presence_score,
    separation,
)


def test_presence_is_the_mean_of_the_most_confident_cells_inside_the_valid_part():
    srm_map = np.zeros((10, 10))
    srm_map[0, :2] = [0.9, 0.7]  # valid
    srm_map[9, 9] = 1.0  # padding: not read
    assert presence_score(srm_map, (8, 8), top=2 / 64) == pytest.approx(0.8)
    assert presence_score(srm_map, (8, 8), top=0.0) == pytest.approx(0.9)  # one cell at least


def test_threshold_keeps_all_but_the_allowed_share_of_positives():
    positives = np.linspace(0.5, 1.0, 100)
    negatives = np.linspace(0.0, 0.6, 50)
    chosen = choose_threshold(positives, negatives, max_recall_loss=0.02)
    assert chosen["recall"] == pytest.approx(0.98)
    assert chosen["threshold"] == pytest.approx(positives[2])
    assert chosen["false_positive_rate"] == pytest.approx(np.mean(negatives >= positives[2]))
    assert chosen["rule"] == "recall"  # 5 % of the negatives lie above it: no room
    assert choose_threshold(positives, negatives, 0.0)["recall"] == 1.0
    assert separation([1, 2], [0, 2]) == pytest.approx(2.5 / 4)  # the tie (2, 2) counts half
    with pytest.raises(ValueError, match="with and without"):
        choose_threshold(positives, [], 0.02)


def test_a_threshold_both_goals_allow_sits_midway_between_their_limits_in_log_odds():
    positives = np.linspace(0.9, 0.999, 50)  # recall limit: the 2nd lowest (1 of 50 may go)
    negatives = np.r_[np.linspace(0.01, 0.5, 38), [0.6, 0.95]]  # 2 of 40 (5 %) may pass
    chosen = choose_threshold(positives, negatives, 0.02, 0.05)
    assert chosen["rule"] == "middle"
    assert chosen["recall_limit"] == pytest.approx(positives[1])
    assert chosen["false_positive_limit"] == pytest.approx(0.5)  # just above the 3rd highest
    logit = lambda x: np.log(x / (1 - x))  # noqa: E731
    mid = (logit(positives[1]) + logit(0.5)) / 2
    assert logit(chosen["threshold"]) == pytest.approx(mid, abs=1e-6)
    assert 0.5 < chosen["threshold"] < positives[1]
    assert chosen["recall"] == 1.0 and chosen["false_positive_rate"] == pytest.approx(1 / 40)
    # no room between them: the recall limit wins, false positives or not
    crowded = choose_threshold(positives, np.r_[negatives, [0.97] * 5], 0.02, 0.05)
    assert crowded["rule"] == "recall"
    assert crowded["threshold"] == pytest.approx(positives[1])
    assert crowded["false_positive_rate"] == pytest.approx(6 / 45)
    # scores at 0 and 1 stay inside the range
    edge = choose_threshold([1.0, 1.0], [0.0, 0.0], 0.0, 0.0)
    assert edge["rule"] == "middle" and 0.0 < edge["threshold"] <= 1.0
    assert edge["recall"] == 1.0 and edge["false_positive_rate"] == 0.0
    with pytest.raises(ValueError, match="max_false_positive_rate"):
        choose_threshold(positives, negatives, 0.02, 1.0)


def test_gate_round_trips_and_a_broken_file_says_how_to_fix_it(tmp_path):
    assert PresenceGate.load(tmp_path) is None
    PresenceGate(0.42, chosen_on={"positives": "kvasir:val"}).save(tmp_path)
    assert PresenceGate.load(tmp_path) == PresenceGate(0.42, chosen_on={"positives": "kvasir:val"})
    (tmp_path / "presence.json").write_text("{")
    with pytest.raises(ValueError, match="--choose, or delete the file"):
        PresenceGate.load(tmp_path)


def test_a_run_with_a_broken_gate_fails_to_load_as_a_bad_run_folder(first_run):
    from agents.prompt_agent import AgentLoadError, PromptAgent

    run = Path(first_run[0]["run_dir"])
    (run / "presence.json").write_text('{"threshold": "high"}')
    try:
        with pytest.raises(AgentLoadError, match="presence.json: not a presence gate"):
            PromptAgent.load(run)
    finally:
        (run / "presence.json").unlink()


def test_segment_writes_an_empty_mask_below_the_threshold_and_lists_it(first_run, tmp_path):
    from PIL import Image

    from agents.prompt_agent import PromptAgent
    from experiments.segment import gather_inputs, segment_images

    summary, _ = first_run
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    agent = PromptAgent.load(summary["run_dir"])
    samples = gather_inputs([str(folder)])
    rep = segment_images(agent, samples, tmp_path / "all", progress=False)
    assert rep.presence_threshold is None and rep.no_target == []  # the run has no gate
    anns = json.loads((tmp_path / "all" / "results.json").read_text())["annotations"]
    scores = [a["presence"] for a in anns]
    assert all(0.0 <= v <= 1.0 for v in scores) and not any(a["no_target"] for a in anns)
    # a gate between the two scores empties exactly the lower one
    low = int(np.argmin(scores))
    cut = float(np.mean(scores)) if scores[0] != scores[1] else scores[0] + 1e-6
    run = Path(summary["run_dir"])
    PresenceGate(cut).save(run)
    try:
        gated = PromptAgent.load(run)
        rep = segment_images(gated, samples, tmp_path / "gated", progress=False)
    finally:
        (run / "presence.json").unlink()
    assert rep.presence_threshold == pytest.approx(cut)
    assert rep.no_target == [["a", "b"][low]] or (
        scores[0] == scores[1] and len(rep.no_target) == 2
    )
    empty = np.asarray(Image.open(tmp_path / "gated" / "masks" / f"{rep.no_target[0]}.png"))
    assert not empty.any()
    summary_json = json.loads((tmp_path / "gated" / "summary.json").read_text())
    assert summary_json["no_target"] == rep.no_target
    anns = json.loads((tmp_path / "gated" / "results.json").read_text())["annotations"]
    assert [a["no_target"] for a in anns] == [i in rep.no_target for i in ("a", "b")]
    assert all(a["clicks"] == [] for a in anns if a["no_target"])
    # the gate comes before the episode: an image under it costs no decoder call
    image = samples[low].load_image()
    calls = gated.segmenter.decoder_calls
    out = gated.segment_detailed(image, presence_threshold=cut)
    assert out["no_target"] and out["decoder_calls"] == 0
    assert gated.segmenter.decoder_calls == calls
    assert out["mask"].shape == image.shape[:2] and not out["mask"].any()
    # 0 turns the gate off
    rep = segment_images(gated, samples, tmp_path / "off", progress=False, presence_threshold=0.0)
    assert rep.no_target == []


def test_presence_command_chooses_on_one_set_and_measures_on_another(first_run, tmp_path):
    from experiments.presence import run_presence

    summary, cache = first_run
    run = Path(summary["run_dir"])
    from segmenter import EmbeddingCache

    try:
        with pytest.raises(ValueError, match="--choose"):
            run_presence(run, "synthetic:val", "synthetic:val@negative", tmp_path / "m0",
                         cache=EmbeddingCache(cache), progress=False)  # fmt: skip
        chosen = run_presence(run, "synthetic:val", "synthetic:val@negative", tmp_path / "c",
                              choose=True, max_recall_loss=0.1, cache=EmbeddingCache(cache),
                              progress=False)  # fmt: skip
        gate = PresenceGate.load(run)
        assert gate.threshold == chosen["threshold"] and chosen["recall"] >= 0.9
        assert gate.chosen_on["rule"] == chosen["rule"] in ("middle", "recall")
        assert gate.chosen_on["max_false_positive_rate"] == chosen["max_false_positive_rate"]
        assert chosen["max_false_positive_rate"] == 0.05
        assert ("midway" if chosen["rule"] == "middle" else "the recall limit") in (
            tmp_path / "c" / "results.md"
        ).read_text()
        measured = run_presence(run, "synthetic:val", "synthetic:val@negative", tmp_path / "m",
                                cache=EmbeddingCache(cache), progress=False)  # fmt: skip
        assert not measured["chosen_here"] and measured["threshold"] == gate.threshold
        assert measured["false_positive_rate"] == chosen["false_positive_rate"]
        assert "| threshold | recall |" in (tmp_path / "m" / "results.md").read_text()
        with pytest.raises(ValueError, match="hold the target"):
            run_presence(run, "synthetic:val", "synthetic:val", tmp_path / "x",
                         cache=EmbeddingCache(cache), progress=False)  # fmt: skip
    finally:
        (run / "presence.json").unlink(missing_ok=True)


def test_presence_model_separates_fits_and_round_trips(tmp_path):
    from recalibration.presence import PresenceModel

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, (40, 5)), rng.normal(-1.0, 1.0, (30, 5))
    model = PresenceModel.fit(pos, neg, fitted_on={"positives_from": ["a"]})
    p = [model.score(x) for x in pos]
    n = [model.score(x) for x in neg]
    assert all(0.0 < v < 1.0 for v in p + n) and separation(p, n) > 0.9
    assert model.fitted_on["positives"] == 40 and model.fitted_on["negatives"] == 30
    PresenceGate(0.5, model=model).save(tmp_path)
    loaded = PresenceGate.load(tmp_path)
    assert loaded.model.score(pos[0]) == pytest.approx(model.score(pos[0]))
    with pytest.raises(ValueError, match="fitted for another segmenter"):
        model.score(np.zeros(4))
    with pytest.raises(ValueError, match="with and without"):
        PresenceModel.fit(pos, neg[:0])


def test_presence_command_fits_a_model_on_train_and_chooses_on_val(first_run, tmp_path):
    from agents.prompt_agent import PromptAgent
    from experiments.presence import run_presence
    from segmenter import EmbeddingCache

    summary, cache = first_run
    run = Path(summary["run_dir"])
    kw = {"cache": EmbeddingCache(cache), "progress": False}
    try:
        with pytest.raises(ValueError, match="--choose"):
            run_presence(run, "synthetic:val", "synthetic:val@negative", tmp_path / "x",
                         fit_positives=["synthetic:train"],
                         fit_negatives=["synthetic:train@negative"], **kw)  # fmt: skip
        with pytest.raises(ValueError, match="not an image without the target"):
            run_presence(run, "synthetic:val", "synthetic:val@negative", tmp_path / "x",
                         choose=True, fit_positives=["synthetic:train"],
                         fit_negatives=["synthetic:train"], **kw)  # fmt: skip
        chosen = run_presence(run, "synthetic:val", "synthetic:val@negative", tmp_path / "c",
                              choose=True, max_recall_loss=0.1,
                              fit_positives=["synthetic:train"],
                              fit_negatives=["synthetic:train@negative"], **kw)  # fmt: skip
        assert chosen["score"] == "learned" and chosen["fitted_on"]["negatives"] > 0
        gate = PresenceGate.load(run)
        assert gate.model is not None and gate.threshold == chosen["threshold"]
        assert "learned presence model" in (tmp_path / "c" / "results.md").read_text()
        # segment reads the learned score, the same as the command measured
        agent = PromptAgent.load(run, cache=EmbeddingCache(cache))
        from experiments.datasets import load_dataset

        first = load_dataset("synthetic:val")[0]
        out = agent.segment_detailed(first.load_image())
        assert out["presence"] == pytest.approx(chosen["per_image"]["positives"][0]["presence"],
                                                abs=1e-6)  # fmt: skip
    finally:
        (run / "presence.json").unlink(missing_ok=True)
