"""proxy/accept/listener.py: `bind_socket`, and `Server`'s accept loop, connection bound and drain.

Strategy: a listener needs a real listening socket, so these tests bind 127.0.0.1 port 0 (nothing
else) and connect real TCP clients to it. The gateway is the real `Gateway` with `dispatch` replaced
by a fixed answer at the seam (a request for /hold waits until the test releases it), so each test
controls which connections are idle and which are busy. Conditions are waited on, never slept for:
trio events from the handler, `wait_readable` on the listening socket, `wait_all_tasks_blocked`.
Drain's `drain_s` runs on trio's autojump clock and is checked against virtual time. The resource
back-off is triggered for real: the descriptor limit is lowered and the table filled, so `accept()`
fails with EMFILE, and the listening socket is a `socket.socket` subclass that reports it.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import select
import socket
from types import SimpleNamespace

import msgspec
import pytest
import trio
import trio.testing

from proxy.accept.listener import Server, bind_socket, serve_tcp
from proxy.gateway import Gateway, build_runtime
from proxy.observe import logs
from tests.support.gateway import make_config


class HoldGateway(Gateway):
    """The real Gateway; `dispatch` answers 200 with the target, after `release` for /hold."""

    def __init__(self, **server) -> None:
        super().__init__(build_runtime(make_config(["http://127.0.0.1:9"], server=server)))
        self.entered = trio.Event()
        self.release = trio.Event()
        self.cancelled = False

    async def dispatch(self, ds, request) -> None:
        if request.target == b"/hold":
            self.entered.set()
            try:
                await self.release.wait()
            finally:
                self.cancelled = not self.release.is_set()
        await ds.send_response(200, [(b"content-type", b"text/plain")], request.target)


def ok(target: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(target) + target


def get(target: bytes, *, close: bool = False) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"


async def start(nursery: trio.Nursery, gw: Gateway, sock: socket.socket | None = None) -> SimpleNamespace:
    """A Server for `gw` serving in `nursery`; `.done` is set (and `.ended_at` known) when serve() returns."""
    run = SimpleNamespace(done=trio.Event(), ended_at=None)
    run.server = Server(gw, gw.runtime.config.server, sock or bind_socket("127.0.0.1", 0))

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await run.server.serve(task_status=task_status)
        finally:
            run.ended_at = trio.current_time()
            run.done.set()

    run.host, run.port = await nursery.start(serve)
    return run


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


async def connect_errno(port: int) -> int:
    """The errno of a TCP connect to 127.0.0.1:`port` (0: connected)."""
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect_ex(("127.0.0.1", port))
        await trio.lowlevel.wait_writable(s)
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    finally:
        s.close()


# -- bind_socket ---------------------------------------------------------------------------------

def test_bind_socket_listens_non_blocking_on_the_port_it_was_given():
    sock = bind_socket("127.0.0.1", 0)
    with sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert sock.getblocking() is False
        assert sock.type == socket.SOCK_STREAM


def test_bind_socket_reuse_port_lets_two_workers_bind_one_port():
    first = bind_socket("127.0.0.1", 0, reuse_port=True)
    with first:
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        with bind_socket("127.0.0.1", first.getsockname()[1], reuse_port=True) as second:
            assert second.getsockname() == first.getsockname()


def test_bind_socket_on_a_port_in_use_raises():
    with bind_socket("127.0.0.1", 0) as taken:
        with pytest.raises(OSError) as exc:
            bind_socket("127.0.0.1", taken.getsockname()[1])
        assert exc.value.errno == errno.EADDRINUSE


# -- accepting -----------------------------------------------------------------------------------

async def test_server_accepts_and_serves_connections(nursery):
    gw = HoldGateway()
    run = await start(nursery, gw)
    assert gw.server is run.server and run.host == "127.0.0.1"
    with trio.fail_after(10):
        a = await trio.open_tcp_stream("127.0.0.1", run.port)
        b = await trio.open_tcp_stream("127.0.0.1", run.port)
        await a.send_all(get(b"/a1"))
        await b.send_all(get(b"/b", close=True))
        assert await read_exactly(a, len(ok(b"/a1"))) == ok(b"/a1")  # a stays open (keep-alive)
        assert await read_to_eof(b) == ok(b"/b").replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        await a.send_all(get(b"/a2", close=True))
        assert await read_to_eof(a) == ok(b"/a2").replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        await a.aclose()
        await b.aclose()
        run.server.drain()
        await run.done.wait()
    assert gw.open_connections == 0


async def test_max_connections_pauses_accepting_until_one_closes(nursery):
    gw = HoldGateway(max_connections=1)
    run = await start(nursery, gw)
    server = run.server
    with trio.fail_after(10):
        a = await trio.open_tcp_stream("127.0.0.1", run.port)
        await a.send_all(get(b"/a"))
        assert await read_exactly(a, len(ok(b"/a"))) == ok(b"/a")
        b = await trio.open_tcp_stream("127.0.0.1", run.port)
        await b.send_all(get(b"/b", close=True))
        # b waits in the kernel's queue: the listener is readable and nobody is waiting on it
        # (the accept loop waits for a slot instead; were it waiting here too, this would raise).
        await trio.lowlevel.wait_readable(server.sock)
        await trio.testing.wait_all_tasks_blocked()
        assert gw.open_connections == 1 and server.slots.value == 0
        assert server.slots.statistics().tasks_waiting == 1
        assert select.select([b.socket], [], [], 0)[0] == []  # b has no answer
        await a.aclose()  # a's slot frees: b is accepted and answered
        assert await read_to_eof(b) == ok(b"/b").replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        await b.aclose()
        server.drain()
        await run.done.wait()
    assert gw.open_connections == 0 and server.slots.value == 1


# -- drain ---------------------------------------------------------------------------------------

async def test_drain_stops_accepting_and_closes_the_listener(nursery):
    gw = HoldGateway()
    run = await start(nursery, gw)
    assert await connect_errno(run.port) == 0
    assert gw.draining is False
    run.server.drain()
    run.server.drain()  # a second drain is a no-op
    assert gw.draining is True
    with trio.fail_after(10):
        await run.done.wait()
    assert run.server.sock.fileno() == -1
    assert await connect_errno(run.port) == errno.ECONNREFUSED


async def test_drain_closes_idle_keep_alive_connections_quietly(nursery, autojump_clock):
    gw = HoldGateway(drain_s=30.0, keepalive_idle_s=3000.0)
    run = await start(nursery, gw)
    with trio.fail_after(1000):
        idle = await trio.open_tcp_stream("127.0.0.1", run.port)
        await idle.send_all(get(b"/a"))
        assert await read_exactly(idle, len(ok(b"/a"))) == ok(b"/a")
        await trio.testing.wait_all_tasks_blocked()
        (ds,) = gw.connections
        assert ds.phase == "idle"
        t0 = trio.current_time()
        run.server.drain()
        assert await read_to_eof(idle) == b""  # closed with no bytes: not a 408
        await run.done.wait()
    assert run.ended_at - t0 < 1.0  # not held until drain_s
    assert gw.open_connections == 0
    await idle.aclose()


async def test_drain_lets_a_busy_request_finish(nursery, autojump_clock):
    gw = HoldGateway(drain_s=30.0, keepalive_idle_s=3000.0)
    run = await start(nursery, gw)
    with trio.fail_after(1000):
        busy = await trio.open_tcp_stream("127.0.0.1", run.port)
        await busy.send_all(get(b"/hold"))
        await gw.entered.wait()
        run.server.drain()
        await trio.testing.wait_all_tasks_blocked()
        assert run.server.sock.fileno() == -1 and not run.done.is_set()
        assert await connect_errno(run.port) == errno.ECONNREFUSED
        t0 = trio.current_time()
        gw.release.set()
        raw = await read_to_eof(busy)  # the answer, then close
        await run.done.wait()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\n/hold")
    assert raw.count(b"HTTP/1.1") == 1
    assert gw.cancelled is False
    assert run.ended_at - t0 < 1.0
    await busy.aclose()


async def test_drain_cuts_what_is_left_after_drain_s(nursery, autojump_clock):
    gw = HoldGateway(drain_s=30.0, keepalive_idle_s=3000.0)
    run = await start(nursery, gw)
    with trio.fail_after(1000):
        busy = await trio.open_tcp_stream("127.0.0.1", run.port)
        await busy.send_all(get(b"/hold"))
        await gw.entered.wait()
        t0 = trio.current_time()
        run.server.drain()
        assert await read_to_eof(busy) == b""
        await run.done.wait()
    assert gw.cancelled is True
    assert run.ended_at - t0 == pytest.approx(30.0)
    assert gw.open_connections == 0
    await busy.aclose()


async def test_serve_tcp_binds_the_configured_address(nursery):
    gw = HoldGateway()
    host, port = await nursery.start(serve_tcp, gw, gw.runtime.config.server)
    assert host == "127.0.0.1" and port > 0
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(get(b"/t", close=True))
        assert await read_to_eof(stream) == ok(b"/t").replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        await stream.aclose()
        gw.server.drain()
        await trio.testing.wait_all_tasks_blocked()
    assert await connect_errno(port) == errno.ECONNREFUSED


# -- out of descriptors --------------------------------------------------------------------------

class ReportingListener(socket.socket):
    """A real listening socket that reports the errno of each failed accept()."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(fileno=sock.detach())
        self.setblocking(False)
        self.errors: list[int] = []
        self.failed = trio.Event()

    def accept(self):
        try:
            return super().accept()
        except BlockingIOError:
            raise
        except OSError as exc:
            self.errors.append(exc.errno)
            self.failed.set()
            raise


async def test_out_of_descriptors_backs_off_and_accepts_once_they_are_back(nursery):
    log = io.BytesIO()
    logs.configure(access=False, stream=log)
    gw = HoldGateway()
    listener = ReportingListener(bind_socket("127.0.0.1", 0))
    run = await start(nursery, gw, listener)
    client = socket.socket()  # made now: no descriptor can be made while the table is full
    client.setblocking(False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    r, w = os.pipe()
    filler: list[int] = []
    try:
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        for _ in range(top + 2):
            try:
                filler.append(os.dup(r))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        else:
            pytest.fail("the descriptor table never filled")
        with trio.fail_after(10):
            client.connect_ex(("127.0.0.1", run.port))
            await trio.lowlevel.wait_writable(client)
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            await listener.failed.wait()
        assert errno.EMFILE in listener.errors and gw.open_connections == 0
    finally:
        logs.configure()
        for fd in filler:
            os.close(fd)
        os.close(r)
        os.close(w)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with trio.fail_after(10):
        client.send(get(b"/later", close=True))
        raw = b""
        while True:
            await trio.lowlevel.wait_readable(client)
            if not (chunk := client.recv(65536)):
                break
            raw += chunk
    client.close()
    assert raw == ok(b"/later").replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
    assert not run.done.is_set()  # the accept loop survived
    backoffs = [rec for line in log.getvalue().splitlines()
                if (rec := msgspec.json.decode(line))["event"] == "accept_backoff"]
    assert len(backoffs) == 1  # logged once, however many times it backed off
    assert backoffs[0]["errno"] == "EMFILE" and backoffs[0]["level"] == "warning"
    assert run.server.accept_backoffs >= 1
    run.server.drain()


class FaultyListener(socket.socket):
    """A real listening socket whose first accept() calls fail with the given errnos, as Linux reports
    them for a connection that was reset or refused by a firewall before it was accepted."""

    def __init__(self, sock: socket.socket, errnos: list[int]) -> None:
        super().__init__(fileno=sock.detach())
        self.setblocking(False)
        self.pending = list(errnos)

    def accept(self):
        if self.pending:
            err = self.pending.pop(0)
            raise OSError(err, os.strerror(err))
        return super().accept()


@pytest.mark.parametrize("err", [errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                                 errno.EHOSTUNREACH])
async def test_accept_errors_of_a_dead_connection_are_skipped_and_the_loop_carries_on(nursery, err):
    gw = HoldGateway()
    listener = FaultyListener(bind_socket("127.0.0.1", 0), [err, err])
    run = await start(nursery, gw, listener)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", run.port)
        await stream.send_all(get(b"/after", close=True))
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
        await stream.aclose()
    assert raw == ok(b"/after").replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
    assert listener.pending == [] and not run.done.is_set()
    run.server.drain()


async def test_an_unknown_accept_error_still_ends_the_loop(nursery):
    # EBADF means the listener itself is broken: not something to spin on.
    gw = HoldGateway()
    listener = FaultyListener(bind_socket("127.0.0.1", 0), [errno.EBADF])
    server = Server(gw, gw.runtime.config.server, listener)
    with trio.fail_after(10):
        client = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
        with pytest.raises(BaseExceptionGroup) as info:
            await server.serve()
        await client.aclose()
    assert info.group_contains(OSError, match="Bad file descriptor")


async def test_a_server_cancelled_from_outside_closes_its_listening_socket():
    gw = HoldGateway()
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(Server(gw, gw.runtime.config.server, sock).serve)
            nursery.cancel_scope.cancel()
    assert sock.fileno() == -1  # closed, not left to the garbage collector
    assert await connect_errno(port) == errno.ECONNREFUSED
