"""Settings of the prompting environment (``env:`` in a task file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from envs.rewards import REWARDS

__all__ = ["EnvConfig", "StartMode"]

StartMode = Literal["gt", "labeler", "none"]


@dataclass
class EnvConfig:
    """Settings of the prompting environment.

    Attributes:
        grid: G, the action grid side (the paper's 10 x 10 patches of an 800 x 800 image).
        max_steps: T, prompting steps per episode (also ``max_episode_steps``).
        reward: A reward of :data:`envs.rewards.REWARDS`: ``iou_gain`` (IoU_t - IoU_{t-1}),
            ``iou`` (IoU_t) or ``hit`` (+1/-1 for a click inside / outside the ground truth,
            the paper's reward).
        start: ``gt`` one random positive and one random negative ground-truth point
            (training); ``labeler`` the labeler's most / least confident cells (evaluation);
            ``none`` an empty prompt set.
        mask_repeats: Forbid clicking a cell twice (``action_masks()``; a repeated click is
            still legal in ``step`` and decoded, but flagged in ``info``).
        feature_channels: K, channels of the projected embedding in the observation.
        use_mask_input: Feed the previous low-res logits back to the decoder as SAM does in
            interactive use.
        success_iou: ``is_success`` threshold on the final IoU.
        full_res_eval: Also report full-resolution IoU at the end of an episode.
        multimask_single_click: Decode a lone click with SAM's three-candidate head and keep
            the highest-scoring mask (SAM's advice for ambiguous clicks). Off by default:
            on Kvasir-SEG train, one click at the deepest point gives mean IoU 0.53 with the
            single-mask head and 0.28 with the best-scoring candidate (``alignsam oneclick``).
        sample_order: ``random`` (seeded) or ``sequential`` image order across resets.
        labeler_learns: Call the labeler's online update after each step (training). Off for
            evaluation and automatic segmentation, so no ground truth ever trains the SRM there.
        allow_pass: Add the *pass* action ``G*G`` (no click, no decode; always allowed). Not in
            the paper; off by default.
        abstain_margin: The labeler abstains on a click whose foreground probability lies
            within this margin of 0.5 (its map's value at the click): the step then adds no
            click and makes no decoder call, like a pass, and the cell counts as visited. Meant
            to let an agent spend its T steps where labels are reliable (on Kvasir-SEG the
            calibrated SRM was rarely unsure, so it did not help; see README). 0 (default, the
            paper) never abstains; labelers without a map never do.
    """

    grid: Annotated[int, Field(ge=2)] = 10
    max_steps: PositiveInt = 15
    reward: str = "iou_gain"
    start: StartMode = "gt"
    mask_repeats: bool = True
    feature_channels: PositiveInt = 32
    use_mask_input: bool = True
    success_iou: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8
    full_res_eval: bool = False
    multimask_single_click: bool = False
    labeler_learns: bool = True
    sample_order: Literal["random", "sequential"] = "random"
    allow_pass: bool = False
    abstain_margin: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.0

    @property
    def n_actions(self) -> int:
        """``G*G`` cells, plus the pass action when ``allow_pass``."""
        return self.grid * self.grid + int(self.allow_pass)

    def __post_init__(self) -> None:
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2, got {self.grid}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        if self.start not in ("gt", "labeler", "none"):
            raise ValueError(f"start must be gt, labeler or none, got {self.start!r}")
        if not 0.0 <= self.abstain_margin < 0.5:
            raise ValueError(f"abstain_margin must lie in [0, 0.5), got {self.abstain_margin}")
