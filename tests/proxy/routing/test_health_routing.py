"""Active upstream health through real sockets: a gateway in front of a tier of two simulated vLLMs,
one of which goes sick (a black hole, a stalled engine) while requests are in flight on it, then
recovers (backends/health.py, proxy/routing/tiers.py, proxy/upstream/open.py, proxy/relay/response.py).

The gateway and the sims run in-process on pytest-trio's autojump clock with short knobs (probe every
0.2 s, 0.2 s timeout, 3 failures, stall_s 1): time moves only when every task waits, so the "within
20 s" claims measure the code's own deadlines, not this machine's speed.
"""

from __future__ import annotations

import msgspec
import trio

from backends.health import Verdict
from proxy.config import UpstreamConfig
from proxy.relay.inband import inband_error
from tests.support.gateway import (
    error_of,
    make_config,
    one_response,
    post,
    split_response,
    start_gateway,
    start_sim,
)

KNOBS = {"health_interval_s": 0.2, "health_timeout_s": 0.2, "unhealthy_after": 3, "stall_s": 1.0}
LONG = b'{"model":"sim-chat","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}'  # 5 s at 20/s
STREAM = b'{"model":"sim-chat","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}'
SHORT = b'{"model":"sim-chat","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}'
LIMIT_S = 20.0  # the bound with the default knobs; with these knobs it takes about a second


async def two_sims_behind_a_gateway(nursery, **knobs):
    a, url_a = await start_sim(nursery, tokens_per_s=20)
    b, url_b = await start_sim(nursery, tokens_per_s=20)
    gw = await start_gateway(nursery, make_config([url_a, url_b], upstream={**KNOBS, **knobs}))
    tier = gw.gw.runtime.router.tiers["local"]
    assert tier.health is not None  # the prober attached its book before the first connection
    return gw, tier, (a, url_a), (b, url_b)


async def in_flight(nursery, gw, sims, bodies) -> list[dict]:
    """Start one request per body, each once the previous one is running on a sim (so round robin
    spreads them in order); returns their outcomes, filled in as they end."""
    outcomes: list[dict] = []
    for body in bodies:
        before = sum(s.statistics().running for s in sims)
        slot: dict = {"body": body}
        outcomes.append(slot)

        async def send(slot=slot, body=body) -> None:
            raw = await one_response(gw.port, post(body))
            slot["at"] = trio.current_time()
            slot["status"], slot["headers"], slot["raw_body"] = split_response(raw)

        nursery.start_soon(send)
        while sum(s.statistics().running for s in sims) <= before:
            await trio.sleep(0.01)
    return outcomes


def sse_events(body: bytes) -> list[bytes]:
    """The SSE events in a chunked body (the chunk framing removed), in order."""
    out = b""
    while body:
        line, sep, rest = body.partition(b"\r\n")
        if not sep or not line:
            break
        size = int(line, 16)
        if size == 0:
            break
        out, body = out + rest[:size], rest[size + 2:]
    return [e + b"\n\n" for e in out.split(b"\n\n") if e]


async def wait_until(predicate) -> None:
    while not predicate():
        await trio.sleep(0.02)


async def traffic(gw, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        statuses.append(split_response(await one_response(gw.port, post(SHORT)))[0])
    return statuses


async def test_a_black_hole_ends_its_requests_in_flight_and_gets_no_new_ones_until_it_recovers(
        nursery, autojump_clock):
    gw, tier, (a, url_a), (b, url_b) = await two_sims_behind_a_gateway(nursery)
    with trio.fail_after(60):
        # Round robin: B, A, B, A -- one non-streaming and one streaming request in flight on each.
        outcomes = await in_flight(nursery, gw, (a, b), [LONG, LONG, STREAM, STREAM])
        assert a.statistics().running == b.statistics().running == 2
        await trio.sleep(0.5)  # the streams are under way (10 tokens each)
        went_silent = trio.current_time()
        a.set_fault("black_hole")
        await wait_until(lambda: a.statistics().running == 0)  # the gateway hung up on A: aborted there
        await wait_until(lambda: sum("status" in o for o in outcomes) >= 2)
        ended = [o for o in outcomes if "status" in o]
        assert max(o["at"] for o in ended) - went_silent < LIMIT_S
        assert tier.health.get(url_a).verdict is Verdict.DOWN and tier.health.get(url_b).up

        plain = next(o for o in ended if o["body"] == LONG)
        assert plain["status"] == 502
        err = error_of(plain["raw_body"])
        assert err["code"] == "bad_gateway" and "health checks" in err["message"]

        streamed = next(o for o in ended if o["body"] == STREAM)
        assert streamed["status"] == 200
        events = sse_events(streamed["raw_body"])
        assert len(events) > 3 and b'"content"' in events[1]  # tokens came first
        assert events[-1] == inband_error(
            "The upstream of tier 'local' failed mid-stream: it stopped answering its health checks.",
            "upstream_unhealthy")
        assert b"[DONE]" not in streamed["raw_body"] and not streamed["raw_body"].endswith(b"0\r\n\r\n")

        # B's two finish normally.
        await wait_until(lambda: all("status" in o for o in outcomes))
        assert sorted(o["status"] for o in outcomes) == [200, 200, 200, 502]

        # New requests all go to B: A (still black-holed) is not even tried.
        seen_a, seen_b = len(a.requests), len(b.requests)
        assert await traffic(gw, 6) == [200] * 6
        assert len(a.requests) == seen_a and len(b.requests) == seen_b + 6

        # A recovers: probes pass again, and it gets its share of the traffic.
        a.set_fault(None)
        await wait_until(lambda: tier.health.get(url_a).up)
        assert await traffic(gw, 6) == [200] * 6
        assert len(a.requests) == seen_a + 3 and len(b.requests) == seen_b + 9


async def test_with_the_default_knobs_a_black_hole_ends_its_requests_within_20_s(nursery, autojump_clock):
    a, url_a = await start_sim(nursery, tokens_per_s=2)  # LONG takes 50 s here
    b, url_b = await start_sim(nursery, tokens_per_s=2)
    d = UpstreamConfig()  # the defaults, spelled out: 2 s interval, 2 s timeout, 3 failures, stall_s 30
    defaults = {"health_interval_s": d.health_interval_s, "health_timeout_s": d.health_timeout_s,
                "unhealthy_after": d.unhealthy_after, "stall_s": d.stall_s}
    assert defaults == {"health_interval_s": 2.0, "health_timeout_s": 2.0, "unhealthy_after": 3, "stall_s": 30.0}
    gw = await start_gateway(nursery, make_config([url_a, url_b], upstream=defaults))
    tier = gw.gw.runtime.router.tiers["local"]
    with trio.fail_after(120):
        outcomes = await in_flight(nursery, gw, (a, b), [LONG, LONG, STREAM, STREAM])
        await trio.sleep(3.0)  # probes have run: both up
        assert tier.health.get(url_a).up and tier.health.get(url_b).up
        went_silent = trio.current_time()
        a.set_fault("black_hole")
        await wait_until(lambda: sum("status" in o for o in outcomes) >= 2)
        ended = [o for o in outcomes if "status" in o]
        assert sorted(o["body"] for o in ended) == sorted([LONG, STREAM])
        assert max(o["at"] for o in ended) - went_silent < LIMIT_S
        a.set_fault(None)
        nursery.cancel_scope.cancel()


async def test_a_stalled_engine_ends_its_requests_in_flight_and_recovers(nursery, autojump_clock):
    gw, tier, (a, url_a), (b, _url_b) = await two_sims_behind_a_gateway(nursery)
    with trio.fail_after(60):
        outcomes = await in_flight(nursery, gw, (a, b), [LONG, LONG, STREAM, STREAM])
        await trio.sleep(0.5)
        stalled_at = trio.current_time()
        a.set_fault("stall")  # /health keeps answering 200; tokens stop
        await wait_until(lambda: sum("status" in o for o in outcomes) >= 2)
        ended = [o for o in outcomes if "status" in o]
        took = max(o["at"] for o in ended) - stalled_at
        assert 1.0 <= took < LIMIT_S  # not before stall_s
        assert tier.health.get(url_a).verdict is Verdict.STALLED

        plain = next(o for o in ended if o["body"] == LONG)
        assert plain["status"] == 502 and "progress" in error_of(plain["raw_body"])["message"]
        streamed = next(o for o in ended if o["body"] == STREAM)
        last = msgspec.json.decode(sse_events(streamed["raw_body"])[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "upstream_unhealthy" and "progress" in last["error"]["message"]

        # Nothing runs on A any more (the gateway hung up): the next probe finds it idle, hence routable;
        # with the stall still on, a new request there would run and freeze -- so first, B only while
        # the verdict stands, then recovery.
        await wait_until(lambda: a.statistics().running == 0)
        a.set_fault(None)
        await wait_until(lambda: tier.health.get(url_a).up)
        seen_a = len(a.requests)
        assert await traffic(gw, 4) == [200] * 4
        assert len(a.requests) == seen_a + 2
        await wait_until(lambda: all("status" in o for o in outcomes))


async def test_stalled_upstreams_get_no_new_requests(nursery, autojump_clock):
    gw, tier, (a, url_a), (b, _url_b) = await two_sims_behind_a_gateway(nursery, stall_s=5.0)
    with trio.fail_after(60):
        outcomes = await in_flight(nursery, gw, (a, b), [LONG, LONG])
        a.set_fault("stall")
        await wait_until(lambda: tier.health.get(url_a).verdict is Verdict.STALLED)
        seen_a = len(a.requests)
        assert await traffic(gw, 4) == [200] * 4
        assert len(a.requests) == seen_a
        await wait_until(lambda: sum("status" in o for o in outcomes) >= 1)
        a.set_fault(None)
        await wait_until(lambda: all("status" in o for o in outcomes))


async def test_a_tier_whose_every_upstream_is_down_answers_503_at_once(nursery, autojump_clock):
    gw, tier, (a, url_a), (b, url_b) = await two_sims_behind_a_gateway(nursery)
    with trio.fail_after(60):
        a.set_fault("black_hole")
        b.set_fault("black_hole")
        await wait_until(lambda: not tier.health.get(url_a).up and not tier.health.get(url_b).up)
        started = trio.current_time()
        status, _, body = split_response(await one_response(gw.port, post(SHORT)))
        assert status == 503 and error_of(body)["code"] == "upstream_unavailable"
        assert trio.current_time() - started < 0.1  # no upstream tried, nothing waited for
        b.set_fault(None)
        await wait_until(lambda: tier.health.get(url_b).up)
        assert await traffic(gw, 2) == [200, 200]
        a.set_fault(None)


async def test_the_health_book_is_on_the_gateways_metrics(nursery, autojump_clock):
    gw, tier, (a, url_a), (_b, url_b) = await two_sims_behind_a_gateway(nursery)
    with trio.fail_after(60):
        a.set_fault("black_hole")
        await wait_until(lambda: not tier.health.get(url_a).up)
        raw = await one_response(gw.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = split_response(raw)[2].decode()
        assert f'spotinference_upstream_health_up{{upstream="{url_a}"}} 0.0' in text
        assert f'spotinference_upstream_health_up{{upstream="{url_b}"}} 1.0' in text
        assert f'spotinference_upstream_health_state{{state="down",upstream="{url_a}"}} 1.0' in text
        a.set_fault(None)
