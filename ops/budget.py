"""Wake accounting: pure, synchronous, clock-injected.

Strategy: every decision about time that the waker makes lives here, so it is tested without an event
loop: a `Wake` knows when it was requested and answers "past the budget?" (once, for counting),
"past the hard cap?", how long a queued caller should wait before retrying, and records the wake's
timeline (requested -> start sent -> running -> healthy -> ready). `IdleTracker` decides idle sleep from
vLLM's own counters (`vllm:num_requests_running` / `_waiting` gauges and the
`vllm:request_success_total` counter), so several gateways watching one backend agree without sharing
state. Callers pass `now` (trio.current_time() in the waker, plain floats in tests); nothing here reads
a clock, sleeps or logs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field


class Phase(enum.Enum):
    """Milestones of one wake, in order."""

    REQUESTED = "requested"
    START_SENT = "start_sent"
    RUNNING = "running"
    HEALTHY = "healthy"
    READY = "ready"


@dataclass
class Wake:
    """One wake of a tier: from the first waiting request (or a recovered in-progress wake) to ready."""

    requested_at: float
    budget_s: float
    hard_cap_s: float
    marks: dict[Phase, float] = field(default_factory=dict)
    _budget_reported: bool = False

    def __post_init__(self) -> None:
        self.marks.setdefault(Phase.REQUESTED, self.requested_at)

    def mark(self, phase: Phase, now: float) -> bool:
        """Record the first time `phase` was reached; True if this call recorded it."""
        if phase in self.marks:
            return False
        self.marks[phase] = now
        return True

    def elapsed(self, now: float) -> float:
        return max(0.0, now - self.requested_at)

    def over_budget(self, now: float) -> bool:
        return self.elapsed(now) >= self.budget_s

    def take_over_budget(self, now: float) -> bool:
        """True exactly once: the first call made past the budget (the moment to count, log and fall back)."""
        if self._budget_reported or not self.over_budget(now):
            return False
        self._budget_reported = True
        return True

    def at_hard_cap(self, now: float) -> bool:
        return self.elapsed(now) >= self.hard_cap_s

    @property
    def ready(self) -> bool:
        return Phase.READY in self.marks

    def duration_s(self) -> float | None:
        """Requested -> ready, once ready."""
        at = self.marks.get(Phase.READY)
        return None if at is None else at - self.requested_at

    def timeline(self) -> list[tuple[str, float]]:
        """(phase, seconds since requested) for the phases reached, in phase order."""
        return [(p.value, round(self.marks[p] - self.requested_at, 3)) for p in Phase if p in self.marks]


def expected_wake_s(budget_s: float, last_wake_s: float | None) -> float:
    """What a wake is expected to take: the last one measured, else the budget."""
    return last_wake_s if last_wake_s is not None and last_wake_s > 0 else budget_s


def remaining_s(wake: Wake | None, now: float, *, budget_s: float, last_wake_s: float | None) -> float:
    """Expected seconds until ready (0 when no wake is under way or it is overdue)."""
    if wake is None:
        return 0.0
    return max(0.0, expected_wake_s(budget_s, last_wake_s) - wake.elapsed(now))


def retry_after_s(wake: Wake | None, now: float, *, budget_s: float, hard_cap_s: float,
                  last_wake_s: float | None) -> int:
    """Retry-After for a caller turned away because too many are waiting: the expected rest of the wake,
    at least 1 s and at most the hard cap, in whole seconds (RFC 9110 section 10.2.3 delay-seconds)."""
    rest = remaining_s(wake, now, budget_s=budget_s, last_wake_s=last_wake_s)
    if wake is None:
        rest = expected_wake_s(budget_s, last_wake_s)
    return int(min(max(1.0, math.ceil(rest)), max(1.0, math.ceil(hard_cap_s))))


class IdleTracker:
    """Idle = no upstream had a running/waiting request and no success counter moved for `idle_s`.

    A counter that goes down (vLLM restarted) counts as activity: the backend did something we cannot
    see, so the idle clock restarts rather than stopping a host that just came back.
    """

    def __init__(self, idle_s: float, now: float) -> None:
        self.idle_s = idle_s
        self.last_activity = now
        self._last_success: dict[str, float] = {}

    def touch(self, now: float) -> None:
        """Activity seen by other means (a wake just finished)."""
        self.last_activity = max(self.last_activity, now)

    def observe(self, now: float, samples: Iterable[tuple[str, float, float]]) -> bool:
        """Feed one round of per-upstream samples ``(upstream, in_flight, success_total)`` where in_flight
        is running + waiting requests; True if any showed activity."""
        active = False
        for upstream, in_flight, success_total in samples:
            before = self._last_success.get(upstream)
            self._last_success[upstream] = success_total
            if in_flight > 0 or (before is not None and success_total != before):
                active = True
        if active:
            self.touch(now)
        return active

    def idle_for(self, now: float) -> float:
        return max(0.0, now - self.last_activity)

    def is_idle(self, now: float) -> bool:
        return self.idle_for(now) >= self.idle_s
