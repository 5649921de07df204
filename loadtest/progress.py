"""Progress of a long command (`bench overhead`, `bench throughput`, `parity`): a live line, or plain lines.

Strategy: one context manager, `progress(label, total)`, yields a `Progress` with three calls:
`advance(n, status=...)` (n units done: requests, jobs), `step(msg)` (a new step begins and the one
before it is done: a cell of the overhead run) and `note(msg)` (a message about the run that is no
step). On a terminal (``sys.stderr.isatty()``, or the given console's own verdict when it writes
elsewhere) they drive one rich.progress line on stderr -- label, bar, done/total, the current step or
status, elapsed and remaining time -- which disappears when the block ends (`transient`), so the
command's tables follow on a clean screen; notes are printed above it. Anywhere else (CI logs, files,
pipes) nothing moves: each step and note is one line, exactly the text given (what the commands printed
before the live line existed), and `advance` prints ``label: done/total[, status]`` at most about ten
times a run (every tenth of `total`, and the last one), never once per request of a long run.
Output goes through the rich `Console` the command passes (its stderr console), so markup in a step is
rendered the same way in both modes. `total` may be None (unknown): the bar then pulses. More done
than `total` grows the total instead of overflowing. Only stderr is written: stdout keeps the tables,
JSON and Markdown unchanged. Calls may come from any thread (rich's Progress takes a lock; plain mode
holds one for its counters).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

PLAIN_LINES = 10  # plain mode: about this many `advance` lines a run


class Progress:
    """What `progress()` yields: advance a count, begin a step, print a note."""

    def __init__(self, label: str, total: int | None, console: Console, live: RichProgress | None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.console = console
        self._live = live
        self._task = live.add_task(label, total=total, status="") if live is not None else None
        self._lock = threading.Lock()
        self._steps = 0  # steps begun
        self._every = max(1, math.ceil(total / PLAIN_LINES)) if total else 1
        self._next_line = self._every

    @property
    def live(self) -> bool:
        """True when a rich live line is shown (stderr is a terminal)."""
        return self._live is not None

    def advance(self, n: int = 1, *, status: str | None = None) -> None:
        """`n` more units done; `status` (e.g. "2 errors") is shown after the count."""
        done, total, line = self._count(n)
        if self._live is not None:
            fields = {} if status is None else {"status": status}
            self._live.update(self._task, completed=done, total=total, **fields)
        elif line:
            count = f"{done}/{total}" if total is not None else f"{done}"
            self.console.print(f"{self.label}: {count}" + (f", {status}" if status else ""),
                               markup=False, highlight=False)

    def step(self, msg: str) -> None:
        """A new step begins (the previous one, if any, is done): shown on the live line, or one line."""
        with self._lock:
            begun, self._steps = self._steps, self._steps + 1
        if self._live is not None:
            done, total, _ = self._count(1 if begun else 0)
            self._live.update(self._task, completed=done, total=total, status=msg)
        else:
            self._count(1 if begun else 0)
            self.console.print(msg)

    def note(self, msg: str) -> None:
        """A line about the run, not a step: above the live line, or one line."""
        if self._live is not None:
            self._live.console.print(msg)
        else:
            self.console.print(msg)

    def _count(self, n: int) -> tuple[int, int | None, bool]:
        """Add `n` done: (done, total, whether plain mode prints a line now)."""
        with self._lock:
            self.done += n
            if self.total is not None and self.done > self.total:
                self.total = self.done
            done, total = self.done, self.total
            line = n > 0 and (done >= self._next_line or done == total)
            if line:
                self._next_line = (done // self._every + 1) * self._every
        return done, total, line

    def _finish(self) -> None:
        """The block ended normally: the last step begun is done (the live line shows it complete)."""
        if self._steps and self.done < self._steps:
            done, total, _ = self._count(1)
            if self._live is not None:
                self._live.update(self._task, completed=done, total=total)


def _columns(total: int | None) -> tuple:
    cols: list = [TextColumn("{task.description}"), BarColumn()]
    if total is not None:
        cols.append(MofNCompleteColumn())
    cols += [TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    if total is not None:
        cols.append(TimeRemainingColumn())
    return tuple(cols)


def is_live(console: Console | None) -> bool:
    """Live line or plain lines: stderr a terminal; a console writing elsewhere decides for itself."""
    if console is None or console.file is sys.stderr:
        return sys.stderr.isatty()
    return console.is_terminal


@contextlib.contextmanager
def progress(label: str, total: int | None = None, *, console: Console | None = None,
             live: bool | None = None) -> Iterator[Progress]:
    """Progress of `label` over `total` units (None: unknown) on stderr; see the module docstring.

    `console`: where to write (default: a stderr console); `live`: force the mode (default: `is_live`).
    """
    console = console if console is not None else Console(stderr=True, highlight=False, soft_wrap=True)
    if live is None:
        live = is_live(console)
    if not live:
        bar = Progress(label, total, console, None)
        yield bar
        bar._finish()
        return
    with RichProgress(*_columns(total), console=console, transient=True) as rich_progress:
        bar = Progress(label, total, console, rich_progress)
        yield bar
        bar._finish()
