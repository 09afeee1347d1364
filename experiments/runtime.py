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
    ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` / ``MALLOC_MMAP_THRESHOLD_``; a setting
    given in the environment is kept. The mmap threshold matters even when only the first two
    are set: setting any of them turns off glibc's dynamic mmap threshold, so every buffer above
    128 kB (the decoder's 4 MB activations) would be mmap'ed and unmapped on each call, which
    measured here as half the CPU time in the kernel and a 2x slower training step. Skipped when
    the C library is not glibc or ``ALIGNSAM_NO_MALLOC_TUNING`` is set. Returns whether every
    setting it made was accepted.
    """
    if os.environ.get("ALIGNSAM_NO_MALLOC_TUNING"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = [
        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, 2**31 - 1),
        ("MALLOC_TOP_PAD_", _M_TOP_PAD, 1 << 30),
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
    ]
    ok = all(
        mallopt(param, value) == 1 for env, param, value in settings if not os.environ.get(env)
    )
    logger.debug("mallopt tuning %s", "applied" if ok else "refused")
    return ok
