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
- Several gateway hosts (ops/lease.py): every EC2 call that changes instances needs the tier's lease
  from the `TierLink` (one node starts, the others watch EC2 and probe until the tier is ready); a
  notice read here is shared, and the notices other hosts shared are read at every poll.
- Health: every probe result (readiness, then vLLM's /metrics) also feeds the host's record in a
  `backends.health.HealthBook` -- the one health mechanism of every tier: its own book, or the
  gateway's once `use_health` hands it over, so the gateway's requests in flight on a host this
  waker finds silent or stalled end, and the gateway and the waker agree on verdicts. A host the
  record calls down (`health_failures` failures in a row) or stalled (running requests, generation
  tokens frozen for the book's `stall_s`) leaves `upstreams()` at once.
- Read-only views: `statistics()` (the metrics) and `status_view()` (the operator's status page,
  proxy/admit/status.py: every host with a URL and whether a spot notice holds it, the wake under way,
  the last `WAKE_HISTORY` wakes' timelines).
The bookkeeping (members, engaged fallback steps, routable/awaited/startable) is the pure
`ops.budget.Inventory`; this module does the I/O and the state machine. All blocking EC2/SQS calls go through
trio.to_thread with this waker's limiters.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from backends import probe
from backends.health import HealthBook, log_change, progress_of
from ops import budget
from ops.budget import FALLBACK, LAUNCHED, PRIMARY, TIER, UP, Inventory, Member
from ops.ec2 import Backoff, CapacityError, Clients, Ec2, Ec2Error, Instance, StateError
from ops.interruptions import InterruptionQueue, Notice, poll_notices
from ops.lease import LOCAL, TierLink
from ops.meter import GpuMeter
from ops.settings import WakeConfig

logger = logging.getLogger(__name__)

TIER_TAG = "spotinference:tier"
WAKE_HISTORY = 5  # finished wakes kept for the status page


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


class WakerStatistics(msgspec.Struct, frozen=True):
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


class FinishedWake(msgspec.Struct, frozen=True):
    finished_at: float  # unix time the tier became ready
    total_s: float  # requested -> ready
    timeline: tuple[tuple[str, float], ...]  # (phase, seconds since requested), in phase order


class WakerView(msgspec.Struct, frozen=True):
    """What the status page shows of a waker; a snapshot, read-only."""

    hosts: tuple[tuple[str, bool], ...]  # (url, held by a spot notice) of every member with a URL
    wake: tuple[tuple[str, float], ...] | None  # the wake under way: the phases reached so far
    wake_elapsed_s: float | None  # since that wake was requested
    recent_wakes: tuple[FinishedWake, ...]  # oldest first, at most WAKE_HISTORY
    budget_s: float
    hard_cap_s: float


class Waker:
    """Wakes, watches and puts to sleep the instances of one tier (see the module comment)."""

    def __init__(self, tier: str, settings: WakeConfig, upstreams: list[str], models: list[str], *,
                 upstream_api_key: str | None = None,
                 on_wake_ready: Callable[[str, float], None] | None = None, link: TierLink | None = None) -> None:
        self.tier = tier
        self._link = link or LOCAL  # the wake lease and shared notices (ops/lease.py)
        self._shared_seen: set[str] = set()  # instance ids held for a notice another host shared
        self._on_wake_ready = on_wake_ready  # (tier, seconds from request to ready): the gateway's histogram
        self.settings = settings
        self.models = list(models)
        self._api_key = upstream_api_key
        self._port = settings.upstream_port or (urlsplit(upstreams[0]).port if upstreams else None) or 8000
        self._inventory = Inventory(instance_ids=list(settings.instance_ids), upstreams=list(upstreams),
                          fallback_ids=list(settings.fallback_instance_ids),
                          launch_template=bool(settings.fallback_launch_template),
                          fallback_tier=bool(settings.fallback_tier), health_failures=settings.health_failures,
                          start_retry_s=settings.start_retry_s)
        clients = Clients(settings.region, settings.endpoint_url)
        self._ec2 = Ec2(clients, backoff=Backoff(attempts=settings.api_attempts))
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
        self._client: httpx.AsyncClient | None = None
        self._health = HealthBook(unhealthy_after=settings.health_failures)
        self.fallback_tier: str | None = None
        self._counts = {"wakes": 0, "budget": 0, "stops": 0, "interruptions": 0, "fallbacks": 0, "down": 0}
        self._last_wake_s: float | None = None
        self._last_timeline: tuple[tuple[str, float], ...] = ()
        self._history = budget.WakeHistory()  # the last wakes, by phase: the ETA of the next
        self._meter = GpuMeter()  # paid host-seconds (ops/meter.py), fed where _refresh_ec2 observes states
        self._wakes: collections.deque[FinishedWake] = collections.deque(maxlen=WAKE_HISTORY)

    # ---- the gateway's side -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Cheap: READY implies at least one routable upstream."""
        return self._state is TierState.READY

    def upstreams(self) -> list[str]:
        """Routable upstream URLs now (no interrupted, failing or unreachable host)."""
        return list(self._routable)

    def check_room(self) -> None:
        """Raise WakeQueueFull if a new waiter would be refused now (the tier not ready, the waiting room
        full): the gateway asks before it sends a waiting stream its early 200 head."""
        if not self.is_ready() and self._waiters >= self.settings.max_waiters:
            raise WakeQueueFull(budget.retry_after_s(
                self._wake, trio.current_time(), budget_s=self.settings.budget_s,
                hard_cap_s=self.settings.hard_cap_s, last_wake_s=self._last_wake_s))

    async def wait_ready(self) -> None:
        """Return when the tier is ready, starting ONE wake if it is asleep; no timeout of its own."""
        if self.is_ready():
            return
        self.check_room()
        self._waiters += 1
        try:
            while not self.is_ready():
                if self._wake_wanted_at is None and self._wake is None:
                    self._wake_wanted_at = trio.current_time()
                    self._kick.set()
                await self._ready_event.wait()
        finally:
            self._waiters -= 1

    def wake_progress(self) -> tuple[str, float, float] | None:
        """(stage, seconds since the wake was asked for, expected seconds until ready) of the wake under
        way (ops/budget.py `STAGES`, `WakeHistory`), or None when none is."""
        wake = self._wake
        if wake is None:
            return None
        return self._history.progress(wake, trio.current_time(), self.settings.budget_s)

    def use_health(self, book: HealthBook) -> None:
        """Keep this tier's health records in `book` (the gateway's) from now on; idempotent."""
        if book is self._health:
            return
        for rec in self._health:
            book.adopt(rec)
        self._health = book

    def report_unreachable(self, upstream: str) -> None:
        """The gateway saw refused/reset before the first byte: take the host out now, re-probe/re-wake."""
        if self._inventory.mark_down(upstream):
            self._counts["down"] += 1
            logger.warning("upstream unreachable", extra={"tier": self.tier, "upstream": upstream})
        self._update_routable()
        self._kick.set()

    @property
    def gpu_meter(self) -> GpuMeter:
        """This tier's paid GPU time, from the EC2 states observed here (read it, never feed it)."""
        return self._meter

    def statistics(self) -> WakerStatistics:
        c = self._counts
        return WakerStatistics(
            tier=self.tier, state=self._state, waiters=self._waiters, routable=len(self._routable),
            wakes_total=c["wakes"], wake_budget_exceeded_total=c["budget"], last_wake_s=self._last_wake_s,
            stops_total=c["stops"], interruptions_total=c["interruptions"], fallbacks_total=c["fallbacks"],
            upstream_down_total=c["down"], fallback_tier=self.fallback_tier, last_timeline=self._last_timeline)

    def status_view(self) -> WakerView:
        """The hosts, the wake under way and the last wakes, for the status page (changes nothing)."""
        now = trio.current_time()
        wake = self._wake
        return WakerView(
            hosts=tuple((m.url, m.held(now)) for m in self._inventory.members if m.url),
            wake=None if wake is None else tuple(wake.timeline()),
            wake_elapsed_s=None if wake is None else round(wake.elapsed(now), 3),
            recent_wakes=tuple(self._wakes), budget_s=self.settings.budget_s,
            hard_cap_s=self.settings.hard_cap_s)

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
            found = await self._call(self._ec2.describe_tagged, TIER_TAG, self.tier)
            if found:
                self._inventory.add_launched([(i.id, i.state) for i in found])
        except Ec2Error as exc:
            logger.error("describe at start failed; assuming asleep", extra={"tier": self.tier, "code": exc.code})
            return
        if not await self._refresh_ec2(everything=True):
            return
        if any(m.ec2_state in UP for m in self._inventory.members if m.group == FALLBACK):
            self._inventory.engaged.add(FALLBACK)
        await self._probe(strict=False)
        states = self._inventory.states()
        now = trio.current_time()
        if self._routable and "pending" not in states:
            self._idle = budget.IdleTracker(self.settings.idle_s, now)
            self._set_state(TierState.READY)
        elif states & UP:
            self._begin_wake(now)  # a wake under way before the restart: wait for it, never re-start
            self._set_state(TierState.WAKING)
        elif "stopping" in states:
            self._set_state(TierState.STOPPING)
        logger.info("tier recovered", extra={"tier": self.tier, "state": self._state.value})

    def _begin_wake(self, requested_at: float) -> budget.Wake:
        self._wake = budget.Wake(requested_at, self.settings.budget_s, self.settings.hard_cap_s)
        self._counts["wakes"] += 1
        self._launch_wanted = LAUNCHED in self._inventory.engaged and not any(
            m.group == LAUNCHED for m in self._inventory.members)
        logger.info("wake started", extra={"tier": self.tier, "waiters": self._waiters})
        return self._wake

    async def _run_wake(self) -> None:
        now = trio.current_time()
        if self._state is TierState.INTERRUPTED and self._wake_wanted_at is None and not self._inventory.held(now):
            # Every upstream lost without a notice: if someone stopped the instances, we are simply asleep.
            await self._refresh_ec2()
            states = self._inventory.states()
            if states and states <= {"stopping", "stopped", "terminated"}:
                self._reset()
                self._set_state(TierState.STOPPING if "stopping" in states else TierState.ASLEEP)
                return
        wake = self._wake or self._begin_wake(self._wake_wanted_at or now)
        self._wake_wanted_at = None
        self._set_state(TierState.WAKING)
        while True:
            if await self._refresh_ec2():
                await self._start_stopped(wake)
                if self._launch_wanted:
                    self._launch_wanted = False
                    await self._launch()
                if any(m.ec2_state == "running" for m in self._inventory.engaged_members()):
                    wake.mark(budget.Phase.RUNNING, trio.current_time())
            await self._probe(strict=True)
            now = trio.current_time()
            if self._routable:
                wake.mark(budget.Phase.HEALTHY, now)
            if self._inventory.wake_complete(now, over_budget=wake.over_budget(now)):
                self._finish_wake(wake, now)
                await self._link.release()
                return
            if not any(m.awaited(now) for m in self._inventory.engaged_members()):
                self._escalate("nothing left to wait for")  # terminated, out of capacity or doomed
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
        self._history.add(wake)
        self._wakes.append(FinishedWake(time.time(), round(self._last_wake_s or 0.0, 3), self._last_timeline))
        self._wake = None
        self.fallback_tier = None
        self._idle = budget.IdleTracker(self.settings.idle_s, now)
        logger.info("wake ready", extra={"tier": self.tier, "wake_s": round(self._last_wake_s or 0.0, 3),
                                         "timeline": self._last_timeline, "upstreams": self._routable})
        self._set_state(TierState.READY)
        if self._on_wake_ready is not None and self._last_wake_s is not None:
            self._on_wake_ready(self.tier, self._last_wake_s)

    async def _watch(self) -> None:
        assert self._idle is not None
        while self._state is TierState.READY:
            await self._nap(self.settings.poll_s)
            await self._read_shared_notices()
            if self._state is not TierState.READY:
                return
            activity = await self._probe(strict=False, activity=True)
            if self._state is not TierState.READY:
                return  # every upstream lost: INTERRUPTED, handled by _run_wake
            now = trio.current_time()
            lost = any(not m.routable(now) for m in self._inventory.instances())
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
                if await self._refresh_ec2(everything=True):
                    mine = self._inventory.instances(everything=True)
                    stop = [m.instance_id for m in mine if m.group != LAUNCHED and m.ec2_state in UP]
                    drop = [m.instance_id for m in mine if m.group == LAUNCHED]
                    if (stop or drop) and not await self._link.hold():
                        stop = drop = []  # another node stops them: watch EC2 until they are stopped
                    if stop:
                        await self._call(self._ec2.stop, stop)
                        logger.info("StopInstances sent", extra={"tier": self.tier, "instance_ids": stop})
                    if drop:
                        await self._call(self._ec2.terminate, drop)
                        logger.info("TerminateInstances sent", extra={"tier": self.tier, "instance_ids": drop})
                    if not stop and not drop and all(m.ec2_state in ("stopped", "terminated") for m in mine):
                        break
            except StateError:
                pass  # pending: cannot be stopped yet; look again next poll
            except Ec2Error as exc:
                logger.warning("stop failed; retrying", extra={"tier": self.tier, "code": exc.code})
            await self._nap(self.settings.poll_s)
        await self._link.release()
        self._reset()
        self._set_state(TierState.ASLEEP)

    # ---- EC2 and probes -----------------------------------------------------------------------------

    async def _call(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _url_of(self, inst: Instance) -> str | None:
        if self.settings.upstream_tag:
            return inst.tags.get(self.settings.upstream_tag)
        return f"http://{inst.private_ip}:{self._port}" if inst.private_ip else None

    async def _refresh_ec2(self, *, everything: bool = False) -> bool:
        members = self._inventory.instances(everything=everything)
        try:
            found = await self._call(self._ec2.describe, [m.instance_id for m in members])
        except Ec2Error as exc:
            logger.warning("describe failed", extra={"tier": self.tier, "code": exc.code})
            return False
        now = trio.current_time()
        for m in members:
            inst = found.get(m.instance_id)
            self._meter.observe(m.instance_id, inst.state if inst else "terminated",
                                started_ago_s=None if m.start_sent_at is None else now - m.start_sent_at)
            self._inventory.observe(m, inst.state if inst else "terminated", self._url_of(inst) if inst else None, now)
        self._update_routable()
        return True

    async def _start_stopped(self, wake: budget.Wake | None) -> None:
        held: bool | None = None  # asked once, and only when there is something to start
        for group in (PRIMARY, FALLBACK, LAUNCHED):
            now = trio.current_time()
            ids = self._inventory.startable(group, now)
            if not ids:
                continue
            if held is None:
                held = await self._link.hold()
            if not held:
                return  # another node holds the tier's lease: it starts them; we watch
            try:
                await self._call(self._ec2.start, ids)
            except CapacityError as exc:
                self._inventory.note_start(ids, now, capacity=True)
                logger.warning("no capacity", extra={"tier": self.tier, "instance_ids": ids, "code": exc.code})
                if group == self._inventory.top():
                    self._escalate(exc.code)
                continue
            except StateError:
                continue  # stopping: start it once it has stopped
            except Ec2Error as exc:
                logger.warning("start failed", extra={"tier": self.tier, "instance_ids": ids, "code": exc.code})
                continue
            self._inventory.note_start(ids, now, capacity=False)
            if wake is not None:
                wake.mark(budget.Phase.START_SENT, now)
            logger.info("StartInstances sent", extra={"tier": self.tier, "instance_ids": ids})

    async def _launch(self) -> None:
        template = self.settings.fallback_launch_template
        assert template is not None
        if not await self._link.hold():
            self._launch_wanted = True  # the holder launches; ask again at the next poll
            return
        count = max(1, len(self.settings.instance_ids))
        token = f"{self.tier}-{uuid.uuid4().hex[:16]}"  # a retried RunInstances launches nothing twice
        try:
            launched = await self._call(self._ec2.run_from_template, template, count, {TIER_TAG: self.tier}, token)
        except CapacityError as exc:
            logger.warning("launch template: no capacity", extra={"tier": self.tier, "code": exc.code})
            self._escalate(exc.code)
            return
        except Ec2Error as exc:
            logger.error("launch template failed", extra={"tier": self.tier, "code": exc.code})
            return
        self._inventory.add_launched([(i.id, i.state) for i in launched])
        logger.info("RunInstances sent", extra={"tier": self.tier, "instance_ids": [i.id for i in launched]})

    async def _probe(self, *, strict: bool, activity: bool = False) -> list[tuple[str, float, float]]:
        """Probe engaged running members; `strict` (waking) drops a host at its first failure."""
        samples: list[tuple[str, float, float]] = []
        client = self._client
        assert client is not None

        async def one(m: Member, url: str) -> None:
            rec = self._health.record(url, unhealthy_after=self.settings.health_failures)
            ready: probe.Readiness | None = None
            seen: probe.Activity | None = None
            with trio.move_on_after(2 * self.settings.probe_timeout_s):
                ready = await probe.probe_ready(client, url, self.models, api_key=self._api_key)
                if ready.healthy:
                    seen = await probe.probe_activity(client, url)
            now = trio.current_time()
            if ready is None or not ready.healthy:
                changed = rec.failed(now, silent=ready is None or ready.timed_out,
                                     reason="timeout" if ready is None else ready.reason)
            else:
                changed = rec.succeeded(now, progress_of(seen))
            if changed:
                log_change(rec)
            ok = ready is not None and ready.ready and rec.up
            if ok and activity:
                # Unreadable metrics count as activity: never stop what we cannot see.
                samples.append((url, 1.0, 0.0) if seen is None else (url, seen.in_flight, seen.success_total))
            # The record counts failures (health_failures in a row): once it says not up, out at once.
            if self._inventory.note_health(m, ok, strict=strict or not rec.up):
                self._counts["down"] += 1
                logger.warning("upstream failing health", extra={"tier": self.tier, "upstream": url})

        async with trio.open_nursery() as nursery:
            for m in self._inventory.engaged_members():
                if m.url and (m.instance_id is None or m.ec2_state == "running"):
                    nursery.start_soon(one, m, m.url)
        self._update_routable()
        return samples

    # ---- interruptions ------------------------------------------------------------------------------

    async def _poll_interruptions(self) -> None:
        assert self._queue is not None
        await poll_notices(self._queue, self._on_notice, limiter=trio.CapacityLimiter(1),
                           wait_s=self.settings.interruption_wait_s, poll_s=self.settings.poll_s)

    def _on_notice(self, notice: Notice) -> bool:
        member = self._inventory.by_instance(notice.instance_id)
        if member is None:
            return False  # another tier's instance: leave the message to it
        self._link.share(notice.instance_id, notice.kind, self.settings.interruption_hold_s)
        self._hold_member(member, notice.kind, notice.action, shared=False)
        return True

    async def _read_shared_notices(self) -> None:
        """Notices another host read from SQS (ops/lease.py): acted on here as if read here."""
        ids = [m.instance_id for m in self._inventory.instances(everything=True) if m.instance_id]
        shared = await self._link.notices(ids)
        self._shared_seen &= set(shared)  # a notice that expired may come again
        for instance_id, kind in shared.items():
            member = self._inventory.by_instance(instance_id)
            if member is None or instance_id in self._shared_seen or member.held(trio.current_time()):
                continue
            self._shared_seen.add(instance_id)
            self._hold_member(member, kind, None, shared=True)

    def _hold_member(self, member: Member, kind: str, action: str | None, *, shared: bool) -> None:
        member.hold_until = trio.current_time() + self.settings.interruption_hold_s
        self._counts["interruptions"] += 1
        logger.warning("spot notice: host out of rotation", extra={
            "tier": self.tier, "instance_id": member.instance_id, "kind": kind,
            "action": action, "upstream": member.url, "shared": shared})
        self._update_routable()
        if not self._routable and member.group in self._inventory.engaged:
            self._escalate(kind)
        self._kick.set()

    # ---- small helpers ------------------------------------------------------------------------------

    def _escalate(self, reason: str, *, everything: bool = False) -> None:
        steps = self._inventory.escalate(everything=everything)
        for step in steps:
            self._counts["fallbacks"] += 1
            if step == LAUNCHED:
                self._launch_wanted = True
            elif step == TIER:
                self.fallback_tier = self.settings.fallback_tier
            logger.warning("fallback engaged", extra={"tier": self.tier, "step": step, "reason": reason})
        if steps:
            self._kick.set()

    def _reset(self) -> None:
        self._inventory.reset()
        self._launch_wanted = False
        self.fallback_tier = None
        self._update_routable()

    def _update_routable(self) -> None:
        self._routable = self._inventory.routable(trio.current_time())
        if self._state is TierState.READY and not self._routable:
            self._set_state(TierState.INTERRUPTED)
            self._kick.set()

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
