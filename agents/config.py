"""Task configuration: what a prompt agent is trained for and how (YAML <-> dataclasses)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)

from agents.features import SPATIAL_KEYS, policy_inputs, policy_prior
from agents.imitation import ImitationConfig
from agents.lookahead import LookaheadConfig
from agents.schema import SchemaError, build, load_yaml, set_dotted
from envs import EnvConfig
from recalibration.srm import SRMConfig

logger = logging.getLogger(__name__)

#: A share or probability, in [0, 1].
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(ValueError):
    """A task file or setting is malformed; the message names the file and each key."""

    @classmethod
    def of(cls, where: str, problems: list[str]) -> ConfigError:
        """One error for every problem found in ``where`` (a file, ``command line``...)."""
        if len(problems) == 1:
            return cls(f"{where}: {problems[0]}")
        return cls(f"{where}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass
class DataConfig:
    """Dataset specs (see ``experiments.datasets``) of the splits.

    ``train_subset`` keeps a seeded random subset of that many training images (the AlignSAM
    protocol trains on 50 images per task). ``pool`` names further labelled images for larger
    training sets, and ``train_size`` sets the size of the training set (a learning curve's
    point): the first ``train_size`` of the ``train`` images, then of the ``pool`` images not
    already in them, so every larger set holds every smaller one (``pool`` in its own order;
    shuffled with the task's seed when ``train_subset`` draws the training images). No
    training image may be scored: ``pool`` must not overlap ``val`` or ``test``.
    ``on_error``: ``raise`` stops at the first unusable file, naming it; ``skip`` leaves such
    files out and lists them in the run's summary (``--skip-bad`` on the command line).
    ``shifted_copies`` names image shifts (``experiments.datasets.SHIFTS``, e.g. ``[crop256,
    colour, blur]``): the SRM also trains on a copy of every training image under each, encoded
    like any image (one encoder pass and one cache entry per copy); the judge, the value model and
    the validation choices stay on the images themselves.
    """

    train: str
    val: str | None = None
    test: str | None = None
    train_subset: PositiveInt | None = None
    pool: str | None = None
    train_size: PositiveInt | None = None
    on_error: Literal["raise", "skip"] = "raise"
    shifted_copies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.shifted_copies = tuple(self.shifted_copies)
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")


@dataclass
class PPOConfig:
    """PPO hyperparameters (paper defaults: Adam 1e-4, gamma 0.99, clip 0.2, K = 20 epochs,
    Monte-Carlo returns bootstrapped at T, i.e. ``gae_lambda = 1.0``; E = 50 episodes per
    update, i.e. ``n_steps = 50 * T`` with one env).

    ``policy``: ``cell`` (default) scores each grid cell with one shared network from that
    cell's features plus global context (:class:`~agents.features.CellPolicy`); ``dense`` is
    the first design, a CNN flattened to ``features_dim`` and a linear layer per action (its
    runs still load). ``cnn_channels`` is the convolution width of both. ``inputs`` names the
    observation maps the cell policy reads (default: all of ``state``, ``image``, ``mask``,
    ``fg``, ``clicks``); ``[mask, fg, clicks]`` leaves out the segmenter's features. ``prior:
    srm_confident`` adds the SRM-confident heuristic's score to the cell policy's logits (with a
    learned scale; the learned part starts at zero), so training starts from that heuristic."""

    learning_rate: PositiveFloat = 1e-4
    gamma: Fraction = 0.99
    clip_range: PositiveFloat = 0.2
    n_epochs: PositiveInt = 20
    gae_lambda: Fraction = 1.0
    n_steps: PositiveInt = 750
    batch_size: Annotated[int, Field(ge=2)] = 150
    ent_coef: NonNegativeFloat = 0.01
    vf_coef: NonNegativeFloat = 0.5
    max_grad_norm: PositiveFloat = 0.5
    n_envs: PositiveInt = 1
    maskable: bool = True
    policy: Literal["cell", "dense"] = "cell"
    features_dim: PositiveInt = 256
    cnn_channels: PositiveInt = 64
    inputs: tuple[str, ...] = SPATIAL_KEYS
    prior: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("cell", "dense"):
            raise ValueError(f"ppo.policy must be cell or dense, got {self.policy!r}")
        self.inputs = policy_inputs(self.inputs, "ppo.inputs")
        self.prior = policy_prior(self.prior, "ppo.prior")
        if self.policy == "dense" and (self.inputs != SPATIAL_KEYS or self.prior is not None):
            raise ValueError("ppo.inputs and ppo.prior apply to the cell policy only")
        if self.n_steps * self.n_envs < 2:
            raise ValueError("ppo: n_steps * n_envs must be at least 2 (one rollout step)")


@dataclass
class TaskConfig:
    """Everything that defines a task and its training run.

    Attributes:
        name: Task name (run folders are ``runs/{name}__ppo__{seed}__{time}``).
        data: Splits as dataset specs.
        segmenter: Registry name of the frozen segmenter.
        checkpoint: Optional weights file of the segmenter.
        device: Torch device.
        bf16: Run the segmenter under bf16 autocast.
        env: Environment settings (grid, T, reward, ...).
        train_start: Start of training episodes: ``gt`` (the paper: one random positive and
            one random negative ground-truth point) or ``labeler`` (the SRM's most / least
            confident cells, exactly as at test time).
        srm: SRM settings (branch, text for the explicit branch, ...).
        srm_pretrain_epochs: Offline SRM pretraining on the train split before RL (0 = none).
        srm_pretrain_steps: A budget of SRM optimizer steps instead (batches of 8 images):
            the epochs become ``ceil(steps / batches per epoch)``, so training cost grows with
            the steps, not with the number of images (a learning curve sets it per size).
        ppo: PPO settings.
        imitation: The imitation stage before PPO (:mod:`agents.imitation`; off unless
            ``rounds > 0``).
        agent: ``ppo`` (the paper's agent: a policy trained by PPO picks cells, the SRM labels
            them) or ``lookahead`` (:mod:`agents.lookahead`: candidates decoded with both
            labels, a mask judge picks; no PPO).
        lookahead: Settings of the lookahead agent.
        total_timesteps: PPO environment steps of training (0: none, e.g. imitation only).
        eval_every: Evaluate on ``val`` every this many steps.
        checkpoint_every: Write a resumable checkpoint every this many steps.
        seed: Seeds numpy, torch, the env and PPO.
    """

    name: str
    data: DataConfig
    segmenter: str = "mobile_sam"
    checkpoint: str | None = None
    device: str = "cpu"
    bf16: bool = False
    env: EnvConfig = field(default_factory=EnvConfig)
    train_start: Literal["gt", "labeler"] = "labeler"
    srm: SRMConfig = field(default_factory=SRMConfig)
    srm_pretrain_epochs: NonNegativeInt = 30
    srm_pretrain_steps: PositiveInt | None = None
    ppo: PPOConfig = field(default_factory=PPOConfig)
    imitation: ImitationConfig = field(default_factory=ImitationConfig)
    agent: Literal["ppo", "lookahead"] = "ppo"
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    total_timesteps: NonNegativeInt = 30_000
    eval_every: PositiveInt = 3_000
    checkpoint_every: PositiveInt = 1_500
    seed: NonNegativeInt = 0

    def srm_epochs(self, n_images: int, batch_size: int = 8) -> int:
        """SRM pretraining epochs over ``n_images``: ``srm_pretrain_epochs``, or the epochs
        that ``srm_pretrain_steps`` optimizer steps take (at least 1)."""
        if self.srm_pretrain_steps is None or self.srm_pretrain_epochs == 0:
            return self.srm_pretrain_epochs
        per_epoch = max(1, math.ceil(n_images / batch_size))
        return max(1, math.ceil(self.srm_pretrain_steps / per_epoch))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["srm"] = self.srm.to_dict()
        return out

    def eval_env(self, **changes: Any) -> EnvConfig:
        """The env settings of episodes run as at test time: SRM start, no online learning,
        images in order (evaluation, automatic segmentation, the imitation stage)."""
        return dataclasses.replace(
            self.env, start="labeler", labeler_learns=False, sample_order="sequential", **changes
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "task") -> TaskConfig:
        """Build from plain data, checking every value (type, range, unknown keys with the
        nearest known one: :mod:`agents.schema`); every problem is named in one
        :class:`ConfigError`, with ``where`` (the file) and each key's path."""
        try:
            return build(cls, data)
        except SchemaError as exc:
            raise ConfigError.of(where, exc.problems) from None

    @classmethod
    def load(cls, path: str | Path) -> TaskConfig:
        """Read a task YAML file (``1e-4`` is read as a number), checked as :meth:`from_dict`."""
        path = Path(path)
        try:
            raw = load_yaml(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read task file {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"task file {path} must hold a mapping of settings")
        raw.setdefault("name", path.stem)
        return cls.from_dict(raw, where=str(path))

    def with_settings(self, settings: dict[str, Any], where: str = "settings") -> TaskConfig:
        """A checked copy with dotted settings changed, e.g. ``{"ppo.n_steps": 400}`` (command
        line overrides, sweep grid points); problems raise :class:`ConfigError` naming them."""
        data = self.to_dict()
        try:
            for key, value in settings.items():
                set_dotted(data, key, value)
        except SchemaError as exc:
            raise ConfigError.of(where, exc.problems) from None
        return TaskConfig.from_dict(data, where=where)
