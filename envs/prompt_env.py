"""``AlignSAM/PointPrompt-v0``: prompting a frozen segmenter as a Gymnasium environment.

An episode is one image. The agent picks a patch centre on a ``G x G`` grid over the image
(``Discrete(G*G)``); a labeler decides whether the click is foreground or background; the
frozen segmenter decodes the whole prompt set against the cached embedding (exactly one
decoder call per step); the reward compares the new mask with the ground truth. With
``allow_pass`` the action space gains one more action, ``G*G`` = *pass*: no click, no decoder
call, the mask stays (reward 0 under ``iou_gain``), so an agent whose labeler is unreliable
can stop adding clicks that would hurt.

The observation (:mod:`envs.observation`): the paper's state ``E_I(x) * M_{t-1}`` reduced to
``K`` channels and pooled to the action grid, the same features without the mask, the mask,
the labeler's foreground map, the clicks so far and the step fraction; with K = 32 and G = 10
an observation is 6,801 floats (27.2 kB), so 2,048 buffered steps take ~56 MB. Rewards come
from :mod:`envs.rewards` by name; each episode is a :class:`~segmenter.session.PromptSession`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from envs.config import EnvConfig, StartMode
from envs.observation import (
    FEATURE_CLIP,
    observation,
    observation_space,
    project_features,
    projection_matrix,
)
from envs.rewards import REWARDS, Step
from recalibration.labelers import EpisodeState, Labeler, OracleLabeler
from segmenter.base import ImageEmbedding, Segmenter, mask_iou, small_torch_ops, torch_threads
from segmenter.cache import EmbeddingCache
from segmenter.geometry import action_centre
from segmenter.session import Outcome, PromptSession, Target

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_CLIP",
    "ClickPreview",
    "EnvConfig",
    "PointPromptEnv",
    "StartMode",
    "projection_matrix",
]


@dataclass
class _Prepared:
    """Per-image tensors computed once and reused by every episode on that image."""

    embedding: ImageEmbedding
    features: torch.Tensor  # (K, He, We) projected, standardised
    target: Target | None  # ground truth in the session's frames
    fg_pixels: np.ndarray | None  # (P, 2) (y, x) foreground pixel coordinates
    bg_pixels: np.ndarray | None


@dataclass(frozen=True)
class ClickPreview:
    """What one action would do from the current state (:meth:`PointPromptEnv.preview`).

    Attributes:
        action: The action.
        click: ``(x, y, label)`` it would add, ``None`` for the pass action or an abstained
            label (no click, no decoder call).
        iou: Low-res IoU with the ground truth after it (0 without ground truth).
        reward: The env's reward for it.
        outcome: The decoded outcome (``None`` without a click); :meth:`PointPromptEnv.step`
            with the same action gives the same mask.
    """

    action: int
    click: tuple[float, float, int] | None
    iou: float
    reward: float
    outcome: Outcome | None


class PointPromptEnv(gym.Env):
    """Click-by-click prompting of a frozen segmenter, rewarded by mask quality.

    Each episode is a :class:`~segmenter.session.PromptSession` on one image; the env adds the
    action grid, the labeler, the reward (:mod:`envs.rewards`) and the observation.

    Args:
        samples: Sequence of objects with ``id``, ``mask`` (``(H, W)`` bool, may be ``None``
            for unlabelled images when ``reward`` is not needed) and ``load_image()``.
        segmenter: A frozen :class:`~segmenter.base.Segmenter` (never loaded by the env).
        labeler: Decides click labels (SRM, oracle, always-positive).
        config: :class:`EnvConfig`.
        cache: Optional on-disk embedding cache shared by every env (and process).
        render_mode: ``"rgb_array"`` or ``None``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(
        self,
        samples: Sequence[Any],
        segmenter: Segmenter,
        labeler: Labeler | None = None,
        config: EnvConfig | None = None,
        cache: EmbeddingCache | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config or EnvConfig()
        if not len(samples):
            raise ValueError("the environment needs at least one sample")
        for s in samples:
            m = getattr(s, "mask", None)
            if m is not None and (not m.any() or m.all()):
                raise ValueError(
                    f"sample {s.id!r}: mask is {'empty' if not m.any() else 'all foreground'}; "
                    "an episode needs foreground and background (drop the sample, e.g. "
                    "with on_error='skip' in the data loader)"
                )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.samples = list(samples)
        self.segmenter = segmenter
        self.labeler = labeler or OracleLabeler()
        self.cache = cache
        self.render_mode = render_mode
        self._reward = REWARDS[self.config.reward]
        self._prepared: dict[str, _Prepared] = {}
        channels = int(segmenter.embedding_shape[0])
        self._proj = projection_matrix(channels, self.config.feature_channels)
        self.action_space = spaces.Discrete(self.config.n_actions)
        self.observation_space = observation_space(self.config.feature_channels, self.config.grid)
        self._next_index = 0
        self._ep: EpisodeState | None = None
        self._session: PromptSession | None = None
        self._fg: np.ndarray | None = None
        self._fg_stale = False

    # -- per-image preparation ---------------------------------------------------------------
    def _prepare(self, sample: Any) -> _Prepared:
        if sample.id in self._prepared:
            return self._prepared[sample.id]
        image = sample.load_image()
        if self.cache is not None:
            emb = self.cache.get_or_encode(self.segmenter, image)
        else:
            emb = self.segmenter.encode(image)
        feats = project_features(self._proj, emb.features)
        gt = getattr(sample, "mask", None)
        target = fg = bg = None
        if gt is not None:
            gt = np.asarray(gt, dtype=bool)
            if gt.shape != emb.original_size:
                raise ValueError(
                    f"sample {sample.id!r}: mask {gt.shape} and image {emb.original_size} differ"
                )
            target = Target.of(emb, gt, self.segmenter.low_res_size)
            fg = np.argwhere(gt)
            bg = np.argwhere(~gt)
        prep = _Prepared(emb, feats, target, fg, bg)
        self._prepared[sample.id] = prep
        return prep

    # -- gym API ------------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        if "index" in options:
            index = int(options["index"]) % len(self.samples)
        elif self.config.sample_order == "sequential":
            index = self._next_index % len(self.samples)
            self._next_index += 1
        else:
            index = int(self.np_random.integers(len(self.samples)))
        sample = self.samples[index]
        prep = self._prepare(sample)
        self._sample, self._prep = sample, prep
        self._session = PromptSession(
            self.segmenter,
            prep.embedding,
            prep.target,
            use_mask_input=self.config.use_mask_input,
            multimask_single_click=self.config.multimask_single_click,
        )
        target = prep.target
        self._ep = EpisodeState(
            sample_id=sample.id,
            embedding=prep.embedding,
            mask_prob=self._session.mask_prob,
            gt_grid=None if target is None else target.grid,
            gt_full=None if target is None else target.full,
            load_image=sample.load_image,
        )
        self._t = 0
        self._visited = np.zeros(self.config.grid**2, bool)
        self._clicks = np.zeros((2, self.config.grid, self.config.grid), np.float32)
        with small_torch_ops(self.segmenter):
            self.labeler.begin(self._ep)
            self._fg = self.labeler.foreground_map(self._ep)
            self._fg_stale = False
            start = options.get("start", self.config.start)
            points, labels = self._start_points(start, prep)
            if len(points):
                self._commit(self._session.prompt(points, labels))
            return self._obs(), self._info(final=False)

    def _start_points(self, start: str, prep: _Prepared) -> tuple[np.ndarray, np.ndarray]:
        if start == "none":
            return np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
        if start == "gt":
            if prep.fg_pixels is None or prep.bg_pixels is None:
                raise RuntimeError("start='gt' needs ground-truth masks; use start='labeler'")
            fy, fx = prep.fg_pixels[self.np_random.integers(len(prep.fg_pixels))]
            by, bx = prep.bg_pixels[self.np_random.integers(len(prep.bg_pixels))]
            pts = np.array([[fx + 0.5, fy + 0.5], [bx + 0.5, by + 0.5]], np.float32)
            return pts, np.array([1, 0], np.int64)
        if start == "labeler":
            if self._fg is None:
                raise RuntimeError(
                    f"start='labeler' needs a labeler with a foreground map; "
                    f"{self.labeler.name!r} has none"
                )
            emb = prep.embedding
            vh, vw = emb.valid_shape(emb.grid_size)
            fg = self._fg[:vh, :vw]
            hi = np.unravel_index(np.argmax(fg), fg.shape)
            lo = np.unravel_index(np.argmin(fg), fg.shape)
            pts = np.array([emb.cell_centre(*hi), emb.cell_centre(*lo)], np.float32)
            return pts, np.array([1, 0], np.int64)
        raise ValueError(f"unknown start mode {start!r}")

    def cell_to_pixel(self, action: int) -> tuple[float, float]:
        """Centre of action-grid cell ``action`` in original ``(x, y)`` pixels."""
        return action_centre(self._prep.embedding.original_size, self.config.grid, action)

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        return self._checked_step(action, observe=True)

    def final_step(self, action: int) -> tuple[float, dict[str, Any]]:
        """:meth:`step` for a caller that reads no observation after it (the last click of an
        automatic episode): the same click, decoder call, reward and info, but the labeler's map
        for the next observation is left until something asks for it, which saves a call of the
        labeler (an SRM head) per episode. Returns ``(reward, info)``."""
        _, reward, _, _, info = self._checked_step(action, observe=False)
        return reward, info

    def _check_action(self, action: Any) -> int:
        if self._ep is None:
            raise RuntimeError("call reset() before step()")
        if isinstance(action, np.ndarray):
            action = action.item() if action.size == 1 else action
        if not isinstance(action, (int, np.integer)) or not 0 <= int(action) < self.action_space.n:
            raise ValueError(
                f"action {action!r} is out of range: expected an int in [0, {self.action_space.n})"
            )
        return int(action)

    def _checked_step(
        self, action: int, observe: bool
    ) -> tuple[dict[str, np.ndarray] | None, float, bool, bool, dict[str, Any]]:
        action = self._check_action(action)
        threads = torch.get_num_threads()
        with small_torch_ops(self.segmenter):
            return self._step(action, threads, observe)

    def _click_of(self, action: int) -> tuple[float, float, int] | None:
        """The click ``(x, y, label)`` that ``action`` adds now, ``None`` for the pass action or
        an abstained label."""
        if self.is_pass(action):
            return None
        x, y = self.cell_to_pixel(action)
        if self._abstains(x, y):
            return None
        return x, y, int(self.labeler.label(self._ep, x, y))

    def _step(
        self, action: int, threads: int, observe: bool
    ) -> tuple[dict[str, np.ndarray] | None, float, bool, bool, dict[str, Any]]:
        """:meth:`step` after validation; ``threads``: torch threads for the labeler's online
        update (a real backward pass, unlike the rest of the step); ``observe``: whether the
        caller reads the observation after it (:meth:`final_step`)."""
        self._labeler_map()  # up to date after a final_step, should the episode go on
        repeated = False
        if not self.is_pass(action):
            repeated = bool(self._visited[action])
            self._visited[action] = True
        click = self._click_of(action)
        if click is None:
            return self._pass(abstained=not self.is_pass(action))
        x, y, label = click
        row, col = divmod(action, self.config.grid)
        self._clicks[0 if label == 1 else 1, row, col] = 1.0
        prev_iou = self.iou
        self._commit(self._session.click(x, y, label))
        self._t += 1
        learn = {}
        if self.config.labeler_learns:
            with torch_threads(threads):
                learn = self.labeler.after_step(self._ep)
        if observe:
            self._fg = self.labeler.foreground_map(self._ep)
        else:
            self._fg_stale = True
        reward = self._reward(Step(prev_iou, self.iou, click, self._prep.target))
        final = self._t >= self.config.max_steps
        info = self._info(final=final)
        info.update(
            click=click,
            repeated=repeated,
            abstained=False,
            **{f"labeler/{k}": v for k, v in learn.items()},
        )
        return (self._obs() if observe else None), float(reward), False, False, info

    def preview(self, actions: Sequence[int]) -> list[ClickPreview]:
        """What each of ``actions`` would do from the current state: its click (labelled by
        the labeler, exactly as :meth:`step` would), IoU and reward; one decoder call per
        action that clicks; the episode is left unchanged. The labeler learns nothing here.

        Raises:
            ValueError: An action is out of range.
        """
        actions = [self._check_action(a) for a in actions]
        with small_torch_ops(self.segmenter):
            self._labeler_map()
            clicks = [self._click_of(a) for a in actions]
            outcomes = iter(self._session.preview([c for c in clicks if c is not None]))
        target, prev = self._prep.target, self.iou
        out = []
        for action, click in zip(actions, clicks, strict=True):
            outcome = None if click is None else next(outcomes)
            iou = prev if outcome is None or outcome.iou is None else float(outcome.iou)
            reward = float(self._reward(Step(prev, iou, click, target)))
            out.append(ClickPreview(action, click, iou, reward, outcome))
        return out

    def is_pass(self, action: int) -> bool:
        """Whether ``action`` is the pass action (only with ``allow_pass``)."""
        return self.config.allow_pass and int(action) == self.config.grid**2

    def _labeler_map(self) -> np.ndarray | None:
        """The labeler's ``(He, We)`` map for the current mask (``None`` for a labeler without
        one), computed now if a :meth:`final_step` left it out."""
        if self._fg_stale:
            with small_torch_ops(self.segmenter):
                self._fg = self.labeler.foreground_map(self._ep)
            self._fg_stale = False
        return self._fg

    def _abstains(self, x: float, y: float) -> bool:
        """Whether the labeler's foreground probability at ``(x, y)`` is too close to 0.5."""
        if self.config.abstain_margin <= 0 or self._fg is None:
            return False
        row, col = self._ep.grid_cell(x, y)
        return abs(float(self._fg[row, col]) - 0.5) < self.config.abstain_margin

    def _pass(
        self, abstained: bool = False
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """The pass action (or an abstained click): no click, no decode; the step counter
        advances."""
        self._t += 1
        iou = self.iou
        reward = self._reward(Step(iou, iou, None, self._prep.target))
        info = self._info(final=self._t >= self.config.max_steps)
        info.update(click=None, repeated=False, abstained=abstained)
        return self._obs(), float(reward), False, False, info

    def _commit(self, outcome: Outcome) -> None:
        """Mirror the session's prompts and mask state into what the labeler sees."""
        ep = self._ep
        ep.points, ep.labels = outcome.points, outcome.labels
        ep.mask_prob = outcome.mask_prob

    # -- what others may read -----------------------------------------------------------------
    @property
    def session(self) -> PromptSession:
        """The current episode's prompting session (read it; step the env to change it)."""
        if self._session is None:
            raise RuntimeError("call reset() first")
        return self._session

    @property
    def episode_state(self) -> EpisodeState:
        """What the labeler sees of the current episode."""
        if self._ep is None:
            raise RuntimeError("call reset() first")
        return self._ep

    @property
    def iou(self) -> float:
        """Low-res IoU of the current mask with the ground truth (0.0 without ground truth or
        before the first decode)."""
        session = self._session
        if session is None or session.target is None:
            return 0.0
        return session.iou

    @property
    def steps_taken(self) -> int:
        """Steps of the current episode so far."""
        return self._t

    # -- observation / info -------------------------------------------------------------------
    def _obs(self) -> dict[str, np.ndarray]:
        emb = self._ep.embedding
        return observation(
            self._prep.features,
            self._ep.mask_prob,
            self._labeler_map(),
            self._clicks,
            self._t / self.config.max_steps,
            emb.valid_shape(emb.grid_size),
            self.config.grid,
        )

    def _info(self, final: bool) -> dict[str, Any]:
        ep = self._ep
        info: dict[str, Any] = {
            "sample_id": ep.sample_id,
            "iou": self.iou,
            "prompts": [
                (float(x), float(y), int(lab))
                for (x, y), lab in zip(ep.points, ep.labels, strict=True)
            ],
        }
        target = self._prep.target
        if final:
            info["is_success"] = bool(self.iou >= self.config.success_iou)
            if self.config.full_res_eval and target is not None:
                info["iou_full"] = mask_iou(self.current_mask(), target.full)
        return info

    def action_masks(self) -> np.ndarray:
        """Boolean ``(n_actions,)`` of allowed actions: unvisited cells when ``mask_repeats``
        (every cell again once all are visited), and the pass action when ``allow_pass``."""
        cells = np.ones(self.config.grid**2, bool)
        if self.config.mask_repeats and not self._visited.all():
            cells = ~self._visited
        if self.config.allow_pass:
            cells = np.append(cells, True)
        return cells

    def foreground_map(self) -> tuple[np.ndarray, ImageEmbedding]:
        """The labeler's ``(He, We)`` foreground probability of this episode's image for the
        current mask (before any click: right after :meth:`reset`), and the embedding whose
        grid it is on."""
        return self._labeler_map(), self._prep.embedding

    def current_mask(self) -> np.ndarray:
        """``(H, W)`` bool full-resolution mask of the current prompt set."""
        return self.session.current_mask()

    def mask_score(self) -> float:
        """Mean decoder foreground probability inside the current mask (0.0 when empty): a
        confidence score for the final mask, computed without ground truth."""
        return self.session.mask_score()

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        from envs.render import overlay

        return overlay(
            self._sample.load_image(), self.current_mask(), self._ep.points, self._ep.labels
        )

    def describe(self) -> dict[str, Any]:
        """Config and sizes, for run folders and logs."""
        return {**asdict(self.config), "labeler": self.labeler.name, "samples": len(self.samples)}
