"""Task configuration: what a prompt agent is trained for and how (YAML <-> dataclasses)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agents.features import SPATIAL_KEYS, policy_inputs, policy_prior
from agents.imitation import ImitationConfig
from agents.lookahead import LookaheadConfig
from envs import EnvConfig
from recalibration.srm import SRMConfig

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A task file is malformed; the message names the file and the key."""


@dataclass
class DataConfig:
    """Dataset specs (see ``experiments.datasets``) of the splits.

    ``train_subset`` keeps a seeded random subset of that many training images (the AlignSAM
    protocol trains on 50 images per task). ``on_error``: ``raise`` stops at the first
    unusable file, naming it; ``skip`` leaves such files out and lists them in the run's
    summary (``--skip-bad`` on the command line).
    """

    train: str
    val: str | None = None
    test: str | None = None
    train_subset: int | None = None
    on_error: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
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

    learning_rate: float = 1e-4
    gamma: float = 0.99
    clip_range: float = 0.2
    n_epochs: int = 20
    gae_lambda: float = 1.0
    n_steps: int = 750
    batch_size: int = 150
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    n_envs: int = 1
    maskable: bool = True
    policy: Literal["cell", "dense"] = "cell"
    features_dim: int = 256
    cnn_channels: int = 64
    inputs: tuple[str, ...] = SPATIAL_KEYS
    prior: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("cell", "dense"):
            raise ValueError(f"ppo.policy must be cell or dense, got {self.policy!r}")
        self.inputs = policy_inputs(self.inputs, "ppo.inputs")
        self.prior = policy_prior(self.prior, "ppo.prior")
        if self.policy == "dense" and (self.inputs != SPATIAL_KEYS or self.prior is not None):
            raise ValueError("ppo.inputs and ppo.prior apply to the cell policy only")


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
        ppo: PPO settings.
        imitation: The imitation stage before PPO (:mod:`agents.imitation`; off unless
            ``rounds > 0``).
        agent: ``ppo`` (the paper's agent: a policy trained by PPO picks cells, the SRM labels
            them) or ``lookahead`` (:mod:`agents.lookahead`: candidates decoded with both
            labels, a mask judge picks; no PPO).
        lookahead: Settings of the lookahead agent.
        total_timesteps: Environment steps of training.
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
    srm_pretrain_epochs: int = 30
    ppo: PPOConfig = field(default_factory=PPOConfig)
    imitation: ImitationConfig = field(default_factory=ImitationConfig)
    agent: Literal["ppo", "lookahead"] = "ppo"
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    total_timesteps: int = 30_000
    eval_every: int = 3_000
    checkpoint_every: int = 1_500
    seed: int = 0

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
        """Build from a plain dict, rejecting unknown keys with the file and key named."""
        data = dict(data)
        try:
            nested = {
                "data": _build(DataConfig, data.pop("data", None), f"{where}: data"),
                "env": _build(EnvConfig, data.pop("env", {}) or {}, f"{where}: env"),
                "srm": _build(SRMConfig, data.pop("srm", {}) or {}, f"{where}: srm"),
                "ppo": _build(PPOConfig, data.pop("ppo", {}) or {}, f"{where}: ppo"),
                "imitation": _build(
                    ImitationConfig, data.pop("imitation", {}) or {}, f"{where}: imitation"
                ),
                "lookahead": _build(
                    LookaheadConfig, data.pop("lookahead", {}) or {}, f"{where}: lookahead"
                ),
            }
            return _build(cls, {**data, **nested}, where)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{where}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> TaskConfig:
        """Read a task YAML file."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read task file {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"task file {path} must hold a mapping of settings")
        raw.setdefault("name", path.stem)
        return cls.from_dict(raw, where=str(path))


def _build(cls: type, values: Any, where: str) -> Any:
    if values is None:
        raise ConfigError(f"{where}: missing (required)")
    if dataclasses.is_dataclass(values):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
