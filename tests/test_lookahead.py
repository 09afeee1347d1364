"""The lookahead agent: episodes that decode candidates with both labels and commit the judged
best, the stop rule, the judge (fit, save, load), a training run on the tiny segmenter that
resumes by stage, loading, segmenting and benchmarking it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from agents.config import ConfigError
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
    # each state: staying (row 0) and the 2 cells x 2 labels
    assert len(ep.states) == 3 and all(f.shape == (5, len(JUDGE_FEATURES)) for f, _, _ in ep.states)
    assert all(set(f[1:, JUDGE_FEATURES.index("label")]) == {0.0, 1.0} for f, _, _ in ep.states)
    assert all(f[0, JUDGE_FEATURES.index("change")] == 0.0 for f, _, _ in ep.states)
    # without the stop rule the oracle commits the best click of each state
    best = [round(float(t[1:].max()), 6) for _, t, _ in ep.states]
    assert [round(v, 6) for v in ep.ious[1:]] == best
    assert ep.final_iou == pytest.approx(ep.ious[-1]) and ep.clicks.shape == (2 + 3, 3)
    # with it, the oracle stops once no click beats the current mask
    ep = agent.episode(emb, lambda: img, gt, chooser="oracle")
    assert all(b >= a for a, b in zip(ep.ious, ep.ious[1:], strict=False))


def test_the_stop_rule_ends_when_staying_is_judged_best(tiny_segmenter, scene):
    img, gt, emb, srm = scene
    agent = LookaheadAgent(tiny_segmenter, srm, None, LookaheadConfig(steps=4, proposals=2))
    stay = lambda f: np.eye(len(f))[0]  # noqa: E731 - the current mask first
    ep = agent.episode(emb, lambda: img, gt, score=stay, chooser="judge")
    assert ep.stopped == 0 and len(ep.ious) == 1
    go = lambda f: np.arange(len(f), dtype=float)  # noqa: E731 - always the last candidate
    ep = agent.episode(emb, lambda: img, gt, score=go)
    assert ep.stopped is None and len(ep.ious) == 5


def test_the_agreement_weight_adds_the_srm_agreement_to_the_judges_score(tiny_segmenter, scene):
    img, gt, emb, srm = scene
    flat = lambda f: np.zeros(len(f))  # noqa: E731 - a judge with no opinion
    go = lambda f: np.arange(len(f), dtype=float)  # noqa: E731 - always the last candidate

    def clicks(agreement: float, score, chooser: str = "judge") -> np.ndarray:
        cfg = LookaheadConfig(steps=3, proposals=2, agreement=agreement, stop=False)
        agent = LookaheadAgent(tiny_segmenter, srm, None, cfg)
        return agent.episode(emb, lambda: img, gt, score=score, chooser=chooser).clicks

    by_agreement = clicks(0.0, None, chooser="agreement")
    # a silent judge plus the agreement: the agreement's choices
    np.testing.assert_array_equal(clicks(1.0, flat), by_agreement)
    # a judge with an opinion and a small weight: the judge's choices
    np.testing.assert_array_equal(clicks(0.01, go), clicks(0.0, go))
    assert not np.array_equal(clicks(0.0, go), by_agreement)
    with pytest.raises(ValueError, match="agreement must be >= 0"):
        LookaheadConfig(agreement=-1.0)


def test_judge_fits_ranks_saves_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    x = [rng.random((11, len(JUDGE_FEATURES))) for _ in range(60)]
    y = [0.7 * f[:, 0] + 0.2 * f[:, 9] + 0.05 * rng.random(11) for f in x]
    for objective in ("lambdarank", "regression"):
        judge = MaskJudge(objective, rounds=60).fit(x[:40], y[:40])
        q = rank_quality([judge.predict(f) for f in x[40:]], y[40:], [0.0] * 20)
        assert q["spearman"] > 0.6 and q["top1_regret"] < 0.1, (objective, q)
        path = judge.save(tmp_path / f"{objective}.json")
        assert np.allclose(MaskJudge.load(path).predict(x[0]), judge.predict(x[0]))
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
    # the presence score reads the SRM map the episode starts from
    from recalibration.presence import presence_score

    emb, _ = agent._embedding(image)
    expected = presence_score(agent.srm_map(emb, lambda: image), emb.valid_shape(emb.grid_size))
    assert agent.segment_detailed(image)["presence"] == pytest.approx(expected)


def test_training_resumes_from_its_stages(lookahead_run):
    from experiments.train import train

    summary, cache = lookahead_run
    run = __import__("pathlib").Path(summary["run_dir"])
    maps = np.load(run / "stages" / "maps.npz")["maps"]
    written = (run / "stages" / "maps.npz").stat().st_mtime_ns
    again = train(None, resume=run, cache_dir=cache, progress=False)
    assert np.array_equal(np.load(run / "stages" / "maps.npz")["maps"], maps)
    assert (run / "stages" / "maps.npz").stat().st_mtime_ns == written  # loaded, not refitted
    # the training time counts the stages the first attempt did (read back from their files)
    first = summary["seconds"]
    reused = again["stages_reused"]
    assert set(reused) == {"mask_states", "srm", "cross_fit"}
    assert reused["cross_fit"] == pytest.approx(first["cross_fit"])
    assert reused["mask_states"] + reused["srm"] == pytest.approx(first["srm"])
    assert again["seconds"]["cross_fit"] >= first["cross_fit"]
    assert again["train_seconds_total"] == pytest.approx(
        again["wall_seconds"] + sum(reused.values())
    )
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
        methods=[
            "random",
            "heuristics",
            "lookahead_oracle",
            "lookahead_agreement",
            "wo_srm",
            "single_step",
        ],
        finetuned=[_decoder_delta(task, tmp_path / "ft")],
        progress=False,
    )
    names = [m["method"] for m in result["methods"]]
    assert names[0] == "agent" and "lookahead, SRM-agreement judge" in names
    # the PPO agent's ablations: one step is defined for it, "all clicks positive" is not
    assert "agent single step" in names and not any("w/o SRM" in n for n in names)
    # a fine-tuned decoder: (c) is the lookahead agent previewing on it
    assert "fine-tuned decoder (c) agent prompting it" in names
    oracle = next(m for m in result["methods"] if m["method"].startswith("lookahead, true-IoU"))
    assert oracle["kind"] == "oracle"
    assert "random + SRM (w/o RL)" in result["by_click"]["methods"]


def _decoder_delta(task, out):
    """A one-epoch decoder delta on the task's segmenter (a few synthetic images)."""
    from segmenter import build_segmenter
    from segmenter.finetune import FinetuneConfig, FinetuneItem, Finetuner

    seg = build_segmenter(task.segmenter, backend="torch")
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        gt = np.zeros((48, 64), bool)
        gt[8 + i : 30, 10:40] = True
        items.append(FinetuneItem(f"s{i}", gt, embedding=seg.encode(img), image=img))
    Finetuner(seg, FinetuneConfig(level="decoder", epochs=1), out).fit(
        items[:2], items[2:], progress=False
    )
    return out


def test_srm_eval_reports_the_map_and_the_judge_of_a_run(lookahead_run, tmp_path):
    from agents.lookahead_training import evaluate_judge
    from envs.synthetic import synthetic_task

    summary, cache = lookahead_run
    agent = PromptAgent.load(summary["run_dir"], cache=EmbeddingCache(cache))
    samples = synthetic_task("test", 2)
    items = [
        (agent.cache.get_or_encode(agent.segmenter, s.load_image()), s.mask, s.load_image)
        for s in samples
    ]
    res = evaluate_judge(agent, items, progress=False)
    assert set(res["episodes_miou"]) == {"judge", "oracle", "agreement", "heuristic"}
    assert res["episodes_miou"]["oracle"] >= res["episodes_miou"]["heuristic"] - 1e-9
    for name in ("states_judge", "states_oracle"):
        assert -1.0 <= res[name]["spearman"] <= 1.0 and res[name]["states"] > 0


def test_answers_keep_a_click_only_when_its_score_beats_the_start_by_the_margin():
    from agents.answers import answers

    scores = [0.8, 0.7, 0.9, 0.9, 0.6]
    assert answers(None, "last", length=5) == answers(scores, "last") == [0, 1, 2, 3, 4]
    assert answers(scores, "best_predicted") == [0, 0, 2, 2, 2]  # the earliest on ties
    assert answers(scores, "valued", margin=0.05) == [0, 0, 2, 2, 2]
    assert answers(scores, "valued", margin=0.1) == [0] * 5  # +0.1 is not clearly better
    assert answers([0.5, 0.56, 0.7, 0.6], "valued", margin=0.05) == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="score"):
        answers(None, "valued")
    with pytest.raises(ValueError, match="margin"):
        answers(scores, "valued", margin=-0.1)
    with pytest.raises(ValueError, match="keep"):
        LookaheadConfig(keep="best")
    with pytest.raises(ValueError, match="max_worse"):
        LookaheadConfig(max_worse=1.5)


def test_a_veto_keeps_a_valued_click_only_when_the_decoder_does_not_call_it_worse():
    from agents.answers import answer_table, answers

    values = [0.4, 0.6, 0.7, 0.65]  # the value model: every click a clear gain
    decoder = [0.9, 0.85, 0.8, 0.88]  # the decoder: every click costs (0.05, 0.1, 0.02)
    assert answers(values, "valued", 0.1) == [0, 1, 2, 2]
    assert answers(values, "valued", 0.1, decoder=decoder, veto=0.0) == [0, 0, 0, 0]
    assert answers(values, "valued", 0.1, decoder=decoder, veto=0.05) == [0, 1, 1, 3]
    assert answers(values, "valued", 0.0, decoder=decoder, veto=0.2) == [0, 1, 2, 2]
    # the decoder's own rule is untouched by it
    assert answers(decoder, "best_predicted", decoder=decoder, veto=0.0) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="decoder's predicted IoU"):
        answers(values, "valued", veto=0.0)
    with pytest.raises(ValueError, match="veto"):
        answers(values, "valued", decoder=decoder, veto=-0.1)
    with pytest.raises(ValueError, match="veto"):
        LookaheadConfig(veto=-0.01)
    # the table scores the valued rules under the veto and records it
    ious = [[0.5, 0.6, 0.3, 0.55]]
    scores = {"valued": [values], "best_predicted": [decoder]}
    table = answer_table(ious, scores, margins=(0.0,), veto=0.0)
    valued = next(r for r in table if r["keep"] == "valued")
    assert valued["veto"] == 0.0 and valued["by_click"] == pytest.approx([0.5] * 4)
    plain = next(r for r in answer_table(ious, scores, margins=(0.0,)) if r["keep"] == "valued")
    assert plain["veto"] is None and plain["by_click"] == pytest.approx([0.5, 0.6, 0.3, 0.3])
    assert next(r for r in table if r["keep"] == "best_predicted")["veto"] is None
    with pytest.raises(ValueError, match="best_predicted"):
        answer_table(ious, {"valued": [values]}, veto=0.0)


def test_the_answer_is_chosen_under_the_bound_on_images_made_worse():
    from agents.answers import answer_table, best_answer

    # three images: the IoU of each path state, and the value model's score of each
    ious = [[0.9, 0.85, 0.8], [0.3, 0.7, 0.8], [0.6, 0.65, 0.55]]
    values = [[0.9, 0.86, 0.84], [0.4, 0.7, 0.8], [0.6, 0.58, 0.62]]
    table = answer_table(ious, {"valued": values}, margins=(0.0, 0.05))
    last = next(r for r in table if r["keep"] == "last")
    assert last["by_click"] == pytest.approx([0.6, 0.7333333, 0.7166667])
    assert last["worse_by_click"] == pytest.approx([0, 1 / 3, 2 / 3])
    strict = next(r for r in table if r["keep"] == "valued" and r["margin"] == 0.05)
    # the margin keeps the start on images 1 and 3 (image 3: +0.02 is no clear gain)
    assert strict["by_click"] == pytest.approx([0.6, 0.7333333, 0.7666667])
    assert strict["worse_by_click"] == [0.0, 0.0, 0.0]
    assert best_answer(table, "last") == ("valued", 0.05, 2)
    assert best_answer(table, "last", max_worse=0.0) == ("valued", 0.05, 2)
    only_last = [last]
    assert best_answer(only_last, "last") == ("last", 0.0, 1)
    assert best_answer(only_last, "last", max_worse=0.0) == ("last", 0.0, 0)  # the start


def test_the_answer_chosen_on_shifted_copies_of_val_keeps_every_set_at_its_start():
    from agents.answers import answer_table, best_answer

    # val: every click helps and the value model says so (margin 0 and 0.1 alike there)
    val = answer_table(
        [[0.5, 0.7], [0.6, 0.8]], {"valued": [[0.5, 0.7], [0.6, 0.8]]}, margins=(0.0, 0.1)
    )
    # a shifted copy: the value model is mildly sure of a click that hurts image 1 badly,
    # and sure of the one that helps image 2
    shifted = answer_table(
        [[0.6, 0.1], [0.4, 0.5]], {"valued": [[0.6, 0.65], [0.4, 0.6]]}, margins=(0.0, 0.1)
    )
    assert best_answer(val, "valued") == ("valued", 0.0, 1)
    # on both sets: margin 0 takes the bad click (shifted mean 0.3 < its start 0.5): out;
    # margin 0.1 keeps image 1's start and takes image 2's click
    assert best_answer({"val": val, "val@hue": shifted}, "valued") == ("valued", 0.1, 1)
    # the share of images made worse is bounded on average over the sets
    assert best_answer({"val": val, "val@hue": shifted}, "valued", max_worse=0.0) == (
        "valued", 0.1, 1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="different rules"):
        best_answer({"val": val, "val@hue": shifted[:1]}, "valued")


def test_best_predicted_ends_the_session_in_the_kept_state(lookahead_run, tmp_path, monkeypatch):
    from experiments.adapt import adapt_run
    from experiments.datasets import load_dataset

    summary, cache = lookahead_run
    agent = PromptAgent.load(summary["run_dir"], cache=EmbeddingCache(cache))
    for s in load_dataset("synthetic:val")[:6]:
        image = s.load_image()
        emb, _ = agent._embedding(image)
        last = agent.episode(emb, lambda image=image: image, keep="last")
        best = agent.episode(emb, lambda image=image: image, keep="best_predicted")
        scores = [o.prediction.score for o in best.path]
        assert best.kept == int(np.argmax(scores)) and last.kept == len(last.path) - 1
        assert best.session.outcome is best.path[best.kept] and best.final is best.path[best.kept]
        assert len(best.clicks) == 2 + best.kept  # the start points and the kept clicks
        assert best.final.prediction.score >= last.final.prediction.score
    # an adapted lookahead run answers with the best predicted state (images of its training
    # domain leave it unchanged unless told to re-estimate anyway)
    adapt_run(summary["run_dir"], ["synthetic:val"], tmp_path / "a", cache=EmbeddingCache(cache),
              progress=False, statistics="always")  # fmt: skip
    adapted = PromptAgent.load(tmp_path / "a", cache=EmbeddingCache(cache))
    assert adapted.config.keep == "best_predicted" and agent.config.keep == "last"
    assert json.loads((tmp_path / "a" / "adapted.json").read_text())["keep"] == "best_predicted"
    # a run that scores its states already (valued, margin chosen on val) keeps its rule
    import shutil

    source = tmp_path / "valued"
    shutil.copytree(summary["run_dir"], source)
    settings_file = source / "checkpoints" / "best" / "lookahead.json"
    settings = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps({**settings, "keep": "valued", "margin": 0.05}))
    adapt_run(source, ["synthetic:val"], tmp_path / "b", cache=EmbeddingCache(cache),
              progress=False)  # fmt: skip
    adapted = PromptAgent.load(tmp_path / "b", cache=EmbeddingCache(cache))
    assert (adapted.config.keep, adapted.config.margin) == ("valued", 0.05)
    assert adapted.value is not None and adapted.config.veto is None
    # with a veto: written into the adapted run and recorded, the rule kept
    adapt_run(source, ["synthetic:val"], tmp_path / "v", cache=EmbeddingCache(cache),
              progress=False, veto=0.02)  # fmt: skip
    adapted = PromptAgent.load(tmp_path / "v", cache=EmbeddingCache(cache))
    assert (adapted.config.keep, adapted.config.margin, adapted.config.veto) == (
        "valued",
        0.05,
        0.02,
    )
    assert json.loads((tmp_path / "v" / "adapted.json").read_text())["veto"] == 0.02
    # auto (the default): the veto goes on when the images' feature drift is more than
    # SHIFTED times that of the run's own labelled images, else the source's setting stays
    import experiments.adapt as adapt_module

    for shifted, veto in ((0.0, 0.0), (1e9, None)):
        monkeypatch.setattr(adapt_module, "SHIFTED", shifted)
        record = adapt_run(source, ["synthetic:val@hue"], tmp_path / f"auto{shifted:g}",
                           cache=EmbeddingCache(cache), progress=False)  # fmt: skip
        shift = record["shift"]
        assert record["veto"] == veto and shift["threshold"] == shifted
        assert (record["re_estimated"] is None) == (veto is None)  # the same drift test
        assert shift["reference_images"] > 0 and shift["ratio"] == pytest.approx(
            record["drift"] / shift["reference_drift"]
        )
        assert PromptAgent.load(tmp_path / f"auto{shifted:g}").config.veto == veto
    (source / "checkpoints" / "best" / "value.json").unlink()
    with pytest.raises(ValueError, match="--fit-value"):
        adapt_run(source, ["synthetic:val"], tmp_path / "c", keep="valued",
                  cache=EmbeddingCache(cache), progress=False)  # fmt: skip


def test_valued_answers_with_the_value_models_best_state(lookahead_run):
    from experiments.datasets import load_dataset

    summary, cache = lookahead_run
    agent = PromptAgent.load(summary["run_dir"], cache=EmbeddingCache(cache))
    assert agent.value is not None  # training fitted it beside the judge
    agent.config.margin = 0.0
    for s in load_dataset("synthetic:val")[:4]:
        image = s.load_image()
        emb, _ = agent._embedding(image)
        ep = agent.episode(emb, lambda image=image: image, keep="valued", record=True)
        assert len(ep.values) == len(ep.path) == len(ep.path_features) == len(ep.answer_at)
        # the start is scored as the judge saw it: the first step's "stay" candidate
        assert np.allclose(ep.path_features[0], ep.states[0][0][0])
        best = int(np.argmax(ep.values))
        assert ep.kept == (best if ep.values[best] > ep.values[0] else 0)
        assert ep.session.outcome is ep.path[ep.kept] and len(ep.clicks) == 2 + ep.kept
    agent.config.keep = "valued"  # segment reports the value model's score of its answer
    assert agent.segment_detailed(image)["score"] == pytest.approx(ep.values[ep.kept])
    # a margin no click can beat keeps the agent at its start; the ceiling (the oracle chooser)
    # answers with its last state whatever the agent's rule
    agent.config.margin = 10.0
    gt = np.zeros(image.shape[:2], bool)
    gt[10:40, 10:40] = True
    assert agent.episode(emb, lambda: image, gt).kept == 0
    oracle = agent.episode(emb, lambda: image, gt, chooser="oracle", stop=False)
    assert oracle.kept == len(oracle.path) - 1 == agent.config.steps
    agent.value = None
    with pytest.raises(RuntimeError, match="value"):
        agent.episode(emb, lambda: image, keep="valued")


def test_best_clicks_takes_the_fewest_clicks_among_the_best():
    from experiments.lookahead import best_clicks

    assert best_clicks([0.60, 0.71, 0.74, 0.74, 0.72]) == 2
    assert best_clicks([0.70, 0.65, 0.69]) == 0
    from agents.answers import best_answer

    rows = [
        {"keep": "last", "margin": 0.0, "by_click": [0.6, 0.7, 0.65]},
        {"keep": "best_predicted", "margin": 0.0, "by_click": [0.6, 0.68, 0.72]},
    ]
    for r in rows:
        r["worse_by_click"] = [0.0] * 3
    assert best_answer(rows, "last") == ("best_predicted", 0.0, 2)
    rows[1]["by_click"] = [0.6, 0.7, 0.7]
    assert best_answer(rows, "last") == ("last", 0.0, 1)  # ties: the task's rule
    assert best_answer(rows, "best_predicted") == ("best_predicted", 0.0, 1)
    with pytest.raises(ValueError, match="clicks must lie"):
        LookaheadConfig(steps=2, clicks=3)


def test_training_chooses_the_clicks_on_val_when_asked(tiny_task, tmp_path):
    from experiments.train import train

    task = dataclasses.replace(
        tiny_task(0),
        name="tinychoose",
        agent="lookahead",
        lookahead=LookaheadConfig(
            steps=3, proposals=2, folds=2, episodes=1, choose_clicks=True, choose_shifts=["blur"]
        ),
    )
    summary = train(task, runs=tmp_path, cache_dir=str(tmp_path / "emb"), progress=False)
    k, by_click = summary["clicks"], summary["val_by_click"]
    # chosen on val and its blurred copy: the blurred set's mean is not below its start
    ((name, blurred),) = summary["shifted_val"].items()
    assert name == f"{task.data.val}@blur" and "val_shifts" in summary["seconds"]
    assert k == 0 or blurred["miou"] >= blurred["start"] - 1e-9
    assert len(by_click) == 4 and by_click[k] == max(by_click) == summary["best_val_miou"]
    assert by_click[k] == max(max(r["by_click"]) for r in summary["val_answers"])
    best = __import__("pathlib").Path(summary["checkpoint"])
    saved = json.loads((best / "lookahead.json").read_text())
    assert saved["clicks"] == k and saved["keep"] == summary["keep"]
    assert saved["margin"] == summary["margin"] and (best / "value.json").is_file()
    assert saved["choose_shifts"] == ["blur"] and summary["choose_shifts"] == ["blur"]
    # the caller's task is left as given (a curve trains its next size from it)
    assert task.lookahead.clicks is None and task.lookahead.keep == "last"
    with pytest.raises(ConfigError, match="unknown shift"):
        train(
            dataclasses.replace(task, lookahead=LookaheadConfig(choose_shifts=("sepia",))),
            runs=tmp_path, cache_dir=str(tmp_path / "emb"), progress=False,
        )  # fmt: skip
    assert len(list(tmp_path.iterdir())) == 2  # the bad task made no run folder


def test_clicks_chosen_on_val_bound_the_agent_not_the_ceiling(lookahead_run, tmp_path):
    """A run trained before choosing: ``choose_clicks`` scores every count on val, writes the
    best into the checkpoint and the summary; the agent then takes that many clicks, while the
    oracle chooser (the ceiling rows) keeps the full ``steps``."""
    import shutil
    from pathlib import Path

    from experiments.lookahead import choose_clicks
    from experiments.train import load_split

    summary, cache = lookahead_run
    run = tmp_path / "run"
    shutil.copytree(summary["run_dir"], run)
    (run / "checkpoints" / "best" / "value.json").unlink()  # trained before the value model
    out = choose_clicks(run, cache, progress=False, max_worse=0.0, value=True)
    k, by_click = out["clicks"], out["val_by_click"]
    assert len(by_click) == 3 and by_click[k] == max(by_click) == out["best_val_miou"]
    assert out["val_worse"] == 0.0 and out["max_worse"] == 0.0 and "value" in out["seconds"]
    assert json.loads((run / "summary.json").read_text())["clicks"] == k
    assert set(out["val_by_click_keep"]) == {"last", "best_predicted", "valued"}
    agent = PromptAgent.load(run, cache=EmbeddingCache(cache))
    assert agent.value is not None and agent.config.margin == out["margin"]
    assert agent.config.clicks == k and agent.config.steps == 2
    assert agent.config.keep == out["keep"]
    # pin a count below the budget to see the two defaults apart (every click kept)
    agent.config.clicks, agent.config.keep = 1, "last"
    image = load_split(agent.task, "val")[0].load_image()
    emb, _ = agent._embedding(image)
    assert len(agent.episode(emb, lambda: image).path) == 2
    gt = np.zeros(image.shape[:2], bool)
    gt[10:40, 10:40] = True
    assert len(agent.episode(emb, lambda: image, gt, chooser="oracle", stop=False).path) == 3
    assert len(agent.segment(image)[1]) == 2 + 1
    with pytest.raises(Exception, match="summary.json"):
        choose_clicks(Path(tmp_path / "nowhere"))


def test_answer_command_writes_the_choice_into_the_run(lookahead_run, tmp_path, capsys):
    import shutil

    from experiments.cli import main

    summary, cache = lookahead_run
    run = tmp_path / "run"
    shutil.copytree(summary["run_dir"], run)
    argv = ["answer", str(run), "--max-worse", "0", "--cache", cache, "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "summary.json").read_text())
    assert f"{saved['clicks']} clicks, keep {saved['keep']}" in out and saved["val_worse"] == 0.0
    assert main(["answer", str(tmp_path / "nowhere"), "--no-progress"]) == 3
    assert "summary.json" in capsys.readouterr().err
    # chosen on val and a hue-rotated copy of it too: recorded in the run
    assert main(argv + ["--shifts", "hue"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "summary.json").read_text())
    ((name, shifted),) = saved["shifted_val"].items()
    assert name.endswith("@hue") and f"{name}: mIoU {shifted['miou']:.3f}" in out
    assert shifted["miou"] >= shifted["start"] - 1e-9 or saved["clicks"] == 0
    settings = json.loads((run / "checkpoints" / "best" / "lookahead.json").read_text())
    assert settings["choose_shifts"] == ["hue"]
    assert PromptAgent.load(run).config.choose_shifts == ("hue",)
    assert main(argv + ["--shifts", "negative"]) == 3
    assert "unknown shift" in capsys.readouterr().err
    # with a veto: the choice is made under it and the run answers with it
    assert main(argv + ["--shifts", "--veto", "0"]) == 0
    assert ", veto 0)" in capsys.readouterr().out or saved["keep"] != "valued"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["veto"] == 0.0 and saved["shifted_val"] == {}
    assert all(r["veto"] == (0.0 if r["keep"] == "valued" else None) for r in saved["val_answers"])
    assert PromptAgent.load(run).config.veto == 0.0
    assert main(argv + ["--veto", "none"]) == 0 and PromptAgent.load(run).config.veto is None
    with pytest.raises(SystemExit):
        main(argv + ["--veto", "-1"])
    assert "a number >= 0 or none" in capsys.readouterr().err


def test_cross_fitted_folds_train_on_the_copies_of_their_own_images_only(monkeypatch):
    """A shifted copy of a held-out image would leak that image into its own map."""
    from agents import lookahead_training as lt

    trained: list[list[str]] = []

    class FakeSRM:
        def __init__(self, *args, **kwargs):
            pass

        def pretrain(self, items, mask_states=None, **kwargs):
            assert mask_states is not None and len(mask_states) == len(items)
            assert all(s == [name] for (name, _, _), s in zip(items, mask_states, strict=True))
            trained.append([name for name, _, _ in items])

    monkeypatch.setattr(lt, "SemanticRecalibrationModule", FakeSRM)
    monkeypatch.setattr(lt, "srm_maps", lambda srm, items: [name for name, _, _ in items])
    items = [(f"img{i}", None, None) for i in range(6)]
    copies = [(i, (f"img{i}@{s}", None, None), [f"img{i}@{s}"]) for s in "ab" for i in range(6)]
    maps = lt.cross_fitted_maps(
        SRMConfig(), 8, items, None, [[name] for name, _, _ in items],
        folds=3, epochs=1, seed=0, progress=False, copies=copies,
    )  # fmt: skip
    assert maps == [f"img{i}" for i in range(6)]  # the originals' maps, in order
    assert len(trained) == 3
    for names in trained:
        kept = {n for n in names if "@" not in n}
        assert len(kept) == 4  # 6 images, 3 folds: 2 held out
        assert sorted(names) == sorted(kept | {f"{n}@{s}" for n in kept for s in "ab"})


def test_cross_fitting_resumes_at_the_fold_an_interruption_stopped(monkeypatch, tmp_path):
    from agents import lookahead_training as lt

    trained, stop_at = [], [2]

    class FakeSRM:
        def __init__(self, *args, **kwargs):
            pass

        def pretrain(self, items, **kwargs):
            if len(trained) == stop_at[0]:
                raise KeyboardInterrupt  # killed while training the third fold
            trained.append(sorted(int(name) for name, _, _ in items))

    monkeypatch.setattr(lt, "SemanticRecalibrationModule", FakeSRM)
    monkeypatch.setattr(
        lt, "srm_maps", lambda srm, items: [np.full((2, 2), float(n)) for n, _, _ in items]
    )
    items = [(str(i), None, None) for i in range(6)]

    def run():
        return lt.cross_fitted_maps(
            SRMConfig(), 8, items, None, None, folds=3, epochs=1, seed=0, progress=False,
            fold_dir=tmp_path / "cross_fit",
        )  # fmt: skip

    with pytest.raises(KeyboardInterrupt):
        run()
    assert len(trained) == 2 and len(list((tmp_path / "cross_fit").glob("fold*.npz"))) == 2
    stop_at[0] = -1
    maps = run()
    assert len(trained) == 3  # only the third fold trained again
    assert [float(m[0, 0]) for m in maps] == [float(i) for i in range(6)]
    assert lt.saved_fold_seconds(tmp_path / "cross_fit") > 0.0  # the folds timed themselves
    assert lt.saved_fold_seconds(tmp_path / "none") == 0.0
    held = [sorted(set(range(6)) - set(t)) for t in trained]
    assert sorted(sum(held, [])) == list(range(6))  # every image held out exactly once


def test_the_srm_trains_on_shifted_copies_of_the_training_images(tiny_task, tmp_path, monkeypatch):
    import experiments.lookahead as lookahead_training
    from experiments.datasets import load_dataset
    from experiments.train import train

    n = len(load_dataset(tiny_task(0).data.train))
    real, calls = lookahead_training.simulate_mask_states, []

    def first_copy_without_background(segmenter, emb, gt, rng, **kw):
        calls.append(emb)  # a copy that is all target (a crop inside a large polyp) gets none
        return [] if len(calls) == n + 1 else real(segmenter, emb, gt, rng, **kw)

    monkeypatch.setattr(lookahead_training, "simulate_mask_states", first_copy_without_background)

    task = dataclasses.replace(
        tiny_task(0),
        name="tinycopies",
        agent="lookahead",
        lookahead=LookaheadConfig(steps=2, proposals=2, folds=2, episodes=1),
    )
    task = dataclasses.replace(task, data=dataclasses.replace(task.data, shifted_copies=["blur"]))
    summary = train(task, runs=tmp_path, cache_dir=str(tmp_path / "emb"), progress=False)
    run = __import__("pathlib").Path(summary["run_dir"])
    with np.load(run / "stages" / "mask_states.npz") as z:
        assert len(z.files) == 2 * n  # the SRM's training set: the images and their copies
        assert z[f"item{n}"].shape[0] == 0 and z[f"item{n + 1}"].shape[0] > 0
    with np.load(run / "stages" / "maps.npz") as z:
        assert len(z["maps"]) == n  # the judge's: the images only
    assert json.loads((run / "config.json").read_text())["data"]["shifted_copies"] == ["blur"]
    bad = dataclasses.replace(task, data=dataclasses.replace(task.data, shifted_copies=["x"]))
    with pytest.raises(ConfigError, match="data.shifted_copies: unknown shift"):
        train(bad, runs=tmp_path, cache_dir=str(tmp_path / "emb"), progress=False)
