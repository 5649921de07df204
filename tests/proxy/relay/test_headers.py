"""response_headers (proxy/relay/headers.py): the head the client gets, from the upstream's headers.

Pure function: exact header lists in, the exact list and the SSE flag out.
"""

from __future__ import annotations

import pytest

from proxy.relay.headers import response_headers

RID = (b"x-request-id", b"req-1")
LIMITS = ((b"x-ratelimit-limit-requests", b"60"), (b"x-ratelimit-remaining-requests", b"59"))


def test_json_keeps_the_upstreams_order_and_appends_request_id_then_extras():
    upstream = [(b"date", b"Mon, 10 Jun 2024 06:00:00 GMT"), (b"server", b"uvicorn"),
                (b"content-length", b"123"), (b"content-type", b"application/json"),
                (b"cache-control", b"private"), (b"x-vllm", b"1")]
    out, sse = response_headers(upstream, b"req-1", LIMITS)
    assert not sse
    assert out == [(b"date", b"Mon, 10 Jun 2024 06:00:00 GMT"), (b"server", b"uvicorn"),
                   (b"content-type", b"application/json"), (b"cache-control", b"private"), (b"x-vllm", b"1"),
                   RID, *LIMITS]


@pytest.mark.parametrize("name", [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
                                  b"trailer", b"upgrade", b"proxy-authenticate", b"x-accel-buffering",
                                  b"content-length"])
def test_hop_by_hop_and_framing_are_dropped(name):
    out, sse = response_headers([(b"server", b"uvicorn"), (name, b"x")], b"req-1", ())
    assert (out, sse) == ([(b"server", b"uvicorn"), RID], False)


@pytest.mark.parametrize("content_type", [b"text/event-stream", b"text/event-stream; charset=utf-8",
                                          b"Text/Event-Stream", b"TEXT/EVENT-STREAM;charset=UTF-8"])
def test_sse_gets_no_cache_and_no_buffering_in_place_of_the_upstreams(content_type):
    upstream = [(b"content-type", content_type), (b"cache-control", b"max-age=60"),
                (b"transfer-encoding", b"chunked"), (b"x-accel-buffering", b"yes"), (b"server", b"uvicorn")]
    out, sse = response_headers(upstream, b"req-1", ((b"x-spotinference-wake-ms", b"1500"),))
    assert sse
    assert out == [(b"content-type", content_type), (b"server", b"uvicorn"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no"), RID, (b"x-spotinference-wake-ms", b"1500")]


def test_an_empty_upstream_head_still_gets_the_request_id():
    assert response_headers([], b"r", ()) == ([(b"x-request-id", b"r")], False)


@pytest.mark.parametrize("content_type", [b"text/event-streamx", b"text/event", b"application/json"])
def test_only_the_event_stream_media_type_is_sse(content_type):
    assert response_headers([(b"content-type", content_type)], b"r", ())[1] is False


def test_headers_named_in_any_connection_header_are_dropped():
    upstream = [(b"connection", b"X-A, keep-alive"), (b"x-a", b"1"), (b"connection", b"x-b"), (b"x-b", b"2"),
                (b"x-c", b"3"), (b"content-type", b"application/json")]
    out, _ = response_headers(upstream, b"r", ())
    assert out == [(b"x-c", b"3"), (b"content-type", b"application/json"), (b"x-request-id", b"r")]
