"""The per-cell actor-critic policy: shapes, action masks, pass logit, and its inductive bias."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.utils import obs_as_tensor

from agents.features import (
    CellActionHead,
    CellFeaturesExtractor,
    GridFeaturesExtractor,
    MaskableCellPolicy,
    cell_policy_class,
)
from envs import EnvConfig, PointPromptEnv
from recalibration.labelers import OracleLabeler
from tests.test_env import make_samples


def _policy(env: PointPromptEnv, maskable: bool = True, channels: int = 8):
    cls = cell_policy_class(maskable)
    kwargs = {"features_extractor_kwargs": {"channels": channels}}
    return cls(env.observation_space, env.action_space, lambda _: 1e-3, **kwargs)


@pytest.mark.parametrize("allow_pass", [False, True])
def test_logits_cover_every_action_and_respect_masks(tiny_segmenter, allow_pass):
    cfg = EnvConfig(max_steps=3, grid=6, allow_pass=allow_pass)
    env = PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), cfg)
    obs, _ = env.reset(seed=0)
    policy = _policy(env)
    assert isinstance(policy, MaskableCellPolicy)
    batch = obs_as_tensor({k: v[None] for k, v in obs.items()}, policy.device)
    masks = env.action_masks()
    masks[:5] = False
    dist = policy.get_distribution(batch, action_masks=masks[None])
    probs = dist.distribution.probs[0].detach().numpy()
    assert probs.shape == (cfg.n_actions,)
    assert np.all(probs[:5] == 0) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert policy.predict_values(batch).shape == (1, 1)
    actions = [int(policy.predict(obs, action_masks=masks)[0]) for _ in range(20)]
    assert min(actions) >= 5


def test_unmasked_policy_for_plain_ppo(tiny_segmenter):
    env = PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), EnvConfig(grid=5))
    obs, _ = env.reset(seed=0)
    policy = _policy(env, maskable=False)
    action, _ = policy.predict(obs)
    assert 0 <= int(action) < 25


@pytest.mark.parametrize("design", ["cell", "dense"])
def test_cell_scores_generalise_across_cells(design):
    """The rule "foreground here and not yet covered", learnt from examples whose answer is
    always in the left half of the grid: the cell policy's shared per-cell weights apply it in
    the right half too; the dense design (a linear layer per action) cannot, and in the same
    budget does not even fit the left half. This is why ``cell`` is the default."""
    torch.manual_seed(0)
    g, k = 8, 4
    space = {
        "state": (k, g, g),
        "image": (k, g, g),
        "mask": (1, g, g),
        "fg": (1, g, g),
        "clicks": (2, g, g),
        "step": (1,),
    }
    obs_space = gym.spaces.Dict(
        {n: gym.spaces.Box(-10, 10, s, np.float32) for n, s in space.items()}
    )
    if design == "cell":
        fx: torch.nn.Module = CellFeaturesExtractor(obs_space, channels=16)
        head: torch.nn.Module = CellActionHead(16, (g, g), g * g)
    else:
        fx = GridFeaturesExtractor(obs_space, features_dim=256, channels=16)
        head = torch.nn.Linear(256, g * g)
    opt = torch.optim.Adam([*fx.parameters(), *head.parameters()], lr=3e-3)

    def batch(n: int, cells: np.ndarray, rng: np.random.Generator):
        """The answer: the one cell with high foreground probability and no mask yet; decoys
        have high foreground probability but are covered already."""
        obs = {name: torch.zeros((n, *shape)) for name, shape in space.items()}
        fg = rng.uniform(0.0, 0.4, (n, g * g))
        mask = (rng.uniform(size=(n, g * g)) > 0.5).astype(np.float32)
        decoys = rng.integers(0, g * g, (n, 3))
        target = rng.choice(cells, n)
        rows = np.arange(n)[:, None]
        fg[rows, decoys], mask[rows, decoys] = 0.95, 1.0
        fg[np.arange(n), target], mask[np.arange(n), target] = 0.95, 0.0
        obs["fg"] = torch.as_tensor(fg, dtype=torch.float32).reshape(n, 1, g, g)
        obs["mask"] = torch.as_tensor(mask).reshape(n, 1, g, g)
        return obs, torch.as_tensor(target)

    def accuracy(cells: np.ndarray) -> float:
        with torch.no_grad():
            obs, target = batch(256, cells, rng)
            return (head(fx(obs)).argmax(1) == target).float().mean().item()

    rng = np.random.default_rng(0)
    left = np.array([r * g + c for r in range(g) for c in range(g // 2)])
    right = np.array([r * g + c for r in range(g) for c in range(g // 2, g)])
    for _ in range(150):
        obs, target = batch(64, left, rng)
        loss = torch.nn.functional.cross_entropy(head(fx(obs)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seen, unseen = accuracy(left), accuracy(right)
    if design == "cell":  # chance among the four high-probability cells is 0.25
        assert seen > 0.9 and unseen > 0.5, (seen, unseen)
    else:
        assert seen < 0.6 and unseen < 0.1, (seen, unseen)


def _random_obs(space: gym.spaces.Dict, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` observations with every map uniform in [0, 1] (soft SRM maps and mask coverage)."""
    return {k: rng.random((n, *s.shape)).astype(np.float32) for k, s in space.spaces.items()}


def test_prior_policy_starts_as_the_srm_confident_heuristic(tiny_segmenter):
    """With ``prior="srm_confident"`` the untrained policy's logits are exactly 50 x the
    heuristic's score, so its deterministic choice is the benchmark's SRM-confident click (the
    same cell, ties included); training changes the learned part and the prior's scale."""
    from agents.clickers import EnvClicker

    env = PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), EnvConfig(grid=6))
    clicker = EnvClicker(env, "srm_confident")
    cls = cell_policy_class(True)
    kwargs = {"features_extractor_kwargs": {"channels": 8, "prior": "srm_confident"}}
    policy = cls(env.observation_space, env.action_space, lambda _: 1e-2, **kwargs)
    rng = np.random.default_rng(0)
    obs = _random_obs(env.observation_space, rng, 16)
    obs["mask"][:8] = rng.integers(0, 2, obs["mask"][:8].shape)  # ties: some cells equal
    allowed = rng.random((16, 36)) > 0.3
    with torch.no_grad():
        batch = obs_as_tensor(obs, policy.device)
        logits = policy.get_distribution(batch).distribution.logits
    score = np.abs(obs["fg"] - 0.5) * np.abs(obs["fg"] - obs["mask"])
    assert torch.allclose(
        logits, torch.log_softmax(torch.as_tensor(50.0 * score.reshape(16, -1)), 1), atol=1e-4
    )
    for i in range(16):
        one = {k: v[i] for k, v in obs.items()}
        action, _ = policy.predict(one, deterministic=True, action_masks=allowed[i])
        assert int(action) == clicker.choose(one, allowed[i], rng)
    # One gradient step on a cross-entropy moves both the learned part and the scale.
    before = policy.action_net.prior_scale.item()
    loss = -policy.get_distribution(batch).distribution.logits[:, 0].mean()
    policy.optimizer.zero_grad()
    loss.backward()
    policy.optimizer.step()
    assert policy.action_net.prior_scale.item() != before
    assert policy.action_net.score[-1].weight.abs().sum() > 0


def test_policy_inputs_leave_out_the_segmenter_features(tiny_segmenter):
    """``keys`` without ``state`` / ``image``: the per-cell features do not move when the
    segmenter's features do, and do move when the SRM map does; unknown keys are refused."""
    env = PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), EnvConfig(grid=6))
    cls = cell_policy_class(True)
    kwargs = {"features_extractor_kwargs": {"channels": 8, "keys": ["mask", "fg", "clicks"]}}
    policy = cls(env.observation_space, env.action_space, lambda _: 1e-3, **kwargs)
    rng = np.random.default_rng(1)
    obs = _random_obs(env.observation_space, rng, 4)

    def logits(o: dict[str, np.ndarray]) -> torch.Tensor:  # the per-cell features, in fact
        with torch.no_grad():
            return policy.features_extractor(obs_as_tensor(o, policy.device))

    base = logits(obs)
    other = {**obs, "state": rng.random(obs["state"].shape).astype(np.float32)}
    other["image"] = rng.random(obs["image"].shape).astype(np.float32)
    assert torch.equal(logits(other), base)
    assert not torch.allclose(logits({**obs, "fg": 1.0 - obs["fg"]}), base)
    with pytest.raises(ValueError, match="subset"):
        CellFeaturesExtractor(env.observation_space, keys=["mask", "depth"])
    with pytest.raises(ValueError, match="prior"):
        CellFeaturesExtractor(env.observation_space, prior="centre")


def test_ppo_config_checks_inputs_and_prior():
    from agents.config import PPOConfig

    assert PPOConfig(inputs=["fg", "mask"]).inputs == ("fg", "mask")
    with pytest.raises(ValueError, match="ppo.inputs"):
        PPOConfig(inputs=["fg", "edges"])
    with pytest.raises(ValueError, match="ppo.prior"):
        PPOConfig(prior="random")
    with pytest.raises(ValueError, match="cell policy only"):
        PPOConfig(policy="dense", prior="srm_confident")


@pytest.mark.parametrize("design", ["cell_masked", "cell_plain", "grid"])
def test_onnx_policy_acts_as_sb3(tiny_segmenter, isolated_home, design):
    """The ONNX Runtime policy's logits and deterministic actions equal SB3's, for every
    policy design a run can have. (An untrained head's logits are all within ~1e-5 of each
    other, where any two float implementations may break near-ties differently; the test
    spreads them as training does.)"""
    from stable_baselines3.common.policies import MultiInputActorCriticPolicy

    from agents.fast_policy import OnnxPolicy

    torch.manual_seed(0)

    cfg = EnvConfig(max_steps=4, grid=6, allow_pass=design == "cell_masked")
    env = PointPromptEnv(make_samples(), tiny_segmenter, OracleLabeler(), cfg)
    if design == "grid":
        kwargs = {
            "features_extractor_class": GridFeaturesExtractor,
            "features_extractor_kwargs": {"features_dim": 32, "channels": 8},
            "net_arch": {"pi": [], "vf": [16]},
        }
        policy = MultiInputActorCriticPolicy(
            env.observation_space, env.action_space, lambda _: 1e-3, **kwargs
        )
    else:
        policy = _policy(env, maskable=design == "cell_masked")
    with torch.no_grad():
        for p in policy.action_net.parameters():
            p.normal_(0.0, 0.5)
    fast = OnnxPolicy(policy)
    obs, _ = env.reset(seed=0)
    for _ in range(cfg.max_steps):
        logits = fast.logits(obs)
        assert fast.check(logits, obs) is None
        batch = obs_as_tensor({k: v[None] for k, v in obs.items()}, policy.device)
        with torch.no_grad():
            ref = policy.get_distribution(batch).distribution.logits[0].numpy()
        np.testing.assert_allclose(torch.log_softmax(torch.from_numpy(logits), 0), ref, atol=1e-5)
        kwargs = {"action_masks": env.action_masks()} if design == "cell_masked" else {}
        action = int(policy.predict(obs, deterministic=True, **kwargs)[0])
        allowed = env.action_masks() if design == "cell_masked" else np.ones_like(logits, bool)
        assert int(np.argmax(np.where(allowed, logits, -np.inf))) == action
        obs, *_ = env.step(action)
    assert len(list((isolated_home / "onnx").glob("policy-*.onnx"))) == 1
