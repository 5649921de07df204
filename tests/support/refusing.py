"""Addresses that refuse connections for as long as a test needs them: an upstream that is down.

A TCP socket bound to 127.0.0.1 port 0 and never listen()ed: connect() to it is refused on Linux (RST),
and as long as the socket stays open nobody else can bind that port (no SO_REUSEADDR here), so no other
process can start listening there in the middle of the test -- unlike a port that was bound, closed and
handed out. `refusing_url()` holds one for the duration of a `with` block; the `dead_upstream` fixture
(registered in tests/conftest.py) hands out as many as a test asks for and closes them when it ends.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest


def _bound_not_listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def refusing_url() -> Iterator[str]:
    """`http://127.0.0.1:PORT` whose connections are refused until the block ends."""
    with _bound_not_listening() as sock:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def dead_upstream() -> Iterator[Callable[[], str]]:
    """A factory: each call returns a new refusing `http://127.0.0.1:PORT`, held until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(refusing_url())
