"""GPU time: every interval (a minute), the paid host-seconds of each tier with `[tiers.cost]`, priced,
into the usage store's ``gpu_time`` table and the tier cost counters.

Strategy: one `GpuTimeRecorder` per gateway process, a service task (process/services.py). Its intervals
are fixed and aligned to the unix epoch (`[usage] gpu_time_s`, 60 by default), so every worker and
every host cuts time the same way. An interval is recorded once it has ended (plus `lag_s`, so the
observation that closes it -- the DescribeInstances after a StartInstances -- is in): for each costed
tier, each host's paid seconds in it from the tier's `ops.meter.GpuMeter` -- the waker's (its EC2
observations) or, for a tier without a waker, one kept here whose hosts are the tier's upstreams, up
while the gateway runs -- times the price per host-hour now (`ops.pricing.TierPricing`: fixed, or the
spot price of the host's zone, refreshed in a thread every `refresh_s`). Each row goes through the usage
log (`UsageLog.record_gpu_time`: the same queue, batches and spill file as usage rows) under the
deterministic uid ``tier|host|interval start``: every worker and host records the whole tier and the
store keeps the first row of each (``INSERT OR IGNORE`` / ``ON CONFLICT (uid) DO NOTHING``), so nothing
is counted twice. Only whole intervals are recorded, never the partial one at shutdown: a restarted
process's meter counts the interval it starts in whole for a host already up (ops/meter.py), which is
the row the old process would have written. At most `CATCH_UP` intervals are recorded after a stall or a
clock jump; older ones are skipped (logged). Waits are bounded (`trio.sleep` to the next boundary,
re-checked against the wall clock).

The counters `spotinference_tier_gpu_seconds_total{tier}` and `spotinference_tier_cost_usd_total{tier}`
advance by 1/workers of each recorded interval, so their sum over a host's workers is the tier's once.
Read-only for other code (a status page): `tier_cost(tier)` -> ``(seconds, usd)`` recorded by this
process since it started plus the current interval so far; `costs()` for every costed tier;
`cost_view(tier)`, the same with what the tier burns now (hosts paid, USD per hour, price source).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ops.meter import GpuMeter
from ops.pricing import TierPricing
from proxy.usage.store import GpuTimeRow

log = logging.getLogger(__name__)

CATCH_UP = 1440  # intervals recorded at most in one go after a stall (a day of minutes)


@dataclass
class TierCost:
    seconds: float = 0.0
    usd: float = 0.0


class GpuTimeRecorder:
    """Records each costed tier's GPU time every interval (see the module comment)."""

    def __init__(self, gw, *, interval_s: int | None = None, lag_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._gw = gw
        self.interval_s = int(interval_s or gw.runtime.config.usage.gpu_time_s)
        self.lag_s = min(5.0, self.interval_s / 4) if lag_s is None else lag_s
        self._clock = clock
        self._always_on: dict[str, GpuMeter] = {}  # tiers without a waker: their upstreams, always up
        self._pricing: dict[str, tuple[tuple, TierPricing]] = {}  # tier -> (what it was built from, pricing)
        self._totals: dict[str, TierCost] = {}
        self.next_start = self._floor(clock())  # the start of the next interval to record
        self.since = clock()  # when this process began counting (tier_cost's totals start here)

    def _floor(self, t: float) -> float:
        return float(int(t // self.interval_s) * self.interval_s)

    # -- what to meter ------------------------------------------------------------------------------------

    def _sources(self) -> list[tuple[str, GpuMeter, TierPricing]]:
        """(tier, meter, pricing) of every tier with [tiers.cost] now, and of tiers just gone (their
        always-on meter stopped here, recorded one last time)."""
        out: list[tuple[str, GpuMeter, TierPricing]] = []
        seen: set[str] = set()
        for name, tier in self._gw.runtime.router.tiers.items():
            cfg = tier.config
            if cfg.cost is None:
                continue
            if tier.waker is not None:
                meter = getattr(tier.waker, "gpu_meter", None)
                if meter is None:
                    continue  # a waker that keeps no meter (a stand-in): nothing to record
            else:
                meter = self._always_on.get(name)
                if meter is None:
                    meter = self._always_on[name] = GpuMeter(self._clock)
                meter.running(tier.urls)
                seen.add(name)
            out.append((name, meter, self._pricing_of(name, cfg)))
        for name, meter in list(self._always_on.items()):
            if name not in seen:
                meter.running([])  # no longer a costed tier without a waker: its hosts are down from now
                if name in self._pricing:
                    out.append((name, meter, self._pricing[name][1]))
        return out

    def _pricing_of(self, name: str, cfg) -> TierPricing:
        wake = cfg.wake
        region = wake.region if wake is not None else "us-east-1"
        endpoint = wake.endpoint_url if wake is not None else None
        built = (cfg.cost, region, endpoint)
        have = self._pricing.get(name)
        if have is None or have[0] != built:
            have = self._pricing[name] = (built, TierPricing(cfg.cost, region=region, endpoint_url=endpoint,
                                                             clock=self._clock))
        return have[1]

    def observe(self) -> None:
        """The first look at the tiers without a waker (their hosts are up from the gateway's start)."""
        self._sources()

    async def refresh_prices(self) -> None:
        """Refresh the spot prices that are due (each bounded; a failure keeps the last prices)."""
        for name, meter, pricing in self._sources():
            hosts = meter.hosts()
            if pricing.due(hosts):
                await pricing.refresh(hosts, tier=name)

    # -- recording ----------------------------------------------------------------------------------------

    def record_due(self) -> int:
        """Record every interval that has ended (plus lag_s); returns how many rows were recorded."""
        now = self._clock()
        behind = int((now - self.lag_s - self.next_start) // self.interval_s)
        if behind > CATCH_UP:
            skip = behind - CATCH_UP
            log.warning("gpu time: %d intervals of %d s skipped (a stall or a clock jump)", skip,
                        self.interval_s)
            self.next_start += skip * self.interval_s
        rows = 0
        while self.next_start + self.interval_s + self.lag_s <= now:
            rows += self.record_interval(self.next_start, self.next_start + self.interval_s)
            self.next_start += self.interval_s
        return rows

    def record_interval(self, start: float, end: float) -> int:
        usage = self._gw.usage
        share = 1.0 / max(1, getattr(self._gw, "workers", 1))
        rows = 0
        sources = self._sources()
        for name, meter, pricing in sources:
            seconds = usd = 0.0
            for host, s in sorted(meter.seconds(start, end).items()):
                s = round(s, 3)
                rate, source = pricing.hourly(host)
                cost = s * rate / 3600.0
                seconds += s
                usd += cost
                if usage is not None:
                    usage.record_gpu_time(GpuTimeRow(ts=start, tier=name, host=host, seconds=s, usd=cost,
                                                     price_source=source))
                rows += 1
            total = self._totals.setdefault(name, TierCost())
            total.seconds += seconds
            total.usd += usd
            self._gw.metrics.gpu_time(name, seconds, usd, share)
        for name, meter, _ in sources:
            meter.prune(end)
            if name in self._always_on and not meter.up() and not meter.seconds(end, self._clock()):
                live = self._gw.runtime.router.tiers.get(name)
                if live is None or live.waker is not None or live.config.cost is None:
                    del self._always_on[name]
        for tier in self._gw.runtime.router.tiers.values():
            meter = getattr(tier.waker, "gpu_meter", None)
            if meter is not None and tier.config.cost is None:
                meter.prune(end)  # nobody records it: keep it small all the same
        return rows

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Record every interval until cancelled (the partial interval at the end is not recorded)."""
        self._gw.gpu_time = self  # read-only handle for other code: `gw.gpu_time.tier_cost(tier)`
        for name, _meter, _pricing in self._sources():
            self._gw.metrics.gpu_time(name, 0.0, 0.0)  # the series exist (at 0) from the start
        self.observe()
        self.since = self._clock()
        self.next_start = self._floor(self.since)
        task_status.started()
        first = True
        while True:
            wait = self.next_start + self.interval_s + self.lag_s - self._clock()
            if wait > 0 and not first:
                await trio.sleep(min(wait, self.interval_s + self.lag_s))
                continue
            try:
                await self.refresh_prices()
                self.record_due()
            except Exception:  # never the gateway's end: logged with its traceback, tried again next interval
                log.exception("gpu time: recording failed")
                self.next_start += self.interval_s
            first = False

    # -- read-only views ----------------------------------------------------------------------------------

    def tier_cost(self, tier: str) -> tuple[float, float]:
        """(host-seconds, USD) of `tier`: recorded by this process since it started, plus the current
        interval so far at the current price. (0, 0) for a tier without [tiers.cost]."""
        return self.costs().get(tier, (0.0, 0.0))

    def costs(self) -> dict[str, tuple[float, float]]:
        """tier -> (host-seconds, USD) as `tier_cost`, for every costed tier."""
        now = self._clock()
        out: dict[str, tuple[float, float]] = {}
        for name, meter, pricing in self._sources():
            done = self._totals.get(name, TierCost())
            seconds, usd = done.seconds, done.usd
            for host, s in meter.seconds(self.next_start, now).items():
                seconds += s
                usd += s * pricing.hourly(host)[0] / 3600.0
            out[name] = (seconds, usd)
        return out

    def cost_view(self, tier: str) -> dict | None:
        """A status page's view of a costed tier (None without [tiers.cost]): ``gpu_seconds`` and ``usd``
        as `tier_cost` (since ``since``, unix time), ``hosts_up`` (paid now), ``usd_per_hour`` (what they
        cost per hour now) and ``price_sources`` (where those prices came from)."""
        for name, meter, pricing in self._sources():
            if name != tier:
                continue
            seconds, usd = self.tier_cost(tier)
            rates = [pricing.hourly(host) for host in meter.up()]
            return {"gpu_seconds": seconds, "usd": usd, "since": self.since, "hosts_up": len(rates),
                    "usd_per_hour": sum(r for r, _ in rates),
                    "price_sources": sorted({src for _, src in rates})}
        return None
