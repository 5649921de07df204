"""process/services.py: `run_gateway`, the services nursery around the listener.

Real everything: a gateway on 127.0.0.1 port 0 (or on a socket bound here), a real simulated vLLM
behind it, raw HTTP from the client side, and a real SQLite usage log in tmp_path whose flush
interval is an hour -- so a row that reaches the database got there through the flush on stop, not
through the periodic writer. Every wait is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import sqlite3

import msgspec
import trio

from proxy.accept.listener import bind_socket
from proxy.config import UsageConfig
from proxy.gateway import Gateway, build_runtime
from proxy.process.services import run_gateway
from tests.support.gateway import make_config, raw_request, split_response, start_sim

CHAT = b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def chat_request() -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nX-Request-Id: svc-1\r\nContent-Length: " + str(len(CHAT)).encode()
            + b"\r\n\r\n" + CHAT)


class Running:
    """run_gateway in the test's nursery; `returned` is set when it comes back."""

    def __init__(self, config, gw=None, **kw) -> None:
        self.config = config
        self.gw = gw
        self.kw = kw
        self.returned = trio.Event()
        self.scope = trio.CancelScope()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await run_gateway(self.config, gateway=self.gw, task_status=task_status, **self.kw)
        finally:
            self.returned.set()

    async def start(self, nursery) -> tuple[str, int]:
        with trio.fail_after(10):
            return await nursery.start(self.run)


def usage_config(tmp_path, url: str):
    return msgspec.structs.replace(make_config([url]), usage=UsageConfig(
        path=str(tmp_path / "usage.sqlite3"), flush_s=3600.0, batch_max=500))


def usage_rows(tmp_path) -> list[tuple]:
    conn = sqlite3.connect(tmp_path / "usage.sqlite3")
    try:
        return conn.execute("SELECT request_id, endpoint, model, tier, status, key_name FROM usage").fetchall()
    finally:
        conn.close()


async def test_reports_the_bound_address(nursery):
    config = make_config(["http://127.0.0.1:9"])
    gw = Gateway(build_runtime(config))
    host, port = await Running(config, gw).start(nursery)
    assert host == "127.0.0.1" and 0 < port < 65536
    assert gw.server is not None and gw.server.sock.getsockname()[:2] == (host, port)
    assert gw.services is not None and not gw.draining
    with trio.fail_after(5):
        raw = await raw_request(port, HEALTHZ)
    assert split_response(raw)[0] == 200


async def test_serves_on_a_socket_bound_by_the_caller(nursery):
    sock = bind_socket("127.0.0.1", 0)
    expected = sock.getsockname()[:2]
    config = make_config(["http://127.0.0.1:9"])
    config = msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, listen="127.0.0.1:1"))
    assert await Running(config, sock=sock).start(nursery) == expected  # not server.listen
    with trio.fail_after(5):
        raw = await raw_request(expected[1], HEALTHZ)
    assert split_response(raw)[0] == 200


async def test_builds_its_own_gateway_when_given_none(nursery):
    _sim, url = await start_sim(nursery)
    _host, port = await Running(make_config([url])).start(nursery)
    with trio.fail_after(10):
        raw = await raw_request(port, chat_request())
    status, headers, body = split_response(raw)
    assert status == 200 and headers["x-request-id"] == "svc-1"
    assert msgspec.json.decode(body)["object"] == "chat.completion"


async def test_serves_against_a_sim_and_flushes_usage_on_drain(nursery, tmp_path):
    sim, url = await start_sim(nursery)
    config = usage_config(tmp_path, url)
    gw = Gateway(build_runtime(config))
    running = Running(config, gw)
    _host, port = await running.start(nursery)
    with trio.fail_after(10):
        raw = await raw_request(port, chat_request())
        health = await raw_request(port, HEALTHZ)
    assert split_response(raw)[0] == 200 and split_response(health)[0] == 200
    assert sim.statistics().requests_total == 1
    stats = gw.usage.statistics()
    assert (stats.queued, stats.written_total) == (1, 0)  # /healthz is not billed; nothing written yet
    assert usage_rows(tmp_path) == []
    assert gw.pool.statistics().idle == 1  # the upstream connection went back to the pool
    gw.server.drain()
    with trio.fail_after(10):
        await running.returned.wait()
    assert not running.scope.cancelled_caught  # it returned by itself, drained
    assert usage_rows(tmp_path) == [("svc-1", "chat", "sim-chat", "local", 200, None)]
    assert gw.usage.statistics().written_total == 1
    assert gw.pool.statistics().idle == 0  # closed on the way out


async def test_the_services_are_cancelled_when_the_listener_drains(nursery):
    config = make_config(["http://127.0.0.1:9"])
    gw = Gateway(build_runtime(config))
    running = Running(config, gw)
    await running.start(nursery)
    services = gw.services
    assert not services.cancel_scope.cancel_called
    assert len(services.child_tasks) >= 3  # metrics, log flusher, vanished-client sweeper
    gw.server.drain()
    assert gw.draining
    with trio.fail_after(10):
        await running.returned.wait()
    assert services.cancel_scope.cancel_called
    assert len(services.child_tasks) == 0


class Announcing(Gateway):
    """Sets `dispatched` once a request head is parsed (the connection is busy from then on)."""

    def __init__(self, runtime) -> None:
        super().__init__(runtime)
        self.dispatched = trio.Event()

    async def dispatch(self, ds, request) -> None:
        self.dispatched.set()
        await super().dispatch(ds, request)


async def test_the_drain_waits_for_a_request_in_flight(nursery, tmp_path):
    sim, url = await start_sim(nursery, latency_ms=300)
    config = usage_config(tmp_path, url)
    gw = Announcing(build_runtime(config))
    running = Running(config, gw)
    _host, port = await running.start(nursery)
    answers = []

    async def client():
        answers.append(await raw_request(port, chat_request()))

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(client)
            await gw.dispatched.wait()
            assert gw.open_connections == 1
            gw.server.drain()
            assert not running.returned.is_set()
        await running.returned.wait()
    assert split_response(answers[0])[0] == 200
    assert sim.statistics().requests_total == 1
    assert usage_rows(tmp_path) == [("svc-1", "chat", "sim-chat", "local", 200, None)]


async def test_usage_is_flushed_when_cancelled_from_outside(nursery, tmp_path):
    _sim, url = await start_sim(nursery)
    config = usage_config(tmp_path, url)
    running = Running(config, Gateway(build_runtime(config)))
    _host, port = await running.start(nursery)
    with trio.fail_after(10):
        assert split_response(await raw_request(port, chat_request()))[0] == 200
        running.scope.cancel()
        await running.returned.wait()
    assert running.scope.cancelled_caught
    assert usage_rows(tmp_path) == [("svc-1", "chat", "sim-chat", "local", 200, None)]
