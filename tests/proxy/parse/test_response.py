"""The upstream response reader (proxy/parse/response.py): framing, keep-alive, and refusals."""

from __future__ import annotations

import pytest

from proxy.parse.response import ResponseError, ResponseReader

SSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
       b"f\r\ndata: {\"a\":1}\n\n\r\n" b"e;x=y\r\ndata: [DONE]\n\n\r\n" b"0\r\nx-trailer: 1\r\n\r\n")


def read_all(raw: bytes, step: int | None = None):
    reader = ResponseReader()
    pieces = [raw] if step is None else [raw[i:i + step] for i in range(0, len(raw), step)]
    head, body = None, b""
    for piece in pieces + [b""]:
        reader.feed(piece)
        if head is None:
            head = reader.next_head()
            if head is None:
                continue
        while True:
            data = reader.read_body()
            if not data:
                break
            body += data
        if reader.complete:
            break
    return reader, head, body


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7, 50])
def test_chunked_sse_split_anywhere(step):
    reader, head, body = read_all(SSE, step)
    assert head.status == 200 and head.chunked and head.keep_alive
    assert body == b'data: {"a":1}\n\ndata: [DONE]\n\n' and reader.complete


def test_content_length_and_keep_alive_cycle():
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello" + b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    reader = ResponseReader()
    reader.feed(raw)
    head = reader.next_head()
    assert head.status == 200 and reader.read_body() == b"hello" and reader.complete
    reader.reset()
    head = reader.next_head()
    assert head.status == 404 and reader.complete and reader.read_body() == b""


def test_informational_responses_are_skipped_and_204_has_no_body():
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    head = reader.next_head()
    assert head.status == 204 and reader.complete


def test_until_close_is_never_reusable():
    reader, head, body = read_all(b"HTTP/1.1 200 OK\r\n\r\nstreamed until close")
    assert body == b"streamed until close" and not head.keep_alive and reader.complete


@pytest.mark.parametrize("raw, keep", [
    (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n", True),
])
def test_keep_alive_rules(raw, keep):
    reader = ResponseReader()
    reader.feed(raw)
    assert reader.next_head().keep_alive is keep


@pytest.mark.parametrize("raw", [
    b"HTTP/2 200\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
])
def test_bad_heads_are_refused(raw):
    reader = ResponseReader()
    reader.feed(raw)
    with pytest.raises(ResponseError):
        reader.next_head()


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcX",
    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",  # then EOF
])
def test_bad_or_truncated_bodies_are_refused(raw):
    with pytest.raises(ResponseError):
        read_all(raw)


def test_head_too_large_is_refused():
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nx: " + b"a" * 70000)
    with pytest.raises(ResponseError, match="too large"):
        reader.next_head()
