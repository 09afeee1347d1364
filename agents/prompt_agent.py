"""A trained prompt agent: PPO policy + SRM + the task it was trained for.

Checkpoints are folders written atomically: the files go into a temporary sibling folder that
is renamed into place, and a small ``latest`` pointer file is replaced last. A run killed at
any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from agents.config import TaskConfig
from agents.lookahead import LookaheadAgent, LookaheadConfig
from envs import EnvConfig, PointPromptEnv
from envs.data import rgb_array
from recalibration.judge import JudgeError, MaskJudge
from recalibration.presence import PresenceGate, image_presence, initial_srm_map, nothing_here
from recalibration.srm import SemanticRecalibrationModule, SRMLoadError
from segmenter import EmbeddingCache, Segmenter, build_segmenter, onnx_backend
from segmenter.base import small_torch_ops
from segmenter.io import atomic_folder, atomic_write
from segmenter.session import PromptSession

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class AgentLoadError(RuntimeError):
    """A run folder or checkpoint cannot be loaded; the message says why and what to do."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint or a result depends on."""
    import gymnasium
    import stable_baselines3

    return {
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "numpy": np.__version__,
    }


def ppo_class(maskable: bool) -> type:
    """``MaskablePPO`` (sb3-contrib) when action masking is on, else SB3's ``PPO``."""
    if maskable:
        from sb3_contrib import MaskablePPO

        return MaskablePPO
    from stable_baselines3 import PPO

    return PPO


def write_meta(
    folder: Path,
    task: TaskConfig,
    step: int,
    segmenter_model_id: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """A checkpoint's ``meta.json``: format version, step, task, segmenter and library versions."""
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "task": task.to_dict(),
        "segmenter_model_id": segmenter_model_id,
        "versions": library_versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def write_checkpoint(
    ckpt_root: Path,
    model: Any,
    srm: SemanticRecalibrationModule,
    task: TaskConfig,
    step: int,
    segmenter_model_id: str,
    extra: dict[str, Any] | None = None,
    name: str | None = None,
    keep: int = 2,
) -> Path:
    """Write ``ckpt_root/{name or step_N}`` atomically and point ``ckpt_root/latest`` at it."""
    name = name or f"step_{step:09d}"

    def fill(folder: Path) -> None:
        model.save(folder / "agent.zip")
        srm.save(folder / "srm.pt")
        write_meta(folder, task, step, segmenter_model_id, extra)

    final = atomic_folder(ckpt_root / name, fill)
    if not name.startswith("step_"):
        return final
    atomic_write(ckpt_root / "latest", lambda fh: fh.write(name.encode()))
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder the ``latest`` pointer names, or ``None`` when the run has none yet. A pointer
    that is missing (a run killed between writing a checkpoint and its pointer), unreadable or
    naming no checkpoint falls back, with a warning, to the newest ``step_N`` folder that holds
    a ``meta.json``."""
    ckpts = run_dir / "checkpoints"
    pointer = ckpts / "latest"
    name = ""
    if pointer.is_file():
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        path = ckpts / name
        if name and "/" not in name and (path / "meta.json").is_file():
            return path
    steps = sorted(
        (p for p in ckpts.glob("step_*") if (p / "meta.json").is_file()),
        key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1,
    )
    if steps:
        why = f"names no checkpoint ({name[:40]!r})" if pointer.is_file() else "is missing"
        logger.warning("%s %s; using %s", pointer, why, steps[-1])
        return steps[-1]
    return None


def checkpoint_of(path: Path, which: str = "best") -> Path:
    """The checkpoint folder :meth:`PromptAgent.load` reads for ``path``: ``path`` itself when
    it is a checkpoint folder, else the run's ``best`` (``which="best"``, when it has one) or
    its ``latest``."""
    path = Path(path)
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    if not path.is_dir():
        raise AgentLoadError(
            f"{path}: no such run folder (give a run folder made by alignsam train)"
        )
    if (path / "meta.json").is_file():
        return path
    if which == "best" and (path / "checkpoints" / "best" / "meta.json").is_file():
        return path / "checkpoints" / "best"
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise AgentLoadError(
            f"{path} holds no alignsam checkpoint (expected meta.json, or a run folder with "
            "checkpoints/best or checkpoints/latest): pass a run folder made by alignsam train"
        )
    return ckpt


def checkpoint_fix(ckpt: Path) -> str:
    """What to do when the checkpoint folder ``ckpt`` cannot be loaded: use another checkpoint
    of the same run when there is one (``latest`` for a broken ``best``, the previous ``step_N``
    for a broken latest one), else train again."""
    ckpts, run = ckpt.parent, ckpt.parent.parent
    latest = latest_checkpoint(run) if ckpts.name == "checkpoints" else None
    if ckpt.name == "best" and latest is not None and latest != ckpt:
        return (
            f"try the latest checkpoint instead: --which latest (alignsam segment, evaluate), or "
            f"give {latest} as RUN"
        )
    others = sorted(
        (p for p in ckpts.glob("step_*") if p != ckpt and (p / "meta.json").is_file()),
        reverse=True,
    )
    if ckpts.name == "checkpoints" and others:
        return (
            f"an earlier checkpoint is kept: give {others[0]} as RUN, or make it the one "
            f"--resume continues from: echo {others[0].name} > {ckpts / 'latest'}"
        )
    return "this run holds no other checkpoint: train again (alignsam train)"


#: Keys every checkpoint's ``meta.json`` holds.
META_KEYS = ("format_version", "step", "task")


def read_meta(ckpt: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, checked: readable JSON, an object with the keys every
    checkpoint has, this format version. Errors name the file, what is wrong and the fix."""
    path = ckpt / "meta.json"
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise AgentLoadError(
            f"{ckpt} is not an alignsam checkpoint (no meta.json): {checkpoint_fix(ckpt)}"
        ) from None
    except OSError as exc:
        raise AgentLoadError(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AgentLoadError(
            f"{path} is damaged: not JSON text ({type(exc).__name__}: {exc}); "
            f"{checkpoint_fix(ckpt)}"
        ) from exc
    if not isinstance(meta, dict):
        raise AgentLoadError(
            f"{path} is damaged: it holds a JSON {type(meta).__name__}, not an object; "
            f"{checkpoint_fix(ckpt)}"
        )
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise AgentLoadError(
            f"{path} is damaged or not an alignsam checkpoint file: it lacks "
            f"{', '.join(missing)}; {checkpoint_fix(ckpt)}"
        )
    version = meta["format_version"]
    if version != FORMAT_VERSION:
        raise AgentLoadError(
            f"{path} has checkpoint format {version!r}, this alignsam ({_version()}) reads "
            f"{FORMAT_VERSION}: load it with the alignsam version that wrote it"
        )
    return meta


def load_policy(ckpt: Path, maskable: bool, **kwargs: Any) -> Any:
    """The SB3 model of a checkpoint (``agent.zip``); a missing or damaged file raises
    :class:`AgentLoadError` naming it and the fix."""
    path = ckpt / "agent.zip"
    if not path.is_file():
        raise AgentLoadError(f"{path} is missing; {checkpoint_fix(ckpt)}")
    try:
        return ppo_class(maskable).load(path, **kwargs)
    except (ValueError, KeyError, OSError, EOFError, RuntimeError, zipfile.BadZipFile) as exc:
        raise AgentLoadError(
            f"{path} is damaged: not a readable SB3 policy file ({type(exc).__name__}: "
            f"{str(exc)[:200]}); {checkpoint_fix(ckpt)}"
        ) from exc


def load_srm(ckpt: Path, **kwargs: Any) -> SemanticRecalibrationModule:
    """The SRM of a checkpoint (``srm.pt``); a missing or damaged file raises
    :class:`AgentLoadError` naming it and the fix."""
    try:
        return SemanticRecalibrationModule.load(ckpt / "srm.pt", **kwargs)
    except SRMLoadError as exc:
        if not exc.damaged:
            raise
        raise AgentLoadError(f"{exc.problem}; {checkpoint_fix(ckpt)}") from exc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alignsam")
    except PackageNotFoundError:
        return "unknown version"


class PromptAgent:
    """Automatic segmentation with a trained agent: SRM initial points, then T policy clicks.

    Args:
        model: The SB3 (Maskable)PPO model.
        srm: The trained SRM (kept frozen here: no online updates without ground truth).
        task: The task configuration it was trained with.
        segmenter: The frozen segmenter (must match the one used in training).
        cache: Optional embedding cache.
    """

    def __init__(
        self,
        model: Any,
        srm: SemanticRecalibrationModule,
        task: TaskConfig,
        segmenter: Segmenter,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.model = model
        self.srm = srm
        self.task = task
        self.segmenter = segmenter
        self.cache = cache
        self.maskable = task.ppo.maskable
        self._fast_policy: Any = None
        #: The run's "nothing here" threshold (``presence.json``), ``None`` when it has none.
        self.presence: PresenceGate | None = None

    def use_fast_policy(self, on: bool = True) -> bool:
        """Deterministic actions through ONNX Runtime (:mod:`agents.fast_policy`), checked
        against torch on first use and after any change to the weights; :meth:`load` turns it
        on when the segmenter is on the fast path. Returns whether it is on."""
        self._fast_policy = None
        if on and onnx_backend.available():
            from agents.fast_policy import OnnxPolicy

            self._fast_policy = OnnxPolicy(self.model.policy)
        return self._fast_policy is not None

    @property
    def fast_policy(self) -> bool:
        """Whether deterministic actions go through ONNX Runtime."""
        return self._fast_policy is not None

    @classmethod
    def load(
        cls,
        path: str | Path,
        segmenter: Segmenter | None = None,
        device: str | None = None,
        cache: EmbeddingCache | None = None,
        which: str = "best",
    ) -> PromptAgent | LookaheadAgent:
        """Load from a run folder (its ``best`` or ``latest`` checkpoint) or a checkpoint folder.

        A run of ``agent: lookahead`` loads as a :class:`~agents.lookahead.LookaheadAgent`
        (the same ``segment`` / ``segment_detailed`` / ``srm`` / ``task`` interface)."""
        path = Path(path)
        ckpt = checkpoint_of(path, which)
        meta = read_meta(ckpt)
        task = TaskConfig.from_dict(meta["task"], where=f"{ckpt}/meta.json")
        device = device or task.device
        if segmenter is None:
            segmenter = build_segmenter(
                task.segmenter, checkpoint=task.checkpoint, device=device, autocast_bf16=task.bf16
            )
        want = meta.get("segmenter_model_id")
        # The policy and SRM read the embeddings: a decoder-only fine-tune of the same base
        # (same embedding_id) is a fair target, anything else is not.
        if want and want not in (segmenter.model_id, segmenter.embedding_id):
            raise AgentLoadError(
                f"{ckpt} was trained with segmenter {want}, but {segmenter.model_id} is loaded: "
                "agents are tied to their segmenter's embeddings; use the same checkpoint"
            )
        srm = load_srm(
            ckpt,
            device=device,
            branch=task.srm.branch,
            embed_channels=int(segmenter.embedding_shape[0]),
            online=False,
            segmenter=segmenter,
            cache=cache,
        )
        fast = getattr(segmenter, "backend", None) == "onnx"
        srm.use_fast_head(fast)  # frozen: inference
        if meta.get("agent") == "lookahead":
            agent = _lookahead_agent(ckpt, srm, task, segmenter, cache)
        else:
            model = load_policy(ckpt, task.ppo.maskable, device=device)
            agent = cls(model, srm, task, segmenter, cache)
            agent.use_fast_policy(fast and model.device.type == "cpu")
        try:
            agent.presence = PresenceGate.load(path) or PresenceGate.load(ckpt)
        except ValueError as exc:  # a broken presence.json: a bad run folder, not a crash
            raise AgentLoadError(str(exc)) from exc
        return agent

    def eval_config(self, **changes: Any) -> EnvConfig:
        """The task's env settings for evaluation (:meth:`TaskConfig.eval_env`)."""
        return self.task.eval_env(**changes)

    def act(
        self, env: PointPromptEnv, obs: dict[str, np.ndarray], deterministic: bool = True
    ) -> int:
        """The policy's action for ``obs`` (respecting action masks when maskable)."""
        masks = env.action_masks() if self.maskable else None
        if deterministic and self._fast_policy is not None:
            action = self._fast_act(obs, masks)
            if action is not None:
                return action
        kwargs = {"action_masks": masks} if self.maskable else {}
        with small_torch_ops(self.segmenter):
            action, _ = self.model.predict(obs, deterministic=deterministic, **kwargs)
        return int(action)

    def _fast_act(self, obs: dict[str, np.ndarray], masks: np.ndarray | None) -> int | None:
        """The deterministic action from the ONNX Runtime policy: the argmax of the allowed
        logits, SB3's mode (logits within float rounding of each other, as an untrained head
        gives, may break the tie differently from SB3's softmax), or ``None`` after switching
        the fast policy off. SB3's distribution objects would cost as much as the graph."""
        fast = self._fast_policy
        try:
            logits = fast.logits(obs)
            why = None if fast.verified else fast.check(logits, obs)
        except Exception as exc:  # noqa: BLE001 - any export / runtime failure: use torch
            why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            logger.warning("policy: fast path off (%s); using torch", why)
            self._fast_policy = None
            return None
        if masks is not None:
            logits = np.where(masks, logits, -np.inf)
        return int(np.argmax(logits))

    def run_episode(
        self, env: PointPromptEnv, index: int, steps: int | None = None, deterministic: bool = True
    ) -> dict[str, Any]:
        """One automatic episode on ``env.samples[index]``; returns the final info."""
        obs, info = env.reset(options={"index": index})
        steps = env.config.max_steps if steps is None else steps
        for t in range(steps):
            action = self.act(env, obs, deterministic)
            if t == steps - 1:  # nothing reads the observation after the last click
                _, info = env.final_step(action)
            else:
                obs, _, _, _, info = env.step(action)
        return info

    def segment(
        self,
        image: np.ndarray | Image.Image | str | os.PathLike[str],
        steps: int | None = None,
        return_session: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, PromptSession]:
        """Segment one image with no human input.

        Args:
            image: ``(H, W, 3)`` uint8 RGB array, a PIL image or an image file's path (read
                as :func:`envs.data.rgb_array` does: EXIF orientation, alpha dropped, ...).
            steps: Agent clicks (default T of the task; 0: the SRM's start points only).
            return_session: Also return the :class:`~segmenter.session.PromptSession` the
                agent ended in: a person's clicks go on from the agent's prompts and mask
                (``session.click(x, y, label)``, ``session.undo()``, ``session.current_mask()``),
                one decoder call each on the image's embedding.

        Returns:
            ``mask`` ``(H, W)`` bool and ``clicks`` ``(N, 3)`` float array of ``(x, y, label)``
            (the two SRM initial points first, then the agent's clicks); with
            ``return_session``, the session third.
        """
        out = self.segment_detailed(image, steps)
        if return_session:
            return out["mask"], out["clicks"], out["session"]
        return out["mask"], out["clicks"]

    def segment_detailed(
        self,
        image: np.ndarray | Image.Image | str | os.PathLike[str],
        steps: int | None = None,
        presence_threshold: float | None = None,
    ) -> dict[str, Any]:
        """:meth:`segment` plus ``score`` (mean decoder foreground probability inside the
        mask), ``presence`` (:func:`~recalibration.presence.presence_score`), ``no_target``,
        ``encode_seconds`` (0 when the embedding came from the cache), ``decoder_calls`` and
        ``session`` (see :meth:`segment`). An image whose presence score is below
        ``presence_threshold`` gets an empty mask and no clicks without an episode."""
        image = rgb_array(image)
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0 (agent clicks), got {steps}")
        t0 = time.perf_counter()
        hits = self.cache.hits if self.cache is not None else 0
        emb = (
            self.cache.get_or_encode(self.segmenter, image)
            if self.cache is not None
            else self.segmenter.encode(image)
        )
        cached = self.cache is not None and self.cache.hits > hits
        encode_seconds = 0.0 if cached else time.perf_counter() - t0
        s_map = initial_srm_map(self.srm, self.segmenter, emb, lambda: image)
        presence = image_presence(self.presence, s_map, emb)
        if presence_threshold is not None and presence < presence_threshold:
            return nothing_here(image.shape[:2], presence, encode_seconds)
        calls = getattr(self.segmenter, "decoder_calls", 0)
        env = PointPromptEnv(
            [_InMemory("image", image)], self.segmenter, self.srm, self.eval_config(), _Encoded(emb)
        )
        info = self.run_episode(env, 0, steps)
        return {
            "mask": env.current_mask(),
            "clicks": np.array(info["prompts"], np.float32).reshape(-1, 3),
            "score": env.mask_score(),
            "presence": presence,
            "no_target": False,
            "encode_seconds": encode_seconds,
            "decoder_calls": int(getattr(self.segmenter, "decoder_calls", 0) - calls),
            "session": env.session,
        }


def _lookahead_agent(
    ckpt: Path, srm: SemanticRecalibrationModule, task: TaskConfig, segmenter: Any, cache: Any
) -> LookaheadAgent:
    """The lookahead agent of checkpoint folder ``ckpt`` (its SRM already loaded)."""
    try:
        config = LookaheadConfig(**json.loads((ckpt / "lookahead.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise AgentLoadError(
            f"{ckpt}/lookahead.json is missing or corrupt ({exc}); train the agent again"
        ) from exc
    try:  # value.json: the value model of ``keep: valued`` (runs trained before have none)
        judge = MaskJudge.load(ckpt / "judge.json")
        value = MaskJudge.load(ckpt / "value.json") if (ckpt / "value.json").is_file() else None
    except JudgeError as exc:
        raise AgentLoadError(str(exc)) from exc
    return LookaheadAgent(segmenter, srm, judge, config, task, cache, value)


@dataclasses.dataclass(frozen=True)
class _Encoded:
    """A one-entry :class:`~segmenter.EmbeddingCache`: the embedding already computed."""

    embedding: Any

    def get_or_encode(self, segmenter: Segmenter, image: np.ndarray) -> Any:
        return self.embedding


@dataclasses.dataclass(frozen=True)
class _InMemory:
    id: str
    image: np.ndarray
    mask: None = None

    def load_image(self) -> np.ndarray:
        return self.image
