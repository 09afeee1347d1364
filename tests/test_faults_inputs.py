"""Bad input through every entry point (`embed`, `train`, `segment`, `benchmark`, and the
loader they share): each bad file stops the command with an error naming it and the fix, or,
with ``--skip-bad``, is left out and listed, while odd but valid files (grayscale, RGBA,
palette, 16-bit, CMYK, EXIF-rotated, non-binary masks, unicode names) are used, aligned."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from envs.data import DataError
from experiments.cli import main
from experiments.datasets import load_readable

H, W = 48, 64


def _disk(h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 4) ** 2


def _image(stem: str, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(stem)) % 2**32)
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    img[_disk(h, w)] = (220, 60, 60)
    return img


def _write(root: Path, stem: str, image=None, mask=None, ext: str = ".png") -> tuple[Path, Path]:
    """An image / mask pair under root/images, root/masks (defaults: a valid pair)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    img_path, mask_path = root / "images" / f"{stem}{ext}", root / "masks" / f"{stem}.png"
    im = image if image is not None else Image.fromarray(_image(stem))
    im.save(img_path, **({"quality": 95} if ext == ".jpg" else {}))
    m = mask if mask is not None else _disk().astype(np.uint8) * 255
    Image.fromarray(m).save(mask_path)
    return img_path, mask_path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_jpeg(root: Path, stem: str) -> None:
    img, _ = _write(root, stem, ext=".jpg")
    _truncate(img)


def _truncated_png(root: Path, stem: str) -> None:
    img, _ = _write(root, stem)
    _truncate(img)


def _zero_byte(root: Path, stem: str) -> None:
    img, _ = _write(root, stem)
    img.write_bytes(b"")


def _text_as_image(root: Path, stem: str) -> None:
    img, _ = _write(root, stem, ext=".jpg")
    img.write_text("<html>not an image</html>\n")


def _wrong_size_mask(root: Path, stem: str) -> None:
    _write(root, stem, mask=np.full((H // 2, W // 2), 255, np.uint8))


def _empty_mask(root: Path, stem: str) -> None:
    _write(root, stem, mask=np.zeros((H, W), np.uint8))


def _full_mask(root: Path, stem: str) -> None:
    _write(root, stem, mask=np.full((H, W), 255, np.uint8))


def _no_mask(root: Path, stem: str) -> None:
    _, mask = _write(root, stem)
    mask.unlink()


def _huge_image(root: Path, stem: str) -> None:
    """A PNG whose header claims 11000 x 10000 pixels (110 Mpx): refused from the header, before
    any pixel is decoded, instead of exhausting memory."""
    img, _ = _write(root, stem)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 11_000, 10_000, 8, 0, 0, 0, 0)
    img.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def _corrupt_mask(root: Path, stem: str) -> None:
    _, mask = _write(root, stem)
    _truncate(mask)


#: Files that cannot be used: an error naming the file, or a listed skip.
BAD: dict[str, Callable[[Path, str], None]] = {
    "truncated JPEG": _truncated_jpeg,
    "truncated PNG": _truncated_png,
    "zero-byte file": _zero_byte,
    "non-image with an image extension": _text_as_image,
    "mask of the wrong size": _wrong_size_mask,
    "all-zero mask": _empty_mask,
    "all-one mask": _full_mask,
    "image without a mask": _no_mask,
    "corrupt mask": _corrupt_mask,
    "image beyond the pixel limit": _huge_image,
}


def _odd_but_valid(root: Path) -> dict[str, str]:
    """Files that must be used, masks aligned; returns {stem: kind}."""
    rgb = _image("odd")
    _write(root, "gray", Image.fromarray(rgb[..., 0]))
    _write(root, "rgba", Image.fromarray(rgb).convert("RGBA"))
    _write(root, "palette", Image.fromarray(rgb).convert("P"))
    _write(root, "sixteen", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))
    _write(root, "cmyk", Image.fromarray(rgb).convert("CMYK"), ext=".jpg")
    # stored 64 x 48 (H x W), displayed rotated 90 degrees to 48 x 64: the mask follows the
    # display, so it only pairs up if the loaders apply the EXIF orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image("rot", W, H)).save(root / "images" / "exif rot.jpg", exif=exif)
    Image.fromarray(_disk().astype(np.uint8) * 255).save(root / "masks" / "exif rot.png")
    _write(root, "soft mask", mask=(_disk() * 200 + 20).astype(np.uint8))  # non-binary
    _write(root, "polyp ü 日本")
    return {
        "gray": "grayscale image",
        "rgba": "RGBA image",
        "palette": "palette image",
        "sixteen": "16-bit image",
        "cmyk": "CMYK JPEG",
        "exif rot": "EXIF-rotated JPEG",
        "soft mask": "non-binary mask",
        "polyp ü 日本": "unicode and spaces in the name",
    }


def _messy(root: Path, bad: list[str]) -> tuple[Path, dict[str, str]]:
    for i in range(3):
        _write(root, f"good{i}")
    for kind in bad:
        BAD[kind](root, _stem(kind))
    return root, _odd_but_valid(root)


def _stem(kind: str) -> str:
    return "bad " + kind.replace(" ", "_")


def _spec(root: Path) -> str:
    return f"folder:{root / 'images'}:{root / 'masks'}"


def _task(root: Path, tmp: Path, name: str = "messy") -> Path:
    path = tmp / f"{name}.yaml"
    spec = _spec(root)
    path.write_text(
        f"name: {name}\n"
        f'data: {{train: "{spec}", val: "{spec}", test: "{spec}"}}\n'
        "segmenter: tiny\n"
        "env: {max_steps: 3}\n"
        "srm_pretrain_epochs: 1\n"
        "ppo: {n_steps: 16, batch_size: 8, n_epochs: 1, cnn_channels: 8}\n"
        "total_timesteps: 16\neval_every: 16\ncheckpoint_every: 16\n"
    )
    return path


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["--threads", "1", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    """A tiny run trained with --skip-bad on a folder holding every bad and odd kind."""
    tmp = tmp_path_factory.mktemp("messy")
    root, odd = _messy(tmp / "data", list(BAD))
    task = _task(root, tmp)
    cache = str(tmp / "emb")
    rc = main(
        ["--threads", "1", "train", str(task), "--runs-dir", str(tmp / "runs"), "--cache", cache]
        + ["--no-progress", "--skip-bad"]
    )
    assert rc == 0
    (run,) = (tmp / "runs").iterdir()
    return {"root": root, "odd": odd, "task": task, "run": run, "cache": cache, "tmp": tmp}


ENTRIES = ("loader", "embed", "train", "segment", "benchmark")


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_stops_every_entry_point_naming_it(kind, messy_run, tmp_path, capsys, faults):
    root, _ = _messy(tmp_path / "data", [kind])
    stem, spec, cache = _stem(kind), _spec(root), str(tmp_path / "emb")
    with pytest.raises(DataError, match=stem) as err:
        load_readable(spec)
    assert "skip" in str(err.value)
    faults.bad_input("loader", kind)

    task = _task(root, tmp_path)
    runs = tmp_path / "runs"
    calls = {
        "embed": ["embed", spec, "--segmenter", "tiny", "--cache", cache],
        "train": ["train", str(task), "--runs-dir", str(runs), "--cache", cache, "--no-progress"],
        "segment": ["segment", str(messy_run["run"]), spec, "--out", str(tmp_path / "seg")]
        + ["--cache", cache, "--no-progress"],
        "benchmark": ["benchmark", str(task), "--agents", str(messy_run["run"]), "--out"]
        + [str(tmp_path / "bench"), "--cache", cache, "--no-progress"],
    }
    for entry, args in calls.items():
        rc, _, err_text = _cli(capsys, *args)
        assert rc == 3, (entry, err_text)  # bad input data: exit code 3
        assert stem in err_text and "--skip-bad" in err_text, (entry, err_text)
        faults.bad_input(entry, kind)
    assert not runs.exists() or not any(runs.iterdir())  # no half-made run folder left behind


def _assert_lists_every_bad_file(text: str) -> None:
    assert f"skipped {len(BAD)} file(s)" in text, text
    for kind in BAD:
        assert _stem(kind) in text, (kind, text)


def test_skip_bad_trains_on_the_usable_files(messy_run, faults):
    summary = json.loads((messy_run["run"] / "summary.json").read_text())
    for split in ("train", "val"):
        skipped = {Path(f).stem for f, _ in summary["skipped"][split]}
        assert skipped == {_stem(k) for k in BAD}, split
    assert json.loads((messy_run["run"] / "config.json").read_text())["data"]["on_error"] == "skip"
    for kind in BAD:
        faults.bad_input("train --skip-bad", kind)


def test_skip_bad_embed_segment_benchmark(messy_run, tmp_path, capsys, faults):
    spec, cache, odd = _spec(messy_run["root"]), messy_run["cache"], messy_run["odd"]
    n_valid = 3 + len(odd)

    embed = ("embed", spec, "--segmenter", "tiny", "--cache", cache, "--skip-bad")
    rc, out, err = _cli(capsys, *embed)
    assert rc == 0, err
    assert f"{n_valid} images" in out
    _assert_lists_every_bad_file(out)

    seg_out = tmp_path / "seg"
    rc, out, err = _cli(
        capsys, "segment", str(messy_run["run"]), spec, "--out", str(seg_out), "--cache", cache,
        "--no-progress", "--skip-bad",
    )  # fmt: skip
    assert rc == 0, err
    assert f"segmented {n_valid} images" in out and f"skipped {len(BAD)}" in out
    summary = json.loads((seg_out / "summary.json").read_text())
    assert {Path(s["id"]).stem for s in summary["skipped"]} == {_stem(k) for k in BAD}
    for stem in odd:  # at the displayed size (the EXIF-rotated one is stored as 64 x 48)
        with Image.open(seg_out / "masks" / f"{stem}.png") as m:
            assert m.size == (W, H), stem

    bench_out = tmp_path / "bench"
    rc, out, err = _cli(
        capsys, "benchmark", str(messy_run["task"]), "--agents", str(messy_run["run"]),
        "--out", str(bench_out), "--cache", cache, "--no-progress", "--skip-bad",
        "--methods", "random", "--manual-clicks", "2",
    )  # fmt: skip
    assert rc == 0, err
    _assert_lists_every_bad_file(out)
    result = json.loads((bench_out / "results.json").read_text())
    assert result["n_images"] == n_valid and len(result["skipped"]) == len(BAD)
    for entry in ("embed", "segment", "benchmark"):
        for kind in BAD:
            faults.bad_input(f"{entry} --skip-bad", kind)
        for kind in odd.values():
            faults.bad_input(entry, kind)
