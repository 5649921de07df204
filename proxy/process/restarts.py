"""When the supervisor restarts a worker that exited: a crash-loop back-off that never leaves the port
with no worker at all.

Strategy: a pure, clock-injected policy (the supervisor passes `time.monotonic()`), so it is tested
without processes. Per worker slot, the exits of the last `WINDOW_S` are remembered: the first
`FREE_RESTARTS` in the window restart at once, then the delay doubles from `BASE_S` up to `MAX_S`
(a poison config or a bad host then costs a log line every few seconds, not a fork storm). The back-off
is per slot, but it never applies to the last one down: when no worker is running, the slot due
soonest restarts at once -- a crash loop slows down, it never takes the whole port out.
"""

from __future__ import annotations

WINDOW_S = 60.0
FREE_RESTARTS = 2
BASE_S = 0.5
MAX_S = 10.0


class RestartPolicy:
    def __init__(self) -> None:
        self.exits: dict[int, list[float]] = {}
        self.pending: dict[int, float] = {}  # slot -> when it is due
        self.restarts = 0

    def exited(self, slot: int, now: float) -> float:
        """Worker `slot` exited at `now`; returns the back-off chosen for it (0: at once)."""
        recent = [t for t in self.exits.get(slot, []) if now - t < WINDOW_S] + [now]
        self.exits[slot] = recent
        n = len(recent)
        delay = 0.0 if n <= FREE_RESTARTS else min(MAX_S, BASE_S * 2 ** (n - FREE_RESTARTS - 1))
        self.pending[slot] = now + delay
        return delay

    def due(self, now: float, running: int) -> list[int]:
        """Slots to restart now (removed from pending); with none `running`, at least the soonest."""
        ready = [slot for slot, at in self.pending.items() if at <= now]
        if not ready and running == 0 and self.pending:
            ready = [min(self.pending, key=self.pending.__getitem__)]
        for slot in ready:
            del self.pending[slot]
        self.restarts += len(ready)
        return sorted(ready)
