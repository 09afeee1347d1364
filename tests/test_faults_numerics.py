"""Numerical faults: NaN / Inf in rewards, observations or policy weights stop training with
the sample id (or parameter) named, before they reach the optimizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agents.prompt_agent import PromptAgent
from agents.training import AlignSAMCallback


@pytest.fixture()
def callback(first_run, tiny_task):
    summary, _ = first_run
    cb = AlignSAMCallback(Path(summary["run_dir"]), tiny_task(), None, None, None, None)
    cb.num_timesteps = 5
    return cb


def _locals(**over):
    base = {
        "rewards": np.array([0.1, 0.2]),
        "infos": [{"sample_id": "img_3"}, {"sample_id": "img_7"}],
        "dones": [False, False],
        "new_obs": {"mask": np.zeros((2, 4, 4), np.float32)},
    }
    return {**base, **over}


def test_clean_step_passes(callback):
    callback.locals = _locals()
    assert callback._on_step()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_reward_names_the_sample(callback, value, faults):
    callback.locals = _locals(rewards=np.array([0.1, value]))
    with pytest.raises(FloatingPointError, match="img_7"):
        callback._on_step()
    faults.bad_input("training numerics", f"reward {value}")


def test_non_finite_observation_names_the_sample_and_key(callback, faults):
    obs = np.zeros((2, 4, 4), np.float32)
    obs[0, 1, 2] = np.nan
    callback.locals = _locals(new_obs={"mask": np.zeros((2, 4, 4), np.float32), "srm": obs})
    with pytest.raises(FloatingPointError, match=r"'srm' of sample img_3"):
        callback._on_step()
    faults.bad_input("training numerics", "NaN in an observation")


def test_non_finite_srm_loss_names_the_sample(callback, faults):
    callback.locals = _locals(infos=[{"sample_id": "a", "labeler/loss": float("nan")}, {}])
    with pytest.raises(FloatingPointError, match="SRM loss is nan on sample a"):
        callback._on_step()
    faults.bad_input("training numerics", "NaN SRM loss")


def test_non_finite_policy_weights_stop_before_the_next_rollout(first_run, callback, faults):
    summary, cache = first_run
    agent = PromptAgent.load(summary["run_dir"])
    callback.model = agent.model
    callback._on_rollout_start()  # finite weights pass
    with torch.no_grad():
        next(agent.model.policy.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError, match="became non-finite in the PPO update"):
        callback._on_rollout_start()
    faults.bad_input("training numerics", "non-finite policy weights")
