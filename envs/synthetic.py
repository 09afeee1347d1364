"""The embedded default task: procedurally generated "spotted blobs" among look-alikes.

Each image is a 256 x 256 scene on a smooth, random-coloured noise background. The target is
every irregular blob filled with a *spotted* texture: two to four of them, scattered, like
several cars in a street or several polyps in one frame. One to three distractor blobs of the
same size range and from the same colour family are filled with a *striped* texture, and some
background clutter (small spots) shares the target's spot colour. Mean colour does not
separate target from distractors: texture and shape do. One click segments one blob, so the
SRM's start point finds one instance and the remaining ones must be found by the clicks that
follow: where the agent clicks matters. Scenes are a pure function of ``(split, index)``, so
every machine generates the same data set without downloading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}
SPLIT_SIZES = {"train": 24, "val": 12, "test": 24}
SIZE = 256


@dataclass(frozen=True)
class ArraySample:
    """A sample whose image lives in memory."""

    id: str
    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)

    def load_image(self) -> np.ndarray:
        return self.image


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (n - n.min()) / (np.ptp(n) + 1e-9)


def _blob(
    rng: np.random.Generator, size: int, radius: float, centre: tuple[float, float]
) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    theta = np.arctan2(yy - centre[0], xx - centre[1])
    r = np.hypot(yy - centre[0], xx - centre[1])
    bound = np.ones_like(theta)
    for k in range(2, 6):
        bound += rng.uniform(0, 0.22 / k * 2) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return r < radius * bound


def _hue_colour(rng: np.random.Generator, hue: float, sat: float, val: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val), np.float32) * 255


def make_scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``(256, 256, 3)`` uint8 image and its ``(256, 256)`` bool target mask."""
    rng = np.random.default_rng(seed)
    s = SIZE
    bg_hue = rng.uniform()
    bg_a = _hue_colour(rng, bg_hue, rng.uniform(0.2, 0.5), rng.uniform(0.45, 0.8))
    bg_b = _hue_colour(
        rng, bg_hue + rng.uniform(0.1, 0.3), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.7)
    )
    t = _noise(rng, s, 12)[..., None]
    img = bg_a * t + bg_b * (1 - t)
    img += (_noise(rng, s, 1.2)[..., None] - 0.5) * 40  # fine background grain

    obj_hue = rng.uniform()
    spot_colour = _hue_colour(rng, obj_hue + 0.5, 0.7, 0.95)
    taken = np.zeros((s, s), bool)
    blobs: list[tuple[np.ndarray, bool]] = []  # (blob, is target)
    n_targets = int(rng.integers(2, 5))
    n_distractors = int(rng.integers(1, 4))
    for k in range(n_targets + n_distractors):
        for _attempt in range(40):
            radius = rng.uniform(18, 32)
            centre = (rng.uniform(radius, s - radius), rng.uniform(radius, s - radius))
            blob = _blob(rng, s, radius, centre)
            if not (blob & ndimage.binary_dilation(taken, iterations=6)).any():
                break
        else:  # no free room left: fewer blobs rather than overlapping ones
            continue
        taken |= blob
        blobs.append((blob, k < n_targets))

    yy, xx = np.mgrid[:s, :s]
    target = np.zeros((s, s), bool)
    for blob, is_target in blobs:
        base = _hue_colour(
            rng, obj_hue + rng.uniform(-0.06, 0.06), rng.uniform(0.4, 0.8), rng.uniform(0.45, 0.8)
        )
        shade = _noise(rng, s, 6)[..., None] * 0.4 + 0.8
        fill = base * shade
        if is_target:  # spots
            target |= blob
            spots = _noise(rng, s, 1.6) > 0.62
            fill = np.where(spots[..., None], spot_colour, fill)
        else:  # distractor: stripes in the spot colour, same coverage
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(7, 12)
            phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
            stripes = (phase % 1.0) < 0.3
            fill = np.where(stripes[..., None], spot_colour, fill)
        img = np.where(blob[..., None], fill, img)

    clutter = (_noise(rng, s, 1.0) > 0.8) & ~ndimage.binary_dilation(taken, iterations=3)
    clutter &= _noise(rng, s, 20) > 0.55
    img = np.where(clutter[..., None], spot_colour * 0.9, img)
    return np.clip(img, 0, 255).astype(np.uint8), target


def synthetic_task(split: str = "train", n: int | None = None) -> list[ArraySample]:
    """The embedded default task's ``split`` (``train`` 24, ``val`` 12, ``test`` 24 images)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown synthetic split {split!r}; use one of {', '.join(SPLIT_SEEDS)}")
    count = SPLIT_SIZES[split] if n is None else n
    out = []
    for i in range(count):
        image, mask = make_scene(SPLIT_SEEDS[split] + i)
        out.append(ArraySample(f"synthetic-{split}-{i:03d}", image, mask))
    return out
