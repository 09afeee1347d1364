"""The policy's deterministic action through ONNX Runtime: the policy's share of the fast path.

At inference (``segment``, benchmarks) the policy's weights are fixed and it acts once per step
on a small grid observation. In torch that is a few tiny convolutions, each paying torch's
per-op cost: ~0.8 ms per action in a loop, ~1.6 ms inside an episode between decoder calls.
ONNX Runtime on one thread runs the whole graph in ~0.25 ms. The graph is exported once per
weights (keyed by their hash, under ``$ALIGNSAM_HOME/onnx``) and its first logits are checked
against torch; a change to the weights (training, ``load_state_dict``) is noticed before the
next action and the graph is exported again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from segmenter import onnx_backend

#: Bump when the exported graph changes without the weights changing: old exports are ignored.
POLICY_GRAPH_VERSION = 1


class _Logits(nn.Module):
    """The action logits of an SB3 actor-critic policy for one batch of observations, as a
    module over the observation's arrays in ``keys`` order (what the exporter traces)."""

    def __init__(self, policy: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.policy = policy
        self.keys = keys

    def forward(self, *observations: torch.Tensor) -> torch.Tensor:
        p = self.policy
        obs = dict(zip(self.keys, observations, strict=True))
        features = p.extract_features(obs, p.pi_features_extractor)
        return p.action_net(p.mlp_extractor.forward_actor(features))


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, its own mode again after."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


class OnnxPolicy:
    """An SB3 actor-critic policy's action logits run by ONNX Runtime (one thread).

    Args:
        policy: The policy (``model.policy`` of PPO or MaskablePPO) with a discrete action space.
    """

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        self.keys = list(policy.observation_space.spaces)
        self._session: Any = None
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self.verified = False

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the session behind; the copy builds its own."""
        return {**self.__dict__, "_session": None, "_stamp": None, "verified": False}

    def _weights_stamp(self) -> tuple[tuple[int, int], ...]:
        """Every parameter's storage and torch's in-place version counter: optimizer steps,
        ``load_state_dict`` and swapped tensors change it, so a stale graph is never used."""
        return tuple((p.data_ptr(), p._version) for p in self.policy.parameters())

    def _module(self) -> nn.Module:
        return _Logits(self.policy, self.keys)

    def _tensors(self, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.as_tensor(np.asarray(obs[k], np.float32))[None] for k in self.keys)

    def _build(self, obs: dict[str, np.ndarray]) -> Any:
        name = f"{type(self.policy.features_extractor).__name__}-v{POLICY_GRAPH_VERSION}"
        with _eval_mode(self.policy):
            path = onnx_backend.export_graph(
                self._module(),
                self._tensors(obs),
                onnx_backend.graph_path("policy", name, (self.policy,)),
                input_names=self.keys,
                output_names=["logits"],
            )
        return onnx_backend.cpu_session(path, 1)

    def logits(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """``(n_actions,)`` logits of one (unbatched) observation."""
        stamp = self._weights_stamp()
        if self._session is None or stamp != self._stamp:
            self._session, self._stamp, self.verified = self._build(obs), stamp, False
        feed = {k: np.asarray(obs[k], np.float32)[None] for k in self.keys}
        (out,) = self._session.run(None, feed)
        return out[0]

    def check(self, logits: np.ndarray, obs: dict[str, np.ndarray]) -> str | None:
        """``None`` when ``logits`` match the torch policy's for ``obs``, else why not."""
        self.verified = True
        with _eval_mode(self.policy), torch.no_grad():
            stock = self._module()(*self._tensors(obs))[0]
        why = onnx_backend.disagreement(torch.from_numpy(logits), stock)
        return None if why is None else f"its logits {why} from torch"
