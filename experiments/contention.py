"""``alignsam bench contention``: PPO training speed alone and beside one CPU-bound process.

Users train on laptops that run other things. Each figure is PPO training env-steps/s
(``alignsam bench ppo``, updates included) measured in a fresh ``alignsam`` process, so the
thread settings apply from the start as they do for ``alignsam train``: first alone, then while
one CPU-bound process (a Python busy loop this command starts, and stops after) competes for
the cores. A fair share of the cores costs half the speed at most (50 % on 2 cores); spinning
thread pools cost far more. ``legacy_too`` repeats both with the thread settings of alignsam
0.1.0 (:data:`experiments.runtime.LEGACY_THREADS_ENV`), so the effect of the current ones is
visible on the same machine.

This module imports no torch: the measuring happens in the child processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from experiments.runtime import LEGACY_THREADS_ENV, OMP_ENV, available_cores, original_env

__all__ = ["BUSY_LOOP", "busy_process", "render", "run_contention"]

#: The competing process: one Python thread that never sleeps.
BUSY_LOOP = "while True:\n    pass\n"


@contextlib.contextmanager
def busy_process() -> Iterator[subprocess.Popen]:
    """One CPU-bound process for the duration of the block (stopped and reaped after)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # running before the measured process starts
        if proc.poll() is not None:
            raise RuntimeError(f"the busy-loop process exited at once (code {proc.returncode})")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _env(legacy: bool) -> dict[str, str]:
    env = dict(os.environ)
    if legacy:  # as the user's environment was before alignsam set its thread settings
        for key in OMP_ENV:
            env.pop(key, None)
            if original_env(key) is not None:
                env[key] = original_env(key)
        env[LEGACY_THREADS_ENV] = "1"
    else:
        env.pop(LEGACY_THREADS_ENV, None)
    return env


def _measure(command: Sequence[str], legacy: bool, timeout: float) -> dict[str, Any]:
    """Run ``alignsam ... bench ppo`` once and return its JSON figures."""
    with tempfile.TemporaryDirectory(prefix="alignsam-contention-") as tmp:
        out = Path(tmp) / "ppo.json"
        proc = subprocess.run(
            [*command, "--out", str(out)],
            env=_env(legacy),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise RuntimeError(f"bench ppo failed (exit code {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def run_contention(
    ppo_args: Sequence[str],
    *,
    threads: int = 0,
    legacy_too: bool = False,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """PPO env-steps/s alone and beside one CPU-bound process, current thread settings (and the
    legacy ones with ``legacy_too``).

    Args:
        ppo_args: Arguments of ``alignsam bench ppo`` (task, dataset, budget, segmenter).
        threads: ``alignsam --threads`` of the measured processes (0: their default).
        legacy_too: Also measure with :data:`~experiments.runtime.LEGACY_THREADS_ENV` set.
        timeout: Seconds each measured process may take.

    Returns:
        ``{"cores", "settings": {name: {"alone", "shared", "ratio", "alone_run",
        "shared_run"}}}`` with env-steps/s figures and each run's full JSON.
    """
    command = [sys.executable, "-m", "experiments.cli"]
    if threads:
        command += ["--threads", str(threads)]
    command += ["bench", "ppo", *ppo_args]
    settings: dict[str, Any] = {}
    for name, legacy in [("current", False)] + ([("legacy", True)] if legacy_too else []):
        alone = _measure(command, legacy, timeout)
        with busy_process():
            shared = _measure(command, legacy, timeout)
        a, s = alone["env_steps_per_s"], shared["env_steps_per_s"]
        settings[name] = {
            "alone": a,
            "shared": s,
            "ratio": s / a if a > 0 else float("nan"),
            "alone_run": alone,
            "shared_run": shared,
        }
    return {"cores": available_cores(), "busy_processes": 1, "settings": settings}


def render(result: dict[str, Any]) -> str:
    """The printed report: both figures and their ratio per thread setting."""
    any_run = next(iter(result["settings"].values()))["alone_run"]
    lines = [
        f"PPO training env-steps/s ({any_run['task']}, {any_run['steps']} steps incl. updates, "
        f"{any_run['segmenter']}, {result['cores']} cores available), alone and beside one "
        "CPU-bound process:",
        f"{'threads':10s}{'alone':>10s}{'shared':>10s}{'shared/alone':>14s}",
    ]
    for name, r in result["settings"].items():
        run = r["alone_run"]
        lines.append(
            f"{name:10s}{r['alone']:10.2f}{r['shared']:10.2f}{100 * r['ratio']:13.1f}%"
            f"   ({run['torch_threads']} torch threads, OMP_WAIT_POLICY "
            f"{run['omp_wait_policy']})"
        )
    lines.append("(a fair share of the cores is 50 %; target: shared >= 40 % of alone)")
    return "\n".join(lines)
