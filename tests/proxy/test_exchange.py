"""exchange.py: the request's record -- its request id, `finish()` exactly once, 499, the derived timings.

Real `Exchange` objects on request heads from the real parser, and a real `Gateway` subclass that
keeps what `request_finished` receives (so "once" is a count). Timings are set on the record's
perf-counter fields directly, so every derived value is exact; no clock is read in an assertion.
"""

from __future__ import annotations

import pytest

from proxy import errors
from proxy.exchange import Exchange
from proxy.gateway import Gateway, build_runtime
from proxy.parse.request import RequestReader
from tests.support.gateway import make_config

RID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:"


class CountingGateway(Gateway):
    def __init__(self) -> None:
        super().__init__(build_runtime(make_config(["http://127.0.0.1:9"])))
        self.finished: list = []

    def request_finished(self, ex) -> None:
        self.finished.append((ex, ex.status, ex.error_type))
        super().request_finished(ex)


def head(*lines: bytes, method: bytes = b"GET"):
    reader = RequestReader()
    reader.feed(method + b" /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n")
    return reader.next_head()


def exchange(*lines: bytes, gw=None) -> Exchange:
    return Exchange(gw, head(*lines), "127.0.0.1")


def is_generated(rid: bytes) -> bool:
    return len(rid) == 22 and all(c in b"0123456789abcdef" for c in rid)


# -- request id ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", [b"abc-123", b"A" * 128, b"x", RID_CHARS.encode()[:128],
                                 b"req_01J:2024.06.10", b"00000000-0000-4000-8000-000000000000"])
def test_a_valid_request_id_is_kept(rid):
    assert exchange(b"X-Request-Id: " + rid).request_id == rid


def test_the_request_id_header_name_is_case_insensitive():
    assert exchange(b"x-REQUEST-id: mine").request_id == b"mine"


@pytest.mark.parametrize("value", [
    b"A" * 129, b"has space", b"slash/id", b"quote\"d", b"semi;colon", b"caf\xc3\xa9", b"<script>", b"a,b", b"",
])
def test_an_invalid_or_too_long_request_id_is_replaced(value):
    rid = exchange(b"X-Request-Id: " + value).request_id
    assert rid != value
    assert is_generated(rid)


def test_no_request_id_gets_a_unique_generated_one():
    rids = [exchange().request_id for _ in range(100)]
    assert all(is_generated(r) for r in rids)
    assert len(set(rids)) == 100
    assert len({r[:12] for r in rids}) == 1  # one per-process prefix, then a counter


def test_only_the_first_request_id_header_is_considered():
    assert exchange(b"X-Request-Id: first", b"X-Request-Id: second").request_id == b"first"
    assert is_generated(exchange(b"X-Request-Id: bad id", b"X-Request-Id: good").request_id)


def test_fields_at_the_start():
    ex = Exchange(None, head(b"X-Request-Id: r", method=b"HEAD"), "127.0.0.1")
    assert (ex.method, ex.client, ex.endpoint, ex.status, ex.key, ex.model, ex.tier) == (
        b"HEAD", "127.0.0.1", "", 0, None, None, None)
    assert (ex.t_upstream, ex.t_first_byte, ex.t_end, ex.wake_ms, ex.charged_tokens) == (None, None, None, None, 0)


# -- finish() -----------------------------------------------------------------------------------------


def test_finish_runs_once():
    gw = CountingGateway()
    ex = exchange(gw=gw)
    ex.endpoint, ex.status = "healthz", 200
    ex.finish(False)
    t_end = ex.t_end
    assert t_end is not None
    ex.status = 500
    ex.finish(True)
    ex.finish(False)
    assert [(s, e) for _, s, e in gw.finished] == [(200, None)]
    assert gw.finished[0][0] is ex
    assert ex.t_end == t_end and ex.status == 500  # a second finish changes nothing


def test_fail_records_status_and_code_or_type():
    ex = exchange()
    ex.fail(errors.model_not_found("m"))
    assert (ex.status, ex.error_type) == (404, "model_not_found")
    ex.fail(errors.ApiError(400, "x", "invalid_request_error"))
    assert (ex.status, ex.error_type) == (400, "invalid_request_error")


@pytest.mark.parametrize("status, error, gone, final", [
    (200, None, True, (499, "client_closed")),     # the client hung up before the answer was done
    (200, None, False, (200, None)),
    (0, None, False, (499, "client_closed")),      # no answer was ever decided (cancelled)
    (0, None, True, (499, "client_closed")),
    (200, "upstream_aborted", True, (499, "upstream_aborted")),  # an earlier reason is kept
    (404, "model_not_found", True, (404, "model_not_found")),    # an error answer stays what it was
    (503, "upstream_unavailable", True, (503, "upstream_unavailable")),
    (408, "request_timeout", False, (408, "request_timeout")),
])
def test_499_for_a_vanished_client(status, error, gone, final):
    gw = CountingGateway()
    ex = exchange(gw=gw)
    ex.status, ex.error_type = status, error
    ex.finish(gone)
    assert (ex.status, ex.error_type) == final
    assert [(s, e) for _, s, e in gw.finished] == [final]


# -- derived timings ----------------------------------------------------------------------------------


def timed(t_upstream=None, t_first_byte=None, t_end=None, wake_ms=None) -> Exchange:
    ex = exchange()
    ex.t0 = 10.0
    ex.t_upstream, ex.t_first_byte, ex.t_end, ex.wake_ms = t_upstream, t_first_byte, t_end, wake_ms
    return ex


def test_latency_and_ttfb():
    ex = timed(t_upstream=10.25, t_first_byte=10.5, t_end=12.0)
    assert ex.latency_ms() == 2000.0
    assert ex.ttfb_ms() == 500.0
    assert timed(t_end=11.0).ttfb_ms() is None


def test_gateway_ms_is_the_time_before_upstream():
    assert timed(t_upstream=10.5, t_end=12.0).gateway_ms() == 500.0


def test_gateway_ms_excludes_the_wake_wait():
    assert timed(t_upstream=10.5, t_end=12.0, wake_ms=400.0).gateway_ms() == 100.0
    assert timed(t_upstream=10.5, t_end=12.0, wake_ms=0.0).gateway_ms() == 500.0


def test_gateway_ms_never_negative():
    assert timed(t_upstream=10.5, t_end=12.0, wake_ms=900.0).gateway_ms() == 0.0


def test_gateway_ms_falls_back_to_latency_when_never_upstream():
    ex = timed(t_end=10.75)
    assert ex.gateway_ms() == 750.0 == ex.latency_ms()
    # A wake wait that ended in an error (no upstream) is part of that latency: nothing is taken off.
    assert timed(t_end=10.75, wake_ms=500.0).gateway_ms() == 750.0


def test_latency_before_finish_runs_on():
    ex = exchange()
    assert ex.t_end is None
    first = ex.latency_ms()
    assert first >= 0.0
    assert ex.latency_ms() >= first
