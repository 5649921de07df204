"""ops.waker and backends.health: the waker's probes feed the same health records the gateway routes by.

moto and the fleet simulator as in test_waker.py (real clock, real sockets); a host goes sick with
FleetSimulator.hang. A `Watch` stands for a gateway request in flight on the host: what the gateway's
Watch does when cancelled is tests/proxy/routing/test_health_routing.py's business.
"""

from __future__ import annotations

import httpx
import trio

from backends.health import HealthBook, Verdict
from tests.support.cloud import MODELS, cloud, wait_for


class Watch:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


async def test_a_black_hole_leaves_the_routable_list_and_its_requests_in_flight_end(aws_url: str) -> None:
    with trio.fail_after(30):
        async with cloud(aws_url, primaries=2) as c:
            waker = c.waker(probe_timeout_s=0.2, health_failures=2, budget_s=10.0, hard_cap_s=15.0)
            await c.start(waker)
            await waker.wait_ready()
            a, b = c.upstreams
            book = HealthBook(unhealthy_after=3, stall_s=30.0)
            waker.use_health(book)  # what the gateway does: the waker's records move into its book
            assert book.get(a).unhealthy_after == 2  # adopted, with the waker's own threshold
            watch = Watch()
            book.get(a).enter(watch)
            c.fleet.hang(c.primary[0])
            await wait_for(lambda: waker.upstreams() == [b])
            assert book.get(a).verdict is Verdict.DOWN and watch.cancelled == 1
            assert waker.is_ready() and waker.statistics().upstream_down_total >= 1
            c.fleet.unhang(c.primary[0])
            await wait_for(lambda: sorted(waker.upstreams()) == sorted([a, b]))
            assert book.get(a).up and c.tap.count("StartInstances") == 1  # no restart for a sick host


async def test_a_stalled_host_leaves_the_routable_list_until_tokens_move_again(aws_url: str) -> None:
    with trio.fail_after(30):
        async with cloud(aws_url, primaries=2, tokens_per_s=20.0) as c:
            waker = c.waker(probe_timeout_s=0.5, budget_s=10.0, hard_cap_s=15.0)
            book = HealthBook(stall_s=0.5)
            waker.use_health(book)
            await c.start(waker)
            await waker.wait_ready()
            a, b = c.upstreams
            watch = Watch()
            done: list[int] = []
            async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
                async def long_request() -> None:
                    r = await http.post(f"{a}/v1/chat/completions", json={
                        "model": MODELS[0], "max_tokens": 60, "messages": [{"role": "user", "content": "x"}]})
                    done.append(r.status_code)

                nursery.start_soon(long_request)
                await wait_for(lambda: c.fleet.server(c.primary[0]).statistics().running == 1)
                book.get(a).enter(watch)
                c.fleet.hang(c.primary[0], "stall")  # /health stays 200
                await wait_for(lambda: waker.upstreams() == [b])
                assert book.get(a).verdict is Verdict.STALLED and watch.cancelled == 1
                c.fleet.unhang(c.primary[0])  # the request carries on: tokens move, the host is back
                await wait_for(lambda: sorted(waker.upstreams()) == sorted([a, b]))
                assert book.get(a).up
            assert done == [200]
