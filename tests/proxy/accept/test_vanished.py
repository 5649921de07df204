"""proxy/accept/vanished.py: `sweep_vanished` with a given `now`, and `run_sweeper` over a served connection.

Strategy: the sweep is synchronous and peeks each connection's socket, so each case is a real
`Downstream` on one end of a `socket.socketpair()` (the in-process client; Downstream works on raw
non-blocking sockets, so trio memory streams do not apply) put into the phase under test, with its own
cancel scope; the client end hangs up, stays, or leaves bytes waiting, and `now` is passed in. A reset
needs TCP, so that one case connects through a 127.0.0.1 port-0 listener. The last test runs the real
sweeper task against `serve_connection` on trio's autojump clock.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from proxy import sockio
from proxy.accept.connection import serve_connection
from proxy.accept.downstream import BODY, BUSY, HEAD, IDLE, Downstream
from proxy.accept.vanished import CLIENT_CHECK_S, run_sweeper, sweep_vanished
from proxy.gateway import Gateway, build_runtime
from tests.support.gateway import make_config

NOW = 1000.0


@pytest.fixture
def gw():
    return Gateway(build_runtime(make_config(["http://127.0.0.1:9"])))


@pytest.fixture
def pairs():
    """make(gw, phase, busy_for) -> (ds, client end); every socket is closed after the test."""
    made: list[socket.socket] = []

    def make(gw, phase=BUSY, busy_for=1.0, sock_pair=None):
        ours, theirs = sock_pair or socket.socketpair()
        ours.setblocking(False)
        made.extend((ours, theirs))
        ds = Downstream(ours, gw, "client")
        ds.scope = trio.CancelScope()
        ds.phase = phase
        ds.busy_since = NOW - busy_for
        return ds, theirs

    yield make
    for s in made:
        s.close()


def untouched(ds) -> bool:
    return ds.client_gone is False and ds.scope.cancel_called is False


async def test_a_busy_connection_whose_client_hung_up_is_cancelled(gw, pairs):
    ds, client = pairs(gw)
    client.close()
    assert sweep_vanished([ds], NOW) == 1
    assert ds.client_gone is True and ds.scope.cancel_called is True


async def test_a_client_that_only_shut_its_writing_side_counts_as_gone(gw, pairs):
    ds, client = pairs(gw)
    client.shutdown(socket.SHUT_WR)  # EOF is all a peek can see
    assert sweep_vanished([ds], NOW) == 1 and ds.client_gone


async def test_a_client_that_is_still_there_is_left_alone(gw, pairs):
    ds, _client = pairs(gw)
    assert sweep_vanished([ds], NOW) == 0 and untouched(ds)


async def test_busy_for_less_than_client_check_s_is_not_checked(gw, pairs):
    young, client = pairs(gw, busy_for=CLIENT_CHECK_S / 2)
    client.close()
    assert sweep_vanished([young], NOW) == 0 and untouched(young)
    assert sweep_vanished([young], NOW - CLIENT_CHECK_S / 2 + CLIENT_CHECK_S) == 1  # once it has been


@pytest.mark.parametrize("phase", [IDLE, HEAD, BODY])
async def test_a_connection_that_is_not_busy_is_left_alone(gw, pairs, phase):
    ds, client = pairs(gw, phase=phase, busy_for=100.0)
    client.close()
    assert sweep_vanished([ds], NOW) == 0 and untouched(ds)


async def test_pipelined_bytes_waiting_are_left_alone_and_unread(gw, pairs):
    ds, client = pairs(gw)
    client.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    client.close()  # even behind the bytes, the EOF is not seen: a request is waiting
    assert sweep_vanished([ds], NOW) == 0 and untouched(ds)
    assert sockio.recv_nowait(ds.sock) == b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"  # the peek took nothing


async def test_a_connection_already_marked_gone_is_not_counted_again(gw, pairs):
    ds, client = pairs(gw)
    client.close()
    assert sweep_vanished([ds], NOW) == 1
    assert sweep_vanished([ds], NOW + 1) == 0


async def test_a_reset_connection_counts_as_gone(gw, pairs):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ds, client = pairs(gw, sock_pair=(ours, client))
    client.close()  # linger 0: RST, so the peek fails with ECONNRESET rather than reading EOF
    assert sweep_vanished([ds], NOW) == 1 and ds.client_gone


async def test_only_the_vanished_among_many_are_cancelled(gw, pairs):
    gone_a, c1 = pairs(gw)
    here, _c2 = pairs(gw)
    young, c3 = pairs(gw, busy_for=0.0)
    idle, c4 = pairs(gw, phase=IDLE)
    gone_b, c5 = pairs(gw, busy_for=CLIENT_CHECK_S)
    for c in (c1, c3, c4, c5):
        c.close()
    connections = {gone_a, here, young, idle, gone_b}
    assert sweep_vanished(connections, NOW) == 2
    assert [ds.client_gone for ds in (gone_a, here, young, idle, gone_b)] == [True, False, False, False, True]
    assert len(connections) == 5  # the sweep does not change the set it is given


class HangingGateway(Gateway):
    """The real Gateway whose dispatch waits forever, like a request waiting for its upstream."""

    def __init__(self) -> None:
        super().__init__(build_runtime(make_config(["http://127.0.0.1:9"])))
        self.started = trio.Event()
        self.cancelled = False

    async def dispatch(self, ds, request) -> None:
        self.started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled = True
            raise


async def test_the_sweeper_cancels_a_served_request_whose_client_hung_up(autojump_clock):
    gw = HangingGateway()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    served = trio.Event()

    async def serve():
        await serve_connection(ours, "client", gw)
        served.set()

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            theirs.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            await gw.started.wait()
            (ds,) = gw.connections
            assert ds.phase is BUSY
            nursery.start_soon(run_sweeper, gw.connections)
            await trio.sleep(10 * CLIENT_CHECK_S)  # sweeps while the client is still there
            assert not served.is_set() and not ds.client_gone
            t0 = trio.current_time()
            theirs.close()
            await served.wait()
            assert trio.current_time() - t0 <= CLIENT_CHECK_S
            nursery.cancel_scope.cancel()
    assert gw.cancelled and ds.client_gone
    assert (gw.open_connections, gw.connections, ours.fileno()) == (0, set(), -1)
