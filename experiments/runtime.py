"""Process-level tuning applied by the command line (never by the library on import): glibc's
allocator, the thread pools of torch (OpenMP) and ONNX Runtime, and a Ctrl-C that sticks."""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

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


#: Set (to anything) to keep the thread settings of alignsam 0.1.0: no OpenMP wait policy and
#: no thread count given to OpenMP (``bench contention --legacy-threads`` compares the two).
LEGACY_THREADS_ENV = "ALIGNSAM_LEGACY_THREADS"

#: The OpenMP settings :func:`tune_threads` may set.
OMP_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")
_ORIGINAL_ENV = {key: os.environ.get(key) for key in OMP_ENV}


def original_env(key: str) -> str | None:
    """``key``'s value in the environment before :func:`tune_threads` ran."""
    return _ORIGINAL_ENV.get(key, os.environ.get(key))


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask: ``taskset``, cgroups cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def tune_threads(threads: int = 0) -> dict[str, str | int]:
    """Size and calm the thread pools, before torch is imported (OpenMP reads its settings once).

    - OpenMP's threads (torch's intra-op pool, and MKL's, which shares it) wait passively
      (``OMP_WAIT_POLICY=PASSIVE``): a thread that finished its part of an op sleeps instead of
      spinning for the next. Spinning threads win a few microseconds per op on an idle machine
      but take the cores from everything else: beside one other CPU-bound process on 2 cores,
      PPO training collapsed to a tenth of its speed (docs/performance.md).
    - torch's pool has ``threads`` threads, default the cores in this process's affinity mask
      (``OMP_NUM_THREADS``); ONNX Runtime's sessions take torch's count when they are made
      (:mod:`segmenter.onnx_backend`) and never spin, and torch runs on one thread around ONNX
      Runtime's decoder calls (:func:`segmenter.base.small_torch_ops`), so the two pools never
      ask for more cores than there are.

    Settings already in the environment are kept (``--threads`` wins over
    ``OMP_NUM_THREADS``). With ``ALIGNSAM_LEGACY_THREADS`` set, only ``threads`` is applied, as
    before. Returns what was applied.
    """
    n = threads or available_cores()
    legacy = bool(os.environ.get(LEGACY_THREADS_ENV))
    if not legacy:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        else:
            os.environ.setdefault("OMP_NUM_THREADS", str(n))
        n = int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else n
    torch = sys.modules.get("torch")  # imported already (tests calling main()): set it directly
    if torch is not None and (threads or not legacy):
        torch.set_num_threads(n)
    elif threads and legacy:
        import torch

        torch.set_num_threads(threads)
    applied: dict[str, str | int] = {
        "threads": n,
        "cores": available_cores(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP's default)"),
        "legacy": int(legacy),
    }
    logger.debug("threads: %s", applied)
    return applied


#: Seconds between two re-deliveries of a Ctrl-C that the running command has not ended on.
CTRL_C_REPEAT = 2.0


@contextlib.contextmanager
def sticky_ctrl_c(every: float = CTRL_C_REPEAT) -> Iterator[None]:
    """Within the block, Ctrl-C raises :class:`KeyboardInterrupt` as usual and, should the code
    inside lose it, raises it again every ``every`` seconds until the block is left.

    Python raises the interrupt wherever the main thread happens to be; when that is a
    finalizer (a ``__del__`` run by the garbage collector or at a refcount drop, such as NumPy's
    ``NpzFile.__del__`` after each cached embedding read) or a library's broad ``except``, it is
    printed as "Exception ignored" and lost, and a training run goes on as if nothing was
    pressed. A daemon thread started by the first Ctrl-C re-delivers it
    (``_thread.interrupt_main``) until the block ends, however it ends. Does nothing outside the
    main thread or when SIGINT does not have Python's default handler (ignored, or a program's
    own handler).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    left = threading.Event()
    lock = threading.Lock()  # no re-delivery once the block is being left

    def repeat() -> None:
        while not left.wait(every):
            with lock:
                if not left.is_set():
                    _thread.interrupt_main()

    repeater = threading.Thread(target=repeat, name="alignsam-ctrl-c", daemon=True)

    def on_ctrl_c(signum: int, frame: object) -> None:
        if not repeater.is_alive() and not left.is_set():
            repeater.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        with lock:
            left.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
