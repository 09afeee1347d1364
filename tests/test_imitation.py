"""The imitation stage: decoded candidate outcomes, the listwise fit, resumable collection, and
``alignsam train`` with imitation rounds before PPO (tiny segmenter)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from agents.config import ConfigError, TaskConfig
from agents.imitation import (
    ImitationConfig,
    TeacherData,
    candidate_ious,
    collect_round,
    fit_policy,
    listwise_loss,
    policy_logits,
    teacher_or_random,
)
from agents.prompt_agent import PromptAgent, latest_checkpoint, read_meta
from envs import PointPromptEnv
from experiments.datasets import load_dataset
from experiments.train import train


def _env(agent: PromptAgent, n: int = 3) -> PointPromptEnv:
    samples = list(load_dataset("synthetic:val"))[:n]
    return PointPromptEnv(samples, agent.segmenter, agent.srm, agent.eval_config(), cache=None)


def test_candidate_ious_are_the_ious_of_real_steps(first_run):
    """Each candidate's IoU equals the IoU a real step on that cell reaches from the same
    state (after a first click, so the prompt set and the mask input matter), and computing
    them leaves the episode where it was."""
    agent = PromptAgent.load(first_run[0]["run_dir"])
    env = _env(agent)
    env.reset(options={"index": 1})
    env.step(55)
    before = (env.iou, env.session.points.copy())
    cells = [0, 12, 44, 87, 99]
    got = candidate_ious(env, cells)
    assert env.iou == before[0] and np.array_equal(env.session.points, before[1])
    for cell, iou in zip(cells, got, strict=True):
        env.reset(options={"index": 1})
        env.step(55)
        env.step(cell)
        assert iou == pytest.approx(env.iou, abs=1e-6)
    assert len(set(np.round(got, 6))) > 1  # the cells differ, so the check has teeth


def test_listwise_loss_ranks_the_best_candidate_first_and_ignores_pads():
    logits = torch.zeros(2, 6, requires_grad=True)
    cells = torch.tensor([[1, 3, 4, -1], [0, 5, -1, -1]])
    ious = torch.tensor([[0.2, 0.5, 0.1, np.nan], [0.7, 0.3, np.nan, np.nan]])
    optim = torch.optim.SGD([logits], lr=1.0)
    for _ in range(50):
        loss = listwise_loss(logits, cells, ious, temperature=0.05)
        assert torch.isfinite(loss)
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert logits[0, [1, 3, 4]].argmax().item() == 1  # cell 3 holds the best IoU
    assert logits[1, [0, 5]].argmax().item() == 0
    assert logits.grad[0, [0, 2, 5]].abs().max() == 0  # never candidates: untouched


def test_fit_policy_learns_a_rule_it_can_see(first_run):
    """Outcomes that follow an observable rule (IoU = the foreground map at the clicked cell)
    are learnt: the fitted policy picks the best of 8 unseen candidates far more often than
    chance (1/8)."""
    summary, _ = first_run
    agent = PromptAgent.load(summary["run_dir"])
    policy = agent.model.policy
    space = agent.model.observation_space
    rng = np.random.default_rng(0)

    def fake(n: int) -> TeacherData:
        obs = {k: rng.random((n, *s.shape), dtype=np.float32) for k, s in space.spaces.items()}
        cells = np.stack([rng.choice(100, 8, replace=False) for _ in range(n)])
        ious = np.take_along_axis(obs["fg"].reshape(n, -1), cells, 1).astype(np.float32)
        image = np.arange(n) % 10  # ten "images"
        return TeacherData(obs, cells, ious, np.zeros(n, np.float32), image, episodes=1)

    cfg = ImitationConfig(rounds=1, epochs=25, learning_rate=3e-3, batch_size=32, temperature=0.05)
    figures = fit_policy(policy, fake(512), cfg, progress=False)
    assert np.isfinite(figures["loss"]) and figures["epoch"] == 24  # no holdout: every epoch
    test = fake(256)
    logits = policy_logits(policy, test.obs)
    choice = logits.gather(1, torch.as_tensor(test.cells)).argmax(1).numpy()
    top1 = float(np.mean(choice == test.ious.argmax(1)))
    assert top1 > 0.3, top1  # chance: 0.125

    # With held-out images the fit keeps its best epoch by their regret and stops early once
    # nothing improves for `patience` epochs.
    early = dataclasses.replace(cfg, epochs=40, holdout=0.3, patience=2, learning_rate=3e-2)
    kept = fit_policy(policy, fake(128), early, progress=False)
    assert {"holdout_regret", "holdout_top1"} <= set(kept) and kept["epoch"] < 39


def test_collection_resumes_to_the_same_states(first_run, tmp_path):
    """A round stopped after its first saves and resumed from the file collects exactly what
    an uninterrupted round does; the saved file round-trips."""
    agent = PromptAgent.load(first_run[0]["run_dir"])
    cfg = ImitationConfig(rounds=1, episodes=4, candidates=5, save_every=2)
    whole = collect_round(_env(agent), teacher_or_random(0.5), cfg, seed=3, progress=False)
    assert len(whole) == 4 * agent.task.env.max_steps and whole.episodes == 4
    assert np.isfinite(whole.ious).all() and (whole.cells >= 0).all()

    path = tmp_path / "round0.npz"
    first = collect_round(
        _env(agent),
        teacher_or_random(0.5),
        dataclasses.replace(cfg, episodes=2),
        seed=3,
        save=lambda d: d.save(path),
        progress=False,
    )
    assert TeacherData.load(path).episodes == 2 == first.episodes
    resumed = collect_round(
        _env(agent),
        teacher_or_random(0.5),
        cfg,
        seed=3,
        resume=TeacherData.load(path),
        progress=False,
    )
    assert resumed.episodes == 4
    np.testing.assert_array_equal(resumed.cells, whole.cells)
    np.testing.assert_allclose(resumed.ious, whole.ious)
    for key in whole.obs:
        np.testing.assert_array_equal(resumed.obs[key], whole.obs[key])

    path.write_bytes(b"not an npz")
    with pytest.raises(RuntimeError, match="delete the file"):
        TeacherData.load(path)


def test_train_with_imitation_rounds_resumes_by_round(tiny_task, tmp_path):
    """``imitation.rounds`` runs before PPO: each round is scored on val and checkpointed, and a
    run stopped after round 0 continues with round 1 (round 0's states are read back, not
    decoded again), then PPO."""
    cache = str(tmp_path / "emb")
    task = tiny_task(0)
    task.imitation = ImitationConfig(rounds=1, episodes=3, candidates=4, epochs=2)
    first = train(task, runs=tmp_path / "runs", cache_dir=cache, progress=False)
    run = tmp_path / "runs" / first["run_dir"].rsplit("/", 1)[-1]
    assert [r["round"] for r in first["imitation"]["rounds"]] == [0]
    assert (run / "imitation" / "round0.npz").is_file()
    meta = read_meta(latest_checkpoint(run))
    assert meta["imitation_rounds"] == 1 and meta["step"] == 0
    assert [h.get("stage") for h in meta["history"]] == ["imitation round 0"]
    assert (run / "checkpoints" / "best" / "agent.zip").is_file()

    meta_path = latest_checkpoint(run) / "meta.json"
    meta["task"]["imitation"]["rounds"] = 2
    meta["task"]["total_timesteps"] = 32
    meta_path.write_text(__import__("json").dumps(meta))
    resumed = train(None, resume=run, cache_dir=cache, progress=False)
    assert [r["round"] for r in resumed["imitation"]["rounds"]] == [1]
    # Round 1 decoded its own 3 episodes only: per episode the SRM start, and T states of 4
    # candidates and the step taken.
    t = task.env.max_steps
    assert resumed["imitation"]["rounds"][0]["collect_decoder_calls"] == 3 * (1 + t * (4 + 1))
    assert resumed["steps"] == 32
    stages = [h.get("stage") for h in resumed["history"]]
    assert stages[:2] == ["imitation round 0", "imitation round 1"] and stages[-1] is None


def test_imitation_settings_are_checked(tiny_task):
    with pytest.raises(ConfigError, match="imitation"):
        TaskConfig.from_dict({**tiny_task().to_dict(), "imitation": {"rounds": 1, "epochs": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        TaskConfig.from_dict({**tiny_task().to_dict(), "imitation": {"round": 1}})
