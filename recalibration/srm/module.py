"""The SRM as a labeler: its foreground map, click labels and online updates.

Training (:mod:`recalibration.srm.training`) and the file format
(:mod:`recalibration.srm.persistence`) are mixins of the same class; the ONNX Runtime head
(:mod:`recalibration.srm.fast_head`) is switched on and off here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from recalibration.clip_surgery import ClipLoadError, ClipSurgery
from recalibration.feature_set import FeatureSet
from recalibration.labelers import EpisodeState, Labeler
from recalibration.srm.config import EPS, SRMConfig
from recalibration.srm.fast_head import OnnxHead
from recalibration.srm.heads import TTA_TRANSFORMS, ExplicitHead, ImplicitHead, dihedral, undihedral
from recalibration.srm.losses import dice_bce_loss, valid_mask
from recalibration.srm.persistence import PersistenceMixin
from recalibration.srm.training import TrainingMixin
from segmenter import onnx_backend
from segmenter.base import ImageEmbedding

logger = logging.getLogger(__name__)

__all__ = ["SemanticRecalibrationModule"]


class SemanticRecalibrationModule(TrainingMixin, PersistenceMixin, Labeler):
    """The learned labeler of AlignSAM (see the module docstring).

    Args:
        config: :class:`SRMConfig`.
        embed_channels: C of the segmenter's embedding (256 for SAM / MobileSAM).
        device: Torch device of the head.
        clip: A ready :class:`ClipSurgery` for the explicit branch (otherwise built from
            ``config.clip``).
        features: The stacked feature sources the head reads (``config.features``,
            :class:`~recalibration.feature_set.FeatureSet`); ``None`` for the segmenter's
            embedding alone (``embed_channels`` is then its channel count).

    Raises:
        ValueError: Explicit branch with an empty ``text``.
        ClipLoadError: Explicit branch without a usable CLIP (unless
            ``config.allow_implicit_fallback``, which logs a warning and runs implicit).
    """

    name = "srm"
    uses_ground_truth = False

    def __init__(
        self,
        config: SRMConfig,
        embed_channels: int,
        device: str | torch.device = "cpu",
        clip: ClipSurgery | None = None,
        features: FeatureSet | None = None,
    ) -> None:
        if embed_channels < 1:
            raise ValueError(f"embed_channels must be >= 1, got {embed_channels}")
        self.device = torch.device(device)
        self.embed_channels = int(embed_channels)
        self.feature_set = features
        if features is not None and tuple(features.names) != tuple(config.features):
            raise ValueError(
                f"the feature set {list(features.names)} is not the config's "
                f"features {list(config.features)}"
            )
        if features is None and tuple(config.features) != ("sam",):
            raise ValueError(
                f"SRMConfig.features={list(config.features)} needs a FeatureSet: build the SRM "
                "with features=FeatureSet(config.features, segmenter, cache)"
            )
        self.clip: ClipSurgery | None = None
        if config.branch == "explicit":
            config, self.clip = self._resolve_clip(config, clip)
        self.config = config
        #: Channels the head reads: ``config.reduce`` when the features are projected first.
        self.head_channels = int(config.reduce or embed_channels)
        head_channels = self.head_channels
        if config.branch == "explicit":
            self.head: nn.Module = ExplicitHead(
                head_channels,
                config.hidden,
                config.input_mode,
                config.dropout,
                config.attn_grid,
                config.attn_heads,
            )
        else:
            self.head = ImplicitHead(
                head_channels,
                config.hidden,
                config.input_mode,
                config.dropout,
                config.dilation,
                config.context,
            )
        self.head.to(self.device)
        # Input standardisation (``normalize="dataset"``) and logit calibration, saved with the
        # weights and never touched by the optimizer.
        self.channel_mean = torch.zeros(head_channels, device=self.device)
        self.channel_std = torch.ones(head_channels, device=self.device)
        # The input projection (``config.reduce``): fitted by ``fit_reduction`` at pretraining.
        self.reduce_mean: torch.Tensor | None = None  # (C,)
        self.reduce_std: torch.Tensor | None = None  # (C,)
        self.reduce_matrix: torch.Tensor | None = None  # (D, C)
        self.calibration = torch.tensor([1.0, 0.0], device=self.device)  # (scale, bias)
        self.optimizer = self._make_optimizer(config.lr)
        self._version = 0  # bumped whenever the weights change
        self._proj_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._pred_cache: tuple[tuple[Any, ...], np.ndarray] | None = None
        self._semantic: dict[tuple[str, str], np.ndarray] = {}
        self.online_updates = 0
        self._fast_threads = 0  # > 0: run the frozen head through ONNX Runtime (use_fast_head)
        self._fast_head: Any = None

    # -- construction helpers ---------------------------------------------------------------------
    @staticmethod
    def _resolve_clip(
        config: SRMConfig, clip: ClipSurgery | None
    ) -> tuple[SRMConfig, ClipSurgery | None]:
        if config.text is None or not config.text.strip():
            raise ValueError(
                "the explicit SRM branch needs a non-empty target name: SRMConfig(text='car')"
            )
        if clip is not None:
            return config, clip
        try:
            if config.clip is None:
                raise ClipLoadError(
                    "the explicit SRM branch needs a CLIP model: pass clip=ClipSurgery(...) or "
                    "set SRMConfig.clip=ClipSpec(arch='ViT-B-16', pretrained='openai') (or "
                    "weights=/path/to/open_clip_pytorch_model.bin)"
                )
            return config, ClipSurgery(config.clip)
        except ClipLoadError as exc:
            if not config.allow_implicit_fallback:
                raise
            logger.warning(
                "!!! explicit SRM for %r has no usable CLIP (%s); FALLING BACK TO THE IMPLICIT "
                "BRANCH (allow_implicit_fallback=True). Results are NOT those of the explicit "
                "method. !!!",
                config.text,
                exc,
            )
            return replace(config, branch="implicit"), None

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.head.parameters(), lr=lr, weight_decay=self.config.weight_decay
        )

    @property
    def branch(self) -> str:
        """The branch actually running (``implicit`` after a CLIP fallback)."""
        return self.config.branch

    def clear_cache(self) -> None:
        """Forget the cached image projection and prediction: the next :meth:`predict`
        recomputes both (as for a new image)."""
        self._proj_cache = None
        self._pred_cache = None

    def _touch(self) -> None:
        self._version += 1
        self._proj_cache = None
        self._pred_cache = None
        self._fast_head = None  # new weights: re-exported (or found by their hash) on next use

    # -- fast inference ---------------------------------------------------------------------------
    def use_fast_head(self, on: bool = True) -> bool:
        """Run the head through ONNX Runtime while its weights stay fixed (inference).

        With torch, the per-step head runs on one thread beside ONNX Runtime decoder calls
        (:func:`segmenter.base.small_torch_ops`); ONNX Runtime runs it on this process's torch
        thread count (taken now) without spinning threads. The first fast result is checked
        against the torch head; on a mismatch or a failed export the module warns and stays on
        torch. Online updates (:meth:`after_step` with ground truth) switch it off. Only the
        implicit head on the CPU; returns whether the fast head is on.
        """
        self._fast_threads, self._fast_head = 0, None
        if not on:
            return False
        if self.branch != "implicit" or self.device.type != "cpu":
            logger.debug("fast SRM head: only the implicit head on the CPU (%s)", self.branch)
            return False
        if not onnx_backend.available():
            return False
        self._fast_threads = torch.get_num_threads()
        return True

    @property
    def fast_head(self) -> bool:
        """Whether the head runs through ONNX Runtime (see :meth:`use_fast_head`)."""
        return self._fast_threads > 0

    def _weights_will_change(self, why: str) -> None:
        """Training: the fast head goes off (its export would be stale after every step)."""
        if self.fast_head:
            logger.info("SRM: %s, fast head off", why)
            self.use_fast_head(False)

    def _fast_off(self, reason: str) -> None:
        logger.warning("SRM: fast head off (%s); using the torch head", reason)
        self.use_fast_head(False)

    def _head_projected(self, proj: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``head.forward_projected`` in eval mode, through ONNX Runtime when it is on."""
        if self._fast_threads > 0 and not self.head.training:
            if self._fast_head is None:
                self._fast_head = OnnxHead(self.head, self._fast_threads)
            try:
                out = self._fast_head.run(proj, maps)
            except Exception as exc:  # noqa: BLE001 - any export / runtime failure: use torch
                self._fast_off(f"{type(exc).__name__}: {exc}")
            else:
                if self._fast_head.verified:
                    return out
                why = self._fast_head.check(out, self.head.forward_projected(proj, maps))
                if why is None:
                    return out
                self._fast_off(why)
        return self.head.forward_projected(proj, maps)

    # -- tensors ----------------------------------------------------------------------------------
    def _normalize(self, feats: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Standardise ``(B, C, H, W)`` features according to ``config.normalize``."""
        mode = self.config.normalize
        if mode == "dataset":
            return (feats - self.channel_mean.view(1, -1, 1, 1)) / self.channel_std.view(
                1, -1, 1, 1
            )
        if mode == "image":
            if valid is None:
                valid = torch.ones_like(feats[:, :1])
            n = valid.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
            mean = (feats * valid).sum(dim=(2, 3), keepdim=True) / n
            var = (((feats - mean) ** 2) * valid).sum(dim=(2, 3), keepdim=True) / n
            return (feats - mean) / (var + EPS).sqrt()
        return feats

    def semantic_map(self, state: EpisodeState) -> np.ndarray | None:
        """``(He, We)`` CLIP-Surgery map of ``config.text`` (explicit branch), memoised.

        Returns ``None`` for the implicit branch.

        Raises:
            RuntimeError: Explicit branch, the map is not memoised and the state cannot load
                the image.
        """
        if self.branch != "explicit":
            return None
        key = (state.embedding.image_hash or state.sample_id, str(self.config.text))
        if key not in self._semantic:
            if state.load_image is None:
                raise RuntimeError(
                    f"the explicit SRM needs the image of {state.sample_id!r} for its CLIP map, "
                    "but the episode state has no load_image; pass one or call remember_semantic"
                )
            assert self.clip is not None
            he, we = state.embedding.grid_size
            self._semantic[key] = self.clip.similarity_map(
                state.load_image(), str(self.config.text), out_size=(he, we)
            ).astype(np.float32)
        return self._semantic[key]

    def remember_semantic(self, emb: ImageEmbedding, semantic: np.ndarray) -> None:
        """Store a precomputed ``(He, We)`` semantic map of ``emb``'s image for ``config.text``."""
        self._semantic[(emb.image_hash, str(self.config.text))] = np.asarray(semantic, np.float32)

    def _maps(self, mask: torch.Tensor, semantic: torch.Tensor | None) -> torch.Tensor:
        """``(B, n_maps, H, W)`` from ``(B, H, W)`` mask (and semantic) maps."""
        if self.branch == "explicit":
            if semantic is None:
                raise RuntimeError("the explicit SRM needs a semantic map")
            return torch.stack([mask, semantic], dim=1)
        return mask[:, None]

    def _apply_calibration(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.calibration[0] + self.calibration[1]

    # -- prediction -------------------------------------------------------------------------------
    def raw_features(
        self, emb: ImageEmbedding, load_image: Callable[[], np.ndarray] | None = None
    ) -> torch.Tensor:
        """``(1, C, He, We)`` stacked features of ``emb``'s image before any projection:
        precomputed ones in ``emb.extras["srm_features"]``
        (:func:`~recalibration.items.collect_items`), else the feature set's (computed with
        ``load_image`` when not cached), else the embedding."""
        feats = emb.extras.get("srm_features")
        if feats is None:
            feats = emb.features if self.feature_set is None else self.feature_set(emb, load_image)
        if feats.shape[1] != self.embed_channels:
            raise ValueError(
                f"the SRM reads {self.embed_channels} feature channels but the features of image "
                f"{emb.image_hash[:12]} have {feats.shape[1]}: they come from another segmenter "
                "or feature sources than the SRM was trained on"
            )
        return feats

    def input_features(
        self, emb: ImageEmbedding, load_image: Callable[[], np.ndarray] | None = None
    ) -> torch.Tensor:
        """``(1, D, He, We)`` what the head reads: :meth:`raw_features`, projected to
        ``config.reduce`` channels when set."""
        feats = self.raw_features(emb, load_image)
        if not self.config.reduce:
            return feats
        if self.reduce_matrix is None:
            raise RuntimeError(
                "the SRM projects its features (reduce) but the projection is not fitted: "
                "pretrain it (or load a trained one)"
            )
        x = feats.to(self.device, torch.float32)
        x = (x - self.reduce_mean.view(1, -1, 1, 1)) / self.reduce_std.view(1, -1, 1, 1)
        return torch.einsum("dc,bchw->bdhw", self.reduce_matrix, x)

    @torch.inference_mode()
    def predict_logits(
        self, state: EpisodeState, semantic: np.ndarray | None = None
    ) -> torch.Tensor:
        """Calibrated ``(He, We)`` logits for the state's embedding and current mask."""
        self.head.eval()
        emb = state.embedding
        key = (id(emb), emb.features.data_ptr(), emb.image_hash, self._version)
        if self._proj_cache is not None and self._proj_cache[0] == key:
            proj = self._proj_cache[1]
        else:
            feats = self.input_features(emb, state.load_image).to(self.device, torch.float32)
            valid = torch.from_numpy(valid_mask(emb)).to(self.device)[None, None]
            proj = self.head.project(self._normalize(feats, valid))
            self._proj_cache = (key, proj)
        mask = torch.as_tensor(np.asarray(state.mask_prob, np.float32), device=self.device)[None]
        sem = None
        if self.branch == "explicit":
            s = semantic if semantic is not None else self.semantic_map(state)
            sem = torch.as_tensor(np.asarray(s, np.float32), device=self.device)[None]
        logits = self._infer(proj, self._maps(mask, sem))
        return self._apply_calibration(logits)[0, 0]

    def _infer(self, proj: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Head logits ``(B, 1, H, W)``, averaged over ``config.tta`` dihedral transforms.

        The 1x1 projection commutes with rotations and flips, so the cached projection is
        transformed instead of the embedding; the transforms run as one batch.
        """
        n = self.config.tta
        if n <= 1:
            return self._head_projected(proj, maps)
        b = proj.shape[0]
        ts = TTA_TRANSFORMS[:n]
        p = torch.cat([dihedral(proj, k, f) for k, f in ts])
        m = torch.cat([dihedral(maps, k, f) for k, f in ts])
        out = self._head_projected(p, m)
        back = [undihedral(out[i * b : (i + 1) * b], k, f) for i, (k, f) in enumerate(ts)]
        return torch.stack(back).mean(dim=0)

    def predict(self, state: EpisodeState, semantic: np.ndarray | None = None) -> np.ndarray:
        """Foreground probability of every embedding-grid cell.

        Args:
            state: The episode state (embedding, current ``mask_prob``).
            semantic: Optional ``(He, We)`` semantic map overriding the memoised CLIP map.

        Returns:
            ``(He, We)`` float32 calibrated probabilities, 0 on padding cells.
        """
        mp = np.ascontiguousarray(state.mask_prob, np.float32)
        emb = state.embedding
        key = (id(emb), emb.features.data_ptr(), emb.image_hash, self._version, hash(mp.tobytes()))
        if semantic is None and self._pred_cache is not None and self._pred_cache[0] == key:
            return self._pred_cache[1]
        prob = torch.sigmoid(self.predict_logits(state, semantic)).cpu().numpy()
        prob = (prob * valid_mask(state.embedding)).astype(np.float32)
        if semantic is None:
            self._pred_cache = (key, prob)
        return prob

    # -- Labeler API ------------------------------------------------------------------------------
    def begin(self, state: EpisodeState) -> None:
        """Start of an episode: compute (memoise) the semantic map for the explicit branch."""
        self._pred_cache = None
        if self.branch == "explicit":
            self.semantic_map(state)

    def foreground_map(self, state: EpisodeState) -> np.ndarray:
        """``(He, We)`` calibrated foreground probability (see :meth:`predict`)."""
        return self.predict(state)

    def label(self, state: EpisodeState, x: float, y: float) -> int:
        """1 when the probability of the grid cell holding pixel ``(x, y)`` is ``>= threshold``."""
        row, col = state.grid_cell(x, y)
        return int(self.predict(state)[row, col] >= self.config.threshold)

    def after_step(self, state: EpisodeState) -> dict[str, float]:
        """Online learning: ``q_steps`` optimizer steps of Dice + BCE on the current state.

        Only when ``config.online`` and the episode has ground truth (``state.gt_grid``);
        otherwise nothing happens and an empty dict is returned.

        Returns:
            ``{"loss": mean loss over the steps}`` (before each step), or ``{}``.
        """
        q = self.config.effective_q_steps
        if not self.config.online or state.gt_grid is None or q == 0:
            return {}
        self._weights_will_change("learning online")
        emb = state.embedding
        valid_np = valid_mask(emb)
        feats = self.input_features(emb, state.load_image).to(self.device, torch.float32)
        valid = torch.from_numpy(valid_np).to(self.device)[None, None]
        target = torch.as_tensor(np.asarray(state.gt_grid, np.float32), device=self.device)
        mask = torch.as_tensor(np.asarray(state.mask_prob, np.float32), device=self.device)
        sem = None
        if self.branch == "explicit":
            sem = torch.as_tensor(self.semantic_map(state), device=self.device)[None]
        maps = self._maps(mask[None], sem)
        e = self._normalize(feats, valid)
        losses = []
        self.head.train()
        for _ in range(q):
            logits = self.head(e, maps)
            loss = dice_bce_loss(logits, target[None, None], valid, self.config.dice_weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.head.eval()
        self.online_updates += q
        self._touch()
        return {"loss": float(np.mean(losses))}

    @torch.no_grad()
    def loss(self, state: EpisodeState) -> float:
        """Dice + BCE of the current (uncalibrated) prediction against ``state.gt_grid``."""
        if state.gt_grid is None:
            raise ValueError("loss needs state.gt_grid")
        self.head.eval()
        emb = state.embedding
        valid = torch.from_numpy(valid_mask(emb)).to(self.device)[None, None]
        feats = self.input_features(emb, state.load_image).to(self.device, torch.float32)
        e = self._normalize(feats, valid)
        mask = torch.as_tensor(np.asarray(state.mask_prob, np.float32), device=self.device)
        sem = None
        if self.branch == "explicit":
            sem = torch.as_tensor(self.semantic_map(state), device=self.device)[None]
        logits = self.head(e, self._maps(mask[None], sem))
        target = torch.as_tensor(np.asarray(state.gt_grid, np.float32), device=self.device)
        return float(dice_bce_loss(logits, target[None, None], valid, self.config.dice_weight))

    def describe(self) -> dict[str, Any]:
        """Config and sizes, for run folders and logs (JSON-able)."""
        n = sum(p.numel() for p in self.head.parameters())
        return {
            **self.config.to_dict(),
            "embed_channels": self.embed_channels,
            "parameters": n,
            "calibration": [float(v) for v in self.calibration],
            "clip": None if self.clip is None else self.clip.model_id,
        }
