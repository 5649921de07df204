"""Shared test helpers: start a simulated vLLM and the gateway in-process on port 0, talk raw HTTP.

Everything binds 127.0.0.1, every wait is bounded by the caller's `trio.fail_after`, and everything
started here lives in the caller's nursery, so it stops when the test ends.
"""

from __future__ import annotations

import sqlite3

import msgspec
import trio

from backends.sim.server import SimOptions, SimServer
from proxy.config import AuthConfig, Config, ServerConfig, TierConfig, UpstreamConfig, validate
from proxy.gateway import Gateway, build_runtime
from proxy.process.services import run_gateway

CHAT = b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}]}'
"""The smallest valid chat completion request body for the simulated vLLM's `sim-chat`."""


def post(body: bytes, *, path: bytes = b"/v1/chat/completions", extra: bytes = b"") -> bytes:
    """A complete HTTP/1.1 POST of JSON `body` to `path`; `extra` is raw header lines (each ending CRLF)."""
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def start_sim(nursery: trio.Nursery, **options) -> tuple[SimServer, str]:
    server = SimServer(SimOptions(**options))
    host, port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, f"http://{host}:{port}"


def make_config(upstreams: list[str], *, models=("sim-chat", "sim-embed"), keys_file: str | None = None,
                server: dict | None = None, upstream: dict | None = None, tiers: list[TierConfig] | None = None,
                **tier_kw) -> Config:
    # The rotation, unless a test asks for a policy: the failover tests name the order they expect.
    # The product's default ("prefix" for several upstreams) has its own tests (routing/test_policy.py,
    # e2e/test_routing.py) and is what the production tests' `spotinference serve` runs.
    tier_kw.setdefault("routing", "round_robin")
    tier_list = tiers if tiers is not None else [
        TierConfig(name="local", upstreams=list(upstreams), models=list(models), **tier_kw)
    ]
    return validate(Config(
        server=ServerConfig(listen="127.0.0.1:0", **(server or {})),
        # Active health probes off unless a test asks (they would reach counting fake upstreams);
        # the health tests set their own knobs.
        upstream=UpstreamConfig(**{"health_interval_s": 3600.0, **(upstream or {})}),
        auth=AuthConfig(keys_file=keys_file),
        tiers=tier_list,
    ))


class GatewayHandle:
    def __init__(self, host: str, port: int, gw: Gateway) -> None:
        self.host = host
        self.port = port
        self.gw = gw
        self.url = f"http://{host}:{port}"
        self.api = f"{self.url}/v1"


async def start_gateway(nursery: trio.Nursery, config: Config) -> GatewayHandle:
    gw = Gateway(build_runtime(config))

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await run_gateway(config, gateway=gw, task_status=task_status)

    host, port = await nursery.start(run)
    return GatewayHandle(host, port, gw)


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send `data`, read until the server closes (or `read_timeout` of silence); return all bytes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        chunks = []
        with trio.move_on_after(read_timeout):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


async def one_response(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection and return exactly one response, read by its own framing
    (Content-Length, chunked, or until the server closes): never by waiting for silence, so the answer
    is complete however slow the machine. The caller's `trio.fail_after` bounds the wait."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        buf = b""

        async def more() -> bool:
            nonlocal buf
            chunk = await stream.receive_some(65536)
            buf += chunk
            return bool(chunk)

        while b"\r\n\r\n" not in buf:
            if not await more():
                return buf  # closed before a whole head: the caller's parse shows what came
        head, _, _ = buf.partition(b"\r\n\r\n")
        _, headers, _ = split_response(head + b"\r\n\r\n")
        size = len(head) + 4
        if "content-length" in headers:
            while len(buf) < size + int(headers["content-length"]):
                if not await more():
                    break
            return buf[:size + int(headers["content-length"])]
        if "chunked" in headers.get("transfer-encoding", ""):
            while not _chunked_complete(buf[size:]):
                if not await more():
                    break
            return buf
        while await more():
            pass
        return buf


def _chunked_complete(body: bytes) -> bool:
    """Whether `body` holds a whole chunked body (up to the last chunk and the empty trailer line)."""
    while True:
        line, sep, rest = body.partition(b"\r\n")
        if not sep:
            return False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return rest.startswith(b"\r\n")  # no trailers from the gateway
        if len(rest) < size + 2:
            return False
        body = rest[size + 2:]


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def error_of(body: bytes) -> dict:
    return msgspec.json.decode(body)["error"]


class CountingGateway(Gateway):
    """A real gateway that also keeps every record handed to `request_finished`."""

    def __init__(self, runtime) -> None:
        super().__init__(runtime)
        self.finished: list = []

    def request_finished(self, ex) -> None:
        self.finished.append(ex)
        super().request_finished(ex)


async def dispatch_one(gw, raw: bytes, *, hang_up: bool = False):
    """Without a listener: a Downstream on a socket pair reads one head from `raw` and the real
    `dispatch` answers it. (the bytes the client got, the Downstream, its scope). `hang_up`: the client
    closes its end before the response is written."""
    import socket

    from proxy import sockio
    from proxy.accept.downstream import Downstream
    from proxy.admit.routes import dispatch

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    try:
        theirs.sendall(raw)
        ds = Downstream(ours, gw, "127.0.0.1")
        with trio.fail_after(10), trio.CancelScope() as scope:
            ds.scope = scope
            request = await ds.read_head()
            if hang_up:
                theirs.close()
            await dispatch(gw, ds, request)
        sockio.close(ours)
        out = b""
        if not hang_up:
            for _ in range(1000):
                chunk = theirs.recv(65536)
                if not chunk:
                    break
                out += chunk
        return out, ds, scope
    finally:
        ours.close()
        theirs.close()


def usage_rows(db) -> list[dict]:
    """Every row of a usage log's SQLite table, in insertion order."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        conn.close()


async def flushed_usage_rows(handle: GatewayHandle, db) -> list[dict]:
    """The usage rows of an in-process gateway once its writer has flushed every finished request."""
    await handle.gw.usage.wait_flushed()
    return usage_rows(db)
