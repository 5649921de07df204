"""The simulated vLLM's faults (black hole, stall) switched at runtime, its live generation counter, the
quiet health probes, and FleetSimulator.hang / unhang -- through real sockets (httpx as the client).

A "hangs" assertion is a bounded wait that must run out (`move_on_after`), never a sleep: what it shows
is that nothing came back in that time, which a later step then contrasts with an answer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from backends import probe
from backends.fleet import FleetSimulator
from backends.sim import SimOptions, SimServer
from ops.ec2 import Clients, Ec2
from tests.support.aws import client, stopped_instances

CHAT = {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}


@contextlib.asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[SimServer, str, httpx.AsyncClient]]:
    server = SimServer(SimOptions(**options))
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as c:
            yield server, f"http://127.0.0.1:{port}", c
        nursery.cancel_scope.cancel()


async def no_answer_within(seconds: float, fn) -> bool:
    with trio.move_on_after(seconds):
        await fn()
        return False
    return True


async def tokens(c: httpx.AsyncClient) -> tuple[float, float | None]:
    a = probe.parse_activity((await c.get("/metrics")).text)
    return a.running, a.generation_tokens


async def test_black_hole_reads_and_never_answers_until_cleared() -> None:
    with trio.fail_after(15):
        async with running(tokens_per_s=50) as (server, _url, c), trio.open_nursery() as nursery:
            got: dict[str, int] = {}

            async def ask(name: str, method: str, path: str, **kw) -> None:
                got[name] = (await c.request(method, path, **kw)).status_code

            streamed: list[bytes] = []

            async def stream() -> None:
                async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    async for piece in r.aiter_bytes():
                        streamed.append(piece)

            nursery.start_soon(stream)
            while not streamed:
                await trio.sleep(0.01)
            server.set_fault("black_hole")
            assert server.fault == "black_hole"
            nursery.start_soon(ask, "health", "GET", "/health")
            nursery.start_soon(functools.partial(ask, "chat", "POST", "/v1/chat/completions", json=CHAT))
            assert await no_answer_within(0.5, lambda: c.get("/metrics"))
            assert got == {}
            frozen = len(streamed)
            assert await no_answer_within(0.3, trio.sleep_forever) and len(streamed) == frozen  # no more events
            # The admin endpoint answers in the black hole, and clears it.
            r = await c.post("/_sim/fault", json={"mode": None})
            assert r.status_code == 200 and r.json() == {"mode": None} and server.fault is None
            while len(got) < 2:
                await trio.sleep(0.01)
            assert got["health"] == 200
        assert b"data: [DONE]" in b"".join(streamed)  # the parked stream carried on and finished


async def test_a_client_that_gives_up_on_the_black_hole_aborts_its_generation() -> None:
    with trio.fail_after(15):
        async with running(tokens_per_s=20) as (server, _url, c):
            server.set_fault("black_hole")
            with trio.move_on_after(0.3):
                await c.post("/v1/chat/completions", json=CHAT)
            server.set_fault(None)
            while server.statistics().open_connections > 1:  # ours (keep-alive pool) at most
                await trio.sleep(0.01)
            assert server.statistics().running == 0


async def test_stall_keeps_health_up_and_freezes_progress_then_recovers() -> None:
    with trio.fail_after(15):
        async with running(tokens_per_s=40) as (server, _url, c), trio.open_nursery() as nursery:
            done: list[int] = []

            async def one(body) -> None:
                r = await c.post("/v1/chat/completions", json=body)
                done.append(r.status_code)

            nursery.start_soon(one, CHAT)  # 40 tokens at 40/s: about 1 s
            nursery.start_soon(one, {**CHAT, "stream": True})
            while (await tokens(c))[1] in (None, 0.0):
                await trio.sleep(0.02)
            moving = (await tokens(c))[1]
            server.set_fault("stall")
            assert (await c.get("/health")).status_code == 200
            running_now, frozen = await tokens(c)
            assert running_now == 2 and frozen is not None and frozen >= moving
            assert await no_answer_within(1.5, trio.sleep_forever)  # past the non-streaming answer's due time
            assert await tokens(c) == (2, frozen) and done == []
            assert server.statistics().generation_tokens_total == frozen
            # A new generation in the stall makes no progress either, and is counted running.
            nursery.start_soon(one, CHAT)
            while (await tokens(c))[0] < 3:
                await trio.sleep(0.02)
            assert (await tokens(c))[1] == frozen
            server.set_fault(None)
            while len(done) < 3:
                await trio.sleep(0.02)
            assert done == [200, 200, 200]
            assert await tokens(c) == (0, 120.0)


async def test_generation_tokens_move_while_a_long_generation_runs() -> None:
    with trio.fail_after(15):
        async with running(tokens_per_s=20) as (_server, _url, c), trio.open_nursery() as nursery:
            nursery.start_soon(lambda: c.post("/v1/chat/completions", json=CHAT))  # 2 s of decoding
            seen = []
            while len(seen) < 3:
                await trio.sleep(0.25)
                running_now, total = await tokens(c)
                if running_now:
                    seen.append(total)
            assert seen == sorted(seen) and seen[0] < seen[-1] < 40  # it moves before the answer exists
            nursery.cancel_scope.cancel()


async def test_probes_are_served_but_not_recorded() -> None:
    with trio.fail_after(10):
        async with running() as (server, url, c):
            async with probe.make_client(2.0) as pc:
                assert (await probe.probe_health(pc, url)) == probe.Health(True)
                assert (await probe.probe_activity(pc, url)) is not None
            assert server.statistics().requests_total == 0 and not server.requests and not server.responses
            assert (await c.get("/health")).status_code == 200
            assert server.statistics().requests_total == 1 and len(server.requests) == 1


async def test_fault_endpoint_refuses_an_unknown_mode() -> None:
    with trio.fail_after(10):
        async with running() as (server, _url, c):
            r = await c.post("/_sim/fault", json={"mode": "on fire"})
            assert r.status_code == 400 and server.fault is None
            assert (await c.post("/_sim/fault", json={"mode": "stall"})).json() == {"mode": "stall"}
            assert server.fault == "stall"
    with pytest.raises(ValueError):
        SimServer().set_fault("nope")


async def test_probe_health_tells_silence_from_an_answer() -> None:
    with trio.fail_after(10):
        async with running() as (server, url, _c), probe.make_client(0.3) as pc:
            server.healthy = False
            assert await probe.probe_health(pc, url) == probe.Health(False, reason="health 503")
            server.healthy = True
            server.set_fault("black_hole")
            result = await probe.probe_health(pc, url)
            assert not result.ok and result.silent and result.reason == "ReadTimeout"
            ready = await probe.probe_ready(pc, url, ["sim-chat"])
            assert not ready.healthy and ready.timed_out
            server.set_fault(None)


async def test_the_fleet_hangs_and_unhangs_a_host(aws_url: str) -> None:
    [iid] = stopped_instances(aws_url, 1)
    fleet = FleetSimulator(Ec2(Clients("us-east-1", aws_url)), SimOptions(), boot_delay_s=0.05, poll_s=0.02)
    url = fleet.reserve(iid)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, probe.make_client(0.3) as pc:
            await nursery.start(fleet.run)
            with pytest.raises(LookupError):
                fleet.hang(iid)  # not up yet
            await trio.to_thread.run_sync(lambda: client(aws_url).start_instances(InstanceIds=[iid]))
            while not (await probe.probe_health(pc, url)).ok:
                await trio.sleep(0.05)
            fleet.hang(iid)
            assert (await probe.probe_health(pc, url)).silent
            fleet.unhang(iid)
            assert (await probe.probe_health(pc, url)).ok
            fleet.hang(iid, "stall")
            assert (await probe.probe_health(pc, url)).ok and fleet.server(iid).fault == "stall"
            fleet.unhang(iid)
            nursery.cancel_scope.cancel()
    assert [e.what for e in fleet.events] == ["running", "up", "black_hole", "recovered", "stall", "recovered"]
