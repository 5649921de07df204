"""proxy/parse/request.py: the strict sans-I/O request reader (pure; no sockets, no event loop)."""

from __future__ import annotations

import h11
import pytest

from proxy.parse.request import RequestError, RequestHead, RequestReader

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"x" * 950 + b'"}]}'
SDK_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\n"
            b"Host: gateway.example.com:8080\r\n"
            b"Accept-Encoding: gzip, deflate\r\n"
            b"Connection: keep-alive\r\n"
            b"Accept: application/json\r\n"
            b"Content-Type: application/json\r\n"
            b"User-Agent: OpenAI/Python 1.51.0\r\n"
            b"X-Stainless-Lang: python\r\n"
            b"X-Stainless-Package-Version: 1.51.0\r\n"
            b"X-Stainless-OS: Linux\r\n"
            b"X-Stainless-Arch: x64\r\n"
            b"X-Stainless-Runtime: CPython\r\n"
            b"X-Stainless-Runtime-Version: 3.11.7\r\n"
            b"Authorization: Bearer sk-proj-abcdefghijklmnopqrstuvwxyz0123456789\r\n"
            b"X-Stainless-Async: false\r\n"
            b"x-stainless-retry-count: 0\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY))
SDK_REQUEST = SDK_HEAD + BODY
CHUNKED = (b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n1;name=value\r\n \r\nA;x\t; y=\"z\"\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")


def get(target: bytes = b"/", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET " + target + b" HTTP/" + version + b"\r\nHost: a\r\n" + extra + b"\r\n"


def post(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /p HTTP/1.1\r\nHost: a\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def summary(head: RequestHead, body: bytes) -> tuple:
    return (head.method, head.target, head.http_version, head.headers, head.content_length, head.chunked,
            head.keep_alive, head.expect_continue, body)


def drain(reader: RequestReader) -> list[tuple]:
    """Every request now complete in the reader; stops at a partial one (state kept in the reader)."""
    out = []
    while True:
        head = getattr(reader, "_test_head", None)
        if head is None:
            head = reader.next_head()
            if head is None:
                return out
            reader._test_head, reader._test_body = head, []
        while True:
            data = reader.read_body()
            if data is None:
                return out
            if data == b"":
                break
            reader._test_body.append(data)
        out.append(summary(head, b"".join(reader._test_body)))
        reader._test_head = None
        reader.next_request()


class Reader(RequestReader):
    """RequestReader with room for the bookkeeping of `drain` (the real one has __slots__)."""

    __slots__ = ("_test_body", "_test_head")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._test_head = None
        self._test_body: list[bytes] = []


def parse(data: bytes, *, step: int = 0, eof: bool = True, **limits) -> list[tuple]:
    """All requests in `data`, fed whole (step 0) or `step` bytes at a time."""
    reader = Reader(**limits)
    out = []
    if step:
        for i in range(0, len(data), step):
            reader.feed(data[i:i + step])
            out += drain(reader)
    else:
        reader.feed(data)
        out += drain(reader)
    if eof:
        reader.feed(b"")
        out += drain(reader)
        assert reader.closed
    return out


def status_of(data: bytes, *, step: int = 0, eof: bool = True, **limits) -> int:
    with pytest.raises(RequestError) as info:
        parse(data, step=step, eof=eof, **limits)
    err = info.value
    assert err.message and len(err.message) < 80 and str(err) == err.message
    return err.status


def one(data: bytes, **kw) -> tuple:
    [request] = parse(data, **kw)
    return request


# -- the typical request ------------------------------------------------------------------------

def test_sdk_request_parses():
    reader = RequestReader()
    reader.feed(SDK_REQUEST)
    head = reader.next_head()
    assert (head.method, head.target, head.http_version) == (b"POST", b"/v1/chat/completions", b"1.1")
    assert head.headers[0] == (b"host", b"gateway.example.com:8080")
    assert head.headers[5] == (b"user-agent", b"OpenAI/Python 1.51.0")
    assert (b"authorization", b"Bearer sk-proj-abcdefghijklmnopqrstuvwxyz0123456789") in head.headers
    assert all(name == name.lower() for name, _ in head.headers) and len(head.headers) == 16
    assert head.content_length == len(BODY) and not head.chunked
    assert head.keep_alive and not head.expect_continue
    assert not reader.body_complete
    assert reader.read_body() == BODY
    assert reader.body_complete
    assert reader.read_body() == b""
    assert not reader.has_partial() and not reader.closed
    reader.next_request()
    assert reader.next_head() is None and not reader.closed
    reader.feed(b"")
    assert reader.next_head() is None and reader.closed


def test_body_arrives_in_pieces():
    reader = RequestReader()
    reader.feed(SDK_HEAD + BODY[:10])
    reader.next_head()
    assert reader.read_body() == BODY[:10]
    assert reader.read_body() is None
    reader.feed(BODY[10:500])
    assert reader.read_body() == BODY[10:500]
    reader.feed(BODY[500:] + get())  # the rest plus a pipelined request
    assert reader.read_body() == BODY[500:]
    assert reader.read_body() == b"" and reader.body_complete
    reader.next_request()
    assert reader.has_partial()
    assert reader.next_head().method == b"GET"


def test_headers_keep_order_duplicates_and_case_of_values():
    (_, _, _, headers, *_rest) = one(get(extra=b"X-A: 1\r\nx-b:2\r\nX-A:  Mixed Case \t\r\nEmpty:\r\n"
                                            b"Blank: \t \r\nTab: a\tb\r\nUtf8: caf\xc3\xa9\r\n"))
    assert headers == [(b"host", b"a"), (b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"Mixed Case"),
                       (b"empty", b""), (b"blank", b""), (b"tab", b"a\tb"), (b"utf8", b"caf\xc3\xa9")]


def test_get_and_head_have_no_body():
    for method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
        reader = RequestReader()
        reader.feed(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
        head = reader.next_head()
        assert head.method == method and head.content_length is None and not head.chunked
        assert reader.body_complete and reader.read_body() == b""


def test_content_length_zero_is_complete_at_once():
    reader = RequestReader()
    reader.feed(post(b""))
    head = reader.next_head()
    assert head.content_length == 0 and reader.body_complete and reader.read_body() == b""


# -- request line ------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1", b"get / HTTP/1.1", b"M-SEARCH * HTTP/1.1", b"OPTIONS * HTTP/1.1",
    b"GET http://example.com/a?b=c HTTP/1.1", b"CONNECT example.com:443 HTTP/1.1",
    b"GET /%7e~!$&'()*+,;=:@?/ HTTP/1.1",
])
def test_valid_request_lines(line):
    method, target, _ = line.split(b" ")
    request = one(line + b"\r\nHost: a\r\n\r\n")
    assert request[:3] == (method, target, b"1.1")


@pytest.mark.parametrize("line", [
    b"GET  / HTTP/1.1", b"GET / HTTP/1.1 ", b" GET / HTTP/1.1", b"GET /", b"GET", b"GET /a b HTTP/1.1",
    b"GET\t/ HTTP/1.1", b"GET /\t HTTP/1.1", b"GET /\x7f HTTP/1.1", b"GET /\x01 HTTP/1.1",
    b"GET /caf\xc3\xa9 HTTP/1.1", b"G(T / HTTP/1.1", b"G\xc3\x89T / HTTP/1.1", b"GET  HTTP/1.1",
    b"GET / http/1.1", b"GET / HTTP/1", b"GET / HTTP/11", b"GET / HTTP/1.1x", b"GET / HTTPS/1.1",
    b"GET / HTTP/1.1\x00", b"\x00GET / HTTP/1.1",
])
def test_malformed_request_lines_are_400(line):
    assert status_of(line + b"\r\nHost: a\r\n\r\n") == 400


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"1.2", b"3.0"])
def test_other_http_versions_are_505(version):
    assert status_of(b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n") == 505
    # refused as soon as the request line is complete, not when the head is
    assert status_of(b"GET / HTTP/" + version + b"\r\nHost: a\r\n", eof=False) == 505


def test_http2_preface_is_505():
    assert status_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == 505


def test_obviously_bad_first_byte_is_refused_at_once():
    assert status_of(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", eof=False) == 400  # TLS hello
    assert status_of(b" GET", eof=False) == 400
    assert status_of(b"\x00", eof=False) == 400


def test_bad_request_line_refused_before_the_head_ends():
    assert status_of(b"GET /a b HTTP/1.1\r\nHost: a\r\n", eof=False) == 400


def test_empty_lines_before_a_request_are_skipped():
    assert one(b"\r\n\r\n\r\n" + get())[:2] == (b"GET", b"/")
    # one CRLF after a body (old clients) before the next pipelined request
    requests = parse(post(b"abc") + b"\r\n" + get(b"/next"))
    assert [r[1] for r in requests] == [b"/p", b"/next"]
    # fed byte by byte, a CR alone waits for its LF
    assert parse(b"\r\n" + get(), step=1) == parse(get())


def test_empty_lines_count_toward_the_head_limit():
    assert status_of(b"\r\n" * 20, max_head_bytes=40, eof=False) == 400
    assert status_of(b"\r\n" * 10 + get(), max_head_bytes=40) == 431
    assert one(b"\r\n" + get(), max_head_bytes=len(get()) + 2)


def test_bare_lf_empty_line_is_400():
    assert status_of(b"\n" + get()) == 400


# -- line endings -------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\rHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n",
])
def test_bare_lf_or_cr_is_400(data):
    assert status_of(data) == 400
    assert status_of(data, step=1) == 400


def test_bare_lf_refused_before_the_head_ends():
    assert status_of(b"GET / HTTP/1.1\nHost: a\n", eof=False) == 400
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\nX: b", eof=False) == 400


# -- header fields ------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    b"Host : b", b"X-A : b", b"X-A\t: b", b" X-A: b", b"\tX-A: b", b"X A: b", b"X-A", b": b", b"X(A): b",
    b"X-A: a\x00b", b"X-A: a\x01b", b"X-A: a\x1fb", b"X-A: a\x7fb", b"X-A: a\x0bb", b"X-A: a\x0cb",
    b"X-\xc3\xa9: b", b"X-A: b\x00",
])
def test_malformed_header_lines_are_400(line):
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n") == 400


@pytest.mark.parametrize("fold", [b" folded", b"\tfolded", b"  "])
def test_obs_fold_is_400(fold):
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n" + fold + b"\r\n\r\n") == 400


def test_head_size_limit():
    base = get()
    assert one(base, max_head_bytes=len(base))  # the whole head, final CRLFCRLF included
    assert status_of(base, max_head_bytes=len(base) - 1) == 431
    big = get(extra=b"X-Big: " + b"b" * 40000 + b"\r\n")
    assert status_of(big) == 431
    assert status_of(big, step=1000) == 431


def test_incomplete_oversized_head_is_431_at_once():
    partial = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 40000
    reader = RequestReader()
    reader.feed(partial[:30000])
    assert reader.next_head() is None and reader.has_partial()
    reader.feed(partial[30000:])
    with pytest.raises(RequestError) as info:
        reader.next_head()
    assert info.value.status == 431
    # exactly at the limit without a terminator: it can no longer fit
    reader = RequestReader(max_head_bytes=100)
    reader.feed(b"GET / HTTP/1.1\r\nX: " + b"y" * 81)
    with pytest.raises(RequestError) as info:
        reader.next_head()
    assert info.value.status == 431
    reader = RequestReader(max_head_bytes=100)
    reader.feed(b"GET / HTTP/1.1\r\nX: " + b"y" * 80)
    assert reader.next_head() is None


def test_header_count_limit():
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(9))
    assert one(get(extra=extra), max_headers=10)  # 9 + Host
    assert status_of(get(extra=extra + b"X-Last: v\r\n"), max_headers=10) == 431
    assert status_of(get(extra=b"X: y\r\n" * 101)) == 431  # default 100


# -- framing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    b"abc", b"-1", b"+5", b"5.0", b"0x5", b"5 5", b"", b"1e3", b"\xd9\xa3", b"9" * 19, b"5,", b",5",
    b"5, 6", b"5, 05", b"5,,5",
])
def test_bad_content_length_is_400(value):
    assert status_of(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + value + b"\r\n\r\n12345") == 400


def test_repeated_content_length_must_agree():
    assert one(post(b"abc", extra=b"Content-Length: 3\r\n"))[4:] == (3, False, True, False, b"abc")
    assert one(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3 , 3,3\r\n\r\nabc")[-1] == b"abc"
    assert status_of(post(b"abc", extra=b"Content-Length: 4\r\n")) == 400
    assert status_of(post(b"abc", extra=b"Content-Length: 03\r\n")) == 400  # as h11: same string


def test_long_but_valid_content_length():
    reader = RequestReader()
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 000000000000000003\r\n\r\nabc")
    assert reader.next_head().content_length == 3 and reader.read_body() == b"abc"


@pytest.mark.parametrize("te", [
    b"Transfer-Encoding: gzip", b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked, chunked",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"Transfer-Encoding: identity",
    b"Transfer-Encoding: chunked;q=1", b"Transfer-Encoding: ",
])
def test_unsupported_transfer_encoding_is_501(te):
    assert status_of(b"POST / HTTP/1.1\r\nHost: a\r\n" + te + b"\r\n\r\n0\r\n\r\n") == 501


def test_transfer_encoding_is_case_insensitive():
    request = one(b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding:  ChUnKeD \r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert request[5] and request[-1] == b"abc"


@pytest.mark.parametrize("order", ["cl-te", "te-cl"])
def test_transfer_encoding_with_content_length_is_400(order):
    cl, te = b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n"
    fields = cl + te if order == "cl-te" else te + cl
    assert status_of(b"POST / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n3\r\nabc\r\n0\r\n\r\n") == 400


def test_transfer_encoding_on_http10_is_400():
    assert status_of(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n") == 400


def test_host_rules():
    assert status_of(b"GET / HTTP/1.1\r\n\r\n") == 400
    assert status_of(b"GET / HTTP/1.1\r\nX: y\r\n\r\n") == 400
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n") == 400
    assert status_of(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n") == 400
    assert one(b"GET / HTTP/1.0\r\n\r\n")[2] == b"1.0"  # HTTP/1.0 needs none
    assert one(b"GET / HTTP/1.1\r\nHost:\r\n\r\n")[3] == [(b"host", b"")]  # empty is allowed


# -- keep-alive and Expect ----------------------------------------------------------------------

@pytest.mark.parametrize(("version", "connection", "keep"), [
    (b"1.1", None, True), (b"1.1", b"keep-alive", True), (b"1.1", b"close", False),
    (b"1.1", b"Close", False), (b"1.1", b"Keep-Alive, Close", False), (b"1.1", b"upgrade , close", False),
    (b"1.1", b"closed", True), (b"1.1", b"x-close", True),
    (b"1.0", None, False), (b"1.0", b"keep-alive", True), (b"1.0", b"Keep-Alive", True),
    (b"1.0", b"foo, keep-alive", True), (b"1.0", b"keep-alive, close", False), (b"1.0", b"close", False),
    (b"1.0", b"keep-alived", False),
])
def test_keep_alive(version, connection, keep):
    extra = b"" if connection is None else b"Connection: " + connection + b"\r\n"
    assert one(get(extra=extra, version=version))[6] is keep


def test_keep_alive_with_two_connection_headers():
    assert not one(get(extra=b"Connection: keep-alive\r\nConnection: close\r\n"))[6]
    assert one(get(extra=b"Connection: x\r\nConnection: keep-alive\r\n", version=b"1.0"))[6]


@pytest.mark.parametrize(("version", "expect", "waiting"), [
    (b"1.1", None, False), (b"1.1", b"100-continue", True), (b"1.1", b"100-Continue", True),
    (b"1.1", b" 100-CONTINUE ", True), (b"1.1", b"200-ok", False), (b"1.1", b"100-continue-x", False),
    (b"1.0", b"100-continue", False),
])
def test_expect_continue(version, expect, waiting):
    extra = b"" if expect is None else b"Expect: " + expect + b"\r\n"
    reader = RequestReader()
    reader.feed(b"POST / HTTP/" + version + b"\r\nHost: a\r\n" + extra + b"Content-Length: 3\r\n\r\n")
    head = reader.next_head()
    assert head.expect_continue is waiting
    assert reader.read_body() is None  # the client waits for 100 Continue before sending the body
    reader.feed(b"abc")
    assert reader.read_body() == b"abc"


# -- chunked bodies -----------------------------------------------------------------------------

def test_chunked_body():
    request = one(CHUNKED)
    assert request[4:6] == (None, True)
    assert request[-1] == b"hello 0123456789"
    assert (b"x-trailer", b"t") not in request[3]  # trailers are dropped


def test_chunked_pieces_come_out_joined_and_incrementally():
    reader = RequestReader()
    reader.feed(CHUNKED[:CHUNKED.index(b"\r\n\r\n") + 4])
    assert reader.next_head().chunked
    assert reader.read_body() is None
    reader.feed(b"5\r\nhel")
    assert reader.read_body() == b"hel"
    reader.feed(b"lo\r\n3\r\nabc\r\n2\r\nde\r\n")
    assert reader.read_body() == b"loabcde"
    assert reader.read_body() is None and not reader.body_complete
    reader.feed(b"0\r\n\r\nGET")
    assert reader.read_body() == b"" and reader.body_complete
    reader.next_request()
    assert reader.has_partial()


@pytest.mark.parametrize("chunks", [
    b"0\r\n\r\n", b"000\r\n\r\n", b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n",
    b"3;\r\nabc\r\n0\r\n\r\n", b"3;ext\r\nabc\r\n0;last\r\n\r\n", b"3;a=b;c=\"d e\"\r\nabc\r\n0\r\n\r\n",
    b"3 \r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\n0\r\nA: 1\r\nB-C: two words\r\n\r\n",
    b"0000000000000003\r\nabc\r\n0\r\n\r\n",
])
def test_valid_chunk_framing(chunks):
    request = one(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert request[-1] in (b"", b"abc", b"0123456789" * 2)


@pytest.mark.parametrize("chunks", [
    b"\r\n", b"g\r\nabc\r\n0\r\n\r\n", b"0x3\r\nabc\r\n0\r\n\r\n", b"+3\r\nabc\r\n0\r\n\r\n",
    b" 3\r\nabc\r\n0\r\n\r\n", b"-1\r\n", b"3_0\r\n", b";x\r\n", b"8000000000000001\r\n",
    b"10000000000000000\r\n", b"00000000000000003\r\nabc\r\n0\r\n\r\n", b"3 ;x\r\nabc\r\n0\r\n\r\n",
    b"3\t;x\r\nabc\r\n0\r\n\r\n",
    b"3\r\nabcX\r\n0\r\n\r\n", b"3\r\nabc\rX0\r\n\r\n", b"3\r\nabc\n0\r\n\r\n", b"3\nabc\r\n0\r\n\r\n",
    b"3;a\x00b\r\nabc\r\n0\r\n\r\n", b"3;a\nb\r\nabc\r\n0\r\n\r\n", b"3\x00\r\nabc\r\n0\r\n\r\n",
    b"3\r\nabc\r\n0\r\nno colon\r\n\r\n", b"3\r\nabc\r\n0\r\nBad Name: x\r\n\r\n",
    b"3\r\nabc\r\n0\r\nX: a\x01\r\n\r\n", b"3\r\nabc\r\n0\r\n folded\r\n\r\n",
    b"3;" + b"e" * 1100 + b"\r\nabc\r\n0\r\n\r\n",
])
def test_bad_chunk_framing_is_400(chunks):
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    assert status_of(data) == 400
    assert status_of(data, step=1) == 400


def test_chunk_size_up_to_2_63_is_accepted():
    reader = RequestReader()
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8000000000000000\r\nab")
    reader.next_head()
    assert reader.read_body() == b"ab" and not reader.body_complete


def test_overlong_chunk_line_is_refused_before_its_end():
    reader = RequestReader()
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    reader.next_head()
    reader.feed(b"3;" + b"e" * 1000)
    assert reader.read_body() is None
    reader.feed(b"e" * 100)
    with pytest.raises(RequestError) as info:
        reader.read_body()
    assert info.value.status == 400


def test_trailers_are_bounded():
    prefix = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    assert status_of(prefix + b"X: " + b"t" * 200 + b"\r\n\r\n", max_head_bytes=100) == 431
    assert status_of(prefix + b"X: " + b"t" * 200, max_head_bytes=100, eof=False) == 431
    assert status_of(prefix + b"X: 12345678\r\n" * 20 + b"\r\n", max_head_bytes=100) == 431
    assert one(prefix + b"X: 12345678\r\n" * 5 + b"\r\n", max_head_bytes=100)


# -- EOF ----------------------------------------------------------------------------------------

def test_clean_eof():
    reader = RequestReader()
    assert not reader.closed
    reader.feed(b"")
    assert reader.next_head() is None and reader.closed and not reader.has_partial()
    reader.feed(b"")  # a second EOF is harmless
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_eof_after_empty_lines_is_clean():
    assert parse(b"\r\n\r\n") == []


def test_eof_after_a_complete_request_still_serves_it():
    reader = RequestReader()
    reader.feed(post(b"abc"))
    reader.feed(b"")
    assert reader.next_head().content_length == 3
    assert reader.read_body() == b"abc" and reader.read_body() == b""
    reader.next_request()
    assert reader.next_head() is None and reader.closed


@pytest.mark.parametrize("cut", [1, 5, 16, 20, len(get()) - 1])
def test_eof_mid_head_is_400(cut):
    assert status_of(get()[:cut]) == 400


def test_eof_mid_body_is_400_after_the_bytes_that_came():
    reader = RequestReader()
    reader.feed(post(b"abcdef")[:-3])
    reader.feed(b"")
    reader.next_head()
    assert reader.read_body() == b"abc"
    with pytest.raises(RequestError) as info:
        reader.read_body()
    assert info.value.status == 400


@pytest.mark.parametrize("cut", range(1, len(CHUNKED) - CHUNKED.index(b"\r\n\r\n") - 4))
def test_eof_mid_chunked_body_is_400(cut):
    assert status_of(CHUNKED[:CHUNKED.index(b"\r\n\r\n") + 4 + cut]) == 400


# -- pipelining and splitting -------------------------------------------------------------------

PIPELINE = (SDK_REQUEST + get(b"/models") + b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n" + CHUNKED
            + b"\r\n" + post(b"x" * 70, extra=b"Expect: 100-continue\r\nConnection: close\r\n")
            + b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
            + b"OPTIONS * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")


def test_pipelined_requests_in_one_feed():
    requests = parse(PIPELINE)
    assert [(r[0], r[1]) for r in requests] == [
        (b"POST", b"/v1/chat/completions"), (b"GET", b"/models"), (b"HEAD", b"/h"),
        (b"POST", b"/v1/completions"), (b"POST", b"/p"), (b"GET", b"/ten"), (b"OPTIONS", b"*")]
    assert [r[-1] for r in requests] == [BODY, b"", b"", b"hello 0123456789", b"x" * 70, b"", b""]
    assert [r[6] for r in requests] == [True, True, True, True, False, True, True]
    assert [r[7] for r in requests] == [False, False, False, False, True, False, False]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1000])
def test_split_anywhere_gives_the_same_requests(step):
    assert parse(PIPELINE, step=step) == parse(PIPELINE)


def test_every_split_point_of_a_chunked_request():
    whole = parse(CHUNKED)
    for cut in range(1, len(CHUNKED)):
        reader = Reader()
        reader.feed(CHUNKED[:cut])
        got = drain(reader)
        reader.feed(CHUNKED[cut:])
        got += drain(reader)
        assert got == whole, cut


def test_every_split_point_of_the_sdk_request():
    whole = parse(SDK_REQUEST + get())
    data = SDK_REQUEST + get()
    for cut in range(1, len(data), 3):
        reader = Reader()
        reader.feed(data[:cut])
        got = drain(reader)
        reader.feed(data[cut:])
        got += drain(reader)
        assert got == whole, cut


def test_has_partial_tracks_an_incomplete_head():
    reader = RequestReader()
    assert not reader.has_partial()
    reader.feed(b"GE")
    assert reader.next_head() is None and reader.has_partial()
    reader.feed(b"T / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reader.next_head() is not None and not reader.has_partial()


def test_api_misuse_is_a_runtime_error():
    reader = RequestReader()
    with pytest.raises(RuntimeError):
        reader.read_body()
    reader.feed(post(b"abc") + get())
    reader.next_head()
    with pytest.raises(RuntimeError):
        reader.next_head()  # next_request() first
    with pytest.raises(RuntimeError):
        reader.next_request()  # the body is unread
    assert reader.read_body() == b"abc"
    reader.next_request()
    assert reader.next_head().method == b"GET"


class _ScanCountingBuffer(bytearray):
    """The reader's buffer, counting the bytes its `find` calls examine (from `start` to the match, or to
    the end of the range): the work of scanning for line and head ends, independent of machine speed."""

    scanned = 0

    def find(self, sub, start=0, end=None, /):
        at = super().find(sub, start) if end is None else super().find(sub, start, end)
        stop = min(len(self), len(self) if end is None else end)
        self.scanned += max(0, (at + len(sub) if at >= 0 else stop) - start)
        return at


def test_incomplete_heads_are_scanned_in_linear_time():
    # 20000 header lines fed 64 bytes at a time: rescanning the buffer would be quadratic (about
    # 440 kB x 6900 feeds / 2 = 1.5 GB examined); resuming each search where the last stopped is linear.
    data = get(extra=b"X-Header-Line: value\r\n" * 20000)
    reader = Reader(max_head_bytes=1 << 20, max_headers=30000)
    buf = reader._buf = _ScanCountingBuffer()
    out = []
    for i in range(0, len(data), 64):
        reader.feed(data[i:i + 64])
        out += drain(reader)
    reader.feed(b"")
    out += drain(reader)
    [request] = out
    assert len(request[3]) == 20001 and reader.closed
    assert reader._buf is buf  # every search went through the counting buffer
    assert 0 < buf.scanned <= 3 * len(data)  # each byte looked at a bounded number of times


# -- differential: h11 --------------------------------------------------------------------------

def h11_parse(data: bytes) -> list[tuple]:
    """[((method, target, version, headers), body), ...] as h11 reads `data` then EOF."""
    out = []
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    conn.receive_data(b"")
    while True:
        event = conn.next_event()
        if type(event) is h11.ConnectionClosed:
            return out
        assert type(event) is h11.Request
        head = (event.method, event.target, event.http_version, list(event.headers))
        body = []
        while type(event := conn.next_event()) is h11.Data:
            body.append(event.data)
        assert type(event) is h11.EndOfMessage
        out.append((head, b"".join(body)))
        if conn.their_state is not h11.DONE or conn.our_state is h11.MUST_CLOSE:
            return out
        conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()


def without_framing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # h11 normalises these two (one Content-Length kept, values lowercased); compared via the head
    return [(n, v) for n, v in headers if n not in (b"content-length", b"transfer-encoding")]


VALID = [
    get(), get(b"/v1/models?x=1&y=%20"), SDK_REQUEST, CHUNKED, post(b""), post(b"{}"),
    b"GET / HTTP/1.0\r\n\r\n", b"HEAD /h HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Ows:  \t v \t \r\nX-Tab: a\tb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nX-A: 2\r\nCookie: a=b; c=d\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: caf\xc3\xa9\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    get(b"/a") + get(b"/b") + post(b"zz"),
]


@pytest.mark.parametrize("data", VALID, ids=range(len(VALID)))
def test_differential_valid(data):
    theirs = h11_parse(data)
    ours = parse(data)
    assert len(ours) == len(theirs) > 0
    for mine, ((method, target, version, headers), body) in zip(ours, theirs):
        assert mine[:3] == (method, target, version)
        assert without_framing(mine[3]) == without_framing(headers)
        assert mine[-1] == body
        h11_cl = [int(v) for n, v in headers if n == b"content-length"]
        assert mine[4] == (h11_cl[0] if h11_cl else None)
        assert mine[5] == ((b"transfer-encoding", b"chunked") in headers)


MALFORMED = [
    b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", b"GET / HTTPS/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x0bb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nNo-Colon\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\nab",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", b" GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n",
]


def h11_rejects(data: bytes) -> bool:
    try:
        h11_parse(data)
    except h11.RemoteProtocolError:
        return True
    return False


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_differential_malformed(data):
    assert h11_rejects(data)
    with pytest.raises(RequestError):
        parse(data)


# What h11 0.16 accepts and this reader refuses on purpose (see the module docstring).
STRICTER = [
    b"GET / HTTP/1.1\nHost: a\n\n",                                         # bare LF
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",                     # obs-fold
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",                      # control byte in a value
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",                                   # 505
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;\x01\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0000000000000000003\r\n\r\nabc",  # 19 digits
]


@pytest.mark.parametrize("data", STRICTER, ids=range(len(STRICTER)))
def test_deliberately_stricter_than_h11(data):
    assert h11_parse(data)
    with pytest.raises(RequestError):
        parse(data)


def test_deliberately_more_lenient_than_h11():
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line before a request line; h11 refuses.
    data = b"\r\n" + get()
    assert h11_rejects(data)
    assert len(parse(data)) == 1
    # HTTP/1.0 keep-alive is honoured; h11 always closes an HTTP/1.0 connection.
    assert one(get(extra=b"Connection: keep-alive\r\n", version=b"1.0"))[6] is True


def _benchmark(number: int = 20000) -> None:
    """feed + next_head + read_body (this reader) vs h11's receive_data + next_event x3, same run:
    .venv/bin/python -m tests.proxy.parse.test_request"""
    import timeit

    def ours() -> None:
        reader = RequestReader()
        reader.feed(SDK_REQUEST)
        reader.next_head()
        reader.read_body()
        reader.read_body()

    def theirs() -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(SDK_REQUEST)
        conn.next_event()
        conn.next_event()
        conn.next_event()

    for _ in range(3):
        t_ours = min(timeit.repeat(ours, number=number, repeat=5)) / number * 1e6
        t_h11 = min(timeit.repeat(theirs, number=number, repeat=5)) / number * 1e6
        print(f"{len(SDK_HEAD)} B head (16 fields) + {len(BODY)} B body: http1_server {t_ours:.2f} us, "
              f"h11 {t_h11:.2f} us ({t_h11 / t_ours:.1f}x)")


if __name__ == "__main__":
    _benchmark()
