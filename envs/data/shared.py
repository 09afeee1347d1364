"""Where the shared evaluation datasets live (``../shared/data`` beside the checkout, or
``$ALIGNSAM_DATA``)."""

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
    the first existing of ``<repo>/../shared/data`` and ``<repo>/shared/data``, where
    ``<repo>`` is the parent of the ``envs`` package folder.

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
    for candidate in (repo.parent / "shared" / "data", repo / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None
