"""What the policy sees of an episode: the observation of the prompting environment.

All float32 with finite bounds (``K = feature_channels``, ``G`` the action grid):

- ``state``   ``(K, G, G)``: the paper's state ``E_I(x) * M_{t-1}``, reduced for a CPU policy:
  the embedding is projected from C to K channels by a fixed orthonormal matrix (seeded, so
  identical in every process), standardised per image, multiplied by the previous mask
  probability and area-pooled to the action grid. Projection and pooling are linear and the
  mask is a per-pixel scalar, so the projection is done once per image
  (:func:`project_features`) and each step costs one ``K x He x We`` product and a pool.
- ``image``   ``(K, G, G)``: the same features without the mask (what lies outside the mask).
- ``mask``    ``(1, G, G)``: previous mask coverage of each cell.
- ``fg``      ``(1, G, G)``: the labeler's foreground probability per cell (0.5 when it has none).
- ``clicks``  ``(2, G, G)``: positive / negative clicks so far.
- ``step``    ``(1,)``: ``t / T``.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces

from segmenter.geometry import to_grid

__all__ = [
    "FEATURE_CLIP",
    "observation",
    "observation_space",
    "project_features",
    "projection_matrix",
]

#: Bound of the standardised features in the observation.
FEATURE_CLIP = 10.0


def projection_matrix(in_channels: int, out_channels: int, seed: int = 0) -> torch.Tensor:
    """Fixed ``(K, C)`` matrix with orthonormal rows (seeded; identical in every process)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(in_channels, max(out_channels, 1), generator=gen)
    q, _ = torch.linalg.qr(g)
    return q[:, :out_channels].T.contiguous()


def project_features(proj: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``(K, He, We)`` projected, per-image standardised and clipped features of a ``(1, C, He,
    We)`` embedding, with ``proj`` from :func:`projection_matrix`."""
    feats = torch.einsum("kc,chw->khw", proj, features[0].float().cpu())
    feats = (feats - feats.mean()) / (feats.std() + 1e-6)
    return feats.clamp(-FEATURE_CLIP, FEATURE_CLIP)


def observation_space(channels: int, grid: int) -> spaces.Dict:
    """The observation space for ``K = channels`` and a ``grid x grid`` action grid."""
    g, k = grid, channels
    box = lambda shape, lo, hi: spaces.Box(lo, hi, shape=shape, dtype=np.float32)  # noqa: E731
    return spaces.Dict(
        {
            "state": box((k, g, g), -FEATURE_CLIP, FEATURE_CLIP),
            "image": box((k, g, g), -FEATURE_CLIP, FEATURE_CLIP),
            "mask": box((1, g, g), 0.0, 1.0),
            "fg": box((1, g, g), 0.0, 1.0),
            "clicks": box((2, g, g), 0.0, 1.0),
            "step": box((1,), 0.0, 1.0),
        }
    )


def observation(
    features: torch.Tensor,
    mask_prob: np.ndarray,
    fg_map: np.ndarray | None,
    clicks: np.ndarray,
    step_fraction: float,
    valid: tuple[int, int],
    grid: int,
) -> dict[str, np.ndarray]:
    """One observation.

    Args:
        features: ``(K, He, We)`` from :func:`project_features`.
        mask_prob: ``(He, We)`` current mask probability on the embedding grid.
        fg_map: ``(He, We)`` labeler foreground map, or ``None``.
        clicks: ``(2, G, G)`` positive / negative clicks so far.
        step_fraction: ``t / T``.
        valid: ``(vh, vw)`` embedding-grid cells covering the image (not padding).
        grid: G.
    """
    g = (grid, grid)
    vh, vw = valid
    feats = features[:, :vh, :vw]
    mask = torch.from_numpy(mask_prob[:vh, :vw])
    pool = torch.nn.functional.adaptive_avg_pool2d
    state = pool((feats * mask)[None], g)[0]
    image = pool(feats[None], g)[0]
    mask_g = pool(mask[None, None], g)[0]
    if fg_map is None:
        fg = np.full((1, *g), 0.5, np.float32)
    else:
        fg = to_grid(fg_map[:vh, :vw], g)[None]
    return {
        "state": state.numpy().astype(np.float32),
        "image": image.numpy().astype(np.float32),
        "mask": mask_g.numpy().astype(np.float32).clip(0, 1),
        "fg": np.asarray(fg, np.float32).clip(0, 1),
        "clicks": clicks.copy(),
        "step": np.array([step_fraction], np.float32),
    }
