"""The fast path: SAM's frozen encoder and prompt encoder + mask decoder exported to ONNX and run
by ONNX Runtime, as SAM's own repository does for its web demo.

The decoder graph is this project's own rewrite of ``MaskDecoder.predict_masks`` with the same
weights and the same arithmetic, laid out for a CPU: batch 1 without ``repeat_interleave``,
and the two 2x2 / stride-2 transposed convolutions of the output upscaling as per-pixel matrix
products in channels-last layout, so the channel LayerNorm is one fused op. Masks agree with the
stock path to ~1e-5 in the logits (tests check it); :class:`~segmenter.sam.SamSegmenter` also
compares the first fast call of a process with the stock path and falls back to stock when
they differ.

Exported graphs are cached under ``$ALIGNSAM_HOME/onnx``, keyed by a hash of the weights they
hold, and written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from segmenter import weights as W

logger = logging.getLogger(__name__)

#: Bump when a graph's definition changes: old exports are then ignored.
GRAPH_VERSION = 2
OPSET = 17


def available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class DecoderGraph(nn.Module):
    """Prompt encoder (points and optional mask) + mask decoder for one image, all four masks.

    Inputs: ``image_embeddings`` ``(1, C, He, We)``; ``coords`` ``(1, N, 2)`` in the encoder's
    input frame, the padding point included; ``labels`` ``(1, N)`` float (1, 0, -1 = padding);
    with ``with_mask`` also ``mask_input`` ``(1, 1, Hl, Wl)``. Outputs: ``masks`` ``(1, 4, Hl,
    Wl)`` low-res logits and ``iou`` ``(1, 4)``: token 0 is the single-mask head, 1-3 the
    multimask candidates.
    """

    def __init__(self, sam: nn.Module, dense_pe: torch.Tensor, with_mask: bool) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.decoder = sam.mask_decoder
        self.with_mask = with_mask
        self.register_buffer("image_pe", dense_pe.detach().clone())
        ct1, norm, _, ct2, _ = self.decoder.output_upscaling
        for conv in (ct1, ct2):
            if conv.kernel_size != (2, 2) or conv.stride != (2, 2):
                raise ValueError(f"unexpected output upscaling layer {conv}")
        # ConvTranspose2d(k=2, s=2) = per-pixel linear map C_in -> (dy, dx, C_out).
        self.register_buffer("w1", ct1.weight.permute(0, 2, 3, 1).reshape(ct1.in_channels, -1))
        self.register_buffer("b1", ct1.bias.repeat(4))
        self.register_buffer("w2", ct2.weight.permute(0, 2, 3, 1).reshape(ct2.in_channels, -1))
        self.register_buffer("b2", ct2.bias.repeat(4))
        self.norm = norm
        self.c1, self.c2 = ct1.out_channels, ct2.out_channels

    def _points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``PromptEncoder._embed_points`` without in-place boolean indexing."""
        pe = self.prompt_encoder
        emb = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
        lab = labels[..., None]
        return (
            emb * (lab != -1)
            + pe.not_a_point_embed.weight * (lab == -1)
            + pe.point_embeddings[0].weight * (lab == 0)
            + pe.point_embeddings[1].weight * (lab == 1)
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe, dec = self.prompt_encoder, self.decoder
        if self.with_mask:
            dense = pe.mask_downscaling(mask_input)
        else:
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)[None]
        tokens = torch.cat([tokens, self._points(coords, labels)], 1)
        src = image_embeddings + dense
        _, _, h, w = src.shape
        hs, x = dec.transformer(src, self.image_pe, tokens)  # x: (1, h * w, C), channels last
        x = x[0] @ self.w1 + self.b1  # (h * w, 4 * c1), ordered (dy, dx, c1)
        x = x.reshape(h, w, 2, 2, self.c1).permute(0, 2, 1, 3, 4).reshape(4 * h * w, self.c1)
        x = F.gelu(F.layer_norm(x, (self.c1,), self.norm.weight, self.norm.bias, self.norm.eps))
        x = x @ self.w2 + self.b2
        x = x.reshape(2 * h, 2 * w, 2, 2, self.c2).permute(0, 2, 1, 3, 4)
        x = F.gelu(x.reshape(16 * h * w, self.c2))
        hyper = torch.stack(
            [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1
        )  # (1, 4, c2)
        masks = (x @ hyper[0].T).T.reshape(1, -1, 4 * h, 4 * w)  # transpose 4 x HW, not HW x C
        return masks, dec.iou_prediction_head(hs[:, 0, :])


def fingerprint(*modules: nn.Module) -> str:
    """Short hash of the modules' weights: exported graphs are keyed by what they compute,
    so a fine-tuned decoder never picks up the graph of the frozen one."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def graph_path(model_id: str, part: str, modules: tuple[nn.Module, ...]) -> Path:
    """Where the exported graph of ``part`` of ``model_id`` with these weights lives."""
    safe = model_id.split(":")[0].replace("/", "-")
    return W.cache_dir() / "onnx" / f"{safe}-{part}-g{GRAPH_VERSION}-{fingerprint(*modules)}.onnx"


def _export(module: nn.Module, args: tuple, path: Path, **kwargs: Any) -> Path:
    """Export once per model and graph version; atomic, so concurrent processes are safe."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and exporter deprecation notes
            torch.onnx.export(module, args, tmp, dynamo=False, opset_version=OPSET, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("exported %s", path)
    return path


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    # No spinning: spinning ORT threads took the cores from torch's between decoder calls (the
    # env, SRM and policy), which made training slower overall (measured with `bench perf`).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxParts:
    """ONNX Runtime sessions for one frozen SAM: encoder and decoder (with / without mask input).

    Sessions are created on first use, so a process that only decodes cached embeddings never
    exports or loads the encoder.
    """

    def __init__(self, sam: nn.Module, model_id: str, dense_pe: torch.Tensor) -> None:
        self.sam = sam
        self.model_id = model_id
        self.dense_pe = dense_pe
        self._decoders: dict[bool, Any] = {}
        self._encoder: Any = None
        # Fixed here, not when a session is made on first use: that may happen inside a block
        # that runs torch on one thread (segmenter.base.small_torch_ops).
        self._threads = torch.get_num_threads()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the sessions behind (they are not picklable); the copy
        builds its own on first use, from the same exported files."""
        state = self.__dict__.copy()
        state["_decoders"], state["_encoder"] = {}, None
        return state

    @property
    def threads(self) -> int:
        """ONNX Runtime intra-op threads: torch's thread count when these parts were made."""
        return self._threads

    def _decoder(self, with_mask: bool):
        if with_mask not in self._decoders:
            c, (he, we) = self.dense_pe.shape[1], self.dense_pe.shape[2:]
            hl, wl = self.sam.prompt_encoder.mask_input_size
            args: tuple = (torch.zeros(1, c, he, we), torch.zeros(1, 2, 2), torch.zeros(1, 2))
            names = ["image_embeddings", "coords", "labels"]
            if with_mask:
                args += (torch.zeros(1, 1, hl, wl),)
                names.append("mask_input")
            part = "decoder_mask" if with_mask else "decoder"
            parts = (self.sam.prompt_encoder, self.sam.mask_decoder)
            path = _export(
                DecoderGraph(self.sam, self.dense_pe, with_mask).eval(),
                args,
                graph_path(self.model_id, part, parts),
                input_names=names,
                output_names=["masks", "iou"],
                dynamic_axes={"coords": {1: "points"}, "labels": {1: "points"}},
            )
            self._decoders[with_mask] = _session(path, self.threads)
        return self._decoders[with_mask]

    def decode(
        self,
        features: torch.Tensor,
        coords: np.ndarray,
        labels: np.ndarray,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All four low-res masks ``(4, Hl, Wl)`` and IoU predictions ``(4,)`` of one prompt set.

        ``coords`` ``(N, 2)`` in the input frame and ``labels`` ``(N,)``, without padding.
        """
        pts = np.concatenate([coords.reshape(-1, 2), np.zeros((1, 2))]).astype(np.float32)
        lab = np.concatenate([labels.reshape(-1), [-1]]).astype(np.float32)
        feed = {
            "image_embeddings": features.detach().to("cpu", torch.float32).numpy(),
            "coords": pts[None],
            "labels": lab[None],
        }
        if mask_input is not None:
            hl, wl = self.sam.prompt_encoder.mask_input_size
            feed["mask_input"] = mask_input.to("cpu", torch.float32).reshape(1, 1, hl, wl).numpy()
        masks, iou = self._decoder(mask_input is not None).run(None, feed)
        return torch.from_numpy(masks[0]), torch.from_numpy(iou[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image encoder on a preprocessed ``(1, 3, S, S)`` batch."""
        if self._encoder is None:
            size = int(self.sam.image_encoder.img_size)
            path = _export(
                self.sam.image_encoder,
                (torch.zeros(1, 3, size, size),),
                graph_path(self.model_id, "encoder", (self.sam.image_encoder,)),
                input_names=["image"],
                output_names=["embedding"],
            )
            self._encoder = _session(path, self.threads)
        (out,) = self._encoder.run(None, {"image": x.detach().to("cpu", torch.float32).numpy()})
        return torch.from_numpy(out)
