"""Atomic writes shared by every on-disk artefact (cache entries, SRM files, pointers,
checkpoint folders)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(fh)`` into a temp file in the same folder, then rename.

    Readers see either the old file or the complete new one; an interrupted writer leaves at
    most a hidden ``.tmp`` file, which is removed when the failure is an exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_folder(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Write the folder ``path`` through ``fill(tmp)`` into a hidden temporary folder beside it,
    then rename it into place (an old ``path`` is replaced).

    Readers see the old folder, no folder or the complete new one; a failure inside ``fill``
    removes the temporary folder and leaves an old ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
