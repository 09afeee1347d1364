"""Where a click lands: every coordinate rule of the project, in one place.

Three frames meet in a prompting episode:

* **original pixels** ``(x, y)`` of the image as loaded (points given to ``decode``);
* the **action grid**: ``G x G`` equal cells over the original image (the agent's
  ``Discrete(G*G)`` action ``a`` is cell ``(row, col) = divmod(a, G)``, clicked at its centre);
* the **embedding grid**: ``He x We`` cells over the encoder's padded square input (the image
  resized so that its longest side fills the square, padded at the bottom and right); the SRM's
  maps and the mask state live here. The decoder's low-res frame is the same square at 4x.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "action_centre",
    "action_centres",
    "embedding_cell_at",
    "embedding_cell_centre",
    "to_grid",
    "value_at",
]


def action_centre(size: tuple[int, int], grid: int, action: int) -> tuple[float, float]:
    """Centre of action-grid cell ``action`` in original ``(x, y)`` pixels.

    Args:
        size: ``(H, W)`` of the original image.
        grid: G, the action grid side.
        action: Cell index ``row * G + col``.
    """
    h, w = size
    row, col = divmod(int(action), grid)
    return (col + 0.5) * w / grid, (row + 0.5) * h / grid


def action_centres(size: tuple[int, int], grid: int) -> np.ndarray:
    """``(G*G, 2)`` ``(x, y)`` centres of every action cell (row-major), as
    :func:`action_centre`."""
    h, w = size
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.stack([(cols + 0.5) * w / grid, (rows + 0.5) * h / grid], axis=1)


def embedding_cell_centre(
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    grid_size: tuple[int, int],
    row: int,
    col: int,
) -> tuple[float, float]:
    """Centre of embedding-grid cell ``(row, col)`` in original ``(x, y)`` pixels.

    The grid covers the padded square input; the result is clipped into the image.

    Args:
        original_size: ``(H, W)`` of the image.
        input_size: ``(h, w)`` after the longest-side resize (before padding).
        grid_size: ``(He, We)`` of the embedding grid.
        row: Grid row.
        col: Grid column.
    """
    he, we = grid_size
    side = max(input_size)
    h, w = original_size
    x = (col + 0.5) / we * side * w / input_size[1]
    y = (row + 0.5) / he * side * h / input_size[0]
    return min(x, w - 0.5), min(y, h - 0.5)


def embedding_cell_at(
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    grid_size: tuple[int, int],
    x: float,
    y: float,
) -> tuple[int, int]:
    """Embedding-grid ``(row, col)`` holding original-image pixel ``(x, y)`` (clipped into the
    grid); the inverse of :func:`embedding_cell_centre`."""
    h, w = original_size
    nh, nw = input_size
    side = max(nh, nw)
    he, we = grid_size
    row = int(np.clip(y * nh / h / side * he, 0, he - 1))
    col = int(np.clip(x * nw / w / side * we, 0, we - 1))
    return row, col


def value_at(mask: np.ndarray, x: float, y: float) -> bool:
    """The ``(H, W)`` map's value at original pixel ``(x, y)`` (the pixel holding the point;
    points on the far edge read the last row / column)."""
    h, w = mask.shape[:2]
    return mask[min(int(y), h - 1), min(int(x), w - 1)]


def to_grid(prob: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average a 2-D map to ``size`` (e.g. low-res probabilities to the embedding grid)."""
    t = torch.as_tensor(np.asarray(prob, dtype=np.float32))[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(t, size)[0, 0].numpy()
