"""One `Waker` per tier: wake on demand, idle sleep, spot interruptions, fallback capacity.

Strategy: one long-lived controller task owns every decision and every EC2 call; callers only read
state, join a waiting room and poke the controller (`_kick`). States (DESIGN.md "Wake semantics"):

    ASLEEP --request--> WAKING --ready--> READY --idle_s--> STOPPING --stopped--> ASLEEP
    READY --all upstreams lost--> INTERRUPTED --> WAKING      (or ASLEEP if someone else stopped it)

- Single flight: `wait_ready` never calls EC2; it records that a wake is wanted, then waits on the
  ready event. However many callers and models, the controller sends ONE StartInstances per stopped
  instance (not re-sent within `start_retry_s`: EC2 is eventually consistent). The wake belongs to the
  controller, so it goes on when a caller gives up; it is abandoned (instances stopped) only past the hard
  cap with nobody waiting. `wait_ready` has no timeout: the gateway's hard-cap scope is the limit.
- Ready = instance running AND `/health` 200 AND every model in `/v1/models` (backends.probe), for every
  upstream still awaited; past the budget, any ready upstream will do.
- Restart-safe: `run` DESCRIBES before `task_status.started()`: running+ready -> READY, pending or running
  but not ready -> WAKING (waiting, never re-starting), stopping -> STOPPING, else ASLEEP. Launch-template
  capacity is tagged `spotinference:tier` so a restarted gateway finds it again.
- Upstream per instance: instance_ids[i] <-> upstreams[i]; other instances (fallback ids, launch-template
  capacity) use the `upstream_tag` tag's value when configured, else http://{PrivateIpAddress}:{port}.
- Budget: past `budget_s` a wake is logged, counted and every configured fallback step is engaged;
  before it, a capacity error engages the next step only. Steps: fallback_instance_ids, then
  fallback_launch_template, then fallback_tier (only exposed as `fallback_tier`: the gateway routes).
- Idle sleep: judged from vLLM's /metrics (ops.budget.IdleTracker), then StopInstances (idempotent) and
  TerminateInstances for launch-template capacity.
- Interruptions (SQS notices, failing /health, `report_unreachable`): the host leaves `upstreams()` at
  once; the controller restarts it once EC2 shows it stopped, or fails over.
All blocking EC2/SQS calls go through trio.to_thread with this waker's limiters.
"""

from __future__ import annotations

import enum
import logging
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from backends import probe
from ops import budget
from ops.ec2 import Backoff, CapacityError, Clients, Ec2, Ec2Error, StateError
from ops.interruptions import InterruptionQueue, Notice, poll_notices
from ops.settings import WakeConfig

logger = logging.getLogger(__name__)

TIER_TAG = "spotinference:tier"
PRIMARY, FALLBACK, LAUNCHED, TIER = "primary", "fallback", "launched", "tier"
_LADDER = (PRIMARY, FALLBACK, LAUNCHED, TIER)
_UP = ("pending", "running")


class TierState(enum.Enum):
    ASLEEP = "asleep"
    WAKING = "waking"
    READY = "ready"
    STOPPING = "stopping"
    INTERRUPTED = "interrupted"


class WakeQueueFull(Exception):
    """Too many requests are already waiting for this tier; retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many requests waiting for the tier to wake; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class WakerStatistics:
    tier: str
    state: TierState
    waiters: int
    routable: int
    wakes_total: int
    wake_budget_exceeded_total: int
    last_wake_s: float | None
    stops_total: int
    interruptions_total: int
    fallbacks_total: int
    upstream_down_total: int
    fallback_tier: str | None
    last_timeline: tuple[tuple[str, float], ...]


@dataclass
class _Member:
    """One upstream we may route to: an instance (or a bare configured URL) and what we know of it."""

    group: str
    instance_id: str | None
    url: str | None
    ec2_state: str = "unknown"
    healthy: bool = False
    failures: int = 0
    hold_until: float | None = None  # interruption notice: out of rotation until then
    start_sent_at: float | None = None
    no_capacity_at: float | None = None

    def routable(self, now: float) -> bool:
        held = self.hold_until is not None and now < self.hold_until
        return self.healthy and self.url is not None and not held

    def awaited(self, now: float) -> bool:
        held = self.hold_until is not None and now < self.hold_until
        return not held and self.no_capacity_at is None and self.ec2_state != "terminated"


class Waker:
    """Wakes, watches and puts to sleep the instances of one tier (see the module comment)."""

    def __init__(self, tier: str, settings: WakeConfig, upstreams: list[str], models: list[str], *,
                 upstream_api_key: str | None = None) -> None:
        self.tier = tier
        self.settings = settings
        self.models = list(models)
        self._api_key = upstream_api_key
        self._port = settings.upstream_port or (urlsplit(upstreams[0]).port if upstreams else None) or 8000
        n = len(settings.instance_ids)
        self._members = [_Member(PRIMARY, iid, upstreams[i] if i < len(upstreams) else None)
                         for i, iid in enumerate(settings.instance_ids)]
        self._members += [_Member(PRIMARY, None, url) for url in upstreams[n:]]
        self._members += [_Member(FALLBACK, iid, None) for iid in settings.fallback_instance_ids]
        self._ladder = [PRIMARY] + [g for g, on in ((FALLBACK, bool(settings.fallback_instance_ids)),
                                                    (LAUNCHED, bool(settings.fallback_launch_template)),
                                                    (TIER, bool(settings.fallback_tier))) if on]
        self._engaged = {PRIMARY}
        clients = Clients(settings.region, settings.endpoint_url)
        self._ec2_api = Ec2(clients, backoff=Backoff(attempts=settings.api_attempts))
        self._queue = (InterruptionQueue(clients, settings.interruption_queue_url)
                       if settings.interruption_queue_url else None)
        self._limiter = trio.CapacityLimiter(2)
        self._state = TierState.ASLEEP
        self._ready_event = trio.Event()
        self._kick = trio.Event()
        self._routable: list[str] = []
        self._waiters = 0
        self._wake_wanted_at: float | None = None
        self._wake: budget.Wake | None = None
        self._launch_wanted = False
        self._idle: budget.IdleTracker | None = None
        self._client = None
        self.fallback_tier: str | None = None
        self._counts = {"wakes": 0, "budget": 0, "stops": 0, "interruptions": 0, "fallbacks": 0, "down": 0}
        self._last_wake_s: float | None = None
        self._last_timeline: tuple[tuple[str, float], ...] = ()

    # ---- the gateway's side -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Cheap: READY implies at least one routable upstream."""
        return self._state is TierState.READY

    def upstreams(self) -> list[str]:
        """Routable upstream URLs now (no interrupted, failing or unreachable host)."""
        return list(self._routable)

    async def wait_ready(self) -> None:
        """Return when the tier is ready, starting ONE wake if it is asleep; no timeout of its own."""
        if self.is_ready():
            return
        if self._waiters >= self.settings.max_waiters:
            raise WakeQueueFull(self._retry_after_s())
        self._waiters += 1
        try:
            while not self.is_ready():
                if self._wake_wanted_at is None and self._wake is None:
                    self._wake_wanted_at = trio.current_time()
                    self._kick.set()
                await self._ready_event.wait()
        finally:
            self._waiters -= 1

    def report_unreachable(self, upstream: str) -> None:
        """The gateway saw refused/reset before the first byte: take the host out now, re-probe/re-wake."""
        for m in self._members:
            if m.url == upstream and m.healthy:
                m.healthy = False
                m.failures = self.settings.health_failures
                self._counts["down"] += 1
                logger.warning("upstream unreachable", extra={"tier": self.tier, "upstream": upstream})
        self._update_routable()
        self._kick.set()

    def wake_ms_hint(self) -> int | None:
        """Expected milliseconds until ready while a wake is under way (from the last measured wake)."""
        if self._wake is None:
            return None
        rest = budget.remaining_s(self._wake, trio.current_time(), budget_s=self.settings.budget_s,
                                  last_wake_s=self._last_wake_s)
        return int(rest * 1000)

    def statistics(self) -> WakerStatistics:
        c = self._counts
        return WakerStatistics(
            tier=self.tier, state=self._state, waiters=self._waiters, routable=len(self._routable),
            wakes_total=c["wakes"], wake_budget_exceeded_total=c["budget"], last_wake_s=self._last_wake_s,
            stops_total=c["stops"], interruptions_total=c["interruptions"], fallbacks_total=c["fallbacks"],
            upstream_down_total=c["down"], fallback_tier=self.fallback_tier, last_timeline=self._last_timeline)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Describe first (restart-safe), report started, then control the tier until cancelled."""
        async with probe.make_client(self.settings.probe_timeout_s) as client, trio.open_nursery() as nursery:
            self._client = client
            await self._recover()
            task_status.started()
            if self._queue is not None:
                nursery.start_soon(self._poll_interruptions)
            while True:
                state = self._state
                if state is TierState.ASLEEP:
                    while self._wake_wanted_at is None:
                        await self._nap(None)
                    await self._run_wake()
                elif state in (TierState.WAKING, TierState.INTERRUPTED):
                    await self._run_wake()
                elif state is TierState.READY:
                    await self._watch()
                else:
                    await self._stop_all()

    # ---- controller phases --------------------------------------------------------------------------

    async def _recover(self) -> None:
        try:
            for inst in await self._call(self._ec2_api.describe_tagged, TIER_TAG, self.tier):
                self._members.append(_Member(LAUNCHED, inst.id, None))
                self._engaged.add(LAUNCHED)
            ok = await self._refresh_ec2(everything=True)
        except Ec2Error as exc:
            ok = False
            logger.error("describe at start failed; assuming asleep", extra={"tier": self.tier, "code": exc.code})
        if not ok:
            return
        if any(m.ec2_state in _UP for m in self._members if m.group == FALLBACK):
            self._engaged.add(FALLBACK)
        await self._probe(wake=False)
        states = {m.ec2_state for m in self._engaged_members() if m.instance_id}
        now = trio.current_time()
        if self._routable and "pending" not in states:
            self._idle = budget.IdleTracker(self.settings.idle_s, now)
            self._set_state(TierState.READY)
        elif states & set(_UP):
            self._wake = budget.Wake(now, self.settings.budget_s, self.settings.hard_cap_s)
            self._counts["wakes"] += 1
            self._set_state(TierState.WAKING)
        elif "stopping" in states:
            self._set_state(TierState.STOPPING)
        logger.info("tier recovered", extra={"tier": self.tier, "state": self._state.value})

    async def _run_wake(self) -> None:
        now = trio.current_time()
        if self._state is TierState.INTERRUPTED and self._wake_wanted_at is None and not self._held(now):
            # Lost every upstream without a notice: if someone stopped the instances, we are simply asleep.
            await self._refresh_ec2()
            states = {m.ec2_state for m in self._engaged_members() if m.instance_id}
            if states and states <= {"stopping", "stopped", "terminated"}:
                self._reset_capacity()
                self._set_state(TierState.STOPPING if "stopping" in states else TierState.ASLEEP)
                return
        if self._wake is None:
            self._wake = budget.Wake(self._wake_wanted_at or now, self.settings.budget_s, self.settings.hard_cap_s)
            self._counts["wakes"] += 1
            logger.info("wake started", extra={"tier": self.tier, "waiters": self._waiters})
        self._wake_wanted_at = None
        wake = self._wake
        self._set_state(TierState.WAKING)
        launched_this_wake = False
        while True:
            if await self._refresh_ec2():
                await self._start_stopped(wake)
                if self._launch_wanted and not launched_this_wake:
                    launched_this_wake = True
                    await self._launch()
                if any(m.ec2_state == "running" for m in self._engaged_members()):
                    wake.mark(budget.Phase.RUNNING, trio.current_time())
            await self._probe(wake=True)
            now = trio.current_time()
            if self._routable:
                wake.mark(budget.Phase.HEALTHY, now)
                if wake.over_budget(now) or all(m.routable(now) for m in self._engaged_members()
                                                if m.awaited(now)):
                    return self._finish_wake(wake, now)
            if wake.take_over_budget(now):
                self._counts["budget"] += 1
                logger.warning("wake over budget", extra={"tier": self.tier, "budget_s": self.settings.budget_s})
                self._escalate("budget", everything=True)
            if wake.at_hard_cap(now) and self._waiters == 0:
                logger.error("wake abandoned at the hard cap with nobody waiting; stopping",
                             extra={"tier": self.tier, "timeline": wake.timeline()})
                self._wake = None
                self._set_state(TierState.STOPPING)
                return
            await self._nap(self.settings.poll_s)

    def _finish_wake(self, wake: budget.Wake, now: float) -> None:
        wake.mark(budget.Phase.READY, now)
        self._last_wake_s = wake.duration_s()
        self._last_timeline = tuple(wake.timeline())
        self._wake = None
        self.fallback_tier = None
        self._idle = budget.IdleTracker(self.settings.idle_s, now)
        logger.info("wake ready", extra={"tier": self.tier, "wake_s": round(self._last_wake_s or 0, 3),
                                         "timeline": self._last_timeline, "upstreams": self._routable})
        self._set_state(TierState.READY)

    async def _watch(self) -> None:
        assert self._idle is not None
        while self._state is TierState.READY:
            await self._nap(self.settings.poll_s)
            if self._state is not TierState.READY:
                return
            activity = await self._probe(wake=False, activity=True)
            if self._state is not TierState.READY:
                return  # every upstream lost: INTERRUPTED, handled by _run_wake
            now = trio.current_time()
            lost = any(m.instance_id and not m.routable(now) for m in self._engaged_members())
            if lost and await self._refresh_ec2():  # repair: restart a host that was stopped under us
                await self._start_stopped(None)
            if self._state is not TierState.READY:
                return
            self._idle.observe(now, activity)
            if self._idle.is_idle(now):
                logger.info("tier idle; stopping", extra={"tier": self.tier, "idle_s": self.settings.idle_s})
                self._set_state(TierState.STOPPING)

    async def _stop_all(self) -> None:
        self._counts["stops"] += 1
        while True:
            try:
                if not await self._refresh_ec2(everything=True):
                    await self._nap(self.settings.poll_s)
                    continue
                mine = [m for m in self._members if m.instance_id]
                stop = [m.instance_id for m in mine if m.group != LAUNCHED and m.ec2_state in _UP]
                drop = [m.instance_id for m in mine if m.group == LAUNCHED and m.ec2_state != "terminated"]
                if stop:
                    await self._call(self._ec2_api.stop, stop)
                    logger.info("StopInstances sent", extra={"tier": self.tier, "instance_ids": stop})
                if drop:
                    await self._call(self._ec2_api.terminate, drop)
                    logger.info("TerminateInstances sent", extra={"tier": self.tier, "instance_ids": drop})
                if not stop and not drop and all(m.ec2_state in ("stopped", "terminated") for m in mine):
                    break
            except StateError:
                pass  # pending: cannot stop yet, look again next poll
            except Ec2Error as exc:
                logger.warning("stop failed; retrying", extra={"tier": self.tier, "code": exc.code})
            await self._nap(self.settings.poll_s)
        self._reset_capacity()
        self._set_state(TierState.ASLEEP)

    # ---- EC2 and probes -----------------------------------------------------------------------------

    async def _call(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _refresh_ec2(self, everything: bool = False) -> bool:
        members = [m for m in (self._members if everything else self._engaged_members()) if m.instance_id]
        try:
            found = await self._call(self._ec2_api.describe, [m.instance_id for m in members])
        except Ec2Error as exc:
            logger.warning("describe failed", extra={"tier": self.tier, "code": exc.code})
            return False
        now = trio.current_time()
        for m in members:
            inst = found.get(m.instance_id)
            m.ec2_state = inst.state if inst else "terminated"
            if m.ec2_state in _UP:
                m.start_sent_at = m.no_capacity_at = None  # seen up: a later "stopped" is real
            if m.ec2_state != "running":
                m.healthy = False
                if m.hold_until is not None and now < m.hold_until:
                    m.hold_until = None  # the interruption happened: restart as usual
            if m.group != PRIMARY and inst is not None:
                tag = self.settings.upstream_tag
                url = inst.tags.get(tag) if tag else (
                    f"http://{inst.private_ip}:{self._port}" if inst.private_ip else None)
                if url != m.url:
                    m.url, m.healthy = url, False
        # Terminated launch-template capacity is gone for good (and vanishes from DescribeInstances).
        self._members = [m for m in self._members if not (m.group == LAUNCHED and m.ec2_state == "terminated")]
        self._update_routable()
        return True

    async def _start_stopped(self, wake: budget.Wake | None) -> None:
        now = trio.current_time()
        retry = self.settings.start_retry_s
        for group in (PRIMARY, FALLBACK, LAUNCHED):
            ids = [m.instance_id for m in self._engaged_members() if m.group == group and m.instance_id
                   and m.ec2_state == "stopped" and not self._held(now, m)
                   and (m.start_sent_at is None or now - m.start_sent_at >= retry)
                   and (m.no_capacity_at is None or now - m.no_capacity_at >= retry)]
            if not ids:
                continue
            chosen = [m for m in self._members if m.instance_id in ids]
            try:
                await self._call(self._ec2_api.start, ids)
            except CapacityError as exc:
                for m in chosen:
                    m.no_capacity_at = now
                logger.warning("no capacity", extra={"tier": self.tier, "instance_ids": ids, "code": exc.code})
                if group == self._top():
                    self._escalate(exc.code)
                continue
            except StateError:
                continue  # stopping: start it once it has stopped
            except Ec2Error as exc:
                logger.warning("start failed", extra={"tier": self.tier, "instance_ids": ids, "code": exc.code})
                continue
            for m in chosen:
                m.start_sent_at, m.no_capacity_at = now, None
            if wake is not None:
                wake.mark(budget.Phase.START_SENT, now)
            logger.info("StartInstances sent", extra={"tier": self.tier, "instance_ids": ids})

    async def _launch(self) -> None:
        count = max(1, len(self.settings.instance_ids))
        template = self.settings.fallback_launch_template
        assert template is not None
        token = f"{self.tier}-{uuid.uuid4().hex[:16]}"
        try:
            launched = await self._call(self._ec2_api.run_from_template, template, count,
                                        {TIER_TAG: self.tier}, token)
        except CapacityError as exc:
            logger.warning("launch template: no capacity", extra={"tier": self.tier, "code": exc.code})
            self._escalate(exc.code)
            return
        except Ec2Error as exc:
            logger.error("launch template failed", extra={"tier": self.tier, "code": exc.code})
            return
        self._members += [_Member(LAUNCHED, inst.id, None, ec2_state=inst.state) for inst in launched]
        logger.info("RunInstances sent", extra={"tier": self.tier, "instance_ids": [i.id for i in launched]})

    async def _probe(self, *, wake: bool, activity: bool = False) -> list[tuple[str, float, float]]:
        samples: list[tuple[str, float, float]] = []
        targets = [m for m in self._engaged_members()
                   if m.url and (m.instance_id is None or m.ec2_state == "running")]

        async def one(m: _Member) -> None:
            with trio.move_on_after(2 * self.settings.probe_timeout_s):
                result = await probe.probe_ready(self._client, m.url, self.models, api_key=self._api_key)
                self._note_health(m, result.ready, strict=wake)
                if activity and result.ready:
                    seen = await probe.probe_activity(self._client, m.url)
                    # Unreadable metrics count as activity: never stop what we cannot see.
                    samples.append((m.url, 1.0, 0.0) if seen is None else (m.url, seen.in_flight, seen.success_total))
                return
            self._note_health(m, False, strict=wake)

        async with trio.open_nursery() as nursery:
            for m in targets:
                nursery.start_soon(one, m)
        self._update_routable()
        return samples

    def _note_health(self, m: _Member, ok: bool, *, strict: bool) -> None:
        if ok:
            m.healthy, m.failures = True, 0
            return
        m.failures += 1
        if m.healthy and (strict or m.failures >= self.settings.health_failures):
            m.healthy = False
            self._counts["down"] += 1
            logger.warning("upstream failing health", extra={"tier": self.tier, "upstream": m.url})

    # ---- interruptions ------------------------------------------------------------------------------

    async def _poll_interruptions(self) -> None:
        assert self._queue is not None
        await poll_notices(self._queue, self._on_notice, limiter=trio.CapacityLimiter(1),
                           wait_s=self.settings.interruption_wait_s, poll_s=self.settings.poll_s)

    def _on_notice(self, notice: Notice) -> bool:
        member = next((m for m in self._members if m.instance_id == notice.instance_id), None)
        if member is None:
            return False
        now = trio.current_time()
        member.hold_until = now + self.settings.interruption_hold_s
        self._counts["interruptions"] += 1
        logger.warning("spot notice: host out of rotation", extra={
            "tier": self.tier, "instance_id": notice.instance_id, "kind": notice.kind,
            "action": notice.action, "upstream": member.url})
        self._update_routable()
        if not self._routable and member.group in self._engaged:
            self._escalate(notice.kind)
        self._kick.set()
        return True

    # ---- small helpers ------------------------------------------------------------------------------

    def _engaged_members(self) -> list[_Member]:
        return [m for m in self._members if m.group in self._engaged]

    def _held(self, now: float, member: _Member | None = None) -> bool:
        ms = [member] if member else self._members
        return any(m.hold_until is not None and now < m.hold_until for m in ms)

    def _top(self) -> str:
        return max(self._engaged, key=_LADDER.index)

    def _escalate(self, reason: str, *, everything: bool = False) -> None:
        for step in self._ladder:
            if step in self._engaged:
                continue
            self._engaged.add(step)
            self._counts["fallbacks"] += 1
            if step == LAUNCHED:
                self._launch_wanted = True
            elif step == TIER:
                self.fallback_tier = self.settings.fallback_tier
            logger.warning("fallback engaged", extra={"tier": self.tier, "step": step, "reason": reason})
            if not everything:
                break
        self._kick.set()

    def _reset_capacity(self) -> None:
        self._members = [m for m in self._members if m.group != LAUNCHED]
        for m in self._members:
            m.healthy, m.failures, m.start_sent_at, m.no_capacity_at = False, 0, None, None
        self._engaged = {PRIMARY}
        self._launch_wanted = False
        self.fallback_tier = None
        self._update_routable()

    def _update_routable(self) -> None:
        now = trio.current_time()
        self._routable = [m.url for m in self._engaged_members() if m.routable(now)]  # type: ignore[misc]
        if self._state is TierState.READY and not self._routable:
            self._set_state(TierState.INTERRUPTED)
            self._kick.set()

    def _retry_after_s(self) -> int:
        return budget.retry_after_s(self._wake, trio.current_time(), budget_s=self.settings.budget_s,
                                    hard_cap_s=self.settings.hard_cap_s, last_wake_s=self._last_wake_s)

    def _set_state(self, new: TierState) -> None:
        old = self._state
        if new is old:
            return
        self._state = new
        if new is TierState.READY:
            self._ready_event.set()
        elif old is TierState.READY:
            self._ready_event = trio.Event()
        logger.info("tier state", extra={"tier": self.tier, "from_state": old.value, "to_state": new.value})

    async def _nap(self, seconds: float | None) -> None:
        if seconds is None:
            await self._kick.wait()
        else:
            with trio.move_on_after(seconds):
                await self._kick.wait()
        self._kick = trio.Event()
