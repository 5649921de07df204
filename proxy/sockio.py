"""Socket I/O on raw non-blocking stdlib sockets, with trio's readiness waits.

Strategy: on this class of machine a syscall costs 5-25 µs, more than most Python work on the hot
path, so the gateway counts them. trio's SocketStream tries `recv` first and waits on EAGAIN; on the
gateway's two hot waits (the next request on a keep-alive connection, the upstream's response) the
data is almost never there yet, so these helpers WAIT FIRST and then read once: one `epoll_ctl` and one
`recv` instead of `recv` + `epoll_ctl` + `recv`. Writes go straight to `send`; only a write that
would block waits, and only then is a timeout scope built (`write_s`), so the common case costs one
syscall and no cancel scope.

Errors: a reset or refused peer reads as EOF (b""); a failed write raises `BrokenPipe`. Closing
calls `trio.lowlevel.notify_closing` first, as trio requires for fds it may be waiting on.
"""

from __future__ import annotations

import socket

import trio
from trio.lowlevel import notify_closing, wait_readable, wait_writable

READ_SIZE = 65536


class BrokenPipe(Exception):
    """The peer is gone: a write failed."""


async def recv(sock: socket.socket, size: int = READ_SIZE) -> bytes:
    """Wait until readable, then read once. EOF, reset or error -> b""."""
    while True:
        await wait_readable(sock)
        try:
            return sock.recv(size)
        except BlockingIOError:
            continue
        except OSError:
            return b""


def recv_nowait(sock: socket.socket, size: int = READ_SIZE) -> bytes | None:
    """Read what is already there: bytes, b"" for EOF/error, or None if nothing is waiting."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


async def send_all(sock: socket.socket, data: bytes, write_s: float) -> None:
    """Write everything; wait (at most `write_s` per stall) only when the kernel buffer is full."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        raise BrokenPipe() from None
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        with trio.move_on_after(write_s) as stalled:
            await wait_writable(sock)
        if stalled.cancelled_caught:
            raise BrokenPipe()  # a client that does not read
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        except OSError:
            raise BrokenPipe() from None
        view = view[sent:]


def close(sock: socket.socket, *, shutdown: bool = True) -> None:
    """Close a socket trio may be waiting on. `shutdown` ends the connection for every process that
    shares it -- right for our own connections, wrong for a listening socket shared by workers."""
    if sock.fileno() < 0:
        return
    notify_closing(sock)
    if shutdown:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    sock.close()
