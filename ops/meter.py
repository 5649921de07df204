"""GPU time: how long each host of a tier was paid for, from what the gateway observed. Pure, clock-injected.

Strategy: EC2 charges a host from its start until it is stopped, so the meter keeps, per host, the spans
during which it was paid: a span opens when StartInstances was sent (the waker passes how long ago,
`started_ago_s`) or when ``pending`` / ``running`` is first seen, whichever is earlier, and closes when
``stopped`` or ``terminated`` is seen. Any other state (``stopping``, ``shutting-down``, unknown) changes
nothing: an open span stays open until EC2 says the host is down. A tier without a waker has no EC2
states: the gateway calls `running(urls)` and its upstreams count as always up while it runs.

A host already up at the meter's first look at it was up before the meter began (a restarted gateway, a
new worker, a waker replaced by a reload): its first span is *backdated* to the start of whichever
window it is first asked about (`seconds`). The gateway records fixed, epoch-aligned windows (a minute)
once each under a deterministic id, so a restarted process reports the minute it started in whole --
the same row the process before it, or another worker, would have written -- and the first row wins;
time is neither lost to the restart nor counted twice.

Callers never pass times: the meter reads its injected clock (`time.time` in the gateway, a fake in
tests); nothing here sleeps, logs or does I/O. `prune(before)` forgets spans that ended before a
window already recorded, so memory stays flat.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

OPENS = frozenset({"pending", "running"})
CLOSES = frozenset({"stopped", "terminated"})


@dataclass
class _Host:
    spans: list[tuple[float, float]] = field(default_factory=list)  # closed paid spans [start, end)
    open_since: float | None = None  # paid since then, not yet seen down
    backdated_at: float | None = None  # the start of a span that began at the first look (up before it)
    gone: bool = False  # last seen terminated: the id never comes back


class GpuMeter:
    """Paid host-seconds of one tier's hosts (instance ids, or upstream URLs for a tier without a waker)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._hosts: dict[str, _Host] = {}

    def observe(self, host: str, state: str, *, started_ago_s: float | None = None) -> None:
        """What EC2 says about `host` now; `started_ago_s`: StartInstances was sent that long ago."""
        now = self._clock()
        h = self._hosts.get(host)
        first = h is None
        if h is None:
            h = self._hosts[host] = _Host()
        if state in OPENS:
            since = now if started_ago_s is None else now - max(0.0, started_ago_s)
            if h.open_since is None:
                h.open_since = since
                if first and started_ago_s is None:
                    h.backdated_at = since
        elif state in CLOSES and h.open_since is not None:
            if now > h.open_since:
                h.spans.append((h.open_since, now))
            h.open_since = None
        h.gone = state == "terminated"

    def running(self, hosts: Iterable[str]) -> None:
        """A tier without a waker: `hosts` are up now; any other host this meter knows is down now."""
        up = set(hosts)
        for host in up:
            self.observe(host, "running")
        for host in list(self._hosts):
            if host not in up:
                self.observe(host, "stopped")

    def hosts(self) -> list[str]:
        """Every host seen (until `prune` drops a terminated one)."""
        return list(self._hosts)

    def up(self) -> list[str]:
        """The hosts paid for now."""
        return [host for host, h in self._hosts.items() if h.open_since is not None]

    def seconds(self, start: float, end: float) -> dict[str, float]:
        """Paid seconds of each host within [start, end) (an open span runs to now); hosts with none are
        left out."""
        end = min(end, self._clock())
        out: dict[str, float] = {}
        if end <= start:
            return out
        for host, h in self._hosts.items():
            spans = list(h.spans)
            if h.open_since is not None:
                spans.append((h.open_since, end))
            total = 0.0
            for s0, s1 in spans:
                if s0 == h.backdated_at and start <= s0 < end:
                    s0 = start  # up before the first look: the window it was first seen in counts whole
                total += max(0.0, min(s1, end) - max(s0, start))
            if total > 0:
                out[host] = total
        return out

    def prune(self, before: float) -> None:
        """Forget closed spans that ended before `before` (windows already recorded), and terminated hosts
        with nothing left. A stopped host is kept: seen up again later, it is not a first look."""
        for host, h in list(self._hosts.items()):
            h.spans = [s for s in h.spans if s[1] > before]
            if h.gone and not h.spans and h.open_since is None:
                del self._hosts[host]
