"""One progress layer for every long loop of the project (encoding, SRM training, judge rounds,
PPO, benchmarks, segmenting).

:func:`progress_bar` takes tqdm's arguments and picks how progress is shown:

- on a terminal (or in a notebook), tqdm's live bar;
- when standard error is a file or a pipe (``alignsam train > train.log 2>&1``, nohup, tmux
  logging, a scheduler), :class:`LineProgress`: no carriage returns and no redraws, only plain
  lines. A stage prints one line when it ends (count, time, rate) and, while it runs, one line
  when both ~30 s have passed and another ~10 % is done since the last line (count, percent,
  the stage's average rate, time left at that rate): a short stage is one line, a long one at
  most about a dozen;
- ``disable=True`` (the commands' ``--no-progress``): nothing.

``ALIGNSAM_PROGRESS=bar|lines|off`` overrides the choice (e.g. ``lines`` on a terminal whose
scrollback is kept). Library code imports :func:`progress_bar` instead of tqdm.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

__all__ = ["LineProgress", "progress_bar", "progress_mode"]

#: Seconds between two intermediate lines of one stage, at least.
LINE_INTERVAL = 30.0
#: Share of the total a stage must advance between two intermediate lines, at least.
LINE_STEP = 0.10
#: Seconds between two checks whether a line is due (tqdm's ``mininterval``).
CHECK_INTERVAL = 1.0
#: Seconds between intermediate lines of a stage whose total is unknown.
UNKNOWN_TOTAL_INTERVAL = 60.0

_RUNNING = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, {remaining} left"
_RUNNING_NO_TOTAL = "{desc}: {n_fmt} {unit} after {elapsed}, {rate_fmt}"
_DONE = "{desc}: {n_fmt}/{total_fmt} {unit} in {elapsed} ({rate_fmt})"
_DONE_NO_TOTAL = "{desc}: {n_fmt} {unit} in {elapsed} ({rate_fmt})"


class _Discard:
    """Where tqdm's own drawing goes in line mode (its carriage returns and clears)."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class LineProgress(tqdm):
    """tqdm's counting and rates, printed as plain lines (see the module docstring).

    Args:
        *args: as :class:`tqdm.tqdm`.
        stream: where the lines go (default: standard error at the time of each line).
        **kwargs: as :class:`tqdm.tqdm` (``file``, ``mininterval`` and ``ncols`` are set here).
    """

    def __init__(self, *args: Any, stream: TextIO | None = None, **kwargs: Any) -> None:
        self._stream = stream
        self._closing = False
        self._line_n = kwargs.get("initial", 0)  # a resumed stage counts from where it was
        self._line_t = time.monotonic()
        kwargs.update(file=_Discard(), mininterval=CHECK_INTERVAL, ncols=0, dynamic_ncols=False)
        # A line's rate and time left are the stage's average since it began, not tqdm's
        # moving average of the last updates: lines are far apart and many stages advance in
        # bursts (PPO's rollouts, updates and evaluations), which swung the time left 10-fold.
        kwargs["smoothing"] = 0
        kwargs.pop("position", None)  # lines need no screen rows
        super().__init__(*args, **kwargs)

    def _due(self) -> bool:
        if self._closing:
            return True
        waited = time.monotonic() - self._line_t
        if not self.total:
            return waited >= UNKNOWN_TOTAL_INTERVAL
        if self.n >= self.total:  # the closing line says it
            return False
        return waited >= LINE_INTERVAL and (self.n - self._line_n) >= LINE_STEP * self.total

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Print one line when one is due; tqdm's clearing calls (``msg`` given) print none."""
        if msg is not None or not self._due():
            return True
        if self._closing:
            fmt = _DONE if self.total else _DONE_NO_TOTAL
        else:
            fmt = _RUNNING if self.total else _RUNNING_NO_TOTAL
        values = dict(self.format_dict)
        values.update(bar_format=fmt, ncols=None)  # ncols=0 would drop bar_format
        if not values.get("prefix"):
            values["prefix"] = "progress"
        line = " ".join(self.format_meter(**values).split()).replace("( ", "(")
        stream = self._stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()
        self._line_n, self._line_t = self.n, time.monotonic()
        return True

    def close(self) -> None:
        """Print the stage's closing line (unless ``leave=False``), then close."""
        if self.disable:
            return
        self._closing = True
        super().close()


def progress_mode(stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off``: ``$ALIGNSAM_PROGRESS`` if set, else ``bar`` on a terminal
    or in a notebook and ``lines`` otherwise."""
    forced = os.environ.get("ALIGNSAM_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    stream = stream or sys.stderr
    if "ipykernel" in sys.modules:
        return "bar"
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "lines"


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str = "",
    total: float | None = None,
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    **kwargs: Any,
) -> tqdm:
    """A progress bar (a tqdm object: iterate it, or ``update``/``set_postfix``/``close`` it) in
    the form that fits where the output goes (see the module docstring).

    Args:
        iterable: what to iterate (``None``: count with ``update``).
        desc: the stage's name, the start of each line.
        total: the expected count (default ``len(iterable)`` where it has one).
        unit: what is counted (``img``, ``step``, ``epoch``).
        disable: show nothing (``--no-progress``).
        leave: keep the finished bar (line mode: print the closing line).
        **kwargs: other :class:`tqdm.tqdm` arguments.
    """
    mode = "off" if disable else progress_mode()
    common = {"desc": desc, "total": total, "unit": unit, "leave": leave, **kwargs}
    if mode == "off":
        return tqdm(iterable, disable=True, **common)
    if mode == "lines":
        return LineProgress(iterable, **common)
    return auto_tqdm(iterable, **common)
