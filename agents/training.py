"""Pieces of PPO training on the prompting env: vectorised envs, evaluation, callbacks."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium.wrappers import TimeLimit
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Image as TBImage
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.config import TaskConfig
from agents.prompt_agent import PromptAgent, write_checkpoint
from envs import EnvConfig, PointPromptEnv
from envs.render import overlay
from recalibration.labelers import Labeler
from segmenter import EmbeddingCache, Segmenter
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)


def make_vec_env(
    samples: Sequence[Any],
    segmenter: Segmenter,
    labeler: Labeler,
    config: EnvConfig,
    n_envs: int = 1,
    cache: EmbeddingCache | None = None,
    seed: int = 0,
) -> DummyVecEnv:
    """``n_envs`` monitored, time-limited envs in one process sharing segmenter, cache and SRM.

    One process on purpose: the SRM learns online from every env's steps, and a single shared
    module is what the agent is saved with. (Each env's decoder call already uses every core.)
    """

    def factory(rank: int) -> Callable[[], Any]:
        def build() -> Any:
            env = PointPromptEnv(samples, segmenter, labeler, config, cache=cache)
            env = TimeLimit(env, max_episode_steps=config.max_steps)
            return Monitor(env, info_keywords=("iou", "is_success"))

        return build

    venv = DummyVecEnv([factory(i) for i in range(n_envs)])
    venv.seed(seed)
    return venv


def evaluate_agent(
    agent: PromptAgent,
    samples: Sequence[Any],
    cache: EmbeddingCache | None = None,
    config: EnvConfig | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Deterministic automatic episodes on ``samples`` (SRM start, no online learning)."""
    config = config or agent.eval_config(full_res_eval=True)
    env = PointPromptEnv(samples, agent.segmenter, agent.srm, config, cache=cache)
    n = len(samples) if limit is None else min(limit, len(samples))
    ious, full = [], []
    first_overlay = None
    for i in range(n):
        info = agent.run_episode(env, i)
        ious.append(info["iou"])
        full.append(info.get("iou_full", info["iou"]))
        if i == 0:
            pts = np.array([p[:2] for p in info["prompts"]]).reshape(-1, 2)
            lbl = np.array([p[2] for p in info["prompts"]])
            s = samples[0]
            first_overlay = overlay(
                s.load_image(), env.current_mask(), pts, lbl, outline=getattr(s, "mask", None)
            )
    return {
        "miou_lowres": float(np.mean(ious)),
        "miou": float(np.mean(full)),
        "per_image": full,
        "overlay": first_overlay,
    }


class AlignSAMCallback(BaseCallback):
    """Logging, periodic validation, best-model keeping and resumable checkpoints.

    Logs ``rollout/final_iou`` and ``rollout/srm_loss`` every rollout, ``eval/miou`` and an
    overlay image every ``eval_every`` steps, keeps ``checkpoints/best`` (highest val mIoU)
    and writes ``checkpoints/step_N`` + ``latest`` every ``checkpoint_every`` steps, always at
    a rollout boundary so a resumed run continues exactly from a finished update.
    """

    def __init__(
        self,
        run_dir: Path,
        task: TaskConfig,
        srm: Any,
        segmenter: Segmenter,
        val_samples: Sequence[Any] | None,
        cache: EmbeddingCache | None,
        best_score: float = -math.inf,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.run_dir = Path(run_dir)
        self.task = task
        self.srm = srm
        self.segmenter = segmenter
        self.val_samples = val_samples
        self.cache = cache
        self.best_score = best_score
        self._final_ious: list[float] = []
        self._srm_losses: list[float] = []
        self._last_eval = -1
        self._last_ckpt = -1
        self.history: list[dict[str, Any]] = []
        #: Training seconds before this process (a resumed run's earlier sessions), so that
        #: checkpoints carry the run's total (``elapsed_seconds``).
        self.elapsed_before = 0.0
        self.t0 = time.perf_counter()
        #: Written into every checkpoint's ``meta.json`` (e.g. the imitation rounds done).
        self.extra_meta: dict[str, Any] = {}

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def _on_training_start(self) -> None:
        self._last_eval = self.num_timesteps
        self._last_ckpt = self.num_timesteps

    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        rewards = np.asarray(self.locals.get("rewards", ()), np.float64)
        for i in np.flatnonzero(~np.isfinite(rewards)):
            raise FloatingPointError(
                f"reward {rewards[i]} on sample {infos[i].get('sample_id')} at step "
                f"{self.num_timesteps}: stopping before it reaches the optimizer (check that "
                "image's embedding and mask)"
            )
        # The next observation is fed to the policy on the next step: a NaN there would turn
        # into NaN logits, and from the rollout buffer into the update.
        obs = self.locals.get("new_obs")
        for key, value in obs.items() if isinstance(obs, dict) else [("obs", obs)]:
            if value is None:
                continue
            bad = ~np.isfinite(np.asarray(value, np.float64).reshape(len(infos), -1)).all(axis=1)
            for i in np.flatnonzero(bad):
                raise FloatingPointError(
                    f"non-finite values in observation {key!r} of sample "
                    f"{infos[i].get('sample_id')} at step {self.num_timesteps}: stopping before "
                    "they reach the policy (check that image's embedding and the SRM's output)"
                )
        for info, done in zip(self.locals["infos"], self.locals["dones"], strict=True):
            loss = info.get("labeler/loss")
            if loss is not None:
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"SRM loss is {loss} on sample {info.get('sample_id')}: stopping before "
                        "non-finite values reach the optimizer"
                    )
                self._srm_losses.append(float(loss))
            if done:
                self._final_ious.append(float(info["iou"]))
        return True

    def _on_rollout_start(self) -> None:
        # Called after each PPO update: a non-finite loss there would have left NaN weights.
        for name, param in self.model.policy.named_parameters():
            if not torch.isfinite(param).all():
                raise FloatingPointError(
                    f"policy parameter {name!r} became non-finite in the PPO update before step "
                    f"{self.num_timesteps}: stopping (lower the learning rate, or resume from "
                    "the last checkpoint, which was written before the update)"
                )

    def _on_rollout_end(self) -> None:
        if self._final_ious:
            self.logger.record("rollout/final_iou", float(np.mean(self._final_ious)))
            self._final_ious.clear()
        if self._srm_losses:
            self.logger.record("rollout/srm_loss", float(np.mean(self._srm_losses)))
            self._srm_losses.clear()
        step = self.num_timesteps
        if self.val_samples and step - self._last_eval >= self.task.eval_every:
            self._last_eval = step
            self.evaluate(step)
        if step - self._last_ckpt >= self.task.checkpoint_every:
            self._last_ckpt = step
            self.save("latest")

    def evaluate(self, step: int, stage: str | None = None) -> float:
        """Val mIoU of the current policy; keeps ``checkpoints/best``. ``stage`` labels an
        evaluation outside PPO (the imitation rounds, which log to TensorBoard themselves)."""
        t0 = time.perf_counter()
        agent = PromptAgent(self.model, self.srm, self.task, self.segmenter, self.cache)
        res = evaluate_agent(agent, self.val_samples, self.cache)  # no online SRM updates
        score = res["miou"]
        if stage is None:
            self.logger.record("eval/miou", score)
            self.logger.record("eval/seconds", time.perf_counter() - t0)
            if res["overlay"] is not None:
                self.logger.record(
                    "eval/overlay",
                    TBImage(res["overlay"], "HWC"),
                    exclude=("stdout", "log", "json", "csv"),
                )
        self.history.append(
            {"step": step, "val_miou": score, **({"stage": stage} if stage else {})}
        )
        logger.info(
            "%s: val mIoU %.4f (best %.4f)",
            stage or f"step {step}",
            score,
            max(score, self.best_score),
        )
        if score > self.best_score:
            self.best_score = score
            self.save("best", extra={"val_miou": score})
        return score

    @property
    def elapsed_seconds(self) -> float:
        """Training wall time of the whole run so far, over every session."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def save(self, kind: str, extra: dict[str, Any] | None = None) -> Path:
        extra = {
            **self.extra_meta,
            "best_val_miou": self.best_score,
            "history": self.history,
            "elapsed_seconds": self.elapsed_seconds,
            **(extra or {}),
        }
        return write_checkpoint(
            self.ckpt_root,
            self.model,
            self.srm,
            self.task,
            self.num_timesteps,
            self.segmenter.model_id,
            extra=extra,
            name="best" if kind == "best" else None,
        )


class ProgressCallback(BaseCallback):
    """PPO's progress through the project's one progress layer (:mod:`segmenter.progress`):
    a live bar on a terminal, a few plain lines in a log file. Replaces SB3's own
    ``learn(progress_bar=...)`` (rich), which redraws itself into log files.

    Args:
        total: the steps this ``learn`` call will take.
        desc: the stage's name in the bar or line.
    """

    def __init__(self, total: int, desc: str = "PPO") -> None:
        super().__init__()
        self.total = int(total)
        self.desc = desc
        self.bar: Any = None

    def _on_training_start(self) -> None:
        self.bar = progress_bar(desc=self.desc, total=self.total, unit="step")

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_env_config(task: TaskConfig) -> EnvConfig:
    """The task's env settings for training episodes."""
    return dataclasses.replace(task.env, start=task.train_start, labeler_learns=True)
