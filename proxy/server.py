"""The listening socket and the accept loop.

Strategy: one SOCK_STREAM listener per worker process, bound with SO_REUSEPORT when several workers
share a port (the kernel balances connections between them), or inherited from a supervisor as an
already-bound file descriptor. trio's `serve_listeners` runs the accept loop (it backs off on EMFILE)
and starts one task per connection (connection.py). `max_connections` bounds connections being served:
past it, an accepted connection waits for a slot before its first read.
"""

from __future__ import annotations

import socket

import trio

from proxy.config import ServerConfig, parse_listen
from proxy.connection import serve_connection

BACKLOG = 4096


def bind_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
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


async def serve_tcp(gw, server: ServerConfig, *, sock: socket.socket | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept and serve connections until cancelled; started((host, port))."""
    if sock is None:
        host, port = parse_listen(server.listen)
        sock = bind_socket(host, port, reuse_port=server.reuse_port)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    limiter = trio.Semaphore(server.max_connections)
    gw.listener = listener

    async def handle(stream: trio.SocketStream) -> None:
        async with limiter:
            await serve_connection(stream, gw)

    host, port = sock.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, [listener])
        task_status.started((host, port))
