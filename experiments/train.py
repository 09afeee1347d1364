"""``alignsam train TASK``: train a prompt agent (PPO) and its SRM for one task.

Readable top to bottom: resolve the task, seed, build the frozen segmenter and data, pretrain
the SRM offline, build the envs, then PPO with validation, checkpoints and TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from agents.config import TaskConfig
from agents.features import GridFeaturesExtractor, cell_policy_class
from agents.imitation import (
    TeacherData,
    collect_round,
    fit_policy,
    policy_or_random,
    teacher_or_random,
)
from agents.prompt_agent import (
    AgentLoadError,
    PromptAgent,
    latest_checkpoint,
    load_policy,
    load_srm,
    ppo_class,
    read_meta,
)
from agents.training import (
    AlignSAMCallback,
    ProgressCallback,
    evaluate_agent,
    make_vec_env,
    train_env_config,
)
from envs import PointPromptEnv
from envs.data import Dataset
from experiments.answering import check_shifts
from experiments.datasets import shifted_copies
from experiments.lookahead import evaluate_lookahead, train_lookahead
from experiments.runs import (
    TASKS_DIR,
    load_split,
    load_train_split,
    new_run_dir,
    peak_memory_mb,
    resolve_task,
    seed_everything,
    skipped_by_split,
)
from recalibration.feature_set import FeatureSet
from recalibration.items import attach_semantic_maps, collect_items
from recalibration.srm import SemanticRecalibrationModule
from segmenter import EmbeddingCache, build_segmenter

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS_DIR",
    "evaluate_run",
    "imitate",
    "load_split",
    "load_train_split",
    "new_ppo",
    "new_run_dir",
    "resolve_task",
    "seed_everything",
    "train",
]


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def new_ppo(task: TaskConfig, venv: Any, tensorboard_log: str | None = None) -> Any:
    """A fresh PPO (or MaskablePPO) model with the task's policy and hyperparameters."""
    p = task.ppo
    if p.policy == "cell":
        policy: Any = cell_policy_class(p.maskable)
        policy_kwargs: dict[str, Any] = {
            "features_extractor_kwargs": {
                "channels": p.cnn_channels,
                "keys": list(p.inputs),
                "prior": p.prior,
            }
        }
    else:
        policy = "MultiInputPolicy"
        policy_kwargs = {
            "features_extractor_class": GridFeaturesExtractor,
            "features_extractor_kwargs": {
                "features_dim": p.features_dim,
                "channels": p.cnn_channels,
            },
            "net_arch": {"pi": [], "vf": [64]},
        }
    return ppo_class(p.maskable)(
        policy,
        venv,
        learning_rate=p.learning_rate,
        n_steps=p.n_steps,
        batch_size=p.batch_size,
        n_epochs=p.n_epochs,
        gamma=p.gamma,
        gae_lambda=p.gae_lambda,
        clip_range=p.clip_range,
        ent_coef=p.ent_coef,
        vf_coef=p.vf_coef,
        max_grad_norm=p.max_grad_norm,
        policy_kwargs=policy_kwargs,
        tensorboard_log=tensorboard_log,
        seed=task.seed,
        device=task.device,
        verbose=0,
    )


def train(
    task: TaskConfig,
    runs: Path = Path("runs"),
    resume: Path | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    total_timesteps: int | None = None,
    run_dir: Path | None = None,
    srm_init: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) a prompt agent. Returns a summary with the run folder and figures.

    ``run_dir`` names the new run's folder (default ``runs/{task}__ppo__{seed}__{time}``); it may
    exist already when it holds no checkpoint (a sweep trial killed before its first one).
    ``srm_init`` (a PPO run only) starts from an SRM saved by another run of the same task (a
    lookahead run's ``stages/srm.pt``) instead of pretraining one: two agents share one SRM."""
    if (task is not None and task.agent == "lookahead") or (
        resume is not None and _run_agent(resume) == "lookahead"
    ):
        return train_lookahead(
            task, runs=runs, resume=resume, cache_dir=cache_dir, progress=progress, run_dir=run_dir
        )
    t_start = time.perf_counter()
    start_step = 0
    best = -float("inf")
    ckpt = None
    meta: dict[str, Any] = {}  # the resumed checkpoint's meta.json
    if task is not None:  # every setting checked before anything loads or a folder is made
        task = TaskConfig.from_dict(task.to_dict(), where=f"task {task.name}")
    if resume is not None:
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise AgentLoadError(f"--resume {resume}: no checkpoint there yet; start a new run")
        meta = read_meta(ckpt)
        saved = TaskConfig.from_dict(meta["task"], where=f"{ckpt}/meta.json")
        if task is not None and task.name != saved.name:
            raise AgentLoadError(
                f"--resume {resume} is a run of task {saved.name!r}, not {task.name!r}: resume "
                "without a TASK (the run keeps its own config) or start a new run"
            )
        task = saved
        for stale in (resume / "checkpoints").glob(".*"):  # temp folders of a killed writer
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        start_step = int(meta["step"])
        best = float(meta.get("best_val_miou", best))
        run_dir = resume
        logger.info("resuming %s from step %d (%s)", run_dir, start_step, ckpt.name)
    total = total_timesteps or task.total_timesteps
    check_shifts(task.data.shifted_copies, "data.shifted_copies")
    seed_everything(task.seed + start_step)

    # Segmenter and data first: a bad checkpoint or file stops here, before a run folder exists.
    segmenter = build_segmenter(
        task.segmenter, checkpoint=task.checkpoint, device=task.device, autocast_bf16=task.bf16
    )
    cache = EmbeddingCache(cache_dir)
    train_set = load_train_split(task)
    val_set = load_split(task, "val") if task.data.val else None
    logger.info("train %d images, val %d", len(train_set), len(val_set) if val_set else 0)
    fresh = resume is None and (run_dir is None or not run_dir.exists())
    if resume is None and run_dir is None:
        run_dir = new_run_dir(runs, task)
    elif resume is None:
        if latest_checkpoint(run_dir) is not None:
            raise AgentLoadError(f"{run_dir} holds a run already: resume it or pick a new folder")
        run_dir.mkdir(parents=True, exist_ok=True)
    with _run_guard(run_dir, fresh):
        (run_dir / "config.json").write_text(json.dumps(task.to_dict(), indent=2, default=str))

        channels = int(segmenter.embedding_shape[0])
        features = None  # the SRM's feature sources besides the embedding (task.srm.features)
        if tuple(task.srm.features) != ("sam",):
            features = FeatureSet(task.srm.features, segmenter, cache)
        if ckpt is not None:
            srm = load_srm(
                ckpt,
                device=task.device,
                branch=task.srm.branch,
                embed_channels=channels,
                segmenter=segmenter,
                cache=cache,
            )
        elif srm_init is not None:
            srm = SemanticRecalibrationModule.load(
                srm_init, device=task.device, segmenter=segmenter, cache=cache
            )
            srm.config.online = task.srm.online  # this task's online updates during PPO
            logger.info("SRM from %s (not pretrained again)", srm_init)
        else:
            items = val_items = None
            if task.srm_pretrain_epochs > 0 or features is not None:
                kw = {"progress": progress, "features": features}
                items = collect_items(train_set, segmenter, cache, desc="train", **kw)
                copies = [c for _, c in shifted_copies(train_set, task.data.shifted_copies)]
                if copies and task.srm_pretrain_epochs > 0:  # the SRM's training set only
                    items += collect_items(copies, segmenter, cache, desc="shifted copies", **kw)
                if val_set:
                    val_items = collect_items(val_set, segmenter, cache, desc="val", **kw)
            if features is not None:
                channels = int(items[0][0].extras["srm_features"].shape[1])
            srm = SemanticRecalibrationModule(
                task.srm, channels, device=task.device, features=features
            )
            if task.srm_pretrain_epochs > 0:
                items = attach_semantic_maps(srm, items, [*train_set, *copies], progress=progress)
                if val_items is not None:
                    val_items = attach_semantic_maps(srm, val_items, val_set, progress=progress)
                srm.pretrain(
                    items,
                    epochs=task.srm_epochs(len(items)),
                    rng=task.seed,
                    val_items=val_items,
                    segmenter=segmenter,
                    progress=progress,
                )

        if ckpt is not None or srm_init is not None or task.srm_pretrain_epochs <= 0:
            # PPO starts at once: images not cached yet are encoded in the background while the
            # env consumes the ones that are (an env reset waits only for its own image).
            cache.prefetch(segmenter, [s.load_image for s in [*train_set, *(val_set or [])]])
        venv = make_vec_env(
            train_set, segmenter, srm, train_env_config(task), task.ppo.n_envs, cache, task.seed
        )
        if ckpt is not None:
            model = load_policy(ckpt, task.ppo.maskable, env=venv, device=task.device)
            model.set_random_seed(task.seed + start_step)
        else:
            model = new_ppo(task, venv, tensorboard_log=str(run_dir / "tb"))
        callback = AlignSAMCallback(run_dir, task, srm, segmenter, val_set, cache, best_score=best)
        callback.t0 = t_start  # the run's clock starts before SRM pretraining
        if ckpt is not None:  # a run from before this record started has no total: None
            callback.elapsed_before = meta.get("elapsed_seconds", float("nan"))
            callback.history = list(meta.get("history", []))
            callback.extra_meta["imitation_rounds"] = int(meta.get("imitation_rounds", 0))
        imitation: dict[str, Any] = {}
        if (
            task.imitation.rounds > callback.extra_meta.get("imitation_rounds", 0)
            and not start_step
        ):
            imitation = imitate(
                task, model, srm, segmenter, train_set, cache, run_dir, callback, progress
            )
        if ckpt is None and task.ppo.prior is not None and not imitation and callback.val_samples:
            # The starting policy is the prior's heuristic: score it, so that best-on-val keeps it
            # when PPO does not improve on it.
            callback.model, callback.num_timesteps = model, 0
            callback.evaluate(0, stage=f"prior {task.ppo.prior}")
        remaining = max(0, total - start_step)
        t_learn = time.perf_counter()
        if remaining:
            model.learn(
                total_timesteps=remaining,
                callback=[callback, ProgressCallback(remaining)] if progress else callback,
                tb_log_name="ppo",
                reset_num_timesteps=ckpt is None,
            )
        learn_seconds = time.perf_counter() - t_learn
        if not remaining:  # resumed at or past the total: the callback never started
            callback.init_callback(model)
        callback.save("latest")
        if (
            val_set is not None
            and (callback.history[-1:] or [{}])[0].get("step") != model.num_timesteps
        ):
            callback.evaluate(model.num_timesteps)
        summary = {
            "run_dir": str(run_dir),
            "agent": "ppo",
            "steps": int(model.num_timesteps),
            "start_step": start_step,
            "best_val_miou": callback.best_score,
            "history": callback.history,
            "learn_seconds": learn_seconds,
            "wall_seconds": time.perf_counter() - t_start,
            "train_seconds_total": _finite_or_none(callback.elapsed_seconds),
            "decoder_calls": segmenter.decoder_calls,
            "imitation": imitation,
            "skipped": skipped_by_split(train_set, val_set),
            "peak_memory_mb": peak_memory_mb(),
            "srm_init": None if srm_init is None else str(srm_init),
        }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_agent(run_dir: Path) -> str:
    """The agent kind of a run folder (from its ``config.json``; ``ppo`` when absent)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text()).get("agent", "ppo")
    except (OSError, ValueError, AttributeError):
        return "ppo"


@contextlib.contextmanager
def _run_guard(run_dir: Path, fresh: bool) -> Iterator[None]:
    """A run that fails or is interrupted says how to resume it; a new run folder without any
    checkpoint yet (nothing to resume) is removed instead of left half-made."""
    try:
        yield
    except BaseException as exc:
        if latest_checkpoint(run_dir) is not None:
            exc.add_note(f"resume with: alignsam train --resume {run_dir}")
        elif fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
            exc.add_note(f"removed {run_dir}: it held no checkpoint yet (nothing to resume)")
        raise


def imitate(
    task: TaskConfig,
    model: Any,
    srm: SemanticRecalibrationModule,
    segmenter: Any,
    train_set: Dataset,
    cache: EmbeddingCache,
    run_dir: Path,
    callback: AlignSAMCallback,
    progress: bool = True,
) -> dict[str, Any]:
    """The imitation stage (:mod:`agents.imitation`) before PPO, resumable by round.

    Episodes run as at test time (SRM start, frozen SRM labels) on the training images. Each
    round's states are saved under ``run_dir/imitation/`` while they are collected; after each
    round's fit, the policy is scored on val (``checkpoints/best`` when it is the best so far)
    and a ``latest`` checkpoint at step 0 records the rounds done, so ``--resume`` continues
    with the next round, or the unfinished one from its saved episodes.
    """
    cfg = task.imitation
    callback.model, callback.num_timesteps = model, 0  # callback.save/evaluate before learn()
    done = int(callback.extra_meta.get("imitation_rounds", 0))
    if done == 0:
        callback.save("latest")  # a resume point before the first (long) collection
    folder = run_dir / "imitation"
    env = PointPromptEnv(train_set, segmenter, srm, task.eval_env(), cache=cache)
    writer = SummaryWriter(str(run_dir / "tb" / "imitation"))
    parts = [TeacherData.load(folder / f"round{r}.npz") for r in range(done)]
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(done, cfg.rounds):
            t0 = time.perf_counter()
            path = folder / f"round{r}.npz"
            partial = TeacherData.load(path) if path.is_file() else None
            behaviour = (
                teacher_or_random(cfg.teacher_prob)
                if r == 0
                else policy_or_random(model.policy, cfg.policy_epsilon)
            )
            calls = segmenter.decoder_calls
            data = collect_round(
                env,
                behaviour,
                cfg,
                seed=task.seed * 1000 + r,
                resume=partial,
                save=lambda d, path=path: d.save(path),
                progress=progress,
            )
            parts.append(data)
            collect_seconds = time.perf_counter() - t0
            collect_calls = segmenter.decoder_calls - calls

            def log(tag: str, value: float, epoch: int, r: int = r) -> None:
                writer.add_scalar(f"{tag}/round{r}", value, epoch)

            figures = fit_policy(
                model.policy,
                TeacherData.concat(parts),
                cfg,
                seed=task.seed + r,
                log=log,
                progress=progress,
            )
            callback.extra_meta["imitation_rounds"] = r + 1
            val = (
                callback.evaluate(0, stage=f"imitation round {r}") if callback.val_samples else None
            )
            if val is not None:
                writer.add_scalar("imitation/val_miou", val, r)
            callback.save("latest")
            rounds.append(
                {
                    "round": r,
                    "states": len(data),
                    "collect_seconds": collect_seconds,
                    "collect_decoder_calls": collect_calls,
                    "seconds": time.perf_counter() - t0,
                    "val_miou": val,
                    **figures,
                }
            )
            logger.info("imitation round %d: %s", r, rounds[-1])
    finally:
        writer.close()
    return {"rounds": rounds}


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    limit: int | None = None,
    which: str = "best",
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Load a run's ``best`` (or ``latest``) agent and evaluate it on the task's ``split``."""
    agent = PromptAgent.load(run_dir, cache=EmbeddingCache(cache_dir), which=which)
    samples = load_split(agent.task, split)
    if getattr(agent, "kind", "ppo") == "lookahead":
        return evaluate_lookahead(agent, samples[:limit] if limit else samples)
    res = evaluate_agent(agent, samples, agent.cache, limit=limit)
    res.pop("overlay", None)
    return res
