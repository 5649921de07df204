"""Fakes at the upstream and waker seams, for the unit tests of proxy/routing, proxy/upstream, proxy/relay.

- FakeUpstream: a tiny trio HTTP/1.1 server on 127.0.0.1 port 0 that answers the n-th request it reads
  with the n-th reply the test gave (`answer`, `answer_then_close`, `answer_then_hang`, `close`,
  `reset`, `silent`): exact bytes, an EOF, an RST, or silence.
- The client side: `client_side` puts a real Downstream on one end of a socket pair; `received` reads
  what the gateway wrote to the other end, to EOF. `new_request` parses a request with the real reader.
- Reporter and FakeWaker: the surface of ops.waker.Waker that the request path uses (upstreams,
  report_unreachable; is_ready, wait_ready, settings, fallback_tier), driven by the test.
- `use_trio_clock`: proxy/routing/wake_wait.py measures the hard cap with `time.perf_counter` (the
  clock of `Exchange.t0`); pointed at trio's clock, the autojump clock moves it too.
Refusing upstream addresses are tests/support/refusing.py's (`dead_upstream`).
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from ops.settings import WakeConfig
from ops.waker import WakeQueueFull
from proxy.accept.downstream import Downstream
from proxy.exchange import Exchange
from proxy.gateway import Gateway, build_runtime
from proxy.parse.request import RequestReader
from proxy.routing import wake_wait
from tests.support.gateway import make_config

BODY = b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}]}'
CLIENT = "10.1.2.3"
OK_BODY = b'{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":3,"total_tokens":5,' \
          b'"completion_tokens":2}}'
OK_JSON = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
           % len(OK_BODY)) + OK_BODY

Reply = Callable[[trio.SocketStream], Awaitable[bool]]  # True: keep the connection for another request


def answer(data: bytes) -> Reply:
    async def reply(stream):
        await stream.send_all(data)
        return True
    return reply


def answer_then_close(data: bytes) -> Reply:
    async def reply(stream):
        await stream.send_all(data)
        return False
    return reply


async def close(stream) -> bool:
    return False  # EOF before any response byte


async def reset(stream) -> bool:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return False  # closed with SO_LINGER 0: an RST before any response byte


async def silent(stream) -> bool:
    await trio.sleep_forever()
    return False


class FakeUpstream:
    """Answers the n-th request it reads (over all its connections) with replies[n]."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0
        self.hung_up = trio.Event()  # set when the server side closed its first connection
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        return self.url

    async def _read_request(self, stream, buf: bytes) -> tuple[bytes, bytes] | None:
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return None
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            data = await stream.receive_some(65536)
            if not data:
                return None
            rest += data
        return head + b"\r\n\r\n" + rest[:length], rest[length:]

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        try:
            while True:
                got = await self._read_request(stream, buf)
                if got is None:
                    return
                request, buf = got
                self.requests.append(request)
                assert self.replies, f"unexpected request #{len(self.requests)}"
                if not await self.replies.pop(0)(stream):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()
            self.hung_up.set()


class Reporter:
    """The part of a waker that Tier.candidates and open_upstream use: the routable list and reports."""

    def __init__(self, urls) -> None:
        self.urls = list(urls)
        self.reported: list[str] = []

    def upstreams(self) -> list[str]:
        return list(self.urls)

    def report_unreachable(self, url: str) -> None:
        self.reported.append(url)


def new_gateway(upstreams: list[str], **kw) -> Gateway:
    return Gateway(build_runtime(make_config(upstreams, **kw)))


def client_side(gw: Gateway) -> tuple[Downstream, trio.socket.SocketType]:
    """A Downstream on one end of a socket pair, and the other end (what the client reads)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return Downstream(ours, gw, CLIENT), trio.socket.from_stdlib_socket(theirs)


async def received(ds: Downstream, peer) -> bytes:
    """Everything the gateway wrote to the client: closes our end, reads the client's to EOF."""
    ds.sock.close()
    out = b""
    with trio.fail_after(5):
        while True:
            data = await peer.recv(65536)
            if not data:
                return out
            out += data


def new_request(gw: Gateway, ds: Downstream | None = None, *, body: bytes = BODY, extra: bytes = b""):
    """A request read by the real request reader (of `ds`, when given) and its Exchange."""
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw.example\r\nauthorization: Bearer sk-client\r\n"
           b"content-type: application/json\r\nx-request-id: req-1\r\n" + extra
           + b"content-length: %d\r\n\r\n" % len(body) + body)
    reader = ds.reader if ds is not None else RequestReader()
    reader.feed(raw)
    head = reader.next_head()
    assert reader.read_body() == body and reader.read_body() == b"" and reader.body_complete
    ex = Exchange(gw, head, CLIENT)
    ex.tier = "local"
    return head, ex


async def drain(conn) -> bytes:
    out = b""
    with trio.fail_after(5):
        while True:
            data = conn.body_nowait()
            if data is None:
                await conn.receive()
            elif not data:
                return out
            else:
                out += data


J = b'{"id":"c1","object":"chat.completion.chunk","created":1718000000,"model":"sim-chat",'
E1, E2, E3 = (b"data: " + J + b'"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}],'
              b'"usage":null}\n\n' % t for t in (b"Hel", b"lo", b"!"))
USAGE = b"data: " + J + b'"choices":[],"usage":{"prompt_tokens":17,"total_tokens":23,"completion_tokens":6}}\n\n'
DONE = b"data: [DONE]\n\n"
SSE_UP = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
SSE_OUT = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
           b"x-accel-buffering: no\r\nx-request-id: req-1\r\ntransfer-encoding: chunked\r\n\r\n")
EARLY_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
              b"x-accel-buffering: no\r\nx-request-id: req-1\r\ntransfer-encoding: chunked\r\n\r\n")
LIMIT = (b"x-ratelimit-remaining-requests", b"9")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer_then_hang(data: bytes):
    async def reply(stream):
        await stream.send_all(data)
        await trio.sleep_forever()
    return reply



SETTINGS = WakeConfig(instance_ids=["i-0"], budget_s=30, hard_cap_s=60, heartbeat_s=7, poll_s=2)
WAKING = b"a\r\n: waking\n\n\r\n"  # one heartbeat comment, chunked
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
        b"x-accel-buffering: no\r\nx-request-id: req-1\r\nx-ratelimit-remaining-requests: 9\r\n"
        b"transfer-encoding: chunked\r\n\r\n")


class FakeWaker(Reporter):
    """A tier's waker as the gateway sees it. `become_ready()` opens the tier; with `goes_down`, a
    report of the last routable upstream puts the tier back to waking, as the real waker does."""

    def __init__(self, urls=(), settings: WakeConfig = SETTINGS, *, ready: bool = False,
                 fallback_tier: str | None = None, goes_down: bool = False) -> None:
        super().__init__(urls)
        self.settings = settings
        self.fallback_tier = fallback_tier
        self.goes_down = goes_down
        self.queue_full: int | None = None  # retry_after_s of WakeQueueFull, when set
        self.waits = 0
        self._ready = trio.Event()
        if ready:
            self._ready.set()

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def become_ready(self, urls=None) -> None:
        if urls is not None:
            self.urls = list(urls)
        self._ready.set()

    progress: tuple[str, float, float] | None = None  # what wake_progress() says (None: no wake under way)

    def wake_progress(self):
        return self.progress

    def check_room(self) -> None:
        if self.queue_full is not None and not self.is_ready():
            raise WakeQueueFull(self.queue_full)

    async def wait_ready(self) -> None:
        self.waits += 1
        if self.queue_full is not None:
            raise WakeQueueFull(self.queue_full)
        await self._ready.wait()

    def report_unreachable(self, url: str) -> None:
        super().report_unreachable(url)
        if self.goes_down and url in self.urls:
            self.urls.remove(url)
            if not self.urls:
                self._ready = trio.Event()


class TrioTime:
    """Stands in for wake_wait's `time` module."""

    perf_counter = staticmethod(trio.current_time)


def use_trio_clock(monkeypatch) -> None:
    monkeypatch.setattr(wake_wait, "time", TrioTime)


@pytest.fixture
def wake_clock(monkeypatch, autojump_clock):
    """The autojump clock, with wake_wait's hard-cap arithmetic on trio's time (a fixture: conftest.py)."""
    use_trio_clock(monkeypatch)
    return autojump_clock


def at(seconds: float, fn, *args):
    async def later():
        await trio.sleep(seconds)
        fn(*args)
    return later


