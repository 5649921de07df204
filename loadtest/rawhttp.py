"""Raw HTTP/1.1 client of the load generator: keep-alive connections, a pool per target, SSE timing.

Strategy: no HTTP library sits between the clock and the wire. Request bytes are built once
(`build_request`) and sent as they are over raw trio sockets; `Conn.exchange` reads one response
(Content-Length, chunked, or close-delimited) with a few `find`s on a byte buffer, and, for streams,
timestamps each complete SSE event (blank line) as the recv() that completed it returns. `Pool` keeps
idle keep-alive connections per target and retires those the server closed or is about to close
(uvicorn drops them after 5 s idle), so a cell never measures a TCP handshake or a reuse race.
Everything is bounded (connect timeout; callers wrap exchanges in their own deadline) and uses poll(),
never select(), because the scale checks hold more than 1,024 descriptors.
Used by loadtest/overhead.py and its helpers; imports nothing from proxy/, ops/ or backends/.
"""

from __future__ import annotations

import select
import socket

import trio

CONNECT_TIMEOUT_S = 10.0
STALE_CHECK_AFTER_S = 0.5
# uvicorn (vLLM, the sim) closes keep-alive connections idle for 5 s; reusing one at that moment
# races the close (EOF or RST instead of an answer), so like any sane client we retire them first.
MAX_IDLE_S = 4.0


class HttpProtocolError(Exception):
    """The peer closed early or sent something this small client does not parse."""


CLIENT_ERRORS = (OSError, HttpProtocolError, trio.TooSlowError, ValueError)


class Conn:
    """One keep-alive client connection. `exchange` sends pre-built bytes and reads one response."""

    __slots__ = ("buf", "idle_since", "keep", "sock")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""
        self.idle_since = 0.0
        self.keep = True

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.keep = False
        self.sock.close()

    def looks_stale(self) -> bool:
        """An idle keep-alive socket that is readable has been closed (or spoken to) by the server."""
        poller = select.poll()  # not select(): descriptors past 1024 while 10,000 connections are held
        poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def exchange(self, request: bytes, times: list[float] | None = None) -> int:
        """Send `request`, read the whole response; return its status.

        With `times` given, append the arrival time of every complete SSE event (a blank line), except
        the final `data: [DONE]`, as seen by the recv() that completed it.
        """
        sock = self.sock
        while request:
            request = request[await sock.send(request) :]
        recv = sock.recv
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            data = await recv(65536)
            if not data:
                raise HttpProtocolError("connection closed before the response head")
            buf += data
        head = buf[:end].lower()
        buf = buf[end + 4 :]
        if not head.startswith(b"http/1."):
            raise HttpProtocolError("not an HTTP/1.x response")
        status = int(head[9:12])
        self.keep = head.startswith(b"http/1.1") and b"\r\nconnection: close" not in head
        feed = _EventClock(times) if times is not None else None
        if b"\r\ntransfer-encoding: chunked" in head:
            buf = await self._read_chunked(buf, feed)
        elif (i := head.find(b"\r\ncontent-length:")) >= 0:
            j = head.find(b"\r\n", i + 17)
            length = int(head[i + 17 : j if j >= 0 else len(head)])
            if feed is not None and buf:
                feed.feed(buf[:length], trio.current_time())
            while len(buf) < length:
                data = await recv(65536)
                if not data:
                    raise HttpProtocolError("connection closed inside the body")
                buf += data
                if feed is not None:
                    feed.feed(data[: max(0, length - (len(buf) - len(data)))], trio.current_time())
            buf = buf[length:]
        elif status in (204, 304) or 100 <= status < 200:
            pass
        else:  # delimited by close
            self.keep = False
            while data := await recv(65536):
                if feed is not None:
                    feed.feed(data, trio.current_time())
            buf = b""
        if feed is not None:
            feed.finish()
        self.buf = buf
        return status

    async def _read_chunked(self, buf: bytes, feed: _EventClock | None) -> bytes:
        recv = self.sock.recv
        while True:
            while (j := buf.find(b"\r\n")) < 0:
                data = await recv(65536)
                if not data:
                    raise HttpProtocolError("connection closed inside chunked body")
                buf += data
            size = int(buf[:j].split(b";", 1)[0], 16)
            buf = buf[j + 2 :]
            if size == 0:
                while True:  # trailers, then the empty line
                    while (j := buf.find(b"\r\n")) < 0:
                        data = await recv(65536)
                        if not data:
                            raise HttpProtocolError("connection closed in trailers")
                        buf += data
                    line, buf = buf[:j], buf[j + 2 :]
                    if not line:
                        return buf
            while len(buf) < size + 2:
                data = await recv(65536)
                if not data:
                    raise HttpProtocolError("connection closed inside a chunk")
                buf += data
            if feed is not None:
                feed.feed(buf[:size], trio.current_time())
            buf = buf[size + 2 :]


class _EventClock:
    """Timestamps SSE events (blank-line terminated) as body pieces arrive."""

    __slots__ = ("start", "tail", "times")

    def __init__(self, times: list[float]) -> None:
        self.times = times
        self.start = len(times)
        self.tail = b""  # the last bytes seen: one for a "\n\n" split across pieces, more for [DONE]

    def feed(self, piece: bytes, now: float) -> None:
        if not piece:
            return
        k = (self.tail[-1:] + piece).count(b"\n\n")
        if k:
            self.times.extend([now] * k)
        self.tail = (self.tail + piece)[-16:] if len(piece) < 16 else piece[-16:]

    def finish(self) -> None:
        if self.tail.endswith(b"[DONE]\n\n") and len(self.times) > self.start:
            self.times.pop()


class Pool:
    """Idle keep-alive connections to one target; opens new ones on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Conn] = []
        self.opened = 0

    async def get(self) -> Conn:
        now = trio.current_time()
        while self.idle:
            conn = self.idle.pop()
            idle_s = now - conn.idle_since
            if idle_s < STALE_CHECK_AFTER_S or (idle_s < MAX_IDLE_S and not conn.looks_stale()):
                return conn
            conn.close()
        self.opened += 1
        return await Conn.open(self.host, self.port)

    def put(self, conn: Conn) -> None:
        if conn.keep:
            conn.idle_since = trio.current_time()
            self.idle.append(conn)
        else:
            conn.close()

    async def fill(self, n: int, parallel: int = 64) -> list[str]:
        """Pre-open connections until `n` are idle (so cells do not measure TCP handshakes).

        Returns the kinds of the connect errors met (empty when all opened)."""
        now = trio.current_time()
        keep = []
        for conn in self.idle:  # retire what the server closed or is about to close
            if now - conn.idle_since < MAX_IDLE_S and not conn.looks_stale():
                keep.append(conn)
            else:
                conn.close()
        self.idle = keep
        missing = n - len(self.idle)
        limiter = trio.CapacityLimiter(parallel)
        failures: list[str] = []

        async def one() -> None:
            async with limiter:
                try:
                    conn = await Conn.open(self.host, self.port)
                except (OSError, trio.TooSlowError) as exc:
                    failures.append(f"connect: {type(exc).__name__}")
                    return
                self.put(conn)

        async with trio.open_nursery() as nursery:
            for _ in range(max(0, missing)):
                nursery.start_soon(one)
        return failures

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def build_request(port: int, body: bytes | None, path: str, key: str | None) -> bytes:
    """Pre-built HTTP/1.1 request bytes (keep-alive is the HTTP/1.1 default)."""
    lines = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def count_closed(conns: list[Conn]) -> int:
    """How many held connections the server has closed (readable idle socket), via one poll()."""
    poller = select.poll()
    for conn in conns:
        poller.register(conn.sock.fileno(), select.POLLIN)
    return len(poller.poll(0))
