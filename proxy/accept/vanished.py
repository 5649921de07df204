"""Noticing clients that hang up while their request is in flight.

Strategy: a client that vanishes while it waits for the upstream's first byte, or in the middle of a
stream, must not keep vLLM generating for nobody. One task per process (`run_sweeper`) peeks every
CLIENT_CHECK_S at each connection that has been busy for a while, and cancels the connection's scope
on EOF -- which closes the upstream connection and so cancels vLLM's work. No per-request task or
syscall: a request that ends quickly costs nothing here. `sweep_vanished` is the synchronous step,
testable with a socket pair and a given `now`.
"""

from __future__ import annotations

import socket

import trio

from proxy.accept.downstream import BUSY

CLIENT_CHECK_S = 0.25


def sweep_vanished(connections, now: float) -> int:
    """Cancel the requests of clients that have hung up. Checks only connections busy for at least
    CLIENT_CHECK_S (a peek: EOF means gone; bytes mean a pipelined request, left alone)."""
    gone = 0
    for ds in list(connections):
        if ds.phase is not BUSY or now - ds.busy_since < CLIENT_CHECK_S or ds.client_gone:
            continue
        try:
            peeked = ds.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError:
            peeked = b""
        if not peeked:
            ds.client_gone = True
            ds.scope.cancel()
            gone += 1
    return gone


async def run_sweeper(connections) -> None:
    """One task per process: see sweep_vanished."""
    while True:
        await trio.sleep(CLIENT_CHECK_S)
        sweep_vanished(connections, trio.current_time())
