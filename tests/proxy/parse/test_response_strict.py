"""The upstream response reader holds heads to the client side's rules (issue 10), and a hostile head
becomes a clean 502 through the real gateway.

Unit part: each hostile head raises ResponseError -- whole, byte by byte, and (where the head can never
complete) while it is still arriving, with the connection left open. Valid heads still parse and agree
with h11, the test oracle. Gateway part: a FakeUpstream (tests/support/upstream_kit.py, a raw trio
server on a free 127.0.0.1 port) answers the first request with the hostile head and the second with a
good response; the client is httpx; the first request is a 502 in the OpenAI error envelope with none
of the hostile head's headers or body, the second a 200.
"""

from __future__ import annotations

import h11
import httpx
import pytest
import trio

from proxy.parse.response import ResponseError, ResponseReader, parse_head
from tests.support.gateway import CHAT, make_config, start_gateway
from tests.support.upstream_kit import OK_BODY, OK_JSON, FakeUpstream, answer

OK = b"HTTP/1.1 200 OK\r\n"
TAIL = b"x-evil: 1\r\ncontent-length: 4\r\n\r\nevil"
CHUNKS = b"\r\n\r\n4\r\nevil\r\n0\r\n\r\n"  # the end of a head, then a chunked body

# name -> a hostile response (head and a few body bytes); every one must be refused.
HOSTILE = {
    # line endings
    "bare LF everywhere": b"HTTP/1.1 200 OK\nx-evil: 1\ncontent-length: 4\n\nevil",
    "bare LF in one header line": OK + b"x-a: 1\nx-b: 2\r\n" + TAIL,
    "bare LF after the status line": b"HTTP/1.1 200 OK\n" + TAIL,
    "bare CR in a header line": OK + b"x-a: 1\rx-b: 2\r\n" + TAIL,
    "obs-fold (space)": OK + b"x-a: 1\r\n folded\r\n" + TAIL,
    "obs-fold (tab)": OK + b"x-a: 1\r\n\tfolded\r\n" + TAIL,
    # bytes inside values
    "NUL in a value": OK + b"x-a: 1\x002\r\n" + TAIL,
    "control char in a value": OK + b"x-a: 1\x012\r\n" + TAIL,
    "DEL in a value": OK + b"x-a: 1\x7f2\r\n" + TAIL,
    "VT in a value": OK + b"x-a: 1\x0b2\r\n" + TAIL,
    "ESC in the reason": b"HTTP/1.1 200 O\x1bK\r\n" + TAIL,
    # names
    "space in a name": OK + b"x a: 1\r\n" + TAIL,
    "space before the colon": OK + b"x-a : 1\r\n" + TAIL,
    "non-token char in a name": OK + b"x@a: 1\r\n" + TAIL,
    "empty name": OK + b": 1\r\n" + TAIL,
    "no colon": OK + b"x-a 1\r\n" + TAIL,
    "non-ASCII name": OK + b"x-\xe9: 1\r\n" + TAIL,
    # Content-Length
    "5000-digit Content-Length": OK + b"x-evil: 1\r\ncontent-length: " + b"9" * 5000 + b"\r\n\r\nevil",
    "19-digit Content-Length": OK + b"x-evil: 1\r\ncontent-length: 1000000000000000000\r\n\r\nevil",
    "negative Content-Length": OK + b"x-evil: 1\r\ncontent-length: -1\r\n\r\nevil",
    "signed Content-Length": OK + b"x-evil: 1\r\ncontent-length: +4\r\n\r\nevil",
    "hex Content-Length": OK + b"x-evil: 1\r\ncontent-length: 0x4\r\n\r\nevil",
    "empty Content-Length": OK + b"x-evil: 1\r\ncontent-length: \r\n\r\nevil",
    "differing Content-Lengths": OK + b"x-evil: 1\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nevil",
    "differing Content-Length list": OK + b"x-evil: 1\r\ncontent-length: 4, 5\r\n\r\nevil",
    "Content-Length with Transfer-Encoding":
        OK + b"x-evil: 1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n4\r\nevil\r\n0\r\n\r\n",
    # Transfer-Encoding
    "gzip, chunked": OK + b"x-evil: 1\r\ntransfer-encoding: gzip, chunked\r\n\r\n4\r\nevil\r\n0\r\n\r\n",
    "chunked, chunked": OK + b"x-evil: 1\r\ntransfer-encoding: chunked, chunked" + CHUNKS,
    "two chunked lines":
        OK + b"x-evil: 1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked" + CHUNKS,
    "chunked, gzip": OK + b"x-evil: 1\r\ntransfer-encoding: chunked, gzip\r\n\r\nevil",
    "identity": OK + b"x-evil: 1\r\ntransfer-encoding: identity\r\n\r\nevil",
    "gzip": OK + b"x-evil: 1\r\ntransfer-encoding: gzip\r\n\r\nevil",
    "Transfer-Encoding on HTTP/1.0":
        b"HTTP/1.0 200 OK\r\nx-evil: 1\r\ntransfer-encoding: chunked\r\n\r\n4\r\nevil\r\n0\r\n\r\n",
    # status line
    "HTTP/2": b"HTTP/2 200 OK\r\n" + TAIL,
    "HTTP/1.2": b"HTTP/1.2 200 OK\r\n" + TAIL,
    "lowercase version": b"http/1.1 200 OK\r\n" + TAIL,
    "two-digit status": b"HTTP/1.1 20 OK\r\n" + TAIL,
    "four-digit status": b"HTTP/1.1 2000 OK\r\n" + TAIL,
    "status under 100": b"HTTP/1.1 099 OK\r\n" + TAIL,
    "status over 599": b"HTTP/1.1 600 OK\r\n" + TAIL,
    "double space": b"HTTP/1.1  200 OK\r\n" + TAIL,
    "tab separator": b"HTTP/1.1\t200 OK\r\n" + TAIL,
    "no status code": b"HTTP/1.1\r\n" + TAIL,
    "leading empty line": b"\r\nHTTP/1.1 200 OK\r\n" + TAIL,
    "garbage": b"garbage\r\n" + TAIL,
    "101 (never asked for)": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: evil\r\n\r\nevil",
    "bad head after a 100": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\n" + TAIL,
}

# Heads that can never complete validly: refused while they arrive, without EOF or CRLFCRLF.
EARLY = ["bare LF everywhere", "bare LF after the status line", "HTTP/2", "lowercase version", "garbage",
         "double space", "status under 100", "no status code", "ESC in the reason", "101 (never asked for)"]


def head_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def read_whole(raw: bytes, step: int | None = None):
    reader = ResponseReader()
    pieces = [raw] if step is None else [raw[i:i + step] for i in range(0, len(raw), step)]
    head = None
    for piece in pieces:
        reader.feed(piece)
        head = reader.next_head()
        if head is not None:
            return reader, head
    reader.feed(b"")
    return reader, reader.next_head()


@pytest.mark.parametrize("step", [None, 1, 5])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_heads_are_refused(name, step):
    with pytest.raises(ResponseError):
        read_whole(HOSTILE[name], step)


@pytest.mark.parametrize("name", EARLY)
def test_hopeless_incomplete_heads_are_refused_before_they_end(name):
    raw = HOSTILE[name]
    prefix = raw[:raw.index(b"\n") + 1]  # just the first line: no head end, no EOF
    reader = ResponseReader()
    reader.feed(prefix)
    with pytest.raises(ResponseError):
        reader.next_head()


def test_bare_lf_is_refused_at_once_even_byte_by_byte():
    reader = ResponseReader()
    raw = b"HTTP/1.1 200 OK\r\nx-a: 1\nx-b"
    with pytest.raises(ResponseError, match="bare LF"):
        for i in range(len(raw)):
            reader.feed(raw[i:i + 1])
            assert reader.next_head() is None, f"accepted at byte {i}"


def test_a_huge_content_length_is_a_parse_error_not_a_value_error():
    block = b"HTTP/1.1 200 OK\r\ncontent-length: " + b"1" * 5000
    with pytest.raises(ResponseError, match="Content-Length"):
        parse_head(block)


def test_a_complete_head_over_the_limit_is_refused():
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\n" + b"x-a: b\r\n" * 9000 + b"content-length: 0\r\n\r\n")
    with pytest.raises(ResponseError, match="too large"):
        reader.next_head()


# -- what stays accepted ---------------------------------------------------------------------------
GOOD = [
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n",  # identical repeats (as h11)
    b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 000000000000000002\r\n\r\n",  # 18 digits
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
    b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n",  # no reason
    b"HTTP/1.1 200 \r\ncontent-length: 0\r\n\r\n",  # empty reason
    b"HTTP/1.1 404 Not \tFound\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx-a:\r\nx-b:  \t v \t \r\nx-c: caf\xc3\xa9\r\ncontent-length: 0\r\n\r\n",  # obs-text
    b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 599 Odd\r\ncontent-length: 0\r\n\r\n",
]


@pytest.mark.parametrize("raw", GOOD)
def test_valid_heads_parse_and_agree_with_h11(raw):
    _, head = read_whole(raw + b"ok", 3)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Response)
    assert head.status == event.status_code and head.reason == event.reason
    theirs = [(n.lower(), v) for n, v in event.headers.raw_items()]
    # h11 folds repeated Content-Length into one and lowercases Transfer-Encoding: framing compared apart.
    framing = (b"content-length", b"transfer-encoding")
    assert [h for h in head.headers if h[0] not in framing] == [h for h in theirs if h[0] not in framing]
    assert head.chunked == any(n == b"transfer-encoding" for n, _ in theirs)
    lengths = {int(v) for n, v in theirs if n == b"content-length"}
    if lengths and event.status_code not in (204, 304):
        assert {head.content_length} == lengths


@pytest.mark.parametrize("raw, keep", [
    (b"HTTP/1.1 200 OK\r\nconnection: x-a\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nconnection: x-close\r\ncontent-length: 0\r\n\r\n", True),  # a token, not text
    (b"HTTP/1.0 200 OK\r\nconnection: x-a\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nconnection: x-keep-alive\r\ncontent-length: 0\r\n\r\n", False),
])
def test_keep_alive_reads_every_connection_header(raw, keep):
    _, head = read_whole(raw)
    assert head.keep_alive is keep


def test_informational_then_final_byte_by_byte_then_the_next_response():
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
           b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    reader = ResponseReader()
    head = None
    for i in range(len(raw)):
        reader.feed(raw[i:i + 1])
        if head is None:
            head = reader.next_head()
    assert head.status == 200 and reader.read_body() == b"ok" and reader.complete
    reader.reset()
    assert reader.next_head().status == 200 and reader.complete


# -- through the real gateway ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(HOSTILE))
async def test_a_hostile_head_is_a_clean_502_and_the_gateway_serves_the_next_request(nursery, name):
    # The hostile reply keeps its connection open: a head that never completes must still be refused
    # at once (first_byte_s is short so a miss shows as a 504, not a hang).
    server = FakeUpstream(answer(HOSTILE[name]), answer(OK_JSON))
    url = await server.start(nursery)
    gw = await start_gateway(nursery, make_config([url], upstream={"first_byte_s": 5}))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
            bad = await http.post("/v1/chat/completions", content=CHAT,
                                  headers={"content-type": "application/json"})
            good = await http.post("/v1/chat/completions", content=CHAT,
                                   headers={"content-type": "application/json"})
    assert bad.status_code == 502
    error = bad.json()["error"]
    assert error["code"] == "bad_gateway" and error["type"] == "server_error"
    assert "invalid response head" in error["message"]  # it answered, wrongly: not a "reset"
    assert set(error) == {"message", "type", "param", "code"}
    assert "x-evil" not in bad.headers and "upgrade" not in bad.headers
    assert b"evil" not in bad.content
    assert good.status_code == 200 and good.content == OK_BODY
    assert len(server.requests) == 2


async def test_a_hostile_head_on_a_reused_connection_is_not_sent_again(nursery):
    # A reset on a reused keep-alive connection may be retried (the server closed it under us); a bad
    # head may not: the upstream did get the request and answered it. It must see the POST once.
    server = FakeUpstream(answer(OK_JSON), answer(HOSTILE["bare LF everywhere"]), answer(OK_JSON))
    url = await server.start(nursery)
    gw = await start_gateway(nursery, make_config([url]))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
            statuses = [(await http.post("/v1/chat/completions", content=CHAT,
                                         headers={"content-type": "application/json"})).status_code
                        for _ in range(3)]
    assert statuses == [200, 502, 200]
    assert len(server.requests) == 3
