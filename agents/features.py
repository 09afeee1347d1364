"""SB3 features extractor for the prompting environment's spatial observation."""

from __future__ import annotations

import gymnasium as gym
import torch
import torch.nn as nn
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

SPATIAL_KEYS = ("state", "image", "mask", "fg", "clicks")


class GridFeaturesExtractor(BaseFeaturesExtractor):
    """A small CNN over the action grid.

    The spatial keys (``state``, ``image``, ``mask``, ``fg``, ``clicks``; each ``(C, G, G)``)
    are stacked along channels together with the step fraction broadcast to a constant plane,
    passed through two 3x3 convolutions and a 1x1 bottleneck that keep the grid resolution (so
    each action cell keeps its own features), then flattened and projected to
    ``features_dim``.

    Args:
        observation_space: The env's ``Dict`` space.
        features_dim: Output size.
        channels: Width of the convolutions.
    """

    def __init__(
        self, observation_space: gym.spaces.Dict, features_dim: int = 256, channels: int = 64
    ) -> None:
        super().__init__(observation_space, features_dim)
        missing = [k for k in (*SPATIAL_KEYS, "step") if k not in observation_space.spaces]
        if missing:
            raise ValueError(f"observation space lacks keys {missing}")
        grid = observation_space["mask"].shape[-2:]
        in_ch = sum(observation_space[k].shape[0] for k in SPATIAL_KEYS) + 1
        self.cnn = nn.Sequential(
            nn.Conv2d(in_ch, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 16, 1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.linear = nn.Sequential(nn.Linear(16 * grid[0] * grid[1], features_dim), nn.ReLU())

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        maps = [observations[k] for k in SPATIAL_KEYS]
        ref = maps[0]
        step = observations["step"].reshape(ref.shape[0], 1, 1, 1).expand(-1, 1, *ref.shape[-2:])
        x = torch.cat([*maps, step], dim=1)
        return self.linear(self.cnn(x))
