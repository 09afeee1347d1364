"""Image shifts (``SPEC@SHIFT``) and negatives (``SPEC@negative``) of issue 31: the images a
method is tested on when it must cope with images unlike its training images, or say that an
image holds no target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from experiments.datasets import (
    MASK_SHIFTS,
    NEGATIVE_MIN_SIDE,
    SHIFTS,
    Shifted,
    load_dataset,
    negative_box,
)


@dataclass(frozen=True)
class _Sample:
    id: str
    image: np.ndarray
    mask: np.ndarray

    def load_image(self) -> np.ndarray:
        return self.image


def _sample(h: int = 400, w: int = 600, box: tuple[int, int, int, int] = (150, 260, 80, 200)):
    rng = np.random.default_rng(0)
    image = rng.integers(40, 220, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = True
    return _Sample("a", image, mask)


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_every_shift_gives_an_rgb_image_its_mask_fits_and_is_fixed_per_image(shift):
    sample = _sample()
    shifted = Shifted(sample, shift, seed=3)
    image, mask = shifted.load_image(), shifted.mask
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert mask.shape == image.shape[:2]
    assert np.array_equal(image, Shifted(sample, shift, seed=3).load_image())
    if shift not in MASK_SHIFTS:
        assert mask is sample.mask
        assert image.shape == sample.image.shape and not np.array_equal(image, sample.image)


def test_negative_is_the_largest_part_beside_the_target_and_holds_none_of_it():
    sample = _sample()
    y0, y1, x0, x1 = negative_box(sample.mask)
    assert not sample.mask[y0:y1, x0:x1].any()
    assert min(y1 - y0, x1 - x0) >= NEGATIVE_MIN_SIDE and max(y1 - y0, x1 - x0) <= 2 * min(
        y1 - y0, x1 - x0
    )
    assert (x0, x1) == (220, 600)  # right of the box (x < 200) widened by 5 % of 400 px
    shifted = Shifted(sample, "negative", 0)
    assert not shifted.mask.any()
    assert np.array_equal(shifted.load_image(), sample.image[y0:y1, x0:x1])
    # a target filling the image leaves no room: no negative from it
    assert negative_box(np.ones((400, 600), bool)) is None


def test_border_blackens_outside_the_field_and_the_target_there_is_gone():
    sample = _sample(box=(0, 80, 0, 120))  # a corner: mostly outside the elliptic field
    shifted = Shifted(sample, "border", 1)
    image, mask = shifted.load_image(), shifted.mask
    assert image[0, 0].max() == 0 and image[-1, -1].max() == 0
    assert mask.sum() < sample.mask.sum() and not (mask & ~sample.mask).any()


def test_crop256_is_a_square_that_holds_target():
    shifted = Shifted(_sample(), "crop256", 2)
    assert shifted.load_image().shape == (256, 256, 3) and shifted.mask.any()


def test_negative_spec_keeps_only_images_with_room(tmp_path):
    from PIL import Image

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name, box in {"small": (10, 60, 10, 60), "wide": (20, 280, 20, 380)}.items():
        Image.fromarray(np.full((300, 400, 3), 120, np.uint8)).save(images / f"{name}.png")
        mask = np.zeros((300, 400), np.uint8)
        mask[box[0] : box[1], box[2] : box[3]] = 255
        Image.fromarray(mask).save(masks / f"{name}.png")
    negatives = load_dataset(f"folder:{images}:{masks}@negative")
    assert [s.id for s in negatives] == ["small@negative"]  # "wide" leaves no 128-px part
    assert not negatives[0].mask.any()
