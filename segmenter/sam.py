"""A frozen SAM-family model behind the encode-once / decode-many contract."""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from segmenter.base import ImageEmbedding, Prediction, SegmenterError

logger = logging.getLogger(__name__)


def image_hash(image: np.ndarray) -> str:
    """Content hash of an RGB pixel array (shape and bytes), used as the cache key."""
    digest = hashlib.sha256()
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:32]


def check_image(image: np.ndarray) -> None:
    """Raise a clear error unless ``image`` is an ``(H, W, 3)`` uint8 RGB array."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}; "
            "load images with envs.data.load_image, which converts grayscale/RGBA/16-bit"
        )
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")


BACKENDS = ("auto", "torch", "onnx")


class SamSegmenter:
    """Frozen SAM / MobileSAM: one encoder pass per image, one decoder call per prompt set.

    Args:
        model: A ``Sam`` module from ``segment_anything`` or ``mobile_sam`` (same interface).
        model_id: Identifier recorded in embeddings and cache keys.
        device: Torch device for both encoder and decoder.
        autocast_bf16: Run encoder and decoder under CPU/GPU bf16 autocast (outputs are float32).
        backend: ``torch`` is the stock eager path, the reference. ``onnx`` runs the same
            weights through ONNX Runtime (:mod:`segmenter.onnx_backend`, CPU, fp32). ``auto``
            (default) takes ``onnx`` on the CPU without bf16 when onnxruntime is installed.
            The first fast encode and decode of a process are checked against the stock path;
            on a mismatch (or a failed export) the segmenter warns and stays on ``torch``.
    """

    def __init__(
        self,
        model: nn.Module,
        model_id: str,
        device: str | torch.device = "cpu",
        autocast_bf16: bool = False,
        backend: str = "auto",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.model_id = model_id
        #: Identifier of what the encoder computes: the cache key and the ``model_id`` of the
        #: embeddings this segmenter makes and accepts. A decoder-only fine-tune
        #: (:mod:`segmenter.finetune`) changes ``model_id`` but keeps this, so cached embeddings
        #: of the base model stay valid.
        self.embedding_id = model_id
        self.variant: str | None = None
        self.autocast_bf16 = autocast_bf16
        self.img_size: int = int(model.image_encoder.img_size)
        self._transform = ResizeLongestSide(self.img_size)
        with torch.inference_mode():
            self._dense_pe = model.prompt_encoder.get_dense_pe()  # constant: compute once
        self.decoder_calls = 0
        self.decoder_seconds = 0.0
        self.encoder_calls = 0
        self._fast = None
        self._stages_module: nn.Module | None = None
        self._verified: set[str] = set()
        self.backend = self._resolve_backend(backend)

    def weights_changed(self, model_id: str, embedding_id: str, variant: str) -> None:
        """Record new weights (a fine-tuning delta applied to ``self.model``): new identifiers,
        the constant positional encoding recomputed, the fast path re-exported and re-checked."""
        self.model_id, self.embedding_id, self.variant = model_id, embedding_id, variant
        self.model.eval().requires_grad_(False)
        with torch.inference_mode():
            self._dense_pe = self.model.prompt_encoder.get_dense_pe()
        self._verified.clear()
        if self._fast is not None:
            from segmenter import onnx_backend

            self._fast = onnx_backend.OnnxParts(self.model, self.embedding_id, self._dense_pe)

    # -- backend ----------------------------------------------------------------------------
    def _resolve_backend(self, backend: str) -> str:
        from segmenter import onnx_backend

        if backend not in BACKENDS:
            raise SegmenterError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if backend == "torch":
            return "torch"
        why = None
        if self.device.type != "cpu":
            why = f"it runs on the CPU only, this segmenter is on {self.device}"
        elif self.autocast_bf16:
            why = "it is fp32; bf16 autocast was asked for"
        elif not onnx_backend.available():
            why = "onnxruntime / onnx are not installed (pip install onnxruntime onnx)"
        if why is not None:
            if backend == "onnx":
                raise SegmenterError(f"backend 'onnx' is not available: {why}; use 'torch'")
            return "torch"
        self._fast = onnx_backend.OnnxParts(self.model, self.model_id, self._dense_pe)
        return "onnx"

    def _fall_back(self, what: str, reason: str) -> None:
        logger.warning(
            "%s: fast %s path off (%s); using the stock torch path", self.model_id, what, reason
        )
        self._fast = None
        self.backend = "torch"

    def _agrees(self, what: str, fast: torch.Tensor, stock: torch.Tensor) -> bool:
        """Compare the first fast result of a kind with the stock one (once per process)."""
        from segmenter.onnx_backend import disagreement

        self._verified.add(what)
        why = disagreement(fast, stock)
        if why is not None:
            self._fall_back(what, f"its output {why} from stock")
            return False
        return True

    # -- geometry ---------------------------------------------------------------------------
    def input_size_for(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` after scaling the longest side to the encoder's input size."""
        h, w = original_size
        return ResizeLongestSide.get_preprocess_shape(h, w, self.img_size)

    @property
    def low_res_size(self) -> tuple[int, int]:
        """Side of the decoder's low-res logits (4 x the embedding grid)."""
        h, w = self.model.prompt_encoder.mask_input_size
        return int(h), int(w)

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """``(C, He, We)`` of the image embedding."""
        he, we = self.model.prompt_encoder.image_embedding_size
        return int(self.model.prompt_encoder.embed_dim), int(he), int(we)

    def _autocast(self):
        if not self.autocast_bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # -- encode -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, image: np.ndarray, stages: bool = False) -> ImageEmbedding:
        """Encode an image once.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            stages: Also keep the encoder's intermediate stages on the embedding grid
                (:mod:`segmenter.stages`), in ``extras["stages"]`` as ``(1, Cs, He, We)``; the
                same encoder pass, no extra cost but memory.

        Returns:
            The embedding with ``features`` of shape ``(1, C, He, We)`` (float32, on device).
        """
        x = self.encoder_input(image)  # checks the image first
        original_size = (int(image.shape[0]), int(image.shape[1]))
        input_size = self.input_size_for(original_size)
        inner = None
        out = self._encode_fast(x, stages) if self._fast is not None else None
        if out is None:
            with self._autocast():
                if stages:
                    out = self._with_stages()(x)
                else:
                    out = self.model.image_encoder(x)
        feats = out[0] if stages else out
        if stages:
            inner = out[1].float()
        self.encoder_calls += 1
        emb = ImageEmbedding(
            features=feats.float(),
            original_size=original_size,
            input_size=input_size,
            model_id=self.embedding_id,
            image_hash=image_hash(image),
        )
        if inner is not None:
            emb.extras["stages"] = inner
        return emb

    @property
    def stages_id(self) -> str:
        """Identifier of the encoder's stages (:meth:`encode` with ``stages=True``): the cache
        key of their entries."""
        return f"{self.embedding_id}.stages"

    def _with_stages(self) -> nn.Module:
        from segmenter.stages import EncoderWithStages

        if self._stages_module is None:
            he, we = self.embedding_shape[1:]
            self._stages_module = EncoderWithStages(self.model.image_encoder, (he, we))
        return self._stages_module

    def encoder_input(self, image: np.ndarray) -> torch.Tensor:
        """``(1, 3, S, S)`` encoder input of an ``(H, W, 3)`` uint8 RGB image: SAM's own resize
        (``ResizeLongestSide.apply_image``, through PIL, as ``SamPredictor`` does), normalised
        and padded bottom / right to the square input."""
        check_image(image)
        resized = self._transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
        return self.model.preprocess(x)

    def _encode_fast(self, x: torch.Tensor, stages: bool = False) -> Any:
        """The fast encoder's output (with ``stages``: ``(embedding, stages)``), or ``None`` to
        use stock."""
        what = "encode_stages" if stages else "encode"
        try:
            out = self._fast.encode_stages(x) if stages else self._fast.encode(x)
        except Exception as exc:  # noqa: BLE001 - any export / runtime failure: use stock
            self._fall_back("encode", f"{type(exc).__name__}: {exc}")
            return None
        if what not in self._verified:
            if stages:
                stock = self._with_stages()(x)
                ok = self._agrees(what, out[0], stock[0]) and self._agrees(what, out[1], stock[1])
            else:
                stock = self.model.image_encoder(x)
                ok = self._agrees(what, out, stock)
            if not ok:
                return stock
        if stages:
            return out[0].to(self.device), out[1].to(self.device)
        return out.to(self.device)

    # -- decode -----------------------------------------------------------------------------
    def _coords(self, embedding: ImageEmbedding, points: np.ndarray) -> torch.Tensor:
        h, w = embedding.original_size
        nh, nw = embedding.input_size
        pts = torch.as_tensor(np.asarray(points, dtype=np.float32), device=self.device)
        scale = torch.tensor([nw / w, nh / h], device=self.device)
        return (pts * scale)[None]

    @torch.inference_mode()
    def decode(
        self,
        embedding: ImageEmbedding,
        points: np.ndarray,
        labels: np.ndarray,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
        return_full: bool = False,
    ) -> Prediction:
        """Decode one prompt set: exactly one prompt-encoder + mask-decoder call.

        Args:
            embedding: From :meth:`encode` (or the cache) for this segmenter.
            points: ``(N, 2)`` float ``(x, y)`` pixel coordinates in the original image.
            labels: ``(N,)`` ints, 1 = foreground, 0 = background.
            mask_input: Optional ``(Hl, Wl)`` or ``(1, 1, Hl, Wl)`` previous low-res logits.
            multimask: Return SAM's three candidates and select the highest-scoring one
                (SAM's advice for a single ambiguous click); otherwise the single-mask head.
            return_full: Also compute the full-resolution boolean mask.

        Returns:
            The prediction; ``low_res_logits`` is ``(Hl, Wl)`` float32.
        """
        if embedding.model_id != self.embedding_id:
            raise SegmenterError(
                f"embedding was made by {embedding.model_id!r}, this segmenter encodes as "
                f"{self.embedding_id!r}: re-encode the image with this segmenter"
            )
        points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(labels).reshape(-1)
        if len(points) != len(labels):
            raise ValueError(f"{len(points)} points but {len(labels)} labels")
        t0 = time.perf_counter()
        coords = self._coords(embedding, points)
        lbl = torch.as_tensor(labels.astype(np.int64), device=self.device)[None]
        if mask_input is not None:
            mask_input = mask_input.to(self.device, torch.float32).reshape(1, 1, *self.low_res_size)
        fast = None
        if self._fast is not None and len(points):  # no points: the stock path (padding rule)
            fast = self._decode_fast(embedding, coords, labels, mask_input)
        if fast is not None:
            masks, ious = fast
            keep = slice(1, None) if multimask else slice(0, 1)
            low_res, iou = masks[keep], ious[keep]
        else:
            low_res, iou = self._decode_stock(embedding, coords, lbl, mask_input, multimask)
        best = int(torch.argmax(iou)) if multimask else 0
        self.decoder_calls += 1
        self.decoder_seconds += time.perf_counter() - t0
        pred = Prediction(
            low_res_logits=low_res[best],
            score=float(iou[best]),
            candidates=low_res,
            candidate_scores=iou,
        )
        if return_full:
            pred.mask = self.upscale(embedding, pred.low_res_logits)
        return pred

    def _decode_stock(
        self,
        embedding: ImageEmbedding,
        coords: torch.Tensor,
        lbl: torch.Tensor,
        mask_input: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            sparse, dense = self.model.prompt_encoder(
                points=(coords, lbl) if lbl.shape[1] else None, boxes=None, masks=mask_input
            )
            low_res, iou = self.model.mask_decoder(
                image_embeddings=embedding.features.to(self.device),
                image_pe=self._dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return low_res[0].float(), iou[0].float()

    def _decode_fast(
        self,
        embedding: ImageEmbedding,
        coords: torch.Tensor,
        labels: np.ndarray,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All four masks and scores from the fast path, or ``None`` to use stock."""
        try:
            masks, ious = self._fast.decode(
                embedding.features, coords[0].cpu().numpy(), labels, mask_input
            )
        except Exception as exc:  # noqa: BLE001 - any export / runtime failure: use stock
            self._fall_back("decode", f"{type(exc).__name__}: {exc}")
            return None
        what = "decode_mask" if mask_input is not None else "decode"
        if what not in self._verified:
            lbl = torch.as_tensor(labels.astype(np.int64), device=self.device)[None]
            single, _ = self._decode_stock(embedding, coords, lbl, mask_input, False)
            multi, _ = self._decode_stock(embedding, coords, lbl, mask_input, True)
            if not self._agrees(what, masks, torch.cat([single, multi])):
                return None
        return masks, ious

    @torch.inference_mode()
    def decode_batch(
        self,
        embedding: ImageEmbedding,
        points: np.ndarray,
        labels: np.ndarray,
        mask_input: torch.Tensor | None = None,
    ) -> list[Prediction]:
        """Decode ``B`` prompt sets of ``N`` points each against one embedding and one mask
        input, single-mask head (the candidates of a lookahead step).

        On the stock path this is one prompt-encoder + mask-decoder call over a batch of ``B``
        (SAM's decoder takes several prompt sets per image); the fast path runs its graph once
        per set (it is built for one set: the image-side work, the bulk of a call, depends on
        each set's tokens, so a batch shares little of it on a CPU). Counts ``B`` decoder calls.

        Args:
            embedding: The image's embedding.
            points: ``(B, N, 2)`` ``(x, y)`` points in original pixels.
            labels: ``(B, N)`` labels.
            mask_input: Optional ``(Hl, Wl)`` low-res logits shared by every set.
        """
        points = np.asarray(points, np.float32)
        labels = np.asarray(labels)
        if points.ndim != 3 or points.shape[-1] != 2 or labels.shape != points.shape[:2]:
            raise ValueError(
                f"decode_batch needs points (B, N, 2) and labels (B, N), got {points.shape} and "
                f"{labels.shape}"
            )
        if self._fast is not None or not len(points) or not points.shape[1]:
            pairs = zip(points, labels, strict=True)
            return [self.decode(embedding, p, lab, mask_input) for p, lab in pairs]
        if embedding.model_id != self.embedding_id:
            raise SegmenterError(
                f"embedding was made by {embedding.model_id!r}, this segmenter encodes as "
                f"{self.embedding_id!r}: re-encode the image with this segmenter"
            )
        t0 = time.perf_counter()
        b = len(points)
        h, w = embedding.original_size
        nh, nw = embedding.input_size
        scale = torch.tensor([nw / w, nh / h], device=self.device)
        coords = torch.as_tensor(points, device=self.device) * scale
        lbl = torch.as_tensor(labels.astype(np.int64), device=self.device)
        masks = None
        if mask_input is not None:
            masks = mask_input.to(self.device, torch.float32).reshape(1, 1, *self.low_res_size)
            masks = masks.expand(b, -1, -1, -1)
        with self._autocast():
            sparse, dense = self.model.prompt_encoder(points=(coords, lbl), boxes=None, masks=masks)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=embedding.features.to(self.device),
                image_pe=self._dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        self.decoder_calls += b
        self.decoder_seconds += time.perf_counter() - t0
        low_res, iou = low_res.float(), iou.float()
        return [
            Prediction(
                low_res_logits=low_res[i, 0],
                score=float(iou[i, 0]),
                candidates=low_res[i],
                candidate_scores=iou[i],
            )
            for i in range(b)
        ]

    @torch.inference_mode()
    def upscale(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> np.ndarray:
        """``(Hl, Wl)`` low-res logits -> ``(H, W)`` bool mask in original pixels (SAM's rule)."""
        x = low_res_logits.reshape(1, 1, *low_res_logits.shape[-2:]).float()
        x = F.interpolate(x, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = x[..., : embedding.input_size[0], : embedding.input_size[1]]
        x = F.interpolate(x, embedding.original_size, mode="bilinear", align_corners=False)
        return (x[0, 0] > 0).cpu().numpy()
