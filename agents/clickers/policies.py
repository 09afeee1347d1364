"""Fixed click policies by name, and :class:`EnvClicker`, which runs one (or a trained agent)
inside the prompting environment, so the labels, the start prompts and the decoder path are
exactly the agent's. ``random`` with the SRM labeler is the paper's "w/o RL" ablation."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.clickers.trace import ClickTrace
from envs.prompt_env import PointPromptEnv
from recalibration.labelers import Labeler
from segmenter.base import mask_iou

logger = logging.getLogger(__name__)


def spiral_order(grid: int) -> np.ndarray:
    """All ``grid * grid`` cells (``row * grid + col``) spiralling out from the image centre.

    Cells are sorted by distance of their centre from the grid centre, then clockwise by angle
    starting straight up, so every prefix is a near-disc around the centre.
    """
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    dy, dx = rows - (grid - 1) / 2, cols - (grid - 1) / 2
    dist = np.round(np.hypot(dy, dx), 6)
    angle = np.round(np.mod(np.arctan2(dx, -dy), 2 * np.pi), 6)  # 0 = up, clockwise
    return np.lexsort((angle, dist)).astype(np.int64)


def grid_order(grid: int) -> np.ndarray:
    """All ``grid * grid`` cells in a fixed, evenly spread order (greedy maximin).

    Starts at the cell nearest the image centre; each next cell is the one farthest from every
    cell taken so far, where the image border also repels at half the spacing (its distance
    counts twice), so points fill the image evenly instead of racing to the corners. Ties go to
    the lowest cell index. For ``grid = 10`` the first four cells are the centre and the
    centres of the other three quadrants, and the first ten are at least 2.2 cells apart.
    """
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    border = 2.0 * np.minimum.reduce([rows + 0.5, grid - 0.5 - rows, cols + 0.5, grid - 0.5 - cols])
    dist = border.astype(np.float64)
    taken = np.zeros(grid * grid, bool)
    order: list[int] = []
    for _ in range(grid * grid):
        cand = np.where(taken, -1.0, np.round(dist, 9))
        k = int(np.argmax(cand))
        order.append(k)
        taken[k] = True
        dist = np.minimum(dist, np.hypot(rows - rows[k], cols - cols[k]))
    return np.asarray(order, np.int64)


#: A click policy as a function ``(env, obs, allowed) -> action`` (e.g. a trained agent).
PolicyFn = Callable[[PointPromptEnv, dict[str, np.ndarray], np.ndarray], int]
#: What a named policy builds for one environment: ``(obs, allowed, rng) -> cell``.
Chooser = Callable[[dict[str, np.ndarray], np.ndarray, np.random.Generator], int]


@dataclass(frozen=True)
class ClickPolicy:
    """One entry of :data:`CLICK_POLICIES`.

    Attributes:
        name: Its name (``EnvClicker(env, name)``, benchmark rows).
        help: One line on what it clicks.
        make: Builds the chooser for an environment (``env.config.grid`` cells).
        needs_foreground_map: Reads the labeler's foreground map (the ``fg`` observation).
    """

    name: str
    help: str
    make: Callable[[PointPromptEnv], Chooser]
    needs_foreground_map: bool = False


#: Every named click policy. Adding one is one entry::
#:
#:     @register_click_policy("corners", "the four corner cells first")
#:     def corners(env): ...  # returns (obs, allowed, rng) -> cell
CLICK_POLICIES: dict[str, ClickPolicy] = {}


def register_click_policy(
    name: str, help: str, needs_foreground_map: bool = False
) -> Callable[[Callable[[PointPromptEnv], Chooser]], Callable[[PointPromptEnv], Chooser]]:
    """Register ``make(env) -> chooser`` as the click policy ``name`` (a decorator)."""

    def add(make: Callable[[PointPromptEnv], Chooser]) -> Callable[[PointPromptEnv], Chooser]:
        if name in CLICK_POLICIES:
            raise ValueError(f"a click policy named {name!r} is registered already")
        CLICK_POLICIES[name] = ClickPolicy(name, help, make, needs_foreground_map)
        return make

    return add


def _first_allowed(order: np.ndarray) -> Chooser:
    def choose(obs: dict[str, np.ndarray], allowed: np.ndarray, rng: np.random.Generator) -> int:
        return int(next(c for c in order if allowed[c]))

    return choose


@register_click_policy("random", "uniform over unvisited cells (seeded per image)")
def random_policy(env: PointPromptEnv) -> Chooser:
    def choose(obs: dict[str, np.ndarray], allowed: np.ndarray, rng: np.random.Generator) -> int:
        return int(rng.choice(np.flatnonzero(allowed)))

    return choose


@register_click_policy("centre", "cells spiralling out from the image centre")
def centre_policy(env: PointPromptEnv) -> Chooser:
    return _first_allowed(spiral_order(env.config.grid))


@register_click_policy("grid", "a fixed, evenly spread order of the cells (greedy maximin)")
def grid_policy(env: PointPromptEnv) -> Chooser:
    return _first_allowed(grid_order(env.config.grid))


def srm_confident_score(fg: Any, mask: Any) -> Any:
    """``|p - 0.5| * |p - m|`` per cell, the ``srm_confident`` policy's score: where the
    labeler is sure (``p``, the ``fg`` map) and the mask (``m``, the ``mask`` map) disagrees
    with it. NumPy arrays or torch tensors of one shape (the cell policy's prior uses it too)."""
    return abs(fg - 0.5) * abs(fg - mask)


@register_click_policy(
    "srm_confident",
    "where the labeler is sure and the mask disagrees: argmax |p - 0.5| * |p - m|",
    needs_foreground_map=True,
)
def srm_confident_policy(env: PointPromptEnv) -> Chooser:
    def choose(obs: dict[str, np.ndarray], allowed: np.ndarray, rng: np.random.Generator) -> int:
        p = obs["fg"][0].reshape(-1).astype(np.float64)
        score = srm_confident_score(p, obs["mask"][0].reshape(-1).astype(np.float64))
        score[~allowed] = -np.inf
        return int(np.argmax(score))

    return choose


#: The named click policies (compatibility name).
POLICIES: tuple[str, ...] = tuple(CLICK_POLICIES)


def _has_foreground_map(labeler: Labeler) -> bool:
    return type(labeler).foreground_map is not Labeler.foreground_map


class EnvClicker:
    """A fixed click policy run inside :class:`~envs.prompt_env.PointPromptEnv`.

    The environment supplies everything else exactly as for the RL agent: its labeler labels
    each click, its start mode places the start prompts, and it makes one decoder call per step
    (multimask only for a single-point prompt set, previous logits fed back as configured).

    Policies (each picks one unvisited action cell per step, ``G x G`` grid): a name of
    :data:`CLICK_POLICIES`:

    * ``random``: uniform over unvisited cells, from ``numpy.random.default_rng([seed, index])``
      (the same clicks for an image whatever the run order).
    * ``centre``: cells spiralling out from the image centre (:func:`spiral_order`).
    * ``grid``: a fixed, evenly spread order of the cells (:func:`grid_order`, greedy maximin).
    * ``srm_confident``: the cell maximising ``|p - 0.5| * |p - m|``, where ``p`` is the
      labeler's foreground probability and ``m`` the current mask coverage of the cell (the
      environment's ``fg`` and ``mask`` observations): where the labeler is sure and the mask
      disagrees with it. Ties go to the lowest cell index. Needs a labeler with a foreground
      map (the SRM, or the oracle as an upper bound).

    or a callable :data:`PolicyFn`, e.g. a trained agent:
    ``lambda env, obs, allowed: agent.act(env, obs)``.

    Args:
        env: The environment (wrappers are looked through: ``steps`` bounds each run).
        policy: A name of :data:`CLICK_POLICIES`, or a :data:`PolicyFn`.
        seed: Seed of the ``random`` policy and of ``env.reset`` (the ``gt`` start's points).
        start: Start mode for every run (``"labeler"``, ``"gt"``, ``"none"``); ``None`` keeps
            the environment's configured start.
    """

    def __init__(
        self,
        env: PointPromptEnv,
        policy: str | PolicyFn,
        seed: int = 0,
        start: str | None = None,
    ) -> None:
        env = env.unwrapped  # accept make_env()'s TimeLimit-wrapped env too
        if callable(policy):
            fn = policy
            name = getattr(policy, "__name__", "custom")

            def chooser(obs: dict[str, np.ndarray], allowed: np.ndarray, rng: Any) -> int:
                return int(fn(env, obs, allowed))

        elif policy in CLICK_POLICIES:
            spec, name = CLICK_POLICIES[policy], policy
            if spec.needs_foreground_map and not _has_foreground_map(env.labeler):
                raise ValueError(
                    f"policy {policy!r} needs a labeler with a foreground map; "
                    f"{env.labeler.name!r} has none (use the SRM or the oracle labeler)"
                )
            chooser = spec.make(env)
        else:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.env = env
        self.policy = name
        self.seed = int(seed)
        self.start = start
        self._chooser = chooser

    def choose(
        self, obs: dict[str, np.ndarray], allowed: np.ndarray, rng: np.random.Generator
    ) -> int:
        """The policy's cell for observation ``obs`` among the ``allowed`` cells."""
        return self._chooser(obs, allowed, rng)

    def run(self, index: int, steps: int | None = None) -> ClickTrace:
        """One episode on image ``index``.

        Args:
            index: Index into ``env.samples``.
            steps: Prompting steps T (default the environment's ``max_steps``).

        Returns:
            The trace: the start prompts (``start_clicks`` of them, decoded jointly) then one
            click per step; ``ious`` full-resolution (``env.current_mask()``) when the sample
            has a mask; ``info["env_iou"]`` the environment's low-res IoU per step.
        """
        env = self.env
        steps = env.config.max_steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        t0 = time.perf_counter()
        options: dict[str, Any] = {"index": int(index)}
        if self.start is not None:
            options["start"] = self.start
        obs, info = env.reset(seed=self.seed, options=options)
        sample = env.samples[int(index) % len(env.samples)]
        gt = getattr(sample, "mask", None)
        gt = None if gt is None else np.asarray(gt, bool)
        n_start = len(info["prompts"])
        calls = 1 if n_start else 0
        ious: list[float] = []
        env_ious: list[float] = []
        if gt is not None and n_start:
            ious = [mask_iou(env.current_mask(), gt)] * n_start
        rng = np.random.default_rng([self.seed, int(index)])
        n_cells = env.config.grid**2  # the pass action (allow_pass) is the policy fn's to take
        visited = np.zeros(n_cells, bool)
        actions: list[int] = []
        for t in range(steps):
            allowed = env.action_masks()[:n_cells] & ~visited
            if not allowed.any():  # more steps than cells: allow repeats rather than stop
                allowed = np.ones(n_cells, bool)
            action = self.choose(obs, allowed, rng)
            if action < n_cells:
                visited[action] = True
            actions.append(action)
            if t == steps - 1:  # nothing reads the observation after the last click
                _, info = env.final_step(action)
            else:
                obs, _, _, _, info = env.step(action)
            calls += info.get("click") is not None  # a pass makes no decoder call
            env_ious.append(float(info["iou"]))
            if gt is not None:
                ious.append(mask_iou(env.current_mask(), gt))
        prompts = info["prompts"]
        final_mask = env.current_mask()
        seconds = time.perf_counter() - t0
        return ClickTrace(
            sample_id=str(info["sample_id"]),
            points=np.asarray([(x, y) for x, y, _ in prompts], np.float32).reshape(-1, 2),
            labels=np.asarray([lab for _, _, lab in prompts], np.int64),
            ious=ious,
            final_mask=final_mask,
            decoder_calls=calls,
            seconds=seconds,
            start_clicks=n_start,
            info={"policy": self.policy, "actions": actions, "env_iou": env_ious},
        )
