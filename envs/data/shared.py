"""Where the shared evaluation datasets live (``$ALIGNSAM_DATA``, or ``shared/data`` beside or
inside the checkout or the current folder)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: Environment variable that overrides the location of the shared datasets.
DATA_ENV = "ALIGNSAM_DATA"


def shared_data_root() -> Path | None:
    """Folder holding the shared datasets (``kvasir-seg/``, ``camvid/``), if present.

    ``$ALIGNSAM_DATA`` wins when set (``None`` with a warning if it is not a folder); otherwise
    the first existing of ``<repo>/../shared/data``, ``<repo>/shared/data`` (``<repo>``: the
    parent of the ``envs`` package folder, i.e. the checkout when running from a clone), then
    ``./../shared/data`` and ``./shared/data`` relative to the current folder (an installed
    package, run from the checkout or beside the data).

    Returns:
        The folder, or ``None`` when absent (tests then skip).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path
        logger.warning("$%s=%s is not a directory; shared data unavailable", DATA_ENV, env)
        return None
    repo = Path(__file__).resolve().parents[2]
    cwd = Path.cwd()
    for base in (repo, cwd):
        for candidate in (base.parent / "shared" / "data", base / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    return None
