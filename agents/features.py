"""SB3 policies for the prompting environment's spatial observation.

Two designs: :class:`GridFeaturesExtractor` flattens a small CNN's output into one vector and
SB3's linear heads map it to the G*G action logits (each cell's logit has its own weights;
runs trained before the cell policy existed use it), and :class:`CellPolicy` /
:class:`MaskableCellPolicy`, the default, which score every cell with the same small network
from that cell's own features plus global context (fully convolutional).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule

from agents.clickers import srm_confident_score

SPATIAL_KEYS = ("state", "image", "mask", "fg", "clicks")
PRIORS = (None, "srm_confident")


def policy_inputs(keys: Sequence[str], what: str = "policy inputs") -> tuple[str, ...]:
    """``keys`` as a tuple, checked to be a non-empty subset of :data:`SPATIAL_KEYS`."""
    keys = tuple(keys)
    if not keys or any(k not in SPATIAL_KEYS for k in keys):
        raise ValueError(
            f"{what} must be a non-empty subset of {list(SPATIAL_KEYS)}, got {list(keys)}"
        )
    return keys


def policy_prior(prior: str | None, what: str = "prior") -> str | None:
    """``prior``, checked to be one of :data:`PRIORS`."""
    if prior not in PRIORS:
        raise ValueError(f"{what} must be one of {list(PRIORS)}, got {prior!r}")
    return prior


def _stack_channels(
    observation_space: gym.spaces.Dict, keys: tuple[str, ...] = SPATIAL_KEYS
) -> int:
    """Channels of :func:`_stack` for ``observation_space`` (whose keys are checked)."""
    keys = policy_inputs(keys)
    missing = [k for k in (*keys, "step") if k not in observation_space.spaces]
    if missing:
        raise ValueError(f"observation space lacks keys {missing}")
    return sum(observation_space[k].shape[0] for k in keys) + 1


def _stack(
    observations: dict[str, torch.Tensor], keys: tuple[str, ...] = SPATIAL_KEYS
) -> torch.Tensor:
    """The spatial ``keys`` and the step fraction broadcast to a plane, along channels."""
    maps = [observations[k] for k in keys]
    ref = maps[0]
    step = observations["step"].reshape(ref.shape[0], 1, 1, 1).expand(-1, 1, *ref.shape[-2:])
    return torch.cat([*maps, step], dim=1)


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
        in_ch = _stack_channels(observation_space)
        grid = observation_space["mask"].shape[-2:]
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
        return self.linear(self.cnn(_stack(observations)))


class CellFeaturesExtractor(BaseFeaturesExtractor):
    """A fully convolutional trunk that keeps one feature vector per action cell.

    The spatial keys, the step fraction and two coordinate planes (so a learned spatial prior
    is possible, e.g. polyps near the centre) are stacked along channels and passed through two
    3x3 convolutions; the mean over cells, projected, is broadcast back and fused by a 1x1
    convolution so each cell also sees the whole image (is the mask already covering something
    elsewhere?). The output is the ``(channels, G, G)`` map, flattened; :class:`CellPolicy`
    scores each cell from its own vector with shared weights, so what is learned at one cell
    applies at every cell (translation equivariance), which matters with 50 training images.

    Args:
        observation_space: The env's ``Dict`` space.
        channels: Width of the per-cell features.
        keys: The spatial keys the policy reads (all by default). Leaving out ``state`` and
            ``image`` (the segmenter's features) leaves a policy that places clicks from the
            labeler's map, the mask and the clicks alone: far fewer ways to fit 50 images.
        prior: ``"srm_confident"`` appends one more plane,
            :func:`~agents.clickers.srm_confident_score` of the
            ``fg`` and ``mask`` observations, which :class:`CellActionHead` adds to the learned
            logits with a learned scale: the policy starts as the SRM-confident heuristic and
            learns corrections to it. ``None`` (default): no prior.
    """

    def __init__(
        self,
        observation_space: gym.spaces.Dict,
        channels: int = 64,
        keys: tuple[str, ...] | list[str] = SPATIAL_KEYS,
        prior: str | None = None,
    ) -> None:
        policy_prior(prior)
        in_ch = _stack_channels(observation_space, tuple(keys)) + 2  # + the coordinate planes
        grid = tuple(observation_space["mask"].shape[-2:])
        super().__init__(observation_space, (channels + (prior is not None)) * grid[0] * grid[1])
        self.keys = tuple(keys)
        self.prior = prior
        self.channels = channels
        self.grid = grid
        self.trunk = nn.Sequential(
            nn.Conv2d(in_ch, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.context = nn.Linear(channels, channels)
        self.fuse = nn.Sequential(nn.Conv2d(2 * channels, channels, 1), nn.ReLU())
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, grid[0]), torch.linspace(-1, 1, grid[1]), indexing="ij"
        )
        self.register_buffer("coords", torch.stack([ys, xs])[None], persistent=False)

    def cell_features(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, channels, G, G)`` per-cell features (``channels + 1`` with the prior plane)."""
        stack = _stack(observations, self.keys)
        coords = self.coords.expand(stack.shape[0], -1, -1, -1)
        x = self.trunk(torch.cat([stack, coords], dim=1))
        ctx = self.context(x.mean(dim=(2, 3)))[..., None, None].expand_as(x)
        x = self.fuse(torch.cat([x, ctx], dim=1))
        if self.prior is not None:
            x = torch.cat([x, srm_confident_score(observations["fg"], observations["mask"])], 1)
        return x

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cell_features(observations).flatten(1)


class CellActionHead(nn.Module):
    """Per-cell logits from the flattened ``(channels, G, G)`` features (shared 1x1 convs),
    plus, when the action space has one more action than cells (``allow_pass``), a pass logit
    from the mean over cells.

    With ``prior``, the features carry one more plane (the extractor's prior score) and the
    logits are ``prior_scale * prior + learned``, ``prior_scale`` a learned scalar that starts
    at ``1 / prior_temperature`` and the learned part starting at exactly zero, so the
    untrained policy's argmax is the prior's."""

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int],
        n_actions: int,
        prior: bool = False,
        prior_temperature: float = 0.02,
    ) -> None:
        super().__init__()
        self.channels, self.grid = channels, grid
        self.prior_scale = nn.Parameter(torch.tensor(1.0 / prior_temperature)) if prior else None
        n_cells = grid[0] * grid[1]
        if n_actions not in (n_cells, n_cells + 1):
            raise ValueError(f"{n_actions} actions do not fit a {grid[0]}x{grid[1]} grid")
        self.score = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, 1, 1)
        )
        self.pass_logit = nn.Linear(channels, 1) if n_actions == n_cells + 1 else None

    def zero_learned(self) -> None:
        """Zero the learned part's last layer, so the logits are the prior's alone."""
        nn.init.zeros_(self.score[-1].weight)
        nn.init.zeros_(self.score[-1].bias)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        planes = self.channels + (self.prior_scale is not None)
        x = latent.reshape(latent.shape[0], planes, *self.grid)
        if self.prior_scale is not None:
            x, prior = x[:, : self.channels], x[:, self.channels :]
        logits = self.score(x).flatten(1)
        if self.prior_scale is not None:
            logits = logits + self.prior_scale * prior.flatten(1)
        if self.pass_logit is not None:
            logits = torch.cat([logits, self.pass_logit(x.mean(dim=(2, 3)))], dim=1)
        return logits


class CellValueHead(nn.Module):
    """State value from the per-cell features: a 1x1 bottleneck, flattened, then an MLP."""

    def __init__(self, channels: int, grid: tuple[int, int], hidden: int = 64) -> None:
        super().__init__()
        self.channels, self.grid = channels, grid
        self.net = nn.Sequential(
            nn.Conv2d(channels, 8, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * grid[0] * grid[1], hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent.reshape(latent.shape[0], self.channels, *self.grid))


def _build_cell_heads(policy: ActorCriticPolicy, lr_schedule: Schedule) -> None:
    """``_build`` of the cell policies: SB3's, with the cell heads instead of linear layers."""
    fx = policy.features_extractor
    if not isinstance(fx, CellFeaturesExtractor):
        raise ValueError("the cell policy needs features_extractor_class=CellFeaturesExtractor")
    policy._build_mlp_extractor()
    mlp = policy.mlp_extractor
    if (mlp.latent_dim_pi, mlp.latent_dim_vf) != (fx.features_dim, fx.features_dim):
        raise ValueError("the cell policy reads the per-cell features: use net_arch=[] (no MLP)")
    prior = fx.prior is not None
    policy.action_net = CellActionHead(fx.channels, fx.grid, int(policy.action_space.n), prior)
    policy.value_net = CellValueHead(fx.channels + prior, fx.grid)
    if policy.ortho_init:
        gains = {fx: np.sqrt(2), policy.action_net: 0.01, policy.value_net: 1.0}
        for module, gain in gains.items():
            module.apply(partial(policy.init_weights, gain=gain))
    if prior:
        policy.action_net.zero_learned()
    policy.optimizer = policy.optimizer_class(
        policy.parameters(), lr=lr_schedule(1), **policy.optimizer_kwargs
    )


def _cell_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("features_extractor_class", CellFeaturesExtractor)
    kwargs.setdefault("net_arch", {"pi": [], "vf": []})
    return kwargs


class CellPolicy(MultiInputActorCriticPolicy):
    """SB3 ``PPO`` policy scoring each action cell from its own features (shared weights)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **_cell_defaults(kwargs))

    def _build(self, lr_schedule: Schedule) -> None:
        _build_cell_heads(self, lr_schedule)


class MaskableCellPolicy(MaskableMultiInputActorCriticPolicy):
    """:class:`CellPolicy` for sb3-contrib's ``MaskablePPO``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **_cell_defaults(kwargs))

    def _build(self, lr_schedule: Schedule) -> None:
        _build_cell_heads(self, lr_schedule)


def cell_policy_class(maskable: bool) -> type[ActorCriticPolicy]:
    """The actor-critic policy with per-cell action logits, for ``MaskablePPO`` or ``PPO``."""
    return MaskableCellPolicy if maskable else CellPolicy
