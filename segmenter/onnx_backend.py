"""The fast path: SAM's frozen encoder and prompt encoder + mask decoder exported to ONNX and run
by ONNX Runtime, as SAM's own repository does for its web demo.

The decoder graph is this project's own rewrite of ``MaskDecoder.predict_masks`` with the same
weights, laid out for a CPU:

- batch 1 without ``repeat_interleave``;
- the two 2x2 / stride-2 transposed convolutions of the output upscaling as per-pixel matrix
  products in channels-last layout, so the channel LayerNorm is one fused op;
- the first transformer layer's three image-side projections (keys and values of the
  token-to-image attention, queries of the image-to-token one) split by linearity into a part
  that depends only on the image, computed once per embedding by a small "prep" graph
  (:class:`DecoderPrep`), and the part of the dense prompt: a constant without a mask input,
  and with one the mask-downscaling stack's last 1x1 convolution folded into the projections,
  a 16-channel product instead of a 256-channel one. The prep also hands the embedding over
  channels-last, the layout the decoder works in;
- the final token-to-image attention run for the five output tokens alone (IoU and mask
  tokens), reassociated so the 4,096 image tokens are never projected to keys and values.

Masks agree with the stock path to ~1e-4 in the logits (tests check it);
:class:`~segmenter.sam.SamSegmenter` also compares the first fast call of a process with the
stock path and falls back to stock when they differ.

Exported graphs are cached under ``$ALIGNSAM_HOME/onnx``, keyed by a hash of the weights they
hold, and written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from segmenter import weights as W

logger = logging.getLogger(__name__)

#: Bump when a graph's definition changes: old exports are then ignored.
GRAPH_VERSION = 5
OPSET = 17


def available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _attend(att: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention.forward`` after its three input projections (``q``, ``k``, ``v``
    ``(1, n, d)`` already projected)."""

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, x.shape[1], att.num_heads, -1).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    attn = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(q.shape[-1]), dim=-1)
    out = (attn @ v).transpose(1, 2)
    return att.out_proj(out.reshape(1, out.shape[1], -1))


def _first_layer(sam: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The decoder's first two-way block and its two cross attentions; refuses layouts the
    split projections do not cover (the export then fails and the segmenter stays on stock)."""
    layer = sam.mask_decoder.transformer.layers[0]
    if not getattr(layer, "skip_first_layer_pe", False):
        raise ValueError("the decoder's first layer does not skip the token positional encoding")
    last = sam.prompt_encoder.mask_downscaling[-1]
    if not isinstance(last, nn.Conv2d) or last.kernel_size != (1, 1):
        raise ValueError(f"unexpected last mask-downscaling layer {last}")
    return layer, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token


def _dense_projection(sam: nn.Module) -> tuple[torch.Tensor, nn.Module]:
    """The first layer's three image-side projection weights stacked ``(3D, C)``, and the mask
    stack's last 1x1 convolution (the dense prompt is ``conv(h)`` with a mask input)."""
    _, t2i, i2t = _first_layer(sam)
    proj = torch.cat([t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight]).detach()
    return proj, sam.prompt_encoder.mask_downscaling[-1]


class DecoderPrep(nn.Module):
    """The image-only part of the first layer's image-side projections, once per embedding.

    Input ``image_embeddings`` ``(1, C, He, We)``; outputs ``pre`` ``(He * We, 3 * D)``: the
    token-to-image keys ``Wk (e + pe) + bk`` and values ``Wv e + bv`` and the image-to-token
    queries ``Wq (e + pe) + bq``, with the share of the dense prompt's bias ``b`` (the rest of the
    dense prompt is added per call by :class:`DecoderGraph`); and ``image`` ``(He * We, C)``,
    ``e + b`` channels-last (the decoder's layout, so no call transposes it again).
    """

    def __init__(self, sam: nn.Module, dense_pe: torch.Tensor) -> None:
        super().__init__()
        _, self.t2i, self.i2t = _first_layer(sam)
        self.register_buffer("pe", dense_pe.detach().flatten(2)[0].T.contiguous())
        proj, conv = _dense_projection(sam)
        # The mask input's dense bias, so a call with a mask input adds no bias of its own (the
        # common call: every click after the first); a call without one swaps it for the
        # no-mask embedding.
        self.register_buffer("pre_bias", proj @ conv.bias.detach())
        self.register_buffer("image_bias", conv.bias.detach().clone())

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src = image_embeddings.flatten(2)[0].T  # (He * We, C)
        kin = src + self.pe
        pre = torch.cat([self.t2i.k_proj(kin), self.t2i.v_proj(src), self.i2t.q_proj(kin)], 1)
        return pre + self.pre_bias, src + self.image_bias


class DecoderGraph(nn.Module):
    """Prompt encoder (points and optional mask) + mask decoder for one image, all four masks.

    Inputs: ``image`` ``(He * We, C)`` and ``pre`` ``(He * We, 3 * D)``, both from
    :class:`DecoderPrep` for the image's embedding; ``coords`` ``(1, N, 2)`` in the encoder's input
    frame, the padding point included; ``labels`` ``(1, N)`` float (1, 0, -1 = padding); with
    ``with_mask`` also ``mask_input`` ``(1, 1, Hl, Wl)``. Outputs: ``masks`` ``(1, 4, Hl, Wl)``
    low-res logits and ``iou`` ``(1, 4)``: token 0 is the single-mask head, 1-3 the multimask
    candidates.
    """

    def __init__(self, sam: nn.Module, dense_pe: torch.Tensor, with_mask: bool) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.decoder = sam.mask_decoder
        self.with_mask = with_mask
        self.register_buffer("image_pe", dense_pe.detach().flatten(2).transpose(1, 2).clone())
        self.grid = tuple(int(n) for n in dense_pe.shape[2:])
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
        # The dense prompt's share of the first layer's projections (see DecoderPrep, whose
        # outputs already hold the mask input's dense bias b).
        proj, conv = _dense_projection(sam)  # (3D, C)
        w_dense = conv.weight[:, :, 0, 0].detach()  # (C, c_mask): dense = w_dense @ h + b
        self.register_buffer("mask_proj", (proj @ w_dense).T.contiguous())
        self.register_buffer("mask_dense", w_dense.T.contiguous())
        no_mask = sam.prompt_encoder.no_mask_embed.weight[0].detach() - conv.bias.detach()
        self.register_buffer("no_mask", no_mask)
        self.register_buffer("no_mask_proj", proj @ no_mask)
        # The final token-to-image attention, reassociated for the output tokens only (below).
        fa = self.decoder.transformer.final_attn_token_to_image
        heads, c = fa.num_heads, fa.internal_dim // fa.num_heads
        self.heads, self.outputs = heads, 1 + self.decoder.num_mask_tokens
        self.register_buffer("final_wk", fa.k_proj.weight.detach().reshape(heads, c, -1) / c**0.5)
        self.register_buffer("final_wv", fa.v_proj.weight.detach().reshape(heads, c, -1))
        self.register_buffer("final_bv", fa.v_proj.bias.detach().reshape(heads, 1, c))

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
        image: torch.Tensor,
        pre: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dec = self.decoder
        tr = dec.transformer
        layer = tr.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        h, w = self.grid
        src = image[None]  # (1, h * w, C)
        if self.with_mask:
            down = self.prompt_encoder.mask_downscaling[:-1](mask_input)  # (1, c_mask, h, w)
            down = down.flatten(2)[0].T
            kvq = down @ self.mask_proj + pre
            src = down @ self.mask_dense + src
        else:
            kvq = pre + self.no_mask_proj
            src = src + self.no_mask
        d = kvq.shape[1] // 3
        keys1, values1, queries1 = kvq[None, :, :d], kvq[None, :, d : 2 * d], kvq[None, :, 2 * d :]
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)[None]
        tokens = torch.cat([tokens, self._points(coords, labels)], 1)
        # TwoWayAttentionBlock.forward of the first layer (skip_first_layer_pe) with the split
        # projections; the other layers and the final attention are SAM's own modules.
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        attn = _attend(t2i, t2i.q_proj(queries + tokens), keys1, values1)
        queries = layer.norm2(queries + attn)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        keys = layer.norm4(src + _attend(i2t, queries1, i2t.k_proj(q), i2t.v_proj(queries)))
        for block in tr.layers[1:]:
            queries, keys = block(queries=queries, keys=keys, query_pe=tokens, key_pe=self.image_pe)
        # Only the IoU and mask tokens leave the final attention, so it runs for them alone.
        n = self.outputs
        hs = tr.norm_final_attn(queries[:, :n] + self._final_attention(queries + tokens, keys))
        x = keys[0] @ self.w1 + self.b1  # (h * w, 4 * c1), ordered (dy, dx, c1)
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

    def _final_attention(self, q_in: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """SAM's final token-to-image ``Attention(q_in, keys + pe, keys)`` for the first
        :attr:`outputs` tokens, without projecting the ``h * w`` keys and values.

        Per head, ``q . (Wk k + bk) = (Wk^T q) . k + q . bk``: the last term is the same for
        every key, which the softmax ignores. And as the weights sum to 1,
        ``sum_j a_j (Wv k_j + bv) = Wv (sum_j a_j k_j) + bv``. So the image side is two
        ``(heads * outputs) x C x (h * w)`` products instead of two ``(h * w) x C x D`` ones.
        """
        fa = self.decoder.transformer.final_attn_token_to_image
        n, heads = self.outputs, self.heads
        q = fa.q_proj(q_in[0, :n]).reshape(n, heads, -1).transpose(0, 1)  # (heads, n, c)
        qk = (q @ self.final_wk).reshape(heads * n, -1)  # (heads * n, C), scaled
        attn = torch.softmax(qk @ (keys[0] + self.image_pe[0]).T, dim=-1)
        ctx = (attn @ keys[0]).reshape(heads, n, -1)  # (heads, n, C)
        out = (ctx @ self.final_wv.transpose(1, 2) + self.final_bv).transpose(0, 1)
        return fa.out_proj(out.reshape(1, n, -1))


#: Largest difference, relative to the reference's magnitude (at least 1), that a fast result
#: may have from the stock one it replaces.
AGREEMENT_TOLERANCE = 1e-3


def disagreement(fast: torch.Tensor, stock: torch.Tensor) -> str | None:
    """``None`` when ``fast`` matches ``stock`` within :data:`AGREEMENT_TOLERANCE`, else how far
    apart they are. The first-use check of every fast path (segmenter, SRM head and policy)."""
    scale = max(1.0, float(stock.abs().max()))
    diff = float((fast.float() - stock.float()).abs().max()) / scale
    return None if diff <= AGREEMENT_TOLERANCE else f"differs by {diff:.2e} (relative)"


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


def export_graph(module: nn.Module, args: tuple, path: Path, **kwargs: Any) -> Path:
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
    logger.debug("exported %s", path)
    return path


#: ONNX Runtime graph rewrites left out: its fused Add + LayerNorm (SkipLayerNormalization)
#: took 3.0 ms on the decoder's 4,096 x 256 image tokens where the plain LayerNorm of the same
#: shape takes 0.3 ms (ONNX Runtime 1.32's profiler, 2 threads).
UNFUSED = ["SkipLayerNormFusion"]


def cpu_session(path: Path, threads: int):
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads, no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    # No spinning: spinning ORT threads took the cores from torch's between decoder calls (the
    # env, SRM and policy), which made training slower overall (measured with `bench perf`).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(
        str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=UNFUSED
    )


class OnnxParts:
    """ONNX Runtime sessions for one frozen SAM: encoder, decoder prep and decoder (with /
    without mask input).

    Sessions are created on first use, so a process that only decodes cached embeddings never
    exports or loads the encoder. The prep of the last :attr:`PREPS_KEPT` embeddings is kept,
    keyed by the features tensor itself (a weak reference, so a freed tensor whose id is
    reused never picks up another image's prep).
    """

    #: Embeddings whose decoder prep is kept (~10 MB each for MobileSAM).
    PREPS_KEPT = 8

    def __init__(self, sam: nn.Module, model_id: str, dense_pe: torch.Tensor) -> None:
        self.sam = sam
        self.model_id = model_id
        self.dense_pe = dense_pe
        self._decoders: dict[bool, Any] = {}
        self._encoder: Any = None
        self._stage_encoder: Any = None
        self._prep_session: Any = None
        self._preps: OrderedDict[int, tuple[weakref.ref, np.ndarray]] = OrderedDict()
        #: Prep graph runs (one per embedding decoded, while it stays among the kept ones).
        self.prep_calls = 0
        # Fixed here, not when a session is made on first use: that may happen inside a block
        # that runs torch on one thread (segmenter.base.small_torch_ops).
        self._threads = torch.get_num_threads()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the sessions behind (they are not picklable); the copy
        builds its own on first use, from the same exported files."""
        state = self.__dict__.copy()
        state["_decoders"], state["_encoder"], state["_prep_session"] = {}, None, None
        state["_stage_encoder"] = None
        state["_preps"] = OrderedDict()
        return state

    @property
    def threads(self) -> int:
        """ONNX Runtime intra-op threads: torch's thread count when these parts were made."""
        return self._threads

    def _decoder_parts(self) -> tuple[nn.Module, ...]:
        return (self.sam.prompt_encoder, self.sam.mask_decoder)

    def _prep(self, features: torch.Tensor) -> dict[str, np.ndarray]:
        """The decoder's ``image`` and ``pre`` inputs for ``features`` (:class:`DecoderPrep`),
        computed once."""
        key = id(features)
        hit = self._preps.get(key)
        if hit is not None and hit[0]() is features:
            self._preps.move_to_end(key)
            return hit[1]
        if self._prep_session is None:
            c, (he, we) = self.dense_pe.shape[1], self.dense_pe.shape[2:]
            path = export_graph(
                DecoderPrep(self.sam, self.dense_pe).eval(),
                (torch.zeros(1, c, he, we),),
                graph_path(self.model_id, "decoder_prep", self._decoder_parts()),
                input_names=["image_embeddings"],
                output_names=["pre", "image"],
            )
            self._prep_session = cpu_session(path, self.threads)
        embeddings = features.detach().to("cpu", torch.float32).numpy()
        pre, image = self._prep_session.run(None, {"image_embeddings": embeddings})
        self.prep_calls += 1
        inputs = {"image": image, "pre": pre}
        # preps of freed embeddings go first (their ids may be reused: this one's may be one)
        for dead in [k for k, (ref, _) in self._preps.items() if ref() is None]:
            del self._preps[dead]
        self._preps[key] = (weakref.ref(features), inputs)
        while len(self._preps) > self.PREPS_KEPT:
            self._preps.popitem(last=False)
        return inputs

    def _decoder(self, with_mask: bool):
        if with_mask not in self._decoders:
            c, (he, we) = self.dense_pe.shape[1], self.dense_pe.shape[2:]
            hl, wl = self.sam.prompt_encoder.mask_input_size
            d = self.sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.internal_dim
            args: tuple = (
                torch.zeros(he * we, c),
                torch.zeros(he * we, 3 * d),
                torch.zeros(1, 2, 2),
                torch.zeros(1, 2),
            )
            names = ["image", "pre", "coords", "labels"]
            if with_mask:
                args += (torch.zeros(1, 1, hl, wl),)
                names.append("mask_input")
            part = "decoder_mask" if with_mask else "decoder"
            path = export_graph(
                DecoderGraph(self.sam, self.dense_pe, with_mask).eval(),
                args,
                graph_path(self.model_id, part, self._decoder_parts()),
                input_names=names,
                output_names=["masks", "iou"],
                dynamic_axes={"coords": {1: "points"}, "labels": {1: "points"}},
            )
            self._decoders[with_mask] = cpu_session(path, self.threads)
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
        feed = {**self._prep(features), "coords": pts[None], "labels": lab[None]}
        if mask_input is not None:
            hl, wl = self.sam.prompt_encoder.mask_input_size
            feed["mask_input"] = mask_input.to("cpu", torch.float32).reshape(1, 1, hl, wl).numpy()
        masks, iou = self._decoder(mask_input is not None).run(None, feed)
        return torch.from_numpy(masks[0]), torch.from_numpy(iou[0])

    def encode_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image encoder and its stages (:class:`~segmenter.stages.EncoderWithStages`) on a
        preprocessed ``(1, 3, S, S)`` batch: ``(embedding, stages)``."""
        if self._stage_encoder is None:
            from segmenter.stages import EncoderWithStages

            size = int(self.sam.image_encoder.img_size)
            grid = tuple(int(v) for v in self.dense_pe.shape[2:])
            path = export_graph(
                EncoderWithStages(self.sam.image_encoder, grid).eval(),
                (torch.zeros(1, 3, size, size),),
                graph_path(self.model_id, "encoder_stages", (self.sam.image_encoder,)),
                input_names=["image"],
                output_names=["embedding", "stages"],
            )
            self._stage_encoder = cpu_session(path, self.threads)
        feed = {"image": x.detach().to("cpu", torch.float32).numpy()}
        emb, stages = self._stage_encoder.run(None, feed)
        return torch.from_numpy(emb), torch.from_numpy(stages)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image encoder on a preprocessed ``(1, 3, S, S)`` batch."""
        if self._encoder is None:
            size = int(self.sam.image_encoder.img_size)
            path = export_graph(
                self.sam.image_encoder,
                (torch.zeros(1, 3, size, size),),
                graph_path(self.model_id, "encoder", (self.sam.image_encoder,)),
                input_names=["image"],
                output_names=["embedding"],
            )
            self._encoder = cpu_session(path, self.threads)
        (out,) = self._encoder.run(None, {"image": x.detach().to("cpu", torch.float32).numpy()})
        return torch.from_numpy(out)
