"""The SRM head through ONNX Runtime: the SRM's share of the fast path.

At inference (``segment``, benchmarks) the SRM's weights are fixed and its head, a few 3x3
convolutions on the embedding grid, runs once per step beside the decoder call. In torch it
has to run on one thread there (:func:`segmenter.base.small_torch_ops`: torch's spinning
OpenMP threads would take the cores from the decoder call that follows); ONNX Runtime uses
both cores without spinning. The graph is exported once per weights (keyed by their hash,
under ``$ALIGNSAM_HOME/onnx``) and its first result is checked against the torch head.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from segmenter import onnx_backend

logger = logging.getLogger(__name__)

#: Bump when the head's graph changes without its weights changing: old exports are ignored.
HEAD_GRAPH_VERSION = 3


class _Projected(nn.Module):
    """``head.forward_parts`` as a module's ``forward`` over the projection's parts and the maps
    (what the exporter traces). The parts come in as separate inputs, so the graph does not
    copy them apart."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head.forward_parts(inputs[:-1], inputs[-1])


class OnnxHead:
    """A frozen SRM head's ``forward_projected`` run by ONNX Runtime.

    Args:
        head: The torch head (an :class:`~recalibration.srm.ImplicitHead`), in eval mode.
        threads: ONNX Runtime intra-op threads.

    The export reflects the weights at the time of the first :meth:`run`; the owner drops this
    object when the weights change.
    """

    def __init__(self, head: nn.Module, threads: int) -> None:
        self.head = head
        self.threads = max(1, int(threads))
        self._session: Any = None
        self.verified = False

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the session behind; the copy builds its own."""
        return {**self.__dict__, "_session": None}

    def _inputs(self, proj: torch.Tensor, maps: torch.Tensor) -> dict[str, np.ndarray]:
        """The graph's feed: the projection's parts (channel slices: views when the batch is
        1) and the maps."""
        parts = proj.detach().to("cpu", torch.float32).split(self.head.stem.hidden, dim=1)
        feed = {f"part{i}": p.numpy() for i, p in enumerate(parts)}
        feed["maps"] = maps.detach().to("cpu", torch.float32).numpy()
        return feed

    def _build(self, feed: dict[str, np.ndarray]) -> Any:
        names = list(feed)
        path = onnx_backend.export_graph(
            _Projected(self.head).eval(),
            tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feed.values()),
            onnx_backend.graph_path(
                "srm", f"{type(self.head).__name__}-v{HEAD_GRAPH_VERSION}", (self.head,)
            ),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={n: {0: "batch", 2: "height", 3: "width"} for n in names},
        )
        return onnx_backend.cpu_session(path, self.threads)

    def run(self, proj: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H, W)``, as ``head.forward_projected(proj, maps)``."""
        feed = self._inputs(proj, maps)
        if self._session is None:
            self._session = self._build(feed)
        (out,) = self._session.run(None, feed)
        return torch.from_numpy(out).to(proj.device)

    def check(self, fast: torch.Tensor, stock: torch.Tensor) -> str | None:
        """``None`` when the fast logits match the torch ones, else why not."""
        self.verified = True
        why = onnx_backend.disagreement(fast, stock)
        return None if why is None else f"its output {why} from torch"
