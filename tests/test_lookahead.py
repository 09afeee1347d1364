"""The lookahead agent: episodes that decode candidates with both labels and commit the judged
best, the stop rule, the judge (fit, save, load), a training run on the tiny segmenter that
resumes by stage, loading, segmenting and benchmarking it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from agents.lookahead import LookaheadAgent, LookaheadConfig
from agents.prompt_agent import PromptAgent
from recalibration.judge import JUDGE_FEATURES, JudgeError, MaskJudge, rank_quality
from recalibration.srm import SemanticRecalibrationModule, SRMConfig
from segmenter import EmbeddingCache


@pytest.fixture(scope="module")
def scene(tiny_segmenter):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    gt = np.zeros((96, 128), bool)
    gt[20:60, 30:90] = True
    img[gt] = (220, 60, 60)
    emb = tiny_segmenter.encode(img)
    srm = SemanticRecalibrationModule(SRMConfig(hidden=8), 32)
    srm.pretrain([(emb, gt, None)], epochs=2, progress=False)
    return img, gt, emb, srm


def test_an_episode_decodes_both_labels_and_commits_without_decoding(tiny_segmenter, scene):
    img, gt, emb, srm = scene
    agent = LookaheadAgent(tiny_segmenter, srm, None, LookaheadConfig(steps=3, proposals=2))
    calls = tiny_segmenter.decoder_calls
    ep = agent.episode(emb, lambda: img, gt, chooser="oracle", stop=False, record=True)
    # the start (1 call) then 3 steps of 2 cells x 2 labels, each committed without a decode
    assert ep.decoder_calls == tiny_segmenter.decoder_calls - calls == 1 + 3 * 4
    assert len(ep.states) == 3 and all(f.shape == (4, len(JUDGE_FEATURES)) for f, _, _ in ep.states)
    assert all(set(f[:, JUDGE_FEATURES.index("label")]) == {0.0, 1.0} for f, _, _ in ep.states)
    # the oracle commits the best candidate of each state
    assert [round(v, 6) for v in ep.ious[1:]] == [round(float(t.max()), 6) for _, t, _ in ep.states]
    assert ep.final_iou == pytest.approx(max(ep.ious), abs=1e-9)
    assert ep.clicks.shape == (2 + 3, 3)


def test_the_stop_rule_ends_when_nothing_is_judged_better(tiny_segmenter, scene):
    img, gt, emb, srm = scene
    agent = LookaheadAgent(tiny_segmenter, srm, None, LookaheadConfig(steps=4, proposals=2))
    ep = agent.episode(emb, lambda: img, gt, score=lambda f: np.zeros(len(f)), chooser="judge")
    assert ep.stopped == 0 and len(ep.ious) == 1  # the start was judged as good: stop at once
    calls = iter(range(100))
    ep = agent.episode(emb, lambda: img, gt, score=lambda f: np.full(len(f), next(calls) * 1.0))
    assert ep.stopped is None and len(ep.ious) == 5  # every step judged better than the last


def test_judge_fits_ranks_saves_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((400, len(JUDGE_FEATURES)))
    y = 0.7 * x[:, 0] + 0.2 * x[:, 9] + 0.05 * rng.random(400)
    judge = MaskJudge(rounds=50).fit(x, y)
    q = rank_quality(
        [judge.predict(x[i : i + 10]) for i in range(0, 400, 10)],
        [y[i : i + 10] for i in range(0, 400, 10)],
        [0.0] * 40,
    )
    assert q["spearman"] > 0.8 and q["top1_regret"] < 0.05
    path = judge.save(tmp_path / "judge.json")
    assert np.allclose(MaskJudge.load(path).predict(x), judge.predict(x))
    ranker = MaskJudge("lambdarank", rounds=20).fit(x, y, [10] * 40)
    assert ranker.predict(x[:5]).shape == (5,)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(JudgeError, match="not an alignsam judge file"):
        MaskJudge.load(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def lookahead_run(tmp_path_factory, tiny_task):
    from experiments.train import train

    task = dataclasses.replace(
        tiny_task(0),
        name="tinylook",
        agent="lookahead",
        lookahead=LookaheadConfig(steps=2, proposals=2, folds=2, episodes=1, rounds=2),
    )
    runs = tmp_path_factory.mktemp("runs")
    cache = str(tmp_path_factory.mktemp("emb"))
    return train(task, runs=runs, cache_dir=cache, progress=False), cache


def test_training_run_writes_a_loadable_agent(lookahead_run):
    summary, cache = lookahead_run
    run = __import__("pathlib").Path(summary["run_dir"])
    assert run.name.startswith("tinylook__lookahead__0__")
    best = run / "checkpoints" / "best"
    assert {p.name for p in best.iterdir()} >= {
        "srm.pt",
        "judge.json",
        "lookahead.json",
        "meta.json",
    }
    assert len(summary["judge_rounds"]) == 2 and summary["best_val_miou"] is not None
    agent = PromptAgent.load(run, cache=EmbeddingCache(cache))
    assert isinstance(agent, LookaheadAgent) and agent.judge.fitted
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    mask, clicks = agent.segment(image)
    assert mask.shape == (70, 90) and 2 <= len(clicks) <= 4


def test_training_resumes_from_its_stages(lookahead_run):
    from experiments.train import train

    summary, cache = lookahead_run
    run = __import__("pathlib").Path(summary["run_dir"])
    maps = np.load(run / "stages" / "maps.npz")["maps"]
    again = train(None, resume=run, cache_dir=cache, progress=False)
    assert np.array_equal(np.load(run / "stages" / "maps.npz")["maps"], maps)
    assert again["seconds"]["cross_fit"] < summary["seconds"]["cross_fit"]  # loaded, not refitted
    assert json.loads((run / "config.json").read_text())["agent"] == "lookahead"


def test_benchmark_runs_the_lookahead_rows(lookahead_run, tmp_path):
    from agents.config import TaskConfig
    from agents.prompt_agent import read_meta
    from experiments.benchmark import run_benchmark
    from experiments.train import resolve_task  # noqa: F401 - the shipped tasks resolve

    summary, cache = lookahead_run
    run = __import__("pathlib").Path(summary["run_dir"])
    task = TaskConfig.from_dict(read_meta(run / "checkpoints" / "best")["task"])
    task = dataclasses.replace(task, data=dataclasses.replace(task.data, test="synthetic:test"))
    result = run_benchmark(
        task,
        [run],
        split="test",
        limit=3,
        out=tmp_path / "bench",
        cache=EmbeddingCache(cache),
        manual_clicks=3,
        methods=["random", "heuristics", "lookahead_oracle", "lookahead_agreement"],
        progress=False,
    )
    names = [m["method"] for m in result["methods"]]
    assert names[0] == "agent" and "lookahead, SRM-agreement judge" in names
    oracle = next(m for m in result["methods"] if m["method"].startswith("lookahead, true-IoU"))
    assert oracle["kind"] == "oracle"
    assert "random + SRM (w/o RL)" in result["by_click"]["methods"]
