"""Tests for ``envs.data``: file loading edge cases, dataset builders, COCO, real data."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageOps

from envs.data import (
    CAMVID_CLASSES,
    DataError,
    Dataset,
    Sample,
    camvid,
    camvid_class_id,
    coco_dataset,
    folder_pairs,
    kvasir_seg,
    label_map_dataset,
    load_image,
    load_label_map,
    load_mask,
    read_image_size,
    shared_data_root,
    validate_mask,
)
from envs.data import images as data_images

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _save(arr: np.ndarray, path: Path, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path, **kwargs)
    return path


def _block_mask(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[rows, cols] = True
    return m


def _pair(root: Path, stem: str, size=(20, 30), image_ext=".png", mask_ext=".png") -> None:
    """An RGB image and a valid 0/255 mask with the same stem under root/images, root/masks."""
    h, w = size
    rng = np.random.default_rng(len(stem))
    _save(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), root / "images" / f"{stem}{image_ext}")
    mask = _block_mask(h, w, slice(2, h // 2), slice(3, w // 2)).astype(np.uint8) * 255
    _save(mask, root / "masks" / f"{stem}{mask_ext}")


def _mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def _png_header(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming ``width x height`` and no real pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------


def test_load_image_grayscale_la_and_rgba(tmp_path):
    gray = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
    out = load_image(_save(gray, tmp_path / "g.png"))
    assert out.shape == (12, 7, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], gray) for c in range(3))

    la = np.stack([gray, np.full_like(gray, 9)], axis=2)
    out = load_image(_save(la, tmp_path / "la.png"))
    assert np.array_equal(out[..., 1], gray)

    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 0  # fully transparent
    out = load_image(_save(rgba, tmp_path / "a.png"))
    assert out.shape == (5, 6, 3)
    assert (out == [200, 100, 50]).all(), "alpha is dropped, colour kept (not composited)"


def test_load_image_palette(tmp_path):
    im = Image.new("P", (8, 4))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 1] * 8)
    path = tmp_path / "p.png"
    im.save(path)
    out = load_image(path)
    assert out.shape == (4, 8, 3)
    assert tuple(out[0, 1]) == (255, 0, 0) and tuple(out[0, 2]) == (0, 255, 0)


def test_load_image_16bit_scales_not_clips(tmp_path):
    arr = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    path = _save(arr, tmp_path / "d16.png")
    assert _mode(path) == "I;16"
    out = load_image(path)
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 255]


def test_load_image_int32_and_float(tmp_path):
    # 32-bit values beyond 16 bit: scaled by their actual range
    arr = np.array([[0, 50_000, 100_000]], dtype=np.int32)
    out = load_image(_save(arr, tmp_path / "i.tif"))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    # 32-bit container holding 16-bit data: scaled like 16 bit
    arr = np.array([[0, 65535, 257]], dtype=np.int32)
    assert load_image(_save(arr, tmp_path / "i16.tif"))[0, :, 0].tolist() == [0, 255, 1]
    # float in [0, 1]
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert load_image(_save(arr, tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_load_image_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 0, 0)).save(path, quality=95)
    assert _mode(path) == "CMYK"
    out = load_image(path)
    assert out.shape == (8, 16, 3) and out.dtype == np.uint8
    r, g, b = out[4, 8].astype(int)
    assert r > 200 and g < 60 and b > 200  # magenta


@pytest.mark.parametrize("orientation", range(1, 9))
def test_header_size_matches_decoded_size(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (30, 20), (10, 20, 30)).save(path, exif=exif)
    with Image.open(path) as im:
        expected = ImageOps.exif_transpose(im).size[::-1]
    assert read_image_size(path) == expected
    assert load_image(path).shape[:2] == expected
    assert load_mask(path, 5).shape == expected


def test_exif_rotated_jpeg_aligns_with_displayed_mask(tmp_path):
    stored = np.zeros((40, 60, 3), np.uint8)  # H=40, W=60 as stored
    stored[0:10, 0:20] = 255  # bright block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    (tmp_path / "images").mkdir()
    Image.fromarray(stored).save(tmp_path / "images" / "rot.jpg", exif=exif, quality=95)
    # as displayed: 60 rows x 40 cols, block at rows 0:20, cols 30:40
    mask = _block_mask(60, 40, slice(0, 20), slice(30, 40))
    _save(mask.astype(np.uint8) * 255, tmp_path / "masks" / "rot.png")

    ds = folder_pairs(tmp_path / "images", tmp_path / "masks")
    sample = ds[0]
    image = sample.load_image()
    assert sample.mask.shape == image.shape[:2] == (60, 40)
    assert image[sample.mask].mean() > 200 and image[~sample.mask].mean() < 50

    # a mask drawn on the stored (unrotated) pixels no longer fits
    _save(np.zeros((40, 60), np.uint8), tmp_path / "masks" / "rot.png")
    with pytest.raises(DataError, match=r"40 x 60 \(H x W\).*60 x 40 \(H x W\)"):
        folder_pairs(tmp_path / "images", tmp_path / "masks")


def test_corrupt_files_raise_dataerror_naming_file(tmp_path):
    good = _save(np.full((64, 64, 3), 120, np.uint8), tmp_path / "good.jpg")
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("this is not an image\n")
    missing = tmp_path / "missing.png"
    for path in (truncated, empty, text, missing):
        with pytest.raises(DataError, match=str(path.name)):
            load_image(path)
        with pytest.raises(DataError, match=str(path.name)):
            load_mask(path)
    with pytest.raises(DataError, match="empty"):
        read_image_size(empty)


def test_pixel_limit(tmp_path, monkeypatch):
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(20_000, 20_000))  # beyond PIL's own hard limit
    with pytest.raises(DataError, match="MAX_IMAGE_PIXELS"):
        load_image(huge)
    big = tmp_path / "big.png"
    big.write_bytes(_png_header(11_000, 10_000))  # 110 Mpx: only PIL's warning zone
    with pytest.raises(DataError, match=r"110000000 pixels.*max_pixels"):
        read_image_size(big)

    small = _save(np.zeros((100, 100), np.uint8), tmp_path / "small.png")
    with pytest.raises(DataError, match="limit is 5000"):
        load_image(small, max_pixels=5000)
    monkeypatch.setattr(data_images, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(DataError, match="too large"):
        read_image_size(small)
    monkeypatch.setattr(data_images, "MAX_IMAGE_PIXELS", 100_000_000)
    # PIL's global limit below ours does not get in the way, and is restored afterwards
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(small).shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000


# ----------------------------------------------------------------------------------------------
# masks and label maps
# ----------------------------------------------------------------------------------------------


def test_load_mask_thresholds_jpeg_like_values(tmp_path):
    rng = np.random.default_rng(1)
    truth = _block_mask(32, 32, slice(8, 24), slice(4, 20))
    noisy = np.where(
        truth, 255 - rng.integers(0, 40, truth.shape), rng.integers(0, 40, truth.shape)
    )
    assert np.array_equal(load_mask(_save(noisy.astype(np.uint8), tmp_path / "m.png")), truth)
    jpeg = _save((truth * 255).astype(np.uint8), tmp_path / "m.jpg", quality=75)
    with Image.open(jpeg) as im:
        raw = np.asarray(im)
    assert len(np.unique(raw)) > 2  # the JPEG really is not binary
    assert np.array_equal(load_mask(jpeg), truth)
    # RGB JPEG masks (as in Kvasir-SEG): max over channels
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[truth, 2] = 255
    assert np.array_equal(load_mask(_save(rgb, tmp_path / "rgb.jpg", quality=90)), truth)
    # mode "1" and 16-bit masks
    assert np.array_equal(load_mask(_save(truth, tmp_path / "bits.png")), truth)
    wide = (truth * 65535).astype(np.uint16)
    assert np.array_equal(load_mask(_save(wide, tmp_path / "m16.png")), truth)
    with pytest.raises(ValueError, match="threshold"):
        load_mask(jpeg, threshold=255)


def test_load_mask_ignores_alpha(tmp_path):
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[1:3, 1:3, 0] = 255
    assert load_mask(_save(rgba, tmp_path / "a.png")).sum() == 4


def test_load_label_map(tmp_path):
    labels = np.array([[0, 3, 11], [8, 8, 1]], dtype=np.uint8)
    out = load_label_map(_save(labels, tmp_path / "l.png"))
    assert np.array_equal(out, labels) and out.dtype == np.uint8
    wide = np.array([[0, 300, 1000]], dtype=np.uint16)
    assert load_label_map(_save(wide, tmp_path / "w.png")).tolist() == [[0, 300, 1000]]
    grey_rgb = np.repeat(labels[:, :, None], 3, axis=2)
    assert np.array_equal(load_label_map(_save(grey_rgb, tmp_path / "g.png")), labels)
    colour = grey_rgb.copy()
    colour[0, 0] = (128, 64, 128)
    with pytest.raises(DataError, match="colour-coded"):
        load_label_map(_save(colour, tmp_path / "c.png"))


def test_validate_mask_messages():
    good = _block_mask(4, 5, slice(0, 2), slice(0, 2))
    validate_mask(good, (4, 5), "x")
    with pytest.raises(DataError, match=r"here: mask is 4 x 5 \(H x W\) but the image is 5 x 4"):
        validate_mask(good, (5, 4), "here")
    with pytest.raises(DataError, match="no foreground pixels.*skip-bad"):
        validate_mask(np.zeros((4, 5), bool), (4, 5), "here")
    with pytest.raises(DataError, match="every mask pixel is foreground.*negative point"):
        validate_mask(np.ones((4, 5), bool), (4, 5), "here")
    with pytest.raises(DataError, match="dtype bool"):
        validate_mask(good.astype(np.uint8), (4, 5), "here")


# ----------------------------------------------------------------------------------------------
# folder_pairs
# ----------------------------------------------------------------------------------------------


def test_folder_pairs_basic_and_dataset_api(tmp_path):
    for stem in ("b", "a", "c"):
        _pair(tmp_path, stem, image_ext=".JPG" if stem == "c" else ".png")
    ds = folder_pairs(tmp_path / "images", tmp_path / "masks", name="toy")
    assert len(ds) == 3 and ds.ids == ["a", "b", "c"]
    assert [s.id for s in ds] == ds.ids and ds[-1].id == "c"
    assert isinstance(ds[1:], Dataset) and ds[1:].ids == ["b", "c"]
    assert ds.summary() == "toy: 3 samples, 0 skipped"
    sample = ds[0]
    assert sample.mask.dtype == bool and sample.mask.shape == (20, 30)
    assert sample.load_image().shape == (20, 30, 3)
    with pytest.raises(ValueError):
        sample.mask[0, 0] = True  # read-only
    # names: order kept, stems or file names
    sub = folder_pairs(tmp_path / "images", tmp_path / "masks", ["c.JPG", "a"])
    assert sub.ids == ["c", "a"]
    with pytest.raises(DataError, match="zzz.png.*not found"):
        folder_pairs(tmp_path / "images", tmp_path / "masks", ["a", "zzz.png"], on_error="skip")
    with pytest.raises(DataError, match="listed twice"):
        folder_pairs(tmp_path / "images", tmp_path / "masks", ["a", "a.png"])


def test_folder_pairs_duplicate_stems(tmp_path):
    _pair(tmp_path, "a")
    _save(np.zeros((20, 30, 3), np.uint8), tmp_path / "images" / "a.jpg")
    with pytest.raises(DataError, match=r"a\.jpg and .*a\.png"):
        folder_pairs(tmp_path / "images", tmp_path / "masks")


def test_folder_pairs_errors_and_skip_counting(tmp_path, caplog):
    _pair(tmp_path, "ok")
    _pair(tmp_path, "nomask")
    (tmp_path / "masks" / "nomask.png").unlink()
    _pair(tmp_path, "wrongsize")
    _save(np.full((10, 10), 255, np.uint8), tmp_path / "masks" / "wrongsize.png")
    _pair(tmp_path, "empty")
    _save(np.zeros((20, 30), np.uint8), tmp_path / "masks" / "empty.png")
    _pair(tmp_path, "full")
    _save(np.full((20, 30), 255, np.uint8), tmp_path / "masks" / "full.png")
    _pair(tmp_path, "textimg")
    (tmp_path / "images" / "textimg.png").write_text("not a png")
    (tmp_path / "images" / "._ok.png").write_bytes(b"\x00\x05")  # macOS junk: ignored

    images, masks = tmp_path / "images", tmp_path / "masks"
    with pytest.raises(DataError, match=r"no mask named nomask"):
        folder_pairs(images, masks, ["nomask"])
    with pytest.raises(DataError) as err:
        folder_pairs(images, masks, ["wrongsize"])
    msg = str(err.value)
    assert "wrongsize.png" in msg and "images" in msg and "masks" in msg
    assert "10 x 10 (H x W)" in msg and "20 x 30 (H x W)" in msg
    with pytest.raises(DataError, match="no foreground"):
        folder_pairs(images, masks, ["empty"])
    with pytest.raises(DataError, match="every mask pixel"):
        folder_pairs(images, masks, ["full"])
    with pytest.raises(DataError, match="textimg.png"):
        folder_pairs(images, masks, ["textimg"])

    with caplog.at_level(logging.WARNING, logger="envs.data"):
        ds = folder_pairs(images, masks, on_error="skip", name="mixed")
    assert ds.ids == ["ok"]
    skipped = {Path(f).stem for f, _ in ds.skipped}
    assert skipped == {"nomask", "wrongsize", "empty", "full", "textimg"}
    assert all(reason.startswith("error: ") for _, reason in ds.skipped)
    assert ds.summary() == "mixed: 1 samples, 5 skipped (5 error)"
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 5


def test_folder_pairs_unicode_and_spaces(tmp_path):
    root = tmp_path / "dätä sét ü"
    _pair(root, "polyp ü 1")
    _pair(root, "日本 画像")
    ds = folder_pairs(root / "images", root / "masks")
    assert sorted(ds.ids) == ["polyp ü 1", "日本 画像"]
    assert all(s.load_image().shape == (20, 30, 3) for s in ds)


def test_sample_rejects_unusable_masks(tmp_path):
    with pytest.raises(DataError, match="no foreground"):
        Sample("x", tmp_path / "x.png", np.zeros((3, 3), bool))
    with pytest.raises(DataError, match="every mask pixel"):
        Sample("x", tmp_path / "x.png", np.ones((3, 3), bool))
    m = _block_mask(3, 3, slice(0, 1), slice(0, 1))
    s = Sample("x", str(tmp_path / "x.png"), m)
    assert isinstance(s.image_path, Path) and m.flags.writeable  # caller's array untouched
    with pytest.raises(DataError, match="duplicate sample id"):
        Dataset([s, s], name="d")


# ----------------------------------------------------------------------------------------------
# label maps and CamVid layout
# ----------------------------------------------------------------------------------------------


def test_label_map_dataset_and_camvid_layout(tmp_path):
    root = tmp_path / "camvid"
    rng = np.random.default_rng(3)
    for i, has_car in enumerate([True, False, True, False, False]):
        labels = np.full((12, 16), 3, np.uint8)
        labels[:2] = 11  # unlabelled strip
        if has_car:
            labels[5:8, 4:10] = 8
        _save(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), root / "val" / f"f{i}.png")
        _save(labels, root / "valannot" / f"f{i}.png")

    ds = camvid(root, "val", "car")
    assert ds.name == "camvid/val/car" and ds.ids == ["f0", "f2"]
    assert ds.skip_counts() == {"class absent": 3}
    assert ds.summary() == "camvid/val/car: 2 samples, 3 skipped (3 class absent)"
    assert int(ds[0].mask.sum()) == 18
    road = camvid(root, "val", 3)
    assert len(road) == 5 and not road[0].mask[:2].any()  # ignore pixels are background
    assert camvid_class_id("Sign/Symbol") == CAMVID_CLASSES.index("sign") == 6
    with pytest.raises(DataError, match="unknown CamVid class 'bus'.*8=car"):
        camvid(root, "val", "bus")
    with pytest.raises(DataError, match="ignore index"):
        label_map_dataset(root / "val", root / "valannot", 11)
    with pytest.raises(DataError, match="available: val"):
        camvid(root, "train", "car")

    _save(np.zeros((5, 5), np.uint8), root / "valannot" / "f0.png")
    with pytest.raises(DataError, match=r"f0.png.*5 x 5 \(H x W\).*12 x 16"):
        camvid(root, "val", "car")
    ds = camvid(root, "val", "car", on_error="skip")
    assert ds.ids == ["f2"] and ds.skip_counts() == {"class absent": 3, "error": 1}


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _coco_fixture(tmp_path: Path) -> tuple[Path, Path]:
    from pycocotools import mask as mask_utils

    h, w = 30, 40
    img_dir = tmp_path / "imgs"
    _save(np.full((h, w, 3), 90, np.uint8), img_dir / "street.png")
    _save(np.full((h, w, 3), 90, np.uint8), img_dir / "blank.png")
    car = _block_mask(h, w, slice(20, 25), slice(20, 35))
    rle = mask_utils.encode(np.asfortranarray(car.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    crowd = _block_mask(h, w, slice(0, 4), slice(30, 40))
    doc = {
        "images": [
            {"id": 1, "file_name": "street.png", "height": h, "width": w},
            {"id": 2, "file_name": "blank.png", "height": h, "width": w},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "Car"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
            {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": rle},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1,
             "segmentation": _uncompressed_rle(crowd)},
        ],
    }  # fmt: skip
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(doc))
    return ann, img_dir


def test_coco_instances_and_categories(tmp_path):
    ann, img_dir = _coco_fixture(tmp_path)
    ds = coco_dataset(ann, img_dir)
    assert ds.ids == ["street#10", "street#11"]
    person, car = ds[0].mask, ds[1].mask
    assert person.shape == (30, 40) and person[10, 10] and not person[0, 0]
    assert 90 <= person.sum() <= 130  # the 10 x 10 polygon square
    assert np.array_equal(car, _block_mask(30, 40, slice(20, 25), slice(20, 35)))
    assert ds.skip_counts() == {"crowd": 1, "no annotations": 1}

    per_cat = coco_dataset(ann, img_dir, per="category")
    assert per_cat.ids == ["street#1", "street#2"]
    assert per_cat[0].mask[1, 35] and per_cat[0].mask[10, 10]  # crowd region in the union

    only_car = coco_dataset(ann, img_dir, category="car")  # case-insensitive fallback
    assert only_car.ids == ["street#11"]
    assert coco_dataset(ann, img_dir, category=1).ids == ["street#10"]
    with pytest.raises(DataError, match="unknown category 'bus'.*2=Car"):
        coco_dataset(ann, img_dir, category="bus")
    small = coco_dataset(ann, img_dir, min_area=80)
    assert small.ids == ["street#10"] and small.skip_counts()["below min_area"] == 1


def test_coco_errors(tmp_path):
    ann, img_dir = _coco_fixture(tmp_path)
    doc = json.loads(ann.read_text())
    doc["annotations"][1]["segmentation"]["size"] = [31, 40]
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotation 11.*RLE size \[31, 40\]"):
        coco_dataset(ann, img_dir)
    assert coco_dataset(ann, img_dir, on_error="skip").ids == ["street#10"]

    doc["images"][0]["height"] = 99
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"99 x 40 \(H x W\).*street.png is 30 x 40"):
        coco_dataset(ann, img_dir)
    ann.write_text("{not json")
    with pytest.raises(DataError, match="instances.json.*parse"):
        coco_dataset(ann, img_dir)


def test_coco_mask_follows_exif_orientation(tmp_path):
    stored = np.zeros((30, 40, 3), np.uint8)  # H=30, W=40 as stored (COCO's frame)
    stored[0:10, 0:20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "imgs").mkdir()
    Image.fromarray(stored).save(tmp_path / "imgs" / "r.jpg", exif=exif, quality=95)
    doc = {
        "images": [{"id": 1, "file_name": "r.jpg", "height": 30, "width": 40}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": [[0, 0, 20, 0, 20, 10, 0, 10]]}],
    }  # fmt: skip
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(doc))
    sample = coco_dataset(ann, tmp_path / "imgs")[0]
    image = sample.load_image()
    assert sample.mask.shape == image.shape[:2] == (40, 30)
    assert image[sample.mask].mean() > 200 and image[~sample.mask].mean() < 50


# ----------------------------------------------------------------------------------------------
# property tests
# ----------------------------------------------------------------------------------------------

_small_gray = arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arr=_small_gray, t=st.integers(0, 254))
def test_load_mask_is_strict_threshold(tmp_path_factory, arr, t):
    path = _save(arr, tmp_path_factory.mktemp("prop") / "m.png")
    mask = load_mask(path, t)
    assert mask.dtype == bool and mask.shape == arr.shape
    assert np.array_equal(mask, arr > t)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arr=_small_gray, t1=st.integers(0, 254), t2=st.integers(0, 254))
def test_load_mask_monotone_in_threshold(tmp_path_factory, arr, t1, t2):
    lo, hi = sorted((t1, t2))
    path = _save(arr, tmp_path_factory.mktemp("prop") / "m.png")
    assert not (load_mask(path, hi) & ~load_mask(path, lo)).any()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arr=arrays(np.uint8, st.tuples(st.integers(1, 8), st.integers(1, 8), st.just(3))),
    t=st.integers(0, 254),
)
def test_load_mask_uses_channel_max(tmp_path_factory, arr, t):
    path = _save(arr, tmp_path_factory.mktemp("prop") / "rgb.png")
    assert np.array_equal(load_mask(path, t), arr.max(axis=2) > t)


# ----------------------------------------------------------------------------------------------
# shared data root and real data
# ----------------------------------------------------------------------------------------------


def test_shared_data_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNSAM_DATA", str(tmp_path))
    assert shared_data_root() == tmp_path
    monkeypatch.setenv("ALIGNSAM_DATA", str(tmp_path / "nope"))
    assert shared_data_root() is None


def test_shared_data_root_from_the_current_folder(tmp_path, monkeypatch):
    """An installed package (its files outside any checkout) finds the data from the current
    folder: ``./shared/data`` or ``../shared/data``."""
    import envs.data.shared as shared

    monkeypatch.delenv("ALIGNSAM_DATA", raising=False)
    site = tmp_path / "site-packages" / "envs" / "data"
    site.mkdir(parents=True)
    monkeypatch.setattr(shared, "__file__", str(site / "shared.py"))
    (tmp_path / "work" / "clone").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "clone")
    assert shared.shared_data_root() is None
    (tmp_path / "work" / "shared" / "data").mkdir(parents=True)
    assert shared.shared_data_root() == tmp_path / "work" / "shared" / "data"
    (tmp_path / "work" / "clone" / "shared" / "data").mkdir(parents=True)
    assert shared.shared_data_root() == tmp_path / "work" / "shared" / "data"  # ../ first
    monkeypatch.chdir(tmp_path / "work")
    assert shared.shared_data_root() == tmp_path / "work" / "shared" / "data"


def _real_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("shared data not found (set ALIGNSAM_DATA or place it at ../shared/data)")
    return root


@pytest.mark.data
def test_real_kvasir_train():
    root = _real_root() / "kvasir-seg"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    ds = kvasir_seg(root, "train")
    assert len(ds) == 50 and not ds.skipped
    assert ds.summary() == "kvasir-seg/train: 50 samples, 0 skipped"
    for sample in ds:
        assert sample.mask.shape == read_image_size(sample.image_path)
        assert 0 < sample.mask.mean() < 1
    assert ds[0].load_image().shape[:2] == ds[0].mask.shape
    with pytest.raises(DataError, match="available: pool, test, test_rest, train, val"):
        kvasir_seg(root, "training")


@pytest.mark.data
def test_real_camvid_val_car(record_property):
    root = _real_root() / "camvid"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    ds = camvid(root, "val", "car")
    n_frames = len(list((root / "val").glob("*.png")))
    absent = ds.skip_counts().get("class absent", 0)
    logging.getLogger(__name__).info(
        "%s (car absent in %d of %d frames)", ds.summary(), absent, n_frames
    )
    record_property("camvid_val_car_absent", absent)
    assert len(ds) + len(ds.skipped) == n_frames
    assert len(ds) > 0
    assert ds[0].mask.shape == (360, 480)
    assert ds[0].load_image().shape == (360, 480, 3)


def test_dataset_spec_slices():
    from experiments.datasets import load_dataset

    full = load_dataset("synthetic:test")
    head, tail = load_dataset("synthetic:test[:10]"), load_dataset("synthetic:test[10:]")
    assert [s.id for s in head] + [s.id for s in tail] == [s.id for s in full]
    assert [s.id for s in load_dataset("synthetic:test[-2:]")] == [s.id for s in full[-2:]]
    with pytest.raises(DataError, match="keeps none"):
        load_dataset("synthetic:test[30:]")


@pytest.mark.data
def test_no_training_image_is_scored_in_any_shipped_task_or_curve_point(monkeypatch):
    """For every shipped task and every learning-curve size up to its pool's end: the training
    images (``train`` + the first of ``pool``) are in no split the task is scored on; and each
    larger training set holds each smaller one. (Ids only: images are not decoded here.)"""
    import functools

    from experiments import runs
    from experiments.curve import curve_task
    from experiments.datasets import load_dataset

    root = _real_root()
    load = functools.lru_cache(maxsize=None)(lambda spec: load_dataset(spec))
    monkeypatch.setattr(runs, "load_readable", lambda spec, on_error="raise": load(spec))
    monkeypatch.setattr(runs, "load_dataset", lambda spec, on_error="raise": load(spec))
    monkeypatch.setattr(
        runs, "readable", lambda samples, on_error="raise", name="": Dataset(list(samples))
    )
    checked = 0
    for path in sorted((REPO / "experiments" / "tasks").glob("*.yaml")):
        task = runs.resolve_task(str(path))
        folder = {"kvasir": "kvasir-seg", "camvid": "camvid"}.get(task.data.train.split(":")[0])
        if folder is None or not (root / folder).is_dir():
            continue
        scored = set()
        for spec in (task.data.val, task.data.test, *_scored_extras(task.data.test)):
            scored |= {s.id for s in load(spec)}
        n_pool = len(load(task.data.pool)) if task.data.pool else 0
        previous: set[str] = set()
        for size in [s for s in (25, 50, 100, 200, 400) if s <= n_pool]:
            ids = [s.id for s in runs.load_train_split(curve_task(task, size))]
            assert len(ids) == size and len(set(ids)) == size
            assert not set(ids) & scored, (task.name, size, sorted(set(ids) & scored)[:5])
            assert previous <= set(ids), (task.name, size)
            previous = set(ids)
            checked += 1
    if not checked:
        pytest.skip("no shipped task's data set is here")
    assert checked >= 5 * 5  # the Kvasir tasks at every size, at least


def _scored_extras(test_spec: str | None) -> list[str]:
    """Other splits results are reported on (Kvasir's ``test_rest``)."""
    return ["kvasir:test_rest"] if test_spec and test_spec.startswith("kvasir") else []


def test_readable_names_bad_files_and_counts_expected_omissions_once(tmp_path, caplog):
    from experiments.datasets import readable

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(good)
    bad.write_bytes(b"not an image")
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    absent = [(str(tmp_path / f"f{i}.png"), "class absent: no pixel of class 8") for i in range(3)]
    quiet = Dataset([Sample("good", good, mask)], name="d", skipped=list(absent))
    with caplog.at_level(logging.INFO, logger="experiments.datasets"):
        assert len(readable(quiet, "skip", name="d")) == 1
    (record,) = [r for r in caplog.records if r.name == "experiments.datasets"]
    assert record.levelno == logging.INFO and "3 class absent" in record.getMessage()
    caplog.clear()
    noisy = Dataset([Sample("good", good, mask), Sample("bad", bad, mask)], name="d",
                    skipped=list(absent))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="experiments.datasets"):
        kept = readable(noisy, "skip", name="d")
    assert len(kept) == 1 and len(kept.skipped) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 usable, 4 skipped (3 class absent, 1 error)" in warnings[0]
    assert any(str(bad) in w for w in warnings[1:]) and not any("f0.png" in w for w in warnings)
