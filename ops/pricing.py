"""What a tier's host-hour costs: a fixed price, or EC2's spot price for the host's zone (`[tiers.cost]`).

Strategy: three layers. `CostConfig` is the shape of `[tiers.cost]` (ops owns its settings and never
imports `proxy`; the gateway's config embeds it and checks it in `proxy.config.validate`). The parsing
is pure and unit-tested: `latest_prices` keeps, per availability zone, the most recent entry of a
DescribeSpotPriceHistory answer for the instance type and product ("Linux/UNIX" also matches EC2's
"Linux/UNIX (Amazon VPC)" spelling), and `zones_of` reads each instance's zone from DescribeInstances'
Placement. `SpotPriceFetcher` makes those two calls, blocking (boto3, through `ops.ec2.call`'s bounded
throttling retries and error translation), so `TierPricing.refresh` runs it in a thread with a
deadline. `TierPricing` holds one tier's prices: `hourly(host)` answers on the event loop from what the
last refresh found -- the host's own zone (a waker's instance), else the configured
`availability_zone`, else the dearest zone of the region (never under-priced) -- and `due()` says
when to refresh (every `refresh_s`, an hour by default; a failed refresh keeps the last prices and is
retried after `RETRY_S`). Before any price is known a spot tier is priced at 0 with source
"spot:unknown", so its GPU seconds are still recorded.

The spot price asked for is the one in effect now (StartTime = now: EC2 returns, per zone, the last
price change before it and any since). Nothing secret is logged: AWS messages name instance ids, not
credentials.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import trio

from ops.ec2 import Backoff, Clients, Ec2Error, call

logger = logging.getLogger(__name__)

RETRY_S = 60.0  # a failed refresh is tried again this much later
FETCH_DEADLINE_S = 60.0  # one refresh (describe + price history) must finish within this
MAX_PAGES = 10
UNKNOWN = "spot:unknown"


class CostConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """[tiers.cost]: exactly one of `hourly_usd` (a fixed price per host-hour) or `spot = true`."""

    hourly_usd: float | None = None
    spot: bool = False
    instance_type: str | None = None  # spot: e.g. "p5.48xlarge"
    region: str | None = None  # spot: default the tier's [tiers.wake] region, else us-east-1
    # spot: the zone for hosts whose zone is not known from EC2 (a tier without [tiers.wake]: required)
    availability_zone: str | None = None
    product: str = "Linux/UNIX"
    refresh_s: float = 3600.0
    endpoint_url: str | None = None  # spot: default the tier's [tiers.wake] endpoint_url (an emulator)


@dataclass(frozen=True)
class SpotPrice:
    zone: str
    usd_per_hour: float
    at: float  # unix time the price took effect


def product_matches(seen: str, wanted: str) -> bool:
    return seen == wanted or seen == f"{wanted} (Amazon VPC)"


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, str):
        return _epoch(datetime.fromisoformat(value))
    return float(value)


def latest_prices(history: Iterable[Mapping[str, Any]], *, instance_type: str,
                  product: str) -> dict[str, SpotPrice]:
    """Zone -> the most recent price of `instance_type` / `product` among DescribeSpotPriceHistory's
    ``SpotPriceHistory`` entries (entries that do not parse are skipped)."""
    out: dict[str, SpotPrice] = {}
    for entry in history:
        if entry.get("InstanceType") != instance_type or not product_matches(
                str(entry.get("ProductDescription", "")), product):
            continue
        try:
            zone = str(entry["AvailabilityZone"])
            price = SpotPrice(zone, float(entry["SpotPrice"]), _epoch(entry["Timestamp"]))
        except (KeyError, TypeError, ValueError):
            continue
        if not math.isfinite(price.usd_per_hour) or price.usd_per_hour < 0:
            continue
        if zone not in out or price.at > out[zone].at:
            out[zone] = price
    return out


def zones_of(reservations: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Instance id -> availability zone, from DescribeInstances' ``Reservations``."""
    return {i["InstanceId"]: i["Placement"]["AvailabilityZone"]
            for r in reservations for i in r.get("Instances", [])
            if i.get("InstanceId") and i.get("Placement", {}).get("AvailabilityZone")}


class SpotPriceFetcher:
    """The two EC2 calls behind a spot price. Every method blocks (run it in a thread)."""

    def __init__(self, clients: Clients, *, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._clients = clients
        self._backoff = backoff or Backoff(attempts=3)
        self._clock = clock

    def _pages(self, action: str, **kwargs: Any):
        fn = getattr(self._clients.get("ec2"), action)
        token: str | None = None
        for _ in range(MAX_PAGES):
            page = call(fn, backoff=self._backoff, what=f"ec2.{action}", **kwargs,
                        **({"NextToken": token} if token else {}))
            yield page
            token = page.get("NextToken")
            if not token:
                return

    def prices(self, instance_type: str, product: str) -> dict[str, SpotPrice]:
        """Zone -> the spot price in effect now."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        history: list[dict] = []
        for page in self._pages("describe_spot_price_history", InstanceTypes=[instance_type],
                                ProductDescriptions=[product], StartTime=now):
            history += page.get("SpotPriceHistory", [])
        return latest_prices(history, instance_type=instance_type, product=product)

    def zones(self, instance_ids: list[str]) -> dict[str, str]:
        """Instance id -> zone; ids EC2 no longer knows are left out (a filter, not InstanceIds)."""
        if not instance_ids:
            return {}
        reservations: list[dict] = []
        wanted = [{"Name": "instance-id", "Values": instance_ids}]
        for page in self._pages("describe_instances", Filters=wanted):
            reservations += page.get("Reservations", [])
        return zones_of(reservations)


class TierPricing:
    """One tier's price per host-hour (see the module comment). `hourly` is cheap; `refresh` does I/O."""

    def __init__(self, cost: CostConfig, *, region: str = "us-east-1", endpoint_url: str | None = None,
                 clock: Callable[[], float] = time.time, fetcher: SpotPriceFetcher | None = None) -> None:
        self.cost = cost
        self.region = cost.region or region
        self._clock = clock
        self._fetcher = fetcher
        if cost.spot and fetcher is None:
            clients = Clients(self.region, cost.endpoint_url or endpoint_url)
            self._fetcher = SpotPriceFetcher(clients, clock=clock)
        self.prices: dict[str, SpotPrice] = {}
        self.zones: dict[str, str] = {}  # host (instance id) -> zone
        self._asked: set[str] = set()  # instance ids whose zone was asked for since the last full refresh
        self._next = 0.0
        self.refreshes_total = 0
        self.refresh_errors_total = 0

    def hourly(self, host: str) -> tuple[float, str]:
        """(USD per host-hour, where the price came from) for `host` now."""
        if not self.cost.spot:
            return float(self.cost.hourly_usd or 0.0), "fixed"
        zone = self.zones.get(host) or self.cost.availability_zone
        if zone is not None and zone in self.prices:
            return self.prices[zone].usd_per_hour, f"spot:{zone}"
        if self.prices:
            dearest = max(self.prices.values(), key=lambda p: p.usd_per_hour)
            return dearest.usd_per_hour, f"spot:{self.region}:max"
        return 0.0, UNKNOWN

    def due(self, hosts: Iterable[str] = ()) -> bool:
        """Time to refresh: every refresh_s (RETRY_S after a failure), or at once for an instance among
        `hosts` whose zone was never asked for (a host launched since)."""
        if not self.cost.spot:
            return False
        return self._clock() >= self._next or any(h.startswith("i-") and h not in self.zones
                                                  and h not in self._asked for h in hosts)

    def fetch_blocking(self, hosts: list[str]) -> tuple[dict[str, str], dict[str, SpotPrice]]:
        """(zones of the instance ids among `hosts` not known yet, prices now). Blocking; raises Ec2Error."""
        assert self._fetcher is not None and self.cost.instance_type is not None
        ids = [h for h in hosts if h.startswith("i-") and h not in self.zones]
        zones = self._fetcher.zones(ids) if ids else {}
        return zones, self._fetcher.prices(self.cost.instance_type, self.cost.product)

    async def refresh(self, hosts: list[str], *, tier: str = "") -> bool:
        """`fetch_blocking` in a thread, within FETCH_DEADLINE_S, the answer applied on the loop; False
        (logged, the last prices kept, retried after RETRY_S) on failure."""
        self._next = self._clock() + RETRY_S
        self._asked.update(h for h in hosts if h.startswith("i-"))
        try:
            with trio.move_on_after(FETCH_DEADLINE_S) as waited:
                zones, prices = await trio.to_thread.run_sync(self.fetch_blocking, list(hosts),
                                                              abandon_on_cancel=True)
        except Ec2Error as exc:
            self.refresh_errors_total += 1
            logger.warning("spot price refresh failed", extra={"tier": tier, "code": exc.code})
            return False
        except Exception as exc:  # noqa: BLE001 -- not EC2's answer: logged by type, retried like any failure
            self.refresh_errors_total += 1
            logger.warning("spot price refresh failed", extra={"tier": tier, "error": type(exc).__name__})
            return False
        if waited.cancelled_caught:
            self.refresh_errors_total += 1
            logger.warning("spot price refresh timed out",
                           extra={"tier": tier, "deadline_s": FETCH_DEADLINE_S})
            return False
        self.zones.update(zones)
        self._asked -= set(zones)
        if prices:
            self.prices = prices
        self.refreshes_total += 1
        self._next = self._clock() + self.cost.refresh_s
        if not self.prices:
            logger.warning("no spot price found", extra={
                "tier": tier, "instance_type": self.cost.instance_type, "region": self.region})
        return True
