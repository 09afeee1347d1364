"""Overlays of image, mask and clicks for people to look at."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    color: tuple[int, int, int] = (30, 144, 255),
    alpha: float = 0.45,
    outline: np.ndarray | None = None,
) -> np.ndarray:
    """Draw a mask and numbered clicks on an image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool mask, tinted with ``color``.
        points: ``(N, 2)`` ``(x, y)`` pixel clicks; positives green "+", negatives red "-".
        labels: ``(N,)`` 1 / 0.
        outline: Optional ``(H, W)`` bool mask (e.g. ground truth) drawn as a yellow contour.

    Returns:
        ``(H, W, 3)`` uint8 RGB overlay.
    """
    out = image.astype(np.float32).copy()
    if mask is not None and mask.any():
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
    if outline is not None:
        edge = outline & ~(
            np.pad(outline, 1)[2:, 1:-1]
            & np.pad(outline, 1)[:-2, 1:-1]
            & np.pad(outline, 1)[1:-1, 2:]
            & np.pad(outline, 1)[1:-1, :-2]
        )
        out[edge] = (255, 220, 0)
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if points is not None and len(points):
        draw = ImageDraw.Draw(pil)
        r = max(3, round(min(image.shape[:2]) / 60))
        for i, ((x, y), lab) in enumerate(
            zip(points, labels if labels is not None else [], strict=True)
        ):
            fill = (40, 220, 60) if int(lab) == 1 else (235, 40, 40)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
            draw.line([x - r + 2, y, x + r - 2, y], fill=(255, 255, 255), width=2)
            if int(lab) == 1:
                draw.line([x, y - r + 2, x, y + r - 2], fill=(255, 255, 255), width=2)
            draw.text((x + r + 1, y - r - 1), str(i + 1), fill=(255, 255, 255))
    return np.asarray(pil)
