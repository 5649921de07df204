"""The listening socket, the accept loop, and graceful drain.

Strategy: one SOCK_STREAM listener per process -- bound here, or inherited from the supervisor as an
already-listening file descriptor that all workers accept on (a killed worker loses no queued
connection: the queue belongs to the shared socket). The accept loop is ours rather than
`trio.serve_listeners` so that draining can stop accepting WITHOUT cancelling the connections:
  drain(): close the listener (new connections are refused once no process holds it), cancel the
  connections that are idle between requests, let in-flight requests and streams finish, and
  after `drain_s` cancel whatever is left.
Accept errors that mean "out of descriptors/memory" back off briefly instead of killing the loop
(logged, at most once per `BACKOFF_LOG_S`); errors Linux reports for a connection that died before
it was accepted (trio's list in `_highlevel_socket.py`: ECONNABORTED, EPROTO, EPERM from a firewall,
ENETDOWN, ...) are skipped -- they concern that connection, not the listener.
`max_connections` bounds connections being served: past it, accepting pauses (the kernel backlog holds
new connections) until one closes.
"""

from __future__ import annotations

import errno
import socket

import trio

from proxy import sockio
from proxy.accept.connection import serve_connection
from proxy.config import ServerConfig, parse_listen
from proxy.observe import logs

BACKLOG = 4096
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_IGNORABLE_ERRNOS = {getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
    "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT",
    "ECONNRESET") if hasattr(errno, name)}
BACKOFF_S = 0.1
BACKOFF_LOG_S = 10.0


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound, listening, non-blocking stdlib socket."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    """Accepts connections for one gateway; `drain()` ends it gracefully."""

    def __init__(self, gw, server: ServerConfig, sock: socket.socket) -> None:
        self.gw = gw
        self.config = server
        self.sock = sock
        self.slots = trio.Semaphore(server.max_connections)
        self.draining = False
        self._accept_scope = trio.CancelScope()
        self._backoff_logged_at = -BACKOFF_LOG_S
        self.accept_backoffs = 0
        gw.server = self

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as connections:
            host, port = self.sock.getsockname()[:2]
            task_status.started((host, port))
            try:
                with self._accept_scope:
                    await self._accept_loop(connections)
            finally:
                # Closed here, by the task that accepted on it, once no wait or accept() is pending on
                # it -- after a drain and when cancelled from outside alike.
                sockio.close(self.sock, shutdown=False)  # other workers may still accept on it
            # Draining: wait for in-flight connections, up to drain_s, then cut them.
            with trio.move_on_after(self.config.drain_s):
                while self.gw.open_connections > 0:
                    await trio.sleep(0.05)
            connections.cancel_scope.cancel()

    async def _accept_loop(self, connections: trio.Nursery) -> None:
        listen = self.sock
        slots = self.slots
        while True:
            await trio.lowlevel.wait_readable(listen)
            # Accept everything queued in one wake-up.
            while True:
                await slots.acquire()
                try:
                    conn, addr = listen.accept()
                except BlockingIOError:
                    slots.release()
                    break
                except OSError as exc:
                    slots.release()
                    if exc.errno in _IGNORABLE_ERRNOS:
                        continue
                    if exc.errno in _RESOURCE_ERRNOS:
                        self._backing_off(exc.errno)
                        await trio.sleep(BACKOFF_S)
                        break
                    raise
                conn.setblocking(False)
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                connections.start_soon(self._handle, conn, addr[0] if isinstance(addr, tuple) else "unix")

    def _backing_off(self, err: int) -> None:
        self.accept_backoffs += 1
        now = trio.current_time()
        if now - self._backoff_logged_at >= BACKOFF_LOG_S:
            self._backoff_logged_at = now
            logs.event("accept_backoff", level="warning", errno=errno.errorcode.get(err, str(err)),
                       open_connections=self.gw.open_connections, backoffs=self.accept_backoffs,
                       pause_s=BACKOFF_S)

    async def _handle(self, conn: socket.socket, client: str) -> None:
        try:
            await serve_connection(conn, client, self.gw)
        finally:
            self.slots.release()

    def drain(self) -> None:
        """Stop accepting now; idle keep-alive connections close; busy ones finish (up to drain_s)."""
        if self.draining:
            return
        self.draining = True
        self._accept_scope.cancel()  # serve() closes the listening socket once the loop has stopped
        self.gw.close_idle_connections()


async def serve_tcp(gw, server: ServerConfig, *, sock: socket.socket | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept and serve connections until drained or cancelled; started((host, port))."""
    if sock is None:
        host, port = parse_listen(server.listen)
        sock = bind_socket(host, port, reuse_port=False)
    await Server(gw, server, sock).serve(task_status=task_status)
