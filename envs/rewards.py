"""Rewards of the prompting environment, by name (``env.reward`` in a task file).

A reward is a function of one :class:`Step`: the IoU before and after it, the click it made
(``None`` for a step without a click: the pass action or an abstained label) and the image's
ground truth. Adding one is one entry here::

    @register_reward("iou_squared")
    def iou_squared(step: Step) -> float:
        \"\"\"IoU squared: rewards the last points of IoU more.\"\"\"
        return step.iou**2

and every part that scores clicks by reward (the environment, its :meth:`preview
<envs.prompt_env.PointPromptEnv.preview>`, imitation and the ceiling) uses it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from segmenter.geometry import value_at
from segmenter.session import Target

__all__ = ["REWARDS", "Reward", "Step", "register_reward", "reward_names"]


@dataclass(frozen=True)
class Step:
    """What a reward sees of one environment step.

    Attributes:
        prev_iou: Low-res IoU with the ground truth before the step (0 without one).
        iou: Low-res IoU after the step.
        click: ``(x, y, label)`` of the click in original pixels, ``None`` for a step that
            made no click (pass, abstained label).
        target: The image's ground truth, ``None`` when it has none.
    """

    prev_iou: float
    iou: float
    click: tuple[float, float, int] | None
    target: Target | None


#: A reward: ``Step -> float``.
Reward = Callable[[Step], float]
#: Every reward by name, in the order they were registered.
REWARDS: dict[str, Reward] = {}


def register_reward(name: str) -> Callable[[Reward], Reward]:
    """Register ``fn`` as the reward ``name`` (a decorator)."""

    def add(fn: Reward) -> Reward:
        if name in REWARDS:
            raise ValueError(f"a reward named {name!r} is registered already")
        REWARDS[name] = fn
        return fn

    return add


def reward_names() -> tuple[str, ...]:
    """The registered reward names."""
    return tuple(REWARDS)


@register_reward("iou_gain")
def iou_gain(step: Step) -> float:
    """IoU after the step minus IoU before it (0 for a step without a click); the default."""
    return step.iou - step.prev_iou


@register_reward("iou")
def iou(step: Step) -> float:
    """IoU after the step."""
    return step.iou


@register_reward("hit")
def hit(step: Step) -> float:
    """The paper's reward: +1 for a click inside the ground truth, -1 outside, 0 without a
    click."""
    if step.click is None:
        return 0.0
    if step.target is None:
        raise RuntimeError("reward='hit' needs ground truth")
    x, y, _ = step.click
    return 1.0 if value_at(step.target.full, x, y) else -1.0
