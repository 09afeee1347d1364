"""Gymnasium environments for prompting frozen segmenters; registers ``AlignSAM/PointPrompt-v0``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from envs.prompt_env import EnvConfig, PointPromptEnv

ENV_ID = "AlignSAM/PointPrompt-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.prompt_env:PointPromptEnv", max_episode_steps=15)


def make_env(
    samples, segmenter, labeler=None, config: EnvConfig | None = None, **kwargs: Any
) -> gym.Env:
    """``gym.make`` the prompting env with ``max_episode_steps = config.max_steps``."""
    config = config or EnvConfig()
    return gym.make(
        ENV_ID,
        max_episode_steps=config.max_steps,
        samples=samples,
        segmenter=segmenter,
        labeler=labeler,
        config=config,
        **kwargs,
    )


__all__ = ["ENV_ID", "EnvConfig", "PointPromptEnv", "make_env"]
