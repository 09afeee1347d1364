"""The prompting environment on the tiny segmenter: API conformance, determinism, rewards."""

from __future__ import annotations

import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import envs
from envs import ENV_ID, EnvConfig, PointPromptEnv, make_env
from envs.synthetic import ArraySample
from recalibration.labelers import AlwaysPositiveLabeler, OracleLabeler
from segmenter import EmbeddingCache
from segmenter.registry import build_tiny_sam


def make_samples(n: int = 3, seed: int = 0) -> list[ArraySample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(90, 140)), int(rng.integers(100, 170))
        img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        y0, x0 = int(rng.integers(5, h // 2)), int(rng.integers(5, w // 2))
        mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = True
        img[mask] = (220, 60, 60)
        out.append(ArraySample(f"s{i}", img, mask))
    return out


@pytest.fixture()
def env(tiny_segmenter):
    return PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), EnvConfig(max_steps=5))


def test_registered_and_time_limited(tiny_segmenter):
    assert ENV_ID in gym.registry
    e = make_env(make_samples(), tiny_segmenter, config=EnvConfig(max_steps=4))
    e.reset(seed=0)
    done = [e.step(a)[3] for a in range(4)]
    assert done == [False, False, False, True]
    assert e.spec.max_episode_steps == 4


def test_gymnasium_check_env(env):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env, skip_render_check=True)
    assert not [
        w for w in caught if "alignsam" in str(w.filename) or "gymnasium" in str(w.filename)
    ]


def test_sb3_check_env(env):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env, warn=True)
    messages = [str(w.message) for w in caught if "stable_baselines3" in str(w.filename)]
    # Expected: SB3 guesses that 3-D float Boxes are images meant for its CNN; the project's
    # own features extractor consumes them (agents/), exactly what the warning recommends.
    expected = re.compile(
        r"observation (space )?(state|image|mask|fg|clicks) is an image but"
        r"|minimal resolution for an image is 36x36 for the default `CnnPolicy`"
        r"|Treating image space as channels-last"
    )
    unexpected = [m for m in messages if not expected.search(m)]
    assert not unexpected, unexpected
    assert messages, "SB3's checker ran no image check: did the observation space change?"


def test_observation_shapes_and_bounds(env):
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    assert obs["state"].shape == (32, 10, 10) and obs["clicks"].sum() == 0
    assert info["iou"] >= 0 and len(info["prompts"]) == 2  # gt start: one +, one -
    assert [p[2] for p in info["prompts"]] == [1, 0]


def test_determinism_same_seed_same_actions(tiny_segmenter):
    def rollout():
        e = PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), EnvConfig(max_steps=5))
        obs, _ = e.reset(seed=123)
        trace = [obs]
        rewards = []
        for a in (3, 44, 99, 0, 57):
            obs, r, *_ = e.step(a)
            trace.append(obs)
            rewards.append(r)
        return trace, rewards

    (t1, r1), (t2, r2) = rollout(), rollout()
    assert r1 == r2
    for a, b in zip(t1, t2, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_one_decoder_call_per_step(env, tiny_segmenter):
    env.reset(seed=0)
    before = tiny_segmenter.decoder_calls
    for a in range(5):
        env.step(a)
    assert tiny_segmenter.decoder_calls - before == 5


def test_iou_gain_rewards_sum_to_final_minus_start(env):
    _, info0 = env.reset(seed=2)
    total = 0.0
    for a in (11, 22, 33, 44, 55):
        _, r, _, _, info = env.step(a)
        total += r
    assert total == pytest.approx(info["iou"] - info0["iou"], abs=1e-9)
    assert "is_success" in info


def test_hit_reward_and_oracle_labels_agree(tiny_segmenter):
    samples = make_samples()
    e = PointPromptEnv(
        samples, tiny_segmenter, OracleLabeler(), EnvConfig(reward="hit", max_steps=3)
    )
    e.reset(seed=0, options={"index": 0})
    for a in (0, 45, 99):
        _, r, _, _, info = e.step(a)
        assert r == (1.0 if info["click"][2] == 1 else -1.0)


def test_always_positive_labeler(tiny_segmenter):
    e = PointPromptEnv(
        make_samples(), tiny_segmenter, AlwaysPositiveLabeler(), EnvConfig(start="none")
    )
    _, info = e.reset(seed=0)
    assert info["prompts"] == []
    for a in (0, 1, 2):
        _, _, _, _, info = e.step(a)
    assert [p[2] for p in info["prompts"]] == [1, 1, 1]


def test_action_masks_and_out_of_range(env):
    env.reset(seed=0)
    env.step(7)
    masks = env.action_masks()
    assert masks.shape == (100,) and not masks[7] and masks.sum() == 99
    with pytest.raises(ValueError, match="out of range"):
        env.step(100)
    with pytest.raises(ValueError, match="out of range"):
        env.step(-1)


def test_empty_and_full_masks_rejected_at_construction(tiny_segmenter):
    s = make_samples(1)[0]
    empty = ArraySample("empty", s.image, np.zeros_like(s.mask))
    with pytest.raises(ValueError, match="'empty'.*empty"):
        PointPromptEnv([s, empty], tiny_segmenter)
    full = ArraySample("full", s.image, np.ones_like(s.mask))
    with pytest.raises(ValueError, match="all foreground"):
        PointPromptEnv([full], tiny_segmenter)


def test_labeler_start_needs_a_map(tiny_segmenter):
    e = PointPromptEnv(
        make_samples(), tiny_segmenter, AlwaysPositiveLabeler(), EnvConfig(start="labeler")
    )
    with pytest.raises(RuntimeError, match="foreground map"):
        e.reset(seed=0)
    oracle = PointPromptEnv(
        make_samples(), tiny_segmenter, OracleLabeler(), EnvConfig(start="labeler")
    )
    _, info = oracle.reset(seed=0)
    assert [p[2] for p in info["prompts"]] == [1, 0]


def test_render_overlay(tiny_segmenter):
    e = PointPromptEnv(make_samples(), tiny_segmenter, render_mode="rgb_array")
    e.reset(seed=0, options={"index": 1})
    e.step(12)
    frame = e.render()
    assert frame.shape == (*make_samples()[1].mask.shape, 3) and frame.dtype == np.uint8


def _make(i: int):
    seg = build_tiny_sam()
    return PointPromptEnv(make_samples(), seg, OracleLabeler(), EnvConfig(max_steps=3))


@pytest.mark.parametrize("vec_cls", [DummyVecEnv, SubprocVecEnv])
def test_vectorized(vec_cls, tmp_path, monkeypatch):
    import functools

    kwargs = {"start_method": "spawn"} if vec_cls is SubprocVecEnv else {}
    venv = vec_cls([functools.partial(_make, i) for i in range(2)], **kwargs)
    try:
        venv.seed(0)
        obs = venv.reset()
        assert obs["state"].shape == (2, 32, 10, 10)
        for _ in range(4):
            obs, rew, done, infos = venv.step(np.array([5, 6]))
        assert done.any() or len(infos) == 2
        masks = venv.env_method("action_masks")
        assert len(masks) == 2
    finally:
        venv.close()


def test_shared_cache_between_envs(tiny_segmenter, tmp_path):
    cache = EmbeddingCache(tmp_path)
    samples = make_samples(2)
    for _ in range(2):
        e = PointPromptEnv(samples, tiny_segmenter, cache=cache)
        for i in range(2):
            e.reset(seed=0, options={"index": i})
    assert cache.misses == 2 and cache.hits == 2


def test_import_registers_once():
    import importlib

    importlib.reload(envs)
    assert ENV_ID in gym.registry


def test_pass_action_makes_no_click_and_no_decode(tiny_segmenter):
    from agents.clickers import EnvClicker

    g = 4
    cfg = EnvConfig(grid=g, max_steps=g * g + 2, allow_pass=True)
    e = PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), cfg)
    assert e.action_space.n == g * g + 1 and e.is_pass(g * g) and not e.is_pass(0)
    obs, info0 = e.reset(seed=0)
    calls = tiny_segmenter.decoder_calls
    obs1, r, _, _, info = e.step(g * g)
    assert tiny_segmenter.decoder_calls == calls and r == 0.0 and info["click"] is None
    assert info["iou"] == info0["iou"] and info["prompts"] == info0["prompts"]
    assert obs1["step"][0] > obs["step"][0]
    np.testing.assert_array_equal(obs1["clicks"], obs["clicks"])
    for a in range(g * g):
        e.step(a)
    masks = e.action_masks()
    assert masks.shape == (g * g + 1,) and masks.all()  # all visited: cells open again, pass too
    # Fixed policies never pass; a policy function may, and a pass costs no decoder call.
    tr = EnvClicker(e, "random", seed=0).run(0, steps=5)
    assert tr.n_clicks == 2 + 5 and tr.decoder_calls == 6
    passer = EnvClicker(e, lambda env, obs, allowed: g * g, seed=0).run(1, steps=5)
    assert passer.n_clicks == 2 and passer.decoder_calls == 1
    assert len(set(passer.ious)) == 1
    plain = PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), EnvConfig(grid=g))
    plain.reset(seed=0)
    with pytest.raises(ValueError, match="out of range"):
        plain.step(g * g)


class _HalfSureLabeler(OracleLabeler):
    """Ground-truth labels, but a foreground map that is unsure (0.5) on the left half."""

    def foreground_map(self, state):
        fg = super().foreground_map(state).copy()
        fg[:, : fg.shape[1] // 2] = 0.5
        return fg


def test_abstaining_on_unsure_cells(tiny_segmenter):
    from agents.clickers import EnvClicker

    g = 4
    cfg = EnvConfig(grid=g, max_steps=6, abstain_margin=0.2, start="gt")
    e = PointPromptEnv(make_samples(), tiny_segmenter, _HalfSureLabeler(), cfg)
    obs, info0 = e.reset(seed=0)
    calls = tiny_segmenter.decoder_calls
    obs1, r, _, _, info = e.step(0)  # left column: the map says 0.5, the labeler abstains
    assert info["abstained"] and info["click"] is None and r == 0.0
    assert tiny_segmenter.decoder_calls == calls and info["prompts"] == info0["prompts"]
    assert not e.action_masks()[0]  # the cell counts as visited
    obs2, _, _, _, info = e.step(g - 1)  # right column: sure, a real click and one decode
    assert not info["abstained"] and info["click"] is not None
    assert tiny_segmenter.decoder_calls == calls + 1
    # Clickers count only real clicks and decoder calls.
    tr = EnvClicker(e, lambda env, obs, allowed: int(np.flatnonzero(allowed)[0]), seed=0).run(0)
    left = [a for a in tr.info["actions"] if a % g < g // 2]
    assert tr.n_clicks == 2 + 6 - len(left) and tr.decoder_calls == 1 + 6 - len(left)
    with pytest.raises(ValueError, match="abstain_margin"):
        EnvConfig(abstain_margin=0.5)


def test_final_step_skips_only_the_unread_labeler_map(tiny_segmenter):
    """``final_step`` is ``step`` without the labeler's map for an observation nobody reads:
    the same decoder call, reward and info, one labeler call fewer; the map is computed when
    the episode goes on after all."""

    class Counting(OracleLabeler):
        calls = 0

        def foreground_map(self, state):
            Counting.calls += 1
            return super().foreground_map(state)

    cfg = EnvConfig(max_steps=3, grid=5, start="labeler")
    runs = []
    for final in (False, True):
        Counting.calls = 0
        env = PointPromptEnv(make_samples(), tiny_segmenter, Counting(), cfg)
        env.reset(seed=0, options={"index": 0})
        env.step(7)
        if final:
            reward, info = env.final_step(12)
        else:
            _, reward, _, _, info = env.step(12)
        runs.append((reward, info, Counting.calls, env.current_mask()))
    (r0, i0, c0, m0), (r1, i1, c1, m1) = runs
    assert r0 == r1 and i0 == i1 and np.array_equal(m0, m1)
    assert c1 == c0 - 1
    obs, *_ = env.step(3)  # the episode goes on: the map is brought up to date first
    assert Counting.calls == c0 + 1
    fg, _ = env.foreground_map()
    assert np.array_equal(fg, env.labeler.foreground_map(env.episode_state))
    assert obs["fg"].shape == (1, 5, 5)


def test_a_registered_reward_reaches_the_env_and_its_preview(tiny_segmenter, monkeypatch):
    """Adding a reward is one entry in envs.rewards: the env's steps and previews use it."""
    from envs import rewards

    monkeypatch.setitem(rewards.REWARDS, "iou_squared", lambda step: step.iou**2)
    e = PointPromptEnv(
        make_samples(), tiny_segmenter, OracleLabeler(), EnvConfig(reward="iou_squared")
    )
    e.reset(seed=0, options={"index": 1})
    (preview,) = e.preview([37])
    _, r, _, _, info = e.step(37)
    assert r == pytest.approx(info["iou"] ** 2) and preview.reward == pytest.approx(r)
    with pytest.raises(ValueError, match="iou_gain, iou, hit"):
        EnvConfig(reward="nope")


def test_preview_equals_the_step_and_leaves_the_episode(env, tiny_segmenter):
    """env.preview gives each action's click, IoU and reward as step would, for one decoder
    call per clicking action, and changes nothing."""
    env.reset(seed=3, options={"index": 0})
    env.step(12)
    before = (env.iou, env.session.points.copy(), env.steps_taken)
    calls = tiny_segmenter.decoder_calls
    previews = env.preview([0, 44, 99])
    assert tiny_segmenter.decoder_calls - calls == 3
    assert (env.iou, env.steps_taken) == (before[0], before[2])
    assert np.array_equal(env.session.points, before[1])
    for p in previews:
        env.reset(seed=3, options={"index": 0})
        env.step(12)
        _, r, _, _, info = env.step(p.action)
        assert info["click"] == p.click and r == pytest.approx(p.reward)
        assert info["iou"] == pytest.approx(p.iou)
        assert np.array_equal(
            env.current_mask(), env.segmenter.upscale(env.session.embedding, p.outcome.logits)
        )
