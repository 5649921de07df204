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

import collections
import enum
import math
import statistics
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


# What a waiting client is told a wake is doing (the `: waking phase=...` comment, the status page):
# the last milestone reached, in words. Stable names: clients and dashboards may match on them.
STAGES = {Phase.REQUESTED: "starting",  # asked for; StartInstances not sent yet
          Phase.START_SENT: "booting",  # StartInstances sent; EC2 does not show the instance running yet
          Phase.RUNNING: "loading",  # the instance runs; vLLM not answering /health with the model yet
          Phase.HEALTHY: "finishing"}  # one host ready; waiting for the others (within the budget)


class WakeHistory:
    """The last wakes' timelines, and what they say about the one under way (its ETA).

    The estimate is by phase: for the phase the wake is in, the median over past wakes of the time
    from reaching that phase to ready, less the time already spent in it -- so a wake that is slow to
    get its instance but then boots at the usual pace gets an honest ETA once it is running. With no
    past wake that reached the phase, the budget is the estimate. Never negative: an overdue wake is 0.
    """

    def __init__(self, keep: int = 8) -> None:
        self._done: collections.deque[dict[Phase, float]] = collections.deque(maxlen=keep)

    def __len__(self) -> int:
        return len(self._done)

    def add(self, wake: Wake) -> None:
        if wake.ready:
            self._done.append({p: t - wake.requested_at for p, t in wake.marks.items()})

    def progress(self, wake: Wake, now: float, budget_s: float) -> tuple[str, float, float]:
        """(stage, seconds since the wake was asked for, expected seconds until ready)."""
        phase = max((p for p in wake.marks if p is not Phase.READY), key=_ORDER.index)
        elapsed = wake.elapsed(now)
        in_phase = now - wake.marks[phase]
        rests = sorted(d[Phase.READY] - d[phase] for d in self._done if phase in d and Phase.READY in d)
        if rests:
            eta = statistics.median(rests) - in_phase
        else:
            eta = budget_s - elapsed
        return STAGES[phase], elapsed, max(0.0, eta)


_ORDER = list(Phase)


def expected_wake_s(budget_s: float, last_wake_s: float | None) -> float:
    """What a wake is expected to take: the last one measured, else the budget."""
    return last_wake_s if last_wake_s is not None and last_wake_s > 0 else budget_s


def expected_left_s(wake: Wake | None, now: float, *, budget_s: float, last_wake_s: float | None) -> float:
    """Expected seconds until ready (0 when no wake is under way or it is overdue)."""
    if wake is None:
        return 0.0
    return max(0.0, expected_wake_s(budget_s, last_wake_s) - wake.elapsed(now))


def retry_after_s(wake: Wake | None, now: float, *, budget_s: float, hard_cap_s: float,
                  last_wake_s: float | None) -> int:
    """Retry-After for a caller turned away because too many are waiting: the expected rest of the wake,
    at least 1 s and at most the hard cap, in whole seconds (RFC 9110 section 10.2.3 delay-seconds)."""
    rest = expected_left_s(wake, now, budget_s=budget_s, last_wake_s=last_wake_s)
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


# ---- the book of a tier's instances ------------------------------------------------------------------

PRIMARY, FALLBACK, LAUNCHED, TIER = "primary", "fallback", "launched", "tier"
LADDER = (PRIMARY, FALLBACK, LAUNCHED, TIER)  # the order fallback steps are engaged in
UP = frozenset({"pending", "running"})


@dataclass
class Member:
    """One upstream the tier may route to: an instance (or a bare configured URL) and what we know of it."""

    group: str
    instance_id: str | None
    url: str | None
    ec2_state: str = "unknown"
    healthy: bool = False
    failures: int = 0
    hold_until: float | None = None  # an interruption notice keeps it out of rotation until then
    start_sent_at: float | None = None
    no_capacity_at: float | None = None

    def held(self, now: float) -> bool:
        return self.hold_until is not None and now < self.hold_until

    def routable(self, now: float) -> bool:
        return self.healthy and self.url is not None and not self.held(now)

    def awaited(self, now: float) -> bool:
        """Does a wake wait for this one? Not when doomed, out of capacity or gone."""
        return not self.held(now) and self.no_capacity_at is None and self.ec2_state != "terminated"


class Inventory:
    """Which instances a tier has, which are engaged, routable, awaited or startable, and the fallback
    ladder (primary -> fallback_instance_ids -> launch template -> fallback tier). Pure: the waker feeds
    it EC2 states, probe results and notices, with `now`."""

    def __init__(self, *, instance_ids: list[str], upstreams: list[str], fallback_ids: list[str],
                 launch_template: bool, fallback_tier: bool, health_failures: int, start_retry_s: float) -> None:
        n = len(instance_ids)
        self.members = [Member(PRIMARY, iid, upstreams[i] if i < len(upstreams) else None)
                        for i, iid in enumerate(instance_ids)]
        self.members += [Member(PRIMARY, None, url) for url in upstreams[n:]]
        self.members += [Member(FALLBACK, iid, None) for iid in fallback_ids]
        self.ladder = [PRIMARY] + [g for g, on in ((FALLBACK, bool(fallback_ids)), (LAUNCHED, launch_template),
                                                   (TIER, fallback_tier)) if on]
        self.engaged = {PRIMARY}
        self.health_failures = health_failures
        self.start_retry_s = start_retry_s

    def engaged_members(self) -> list[Member]:
        return [m for m in self.members if m.group in self.engaged]

    def instances(self, *, everything: bool = False) -> list[Member]:
        return [m for m in (self.members if everything else self.engaged_members()) if m.instance_id]

    def by_instance(self, instance_id: str) -> Member | None:
        return next((m for m in self.members if m.instance_id == instance_id), None)

    def states(self) -> set[str]:
        return {m.ec2_state for m in self.instances()}

    def routable(self, now: float) -> list[str]:
        return [m.url for m in self.engaged_members() if m.routable(now) and m.url is not None]

    def wake_complete(self, now: float, *, over_budget: bool) -> bool:
        """Ready: something routable, and everything awaited routable (past the budget, anything will do)."""
        if not self.routable(now):
            return False
        return over_budget or all(m.routable(now) for m in self.engaged_members() if m.awaited(now))

    def held(self, now: float) -> bool:
        return any(m.held(now) for m in self.members)

    def observe(self, m: Member, state: str, url: str | None, now: float) -> None:
        """What DescribeInstances said about one member (`url` only matters for non-primaries)."""
        m.ec2_state = state
        if state in UP:
            m.start_sent_at = m.no_capacity_at = None  # seen up: a later "stopped" is real
        else:
            m.healthy = False
            if m.held(now):
                m.hold_until = None  # the interruption happened: restart it as usual
        if m.group != PRIMARY and url != m.url:
            m.url, m.healthy = url, False
        if m.group == LAUNCHED and state == "terminated":
            self.members.remove(m)  # launch-template capacity is gone for good

    def startable(self, group: str, now: float) -> list[str]:
        """Stopped engaged instances of `group` not started (or out of capacity) within start_retry_s."""
        retry = self.start_retry_s
        return [m.instance_id for m in self.engaged_members()
                if m.group == group and m.instance_id and m.ec2_state == "stopped" and not m.held(now)
                and (m.start_sent_at is None or now - m.start_sent_at >= retry)
                and (m.no_capacity_at is None or now - m.no_capacity_at >= retry)]

    def note_start(self, ids: list[str], now: float, *, capacity: bool) -> None:
        for m in self.members:
            if m.instance_id in ids:
                if capacity:
                    m.no_capacity_at = now
                else:
                    m.start_sent_at, m.no_capacity_at = now, None

    def note_health(self, m: Member, ok: bool, *, strict: bool) -> bool:
        """A probe result; True when a healthy member just went down (strict: at the first failure)."""
        if ok:
            m.healthy, m.failures = True, 0
            return False
        m.failures += 1
        if m.healthy and (strict or m.failures >= self.health_failures):
            m.healthy = False
            return True
        return False

    def mark_down(self, url: str) -> int:
        """The gateway could not connect: take every healthy member with this URL out now."""
        hit = [m for m in self.members if m.url == url and m.healthy]
        for m in hit:
            m.healthy, m.failures = False, self.health_failures
        return len(hit)

    def top(self) -> str:
        return max(self.engaged, key=LADDER.index)

    def escalate(self, *, everything: bool = False) -> list[str]:
        """Engage the next fallback step (all remaining ones with `everything`); returns those engaged."""
        steps: list[str] = []
        for step in self.ladder:
            if step not in self.engaged:
                self.engaged.add(step)
                steps.append(step)
                if not everything:
                    break
        return steps

    def add_launched(self, ids_states: list[tuple[str, str]]) -> None:
        self.members += [Member(LAUNCHED, iid, None, ec2_state=state) for iid, state in ids_states]
        self.engaged.add(LAUNCHED)

    def reset(self) -> None:
        """Asleep again: only the configured instances, nothing engaged beyond the primaries."""
        self.members = [m for m in self.members if m.group != LAUNCHED]
        for m in self.members:
            m.healthy, m.failures, m.start_sent_at, m.no_capacity_at = False, 0, None, None
        self.engaged = {PRIMARY}
