"""Process-level tuning applied by the command line (never by the library on import)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS on every free.

    PyTorch on CPU allocates and frees large activation buffers for every forward pass; on
    small VMs returning them to the kernel each time (and faulting them back in) roughly
    doubles MobileSAM's encoder time. This is the in-process equivalent of
    ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``; it is skipped when those are set or
    when the C library is not glibc. Returns whether it was applied.
    """
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") or os.environ.get("ALIGNSAM_NO_MALLOC_TUNING"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_TRIM_THRESHOLD, 2**31 - 1),
            (_M_TOP_PAD, 1 << 30),
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
        )
    )
    logger.debug("mallopt tuning %s", "applied" if ok else "refused")
    return ok
