"""Sharing the CPU (issue 26, item 6): the ``alignsam`` process sizes torch's and ONNX Runtime's
thread pools to its affinity mask and makes OpenMP wait passively, before torch is imported;
``bench contention`` measures PPO training alone and beside a CPU-bound process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.runtime import LEGACY_THREADS_ENV, OMP_ENV, available_cores


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (*OMP_ENV, LEGACY_THREADS_ENV)}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=300,
    )


REPORT = """
import json, os, sys
from experiments.runtime import tune_threads
applied = tune_threads({threads})
assert "torch" not in sys.modules
import torch
print(json.dumps({{"env": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.get_num_threads(),
                  "applied": applied}}))
"""


def test_thread_pools_are_sized_to_the_affinity_mask_and_wait_passively():
    out = json.loads(_python(REPORT.format(threads=0)).stdout)
    assert out["env"] == "PASSIVE"
    assert out["torch"] == available_cores() == out["applied"]["threads"]
    one = json.loads(_python(REPORT.format(threads=1)).stdout)
    assert one["torch"] == 1
    mine = json.loads(_python(REPORT.format(threads=0), OMP_WAIT_POLICY="ACTIVE").stdout)
    assert mine["env"] == "ACTIVE"  # a setting the user made is kept
    legacy = json.loads(_python(REPORT.format(threads=0), **{LEGACY_THREADS_ENV: "1"}).stdout)
    assert legacy["env"] is None and legacy["applied"]["legacy"] == 1


def test_the_command_line_imports_no_torch_before_the_threads_are_set():
    code = (
        "import os, sys\n"
        "import experiments.cli as cli, experiments.cli.weights as w\n"
        "assert 'torch' not in sys.modules\n"
        "def probe(args):\n"
        "    import torch\n"
        "    print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())\n"
        "    return 0\n"
        "w.run = probe\n"
        "sys.exit(cli.main(['--threads', '1', 'weights', 'list']))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["PASSIVE", "1"]


SPIN = """
import resource, time
from experiments.runtime import tune_threads
tune_threads(2)
import torch
x = torch.randn(200_000)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
idle = 0.0
for _ in range(100):
    y = x * 2.0 + 1.0  # a parallel region on two threads, then nothing to do
    c0 = cpu()
    time.sleep(0.005)
    idle += cpu() - c0  # CPU time the process burnt while it had nothing to do
print(idle)
"""


@pytest.mark.skipif(available_cores() < 2, reason="needs two cores for two OpenMP threads")
def test_passive_waiting_takes_effect():
    """OpenMP reads the wait policy once, when torch loads: with ``tune_threads`` first, idle
    threads sleep (no CPU time while the process waits); with spinning forced, the worker
    thread burns its core in every pause (the legacy settings leave OpenMP's default, which
    spins for a while after each op)."""
    passive = float(_python(SPIN).stdout)
    spinning = float(_python(SPIN, OMP_WAIT_POLICY="ACTIVE", **{LEGACY_THREADS_ENV: "1"}).stdout)
    assert passive < 0.25 * spinning, (passive, spinning)


@pytest.mark.slow
def test_bench_contention_measures_alone_and_beside_a_busy_process(tmp_path):
    out = tmp_path / "contention.json"
    env = {k: v for k, v in os.environ.items() if k not in (*OMP_ENV, LEGACY_THREADS_ENV)}
    env.update(ALIGNSAM_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "bench", "contention", "--segmenter", "tiny",
         "--dataset", "synthetic:val", "--limit", "2", "--task", "synthetic", "--n-steps", "16",
         "--legacy-threads", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["cores"] == available_cores() and res["busy_processes"] == 1
    for name in ("current", "legacy"):
        r = res["settings"][name]
        assert r["alone"] > 0 and r["shared"] > 0 and r["ratio"] == r["shared"] / r["alone"]
        assert r["alone_run"]["steps"] == 16
    assert res["settings"]["current"]["alone_run"]["omp_wait_policy"] == "PASSIVE"
    assert res["settings"]["legacy"]["alone_run"]["omp_wait_policy"] != "PASSIVE"
    assert "beside one CPU-bound process" in proc.stdout and "shared/alone" in proc.stdout
    assert not _busy_loops_left()  # the busy loop was stopped


def _busy_loops_left() -> bool:
    """Whether a busy-loop process of ``bench contention`` is still running."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"while True:\n    pass" in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


LOST_CTRL_C = """
import os, signal, sys, threading, time
from experiments.runtime import sticky_ctrl_c

class Closes:
    def __del__(self):  # a finalizer, like NumPy's NpzFile.__del__: Ctrl-C lands in it
        time.sleep(1.0)

def train():
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    Closes()  # Python prints "Exception ignored in ... __del__" and goes on
    t0 = time.monotonic()
    while time.monotonic() - t0 < 8:
        sum(range(1000))
    return "finished"

try:
    if sys.argv[1] == "sticky":
        with sticky_ctrl_c(every=0.2):
            print(train())
    else:
        print(train())
except KeyboardInterrupt:
    print("interrupted")
time.sleep(0.6)  # no interrupt arrives after the block
print("default handler back:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
"""


def _lost_ctrl_c(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOST_CTRL_C, mode],
        capture_output=True,
        text=True,
        timeout=60,
        # a shell's background job inherits SIGINT ignored: start as a terminal's process does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_a_ctrl_c_lost_in_a_finalizer_is_raised_again():
    plain = _lost_ctrl_c("plain")  # the failure this guards against: the run goes on
    assert "Exception ignored" in plain.stderr and "KeyboardInterrupt" in plain.stderr
    assert plain.stdout.split() == ["finished", "default", "handler", "back:", "True"]
    t0 = time.monotonic()
    sticky = _lost_ctrl_c("sticky")
    assert sticky.stdout.split() == ["interrupted", "default", "handler", "back:", "True"]
    assert time.monotonic() - t0 < 6, sticky.stderr  # well before the 8 s loop ends
