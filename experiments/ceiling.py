"""``alignsam ceiling RUN``: how much click placement can matter with a run's SRM labels.

For each image, three click policies run in the run's evaluation environment from the same SRM
start points, with labels always from the SRM:

- ``greedy``: at every step, the cell whose click (with the SRM's label) earns the env's reward
  most (with the default ``iou_gain``: the best IoU with the ground truth). It reads the ground
  truth to choose, so it is a ceiling for any placement policy with these labels (greedy, so
  not the exact optimum), and a teacher for one.
- ``agent``: the run's trained policy.
- ``random``: uniformly random unvisited cells (the paper's "w/o RL").

IoUs are the environment's low-resolution IoUs. Greedy costs one decoder call per candidate
cell per step (~1,400 calls per image on the 10 x 10 grid with T = 15).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.prompt_agent import PromptAgent
from envs import PointPromptEnv
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

POLICIES = ("greedy", "agent", "random")


def greedy_action(env: PointPromptEnv) -> int:
    """The legal cell whose click, labelled by the env's labeler, earns the env's reward most
    (with the default ``iou_gain``: the best IoU next)."""
    cells = [int(c) for c in np.flatnonzero(env.action_masks()) if not env.is_pass(int(c))]
    return cells[int(np.argmax([p.reward for p in env.preview(cells)]))]


def placement_ceiling(
    agent: PromptAgent, samples: Sequence[Any], seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Final IoU of each policy on each sample, and their means."""
    config = agent.eval_config(full_res_eval=False)
    env = PointPromptEnv(samples, agent.segmenter, agent.srm, config, cache=agent.cache)
    rng = np.random.default_rng(seed)
    per_image: dict[str, list[float]] = {p: [] for p in POLICIES}
    for i in progress_bar(range(len(samples)), desc="ceiling", unit="img", disable=not progress):
        for policy in POLICIES:
            obs, _ = env.reset(seed=seed + i, options={"index": i})
            for _ in range(config.max_steps):
                if policy == "greedy":
                    action = greedy_action(env)
                elif policy == "agent":
                    action = agent.act(env, obs)
                else:
                    legal = [a for a in np.flatnonzero(env.action_masks()) if not env.is_pass(a)]
                    action = int(rng.choice(legal))
                obs, *_ = env.step(action)
            per_image[policy].append(float(env.iou))
    return {
        "n": len(samples),
        "mean_iou": {p: float(np.mean(v)) for p, v in per_image.items()},
        "per_image": {s.id: {p: per_image[p][i] for p in POLICIES} for i, s in enumerate(samples)},
    }
