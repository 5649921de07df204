"""Active health of upstreams: one verdict per upstream (up / down / stalled), and the prober feeding it.

Strategy: ONE mechanism for every tier. `UpstreamHealth` is a pure, clock-injected state machine
(callers pass `now`; nothing here reads a clock, sleeps or does I/O) fed by whoever probes the host:
the gateway's prober (`run_prober`, one trio task per upstream per gateway worker, for the tiers
without a waker) or a tier's waker (ops/waker.py feeds its readiness and /metrics probes into the same
records, so a waker's routable list and the gateway agree). A `HealthBook` holds the records of one
gateway worker by URL; the routing layer reads `record.up` (a plain attribute) and `book.version`
(bumped on every verdict change, so a tier re-filters its upstreams only when something changed).

Verdicts:
- DOWN after `unhealthy_after` consecutive failed probes. A failure is silence (a timeout: the host
  accepted and never answered -- an engine hung in a collective, a half-dead network) or an answer
  (refused, reset, a non-200 /health: the host is there and says no, e.g. a host draining under a spot
  notice, whose requests in flight may still finish).
- STALLED when /health answers but vLLM makes no progress: `vllm:num_requests_running` > 0 and
  `vllm:generation_tokens_total` unchanged for `stall_s`. Metrics that cannot be read never stall a
  host (we do not act on what we cannot see).
- UP again at the first successful probe that does not show a stall (tokens moving, nothing running, or
  no metrics): a DOWN host starts its stall clock afresh.

In-flight requests: each exchange on an upstream registers a "watch" (any object with `cancel()`)
with the record -- a set add and discard, O(1), no task per request. When the verdict means they
cannot finish -- STALLED, or DOWN with silence in the failure streak -- every registered watch is
cancelled (and so is one registering later, at once); a DOWN host that only refuses keeps its in-flight
requests. The watch decides what cancelling means (the gateway shuts the upstream socket down:
proxy/upstream/open.py `Watch`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

import msgspec
import trio

from backends import probe

logger = logging.getLogger(__name__)


class Verdict(enum.Enum):
    UP = "up"
    DOWN = "down"
    STALLED = "stalled"


class Progress(NamedTuple):
    """vLLM's progress as /metrics shows it: requests running, generation tokens so far; and its load
    (requests waiting, the KV cache's fill) for the routing policies (proxy/routing/policy.py)."""

    running: float
    tokens: float
    waiting: float = 0.0
    kv_usage: float | None = None


def progress_of(activity: probe.Activity | None) -> Progress | None:
    """The progress sample in a /metrics reading; None when unreadable or without the token counter."""
    if activity is None or activity.generation_tokens is None:
        return None
    return Progress(activity.running, activity.generation_tokens, activity.waiting, activity.kv_usage)


class Watch(Protocol):
    def cancel(self) -> None: ...


class HealthStatistics(msgspec.Struct, frozen=True):
    up: float  # 1.0 routable, 0.0 not (a float: the largest over workers in multiprocess mode)
    state: Verdict
    failures: int
    in_flight: int
    down_total: int
    stalled_total: int


class UpstreamHealth:
    """The verdict on one upstream, from the probes fed to it (see the module comment)."""

    __slots__ = ("_book", "changed_at", "down_total", "failures", "frozen_since", "inflight", "load", "reason",
                 "silent", "stall_s", "stalled_total", "tokens", "unhealthy_after", "up", "url", "verdict")

    def __init__(self, url: str, *, unhealthy_after: int = 3, stall_s: float = 30.0,
                 book: HealthBook | None = None) -> None:
        self.url = url
        self.unhealthy_after = unhealthy_after
        self.stall_s = stall_s
        self._book = book
        self.verdict = Verdict.UP  # unknown hosts are routable: the first probes decide
        self.up = True
        self.changed_at: float | None = None
        self.reason: str | None = None
        self.failures = 0
        self.silent = False  # a timeout in the current failure streak
        self.tokens: float | None = None  # generation tokens at the last sample that ran something
        self.frozen_since: float | None = None  # since when `tokens` has not moved with requests running
        self.inflight: set[Watch] = set()
        # vLLM's own load at the last /metrics reading: (running + waiting, KV usage or None, when read,
        # this gateway's requests in flight there then -- so the rest are other gateways')
        self.load: tuple[float, float | None, float, int] | None = None
        self.down_total = 0
        self.stalled_total = 0

    @property
    def doomed(self) -> bool:
        """In-flight requests cannot finish here: stalled, or down after going silent."""
        return self.verdict is Verdict.STALLED or (self.verdict is Verdict.DOWN and self.silent)

    # ---- probe results ------------------------------------------------------------------------------

    def failed(self, now: float, *, silent: bool, reason: str | None = None) -> bool:
        """A failed probe (`silent`: a timeout). True when the verdict changed."""
        self.failures += 1
        self.silent = self.silent or silent
        self.reason = reason or ("timeout" if silent else "failed")
        changed = False
        if self.failures >= self.unhealthy_after:
            changed = self._set(Verdict.DOWN, now)
            if self.doomed:
                self._cancel_all()
        return changed

    def succeeded(self, now: float, progress: Progress | None = None) -> bool:
        """A successful probe, with the /metrics progress sample when one was read. True when the
        verdict changed."""
        if self.verdict is Verdict.DOWN:
            self.tokens = self.frozen_since = None  # back from an outage: the stall clock starts afresh
        self.failures = 0
        self.silent = False
        if progress is not None:  # and this gateway's own requests there as it read them
            self.load = (progress.running + progress.waiting, progress.kv_usage, now, len(self.inflight))
        stalled = False
        if progress is None or progress.running <= 0:
            self.tokens = None if progress is None else progress.tokens
            self.frozen_since = now
        elif self.tokens is None or progress.tokens != self.tokens or self.frozen_since is None:
            self.tokens, self.frozen_since = progress.tokens, now
        else:
            stalled = now - self.frozen_since >= self.stall_s
        self.reason = "no progress" if stalled else None
        changed = self._set(Verdict.STALLED if stalled else Verdict.UP, now)
        if stalled:
            self._cancel_all()
        return changed

    # ---- requests in flight -------------------------------------------------------------------------

    def enter(self, watch: Watch) -> None:
        """An exchange starts on this upstream; cancelled at once if it cannot finish here."""
        if self.doomed:
            watch.cancel()
            return
        self.inflight.add(watch)

    def leave(self, watch: Watch) -> None:
        self.inflight.discard(watch)

    def statistics(self) -> HealthStatistics:
        return HealthStatistics(up=1.0 if self.up else 0.0, state=self.verdict, failures=self.failures,
                                in_flight=len(self.inflight), down_total=self.down_total,
                                stalled_total=self.stalled_total)

    # ---- internals ----------------------------------------------------------------------------------

    def _set(self, verdict: Verdict, now: float) -> bool:
        if verdict is self.verdict:
            return False
        self.verdict = verdict
        self.up = verdict is Verdict.UP
        self.changed_at = now
        if verdict is Verdict.DOWN:
            self.down_total += 1
        elif verdict is Verdict.STALLED:
            self.stalled_total += 1
        if self._book is not None:
            self._book.version += 1
        return True

    def _cancel_all(self) -> None:
        if self.inflight:
            watches = list(self.inflight)
            self.inflight.clear()
            for w in watches:
                w.cancel()


class HealthBook:
    """The health records of one gateway worker, by upstream URL (defaults for new records here)."""

    def __init__(self, *, unhealthy_after: int = 3, stall_s: float = 30.0) -> None:
        self.unhealthy_after = unhealthy_after
        self.stall_s = stall_s
        self.version = 0  # bumped by every verdict change of every record
        self._records: dict[str, UpstreamHealth] = {}

    def record(self, url: str, *, unhealthy_after: int | None = None) -> UpstreamHealth:
        """The record of `url`, created UP if new; `unhealthy_after` sets its failure threshold."""
        rec = self._records.get(url)
        if rec is None:
            rec = self._records[url] = UpstreamHealth(url, unhealthy_after=self.unhealthy_after,
                                                      stall_s=self.stall_s, book=self)
        if unhealthy_after is not None:
            rec.unhealthy_after = unhealthy_after
        return rec

    def get(self, url: str) -> UpstreamHealth | None:
        return self._records.get(url)

    def adopt(self, rec: UpstreamHealth) -> UpstreamHealth:
        """Take over a record kept elsewhere (a waker's own book) unless this book has one for its URL."""
        mine = self._records.get(rec.url)
        if mine is not None:
            return mine
        rec._book = self
        rec.stall_s = self.stall_s
        self._records[rec.url] = rec
        self.version += 1
        return rec

    def __iter__(self) -> Iterator[UpstreamHealth]:
        return iter(list(self._records.values()))

    def statistics(self) -> dict[str, HealthStatistics]:
        return {url: rec.statistics() for url, rec in self._records.items()}


# ---- the prober (trio) -------------------------------------------------------------------------------

async def check(client, rec: UpstreamHealth, timeout_s: float) -> bool:
    """One probe of `rec.url`: GET /health within `timeout_s`, then GET /metrics for progress. Feeds the
    record; True when its verdict changed (logged)."""
    result: probe.Health | None = None
    with trio.move_on_after(timeout_s):
        result = await probe.probe_health(client, rec.url)
    if result is None or not result.ok:
        silent = result is None or result.silent
        changed = rec.failed(trio.current_time(), silent=silent,
                             reason="timeout" if result is None else result.reason)
    else:
        activity = None
        with trio.move_on_after(timeout_s):
            activity = await probe.probe_activity(client, rec.url)
        changed = rec.succeeded(trio.current_time(), progress_of(activity))
    if changed:
        log_change(rec)
    return changed


def log_change(rec: UpstreamHealth) -> None:
    fields = {"upstream": rec.url, "state": rec.verdict.value, "reason": rec.reason,
              "in_flight": len(rec.inflight)}
    if rec.up:
        logger.info("upstream healthy again", extra=fields)
    else:
        logger.warning("upstream unhealthy", extra=fields)


async def _watch_one(client, rec: UpstreamHealth, interval_s: float, timeout_s: float, *,
                     task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await trio.sleep(interval_s)  # a new record is UP: the first check can wait one interval
        while True:
            started = trio.current_time()
            await check(client, rec, timeout_s)
            await trio.sleep_until(started + interval_s)


async def run_prober(book: HealthBook, targets: Callable[[], Iterable[str]], *, interval_s: float,
                     timeout_s: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Probe every URL `targets()` names, each every `interval_s` on its own task (the first check one
    interval after it is added), until cancelled. `targets` is asked again every `interval_s` (a reload
    adds or removes upstreams)."""
    async with probe.make_client(timeout_s) as client, trio.open_nursery() as nursery:
        loops: dict[str, trio.CancelScope] = {}
        task_status.started()
        while True:
            wanted = dict.fromkeys(targets())
            for url in wanted:
                if url not in loops:
                    loops[url] = await nursery.start(_watch_one, client, book.record(url), interval_s, timeout_s)
            for url in [u for u in loops if u not in wanted]:
                loops.pop(url).cancel()
            await trio.sleep(interval_s)
