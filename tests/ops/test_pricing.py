"""ops.pricing: the spot price history parsed (pure), then fetched from moto's server mode.

moto answers DescribeSpotPriceHistory from its instance-type offerings: one entry per availability zone
that offers the type, every price "0.00001", product "Linux/UNIX (Amazon VPC)", one fixed timestamp in
2006 (it ignores StartTime and ProductDescriptions). The tests are built on exactly that: every zone of
us-east-1 offering p5.48xlarge, at 0.00001 USD per hour, the VPC spelling matching "Linux/UNIX".
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio

from ops.ec2 import Clients
from ops.pricing import CostConfig, SpotPrice, SpotPriceFetcher, TierPricing, latest_prices, zones_of
from tests.support.aws import AMI, client

MOTO_PRICE = 0.00001


def entry(zone: str, price: str, when: str, *, itype: str = "p5.48xlarge",
          product: str = "Linux/UNIX") -> dict:
    return {"AvailabilityZone": zone, "InstanceType": itype, "ProductDescription": product,
            "SpotPrice": price, "Timestamp": datetime.fromisoformat(when)}


def test_latest_price_per_zone_of_the_type_and_product() -> None:
    history = [
        entry("us-east-1a", "31.10", "2026-05-01T10:00:00+00:00"),
        entry("us-east-1a", "29.50", "2026-05-01T12:00:00+00:00"),  # later: this one
        entry("us-east-1a", "33.00", "2026-05-01T11:00:00+00:00"),
        entry("us-east-1b", "40.00", "2026-05-01T09:00:00+00:00", product="Linux/UNIX (Amazon VPC)"),
        entry("us-east-1b", "99.00", "2026-05-01T13:00:00+00:00", product="Windows"),
        entry("us-east-1c", "1.00", "2026-05-01T13:00:00+00:00", itype="g5.12xlarge"),
        {"AvailabilityZone": "us-east-1d", "InstanceType": "p5.48xlarge", "ProductDescription": "Linux/UNIX",
         "SpotPrice": "not a number", "Timestamp": "2026-05-01T13:00:00Z"},
        {"InstanceType": "p5.48xlarge", "ProductDescription": "Linux/UNIX", "SpotPrice": "1"},  # no zone
    ]
    prices = latest_prices(history, instance_type="p5.48xlarge", product="Linux/UNIX")
    assert prices == {
        "us-east-1a": SpotPrice("us-east-1a", 29.5, datetime(2026, 5, 1, 12, tzinfo=UTC).timestamp()),
        "us-east-1b": SpotPrice("us-east-1b", 40.0, datetime(2026, 5, 1, 9, tzinfo=UTC).timestamp()),
    }


def test_zones_from_describe_instances_placement() -> None:
    reservations = [{"Instances": [{"InstanceId": "i-1", "Placement": {"AvailabilityZone": "us-east-1a"}},
                                   {"InstanceId": "i-2", "Placement": {}}]},
                    {"Instances": [{"InstanceId": "i-3", "Placement": {"AvailabilityZone": "us-east-1f"}}]}]
    assert zones_of(reservations) == {"i-1": "us-east-1a", "i-3": "us-east-1f"}


def test_fetcher_reads_moto_spot_price_history_and_placements(aws_url: str) -> None:
    fetcher = SpotPriceFetcher(Clients("us-east-1", aws_url))
    prices = fetcher.prices("p5.48xlarge", "Linux/UNIX")
    raw = client(aws_url).describe_spot_price_history(InstanceTypes=["p5.48xlarge"])["SpotPriceHistory"]
    assert sorted(prices) == sorted({e["AvailabilityZone"] for e in raw}) and "us-east-1a" in prices
    assert {p.usd_per_hour for p in prices.values()} == {MOTO_PRICE}
    assert fetcher.prices("no-such.type", "Linux/UNIX") == {}
    ids = [i["InstanceId"] for i in client(aws_url).run_instances(
        ImageId=AMI, MinCount=2, MaxCount=2, InstanceType="p5.48xlarge",
        Placement={"AvailabilityZone": "us-east-1b"})["Instances"]]
    assert fetcher.zones([*ids, "i-0000000000000dead"]) == dict.fromkeys(ids, "us-east-1b")


async def test_tier_pricing_refreshes_from_moto_and_prices_hosts_by_zone(aws_url: str) -> None:
    (inst,) = client(aws_url).run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="p5.48xlarge",
                                            Placement={"AvailabilityZone": "us-east-1c"})["Instances"]
    now = [1_000_000.0]
    pricing = TierPricing(CostConfig(spot=True, instance_type="p5.48xlarge", availability_zone="us-east-1a",
                                     refresh_s=3600.0), endpoint_url=aws_url, clock=lambda: now[0])
    assert pricing.hourly(inst["InstanceId"]) == (0.0, "spot:unknown")  # nothing fetched yet
    assert pricing.due()
    with trio.fail_after(30):
        assert await pricing.refresh([inst["InstanceId"], "http://10.0.0.9:8000"], tier="gpu")
    assert pricing.hourly(inst["InstanceId"]) == (MOTO_PRICE, "spot:us-east-1c")  # its own zone
    assert pricing.hourly("http://10.0.0.9:8000") == (MOTO_PRICE, "spot:us-east-1a")  # the configured one
    assert not pricing.due([inst["InstanceId"]])
    launched = "i-0fffffffffffffff0"  # a host seen since (launch-template capacity): its zone asked at once
    assert pricing.due([inst["InstanceId"], launched])
    with trio.fail_after(30):
        assert await pricing.refresh([inst["InstanceId"], launched], tier="gpu")
    assert not pricing.due([launched])  # EC2 does not know it: asked once, not every minute
    now[0] += 3600.0
    assert pricing.due()


async def test_a_failed_refresh_keeps_the_last_prices_and_retries_soon(aws_url: str, dead_upstream) -> None:
    now = [1_000_000.0]
    pricing = TierPricing(CostConfig(spot=True, instance_type="p5.48xlarge"), endpoint_url=aws_url,
                          clock=lambda: now[0])
    with trio.fail_after(30):
        assert await pricing.refresh(["i-0123456789abcdef0"])
    before = dict(pricing.prices)
    assert pricing.hourly("i-0123456789abcdef0") == (MOTO_PRICE, "spot:us-east-1:max")  # no zone: the dearest
    broken = TierPricing(CostConfig(spot=True, instance_type="p5.48xlarge"), endpoint_url=dead_upstream(),
                         clock=lambda: now[0])
    broken.prices = before
    with trio.fail_after(30):
        assert not await broken.refresh(["i-0123456789abcdef0"], tier="gpu")
    assert broken.prices == before and broken.refresh_errors_total == 1
    assert not broken.due()
    now[0] += 60.0
    assert broken.due()  # RETRY_S later, not an hour


def test_a_fixed_price_needs_no_aws() -> None:
    pricing = TierPricing(CostConfig(hourly_usd=98.32))
    assert pricing.hourly("i-1") == (98.32, "fixed") and not pricing.due()


@pytest.mark.parametrize("product", ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"])
def test_either_spelling_of_the_product(product: str) -> None:
    history = [entry("us-east-1a", "2.5", "2026-05-01T10:00:00+00:00", product=product)]
    prices = latest_prices(history, instance_type="p5.48xlarge", product="Linux/UNIX")
    assert prices["us-east-1a"].usd_per_hour == 2.5
