"""Differential fuzz: proxy/parse/request.py (our client-side request reader) against h11 0.16.

Byte streams are built from HTTP/1.1 grammar pieces with hostile variants (methods, targets incl.
absolute-form, header names and values with control bytes and obs-text, CR/LF variants, obs-fold,
duplicate and comma-listed Content-Length, Content-Length with Transfer-Encoding, Transfer-Encoding
variants, chunk sizes with leading zeros and huge hex, chunk extensions, trailers, bodies), sometimes
mutated byte-wise, and fed to both parsers in the same random pieces, then EOF. The contract:

- h11 refuses the message -> ours refuses it too (we are never more lenient than h11);
- h11 accepts -> ours accepts with the same method, target, version, headers (names lowercased; h11's
  own normalisation of Content-Length / Transfer-Encoding applied to ours), framing (chunked or the
  Content-Length), body bytes, keep-alive and 100-continue -- or ours refuses, and then one of the
  documented strictness rules below holds for the input, with its status;
- and when such a rule holds, ours does refuse (no silent leniency).

Documented deliberate differences (proxy/parse/request.py's docstring), each asserted:
strictness (h11 accepts, ours refuses): bare LF line ends, obs-fold, control bytes other than HTAB in
the head (h11 allows all but NUL/CR/LF/VT/FF in values), HTTP versions other than 1.0/1.1 (505),
Transfer-Encoding with Content-Length, Transfer-Encoding on HTTP/1.0, Content-Length over 18 digits,
chunk sizes over 16 hex digits or 2**63, control bytes (incl. a bare CR) in chunk extensions, chunk
size lines over 1 KiB, bare LF / obs-fold / control bytes in trailers, trailers over the limit (431),
a head over max_head_bytes even when it arrived whole (431), more than max_headers fields (431).
leniency (ours accepts, h11 refuses): empty lines (CRLF) before the request line are skipped (RFC 9112
2.2; h11: "no request line received") -- asserted by checking h11 refuses the original stream and
comparing ours against h11 on the stream without them; HTTP/1.0 `Connection: keep-alive` is honoured
(h11 always closes 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import pytest
from h11._headers import get_comma_header, normalize_and_validate
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.parse.request import RequestError, RequestReader
from tests.fuzz._common import (
    SHARED,
    Picker,
    chunked_body,
    chunked_reasons,
    content_length,
    fuzz_settings,
    head_end,
    head_lines,
    head_reasons,
    mutated,
    split,
    tokens,
    vchars,
)

MAX_HEAD = 32768
MAX_HEADERS = 100


# -- running both parsers -------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str                     # "ok", "refused", "closed" (EOF before any request), "incomplete"
    stage: str = ""               # "head" or "body" (refusals)
    status: int | None = None
    message: str = ""
    head: object = None           # h11.Request or RequestHead
    body: bytes = b""
    extra: dict = field(default_factory=dict)


def run_h11(chunks: list[bytes]) -> Outcome:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    head = None
    body = []
    expect = False
    try:
        for data in [*chunks, b""]:
            conn.receive_data(data)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.Request):
                    head = event
                    expect = conn.they_are_waiting_for_100_continue
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return Outcome("ok", head=head, body=b"".join(body), extra={"expect": expect})
                elif isinstance(event, h11.ConnectionClosed):
                    return Outcome("closed")
                else:
                    raise TypeError(f"unexpected h11 event {event!r}")
    except h11.RemoteProtocolError as exc:
        return Outcome("refused", "body" if head is not None else "head", exc.error_status_hint, str(exc), head)
    return Outcome("incomplete", head=head)


def run_ours(chunks: list[bytes]) -> Outcome:
    reader = RequestReader(max_head_bytes=MAX_HEAD, max_headers=MAX_HEADERS)
    head = None
    body = []
    try:
        for data in [*chunks, b""]:
            reader.feed(data)
            if head is None:
                head = reader.next_head()
                if head is None:
                    if reader.closed:
                        return Outcome("closed")
                    continue
            while True:
                got = reader.read_body()
                if got is None:
                    break
                if got == b"":
                    assert reader.body_complete
                    return Outcome("ok", head=head, body=b"".join(body))
                body.append(got)
    except RequestError as exc:
        assert exc.status in (400, 431, 501, 505), exc
        return Outcome("refused", "body" if head is not None else "head", exc.status, exc.message, head)
    return Outcome("incomplete", head=head)


def strictness(stream: bytes, skipped: int, h: Outcome) -> dict[str, set[int]]:
    """The documented strictness rules of ours that `stream` (h11 accepted its head) breaks."""
    end = head_end(stream)
    assert end is not None
    region = stream[:end]
    reasons = head_reasons(region)
    req = h.head
    if req.http_version not in (b"1.0", b"1.1"):
        reasons["HTTP version other than 1.0/1.1"] = {505}
    te = any(name == b"transfer-encoding" for name, _ in req.headers)
    cl = [value for name, value in req.headers if name == b"content-length"]
    if te and cl:
        reasons["Transfer-Encoding with Content-Length"] = {400}
    if te and req.http_version == b"1.0":
        reasons["Transfer-Encoding on HTTP/1.0"] = {400}
    if cl and len(cl[0]) > 18:
        reasons["Content-Length over 18 digits"] = {400}
    if len(region) + skipped > MAX_HEAD:
        reasons["head over max_head_bytes"] = {431}
    if len(head_lines(region)) - 1 > MAX_HEADERS:
        reasons["more than max_headers fields"] = {431}
    if te and h.kind == "ok":
        reasons.update(chunked_reasons(stream[end:], MAX_HEAD))
    return reasons


def normalised(headers) -> list[tuple[bytes, bytes]]:
    return list(normalize_and_validate(list(headers), _parsed=True))


def check(stream: bytes, chunks: list[bytes]) -> str:
    ours = run_ours(chunks)
    assert ours.kind != "incomplete", ours

    # Leniency: leading CRLFs are skipped by ours; h11 refuses them. Compare against h11 without them.
    skipped = 0
    while stream.startswith(b"\r\n", skipped):
        skipped += 2
    if skipped:
        assert run_h11(chunks).kind == "refused", "h11 now accepts empty lines before a request line"
        stream = stream[skipped:]
        chunks = [c for c in split_at(stream, chunk_bounds(chunks, skipped)) if c]
    ref = run_h11(chunks)
    assert ref.kind != "incomplete", ref
    _check(stream, ref, ours, skipped)
    return f"h11 {ref.kind} {ref.stage}".strip() + f" / ours {ours.kind} {ours.stage}".rstrip()


def _check(stream: bytes, ref: Outcome, ours: Outcome, skipped: int) -> None:
    if ref.kind == "closed":
        assert ours.kind == "closed", (ours, ref)
        return
    if ref.kind == "refused" and ref.stage == "head":
        assert ours.kind == "refused" and ours.stage == "head", (
            f"h11 refused the head ({ref.message}) but ours accepted it: {ours}")
        return
    if ref.kind == "refused":  # h11 accepted the head, refused the body
        assert ours.kind == "refused", f"h11 refused the body ({ref.message}) but ours accepted it: {ours}"
        return
    reasons = strictness(stream, skipped, ref)
    if ours.kind == "refused":
        assert reasons, f"h11 accepted, ours refused ({ours.status} {ours.message}) for no documented reason"
        allowed = set().union(*reasons.values())
        assert ours.status in allowed, (ours.status, ours.message, reasons)
        return
    assert not reasons, f"ours accepted input its documented strictness refuses: {sorted(reasons)}"
    assert ours.kind == "ok", (ours, ref)
    mine, theirs = ours.head, ref.head
    assert mine.method == theirs.method
    assert mine.target == theirs.target
    assert mine.http_version == theirs.http_version
    assert all(name == name.lower() for name, _ in mine.headers)
    assert normalised(mine.headers) == list(theirs.headers)
    te = get_comma_header(theirs.headers, b"transfer-encoding")
    cl = get_comma_header(theirs.headers, b"content-length")
    assert mine.chunked == bool(te)
    if not te:
        assert mine.content_length == (int(cl[0]) if cl else None)
    assert ours.body == ref.body
    tokens = get_comma_header(theirs.headers, b"connection")
    if mine.http_version == b"1.1":
        assert mine.keep_alive == (b"close" not in tokens)
    else:  # leniency: HTTP/1.0 keep-alive is honoured
        assert mine.keep_alive == (b"keep-alive" in tokens and b"close" not in tokens)
    assert mine.expect_continue == ref.extra["expect"]


def chunk_bounds(chunks: list[bytes], shift: int) -> list[int]:
    bounds, pos = [], 0
    for c in chunks:
        pos += len(c)
        bounds.append(pos - shift)
    return bounds


def split_at(data: bytes, bounds: list[int]) -> list[bytes]:
    out, prev = [], 0
    for b in bounds:
        b = max(0, min(len(data), b))
        out.append(data[prev:b])
        prev = max(prev, b)
    out.append(data[prev:])
    return out


# -- generating requests (shared pieces: tests/fuzz/_common.py) ----------------------------------------

P = {**SHARED,  # name: (valid, hostile)
    "method": (st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"M-SEARCH", b"get"]), tokens),
               st.sampled_from([b"G@T", b"", b"GET\x00", b"P\xc3\xb6ST", b"GE T", b"(GET)", b"GET\t"])),
    "target": (st.one_of(st.sampled_from([b"/", b"/v1/chat/completions", b"/v1/models?x=1&y=%20", b"*",
                                          b"http://example.com/v1/completions", b"https://u:p@h:1/x#f",
                                          b"example.com:443", b"//", b"/" + b"a" * 300]),
                         vchars.map(lambda v: b"/" + v)),
               st.sampled_from([b"/caf\xc3\xa9", b"/\x7f", b"/a\x00b", b"", b"/a b", b"/\x01", b"/\xff"])),
    "version": (st.sampled_from([b"HTTP/1.1"] * 3 + [b"HTTP/1.0"]),
                st.sampled_from([b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/3.1", b"http/1.1", b"HTTP/11",
                                 b"HTTP/1.10", b"HTTP/1.1 ", b"HTTP/1", b"HTTP/a.b", b"HTTP/1.1\x00", b""])),
    "expect": (st.sampled_from([b"100-continue", b"100-Continue", b"100-continue, x"]),
               st.sampled_from([b"x", b"", b"200-ok", b"100-continue\x01"])),
    "host": (st.sampled_from([b"example.com", b"a:8080", b"[::1]:1", b"x"]),
             st.sampled_from([b"", b"a b", b"a\x00", b"h\xff"])),
    "lead": (st.just(b""), st.sampled_from([b"\r\n", b"\r\n\r\n", b"\n", b" ", b"\x16\x03\x01", b"\r"])),
    "tail": (st.sampled_from([b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]), st.sampled_from([b"\r\n", b"garbage", b"\n"])),
}


@st.composite
def request_streams(draw) -> bytes:
    pick = Picker(draw, P)
    line = pick("method") + pick("sep") + pick("target") + pick("sep") + pick("version")
    headers: list[bytes] = []
    hosts = 1 if not pick.chance(12) else draw(st.sampled_from([0, 2]))
    for _ in range(hosts):
        headers.append(draw(st.sampled_from([b"Host", b"host", b"HOST"])) + b": " + pick("host"))
    body = b""
    mode = draw(st.sampled_from(["none", "cl", "cl", "cl", "cl_twice", "te", "te", "te", "te_twice", "te_cl"]))
    payload = draw(st.binary(max_size=40))
    if mode in ("cl", "cl_twice", "te_cl"):
        headers.append(b"Content-Length: " + content_length(pick("cl"), len(payload)))
        if mode == "cl_twice":
            headers.append(b"content-length: " + content_length(pick("cl"), len(payload)))
        body = payload
    if mode in ("te", "te_twice", "te_cl"):
        headers.append(b"Transfer-Encoding: " + pick("te"))
        if mode == "te_twice":
            headers.append(b"transfer-encoding: " + pick("te"))
        body = chunked_body(draw, pick)
    for _ in range(draw(st.integers(0, 5))):
        headers.append(pick("name") + pick("colon") + pick("value"))
    if pick.chance(5):
        headers.append(b"Connection: " + pick("connection"))
    if pick.chance(7):
        headers.append(b"Expect: " + pick("expect"))
    if pick.chance(40):  # a long line straddling max_head_bytes
        headers.append(b"X-Long: " + b"a" * draw(st.integers(MAX_HEAD - 300, MAX_HEAD + 100)))
    if pick.chance(40):  # around max_headers
        headers += [b"X-%d: v" % i for i in range(draw(st.integers(MAX_HEADERS - 5, MAX_HEADERS + 5)))]
    if len(headers) < 20:
        headers = draw(st.permutations(headers))
    if headers and pick.chance(15):  # obs-fold after some line
        i = draw(st.integers(0, len(headers) - 1))
        headers.insert(i + 1, draw(st.sampled_from([b" folded", b"\tfolded", b"  ", b" Content-Length: 1"])))
    head = line + pick("eol") + b"".join(h + pick("eol") for h in headers) + pick("head_end")
    return draw(mutated(pick("lead") + head + body + pick("tail"), probability=0.15))


@given(st.data())
@fuzz_settings(300)
def test_request_reader_agrees_with_h11(data):
    stream = data.draw(request_streams(), label="stream")
    chunks = data.draw(split(stream), label="chunks")
    event(check(stream, chunks))


# -- each documented difference, asserted on one input ---------------------------------------------------

OK_HEAD = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
STRICT = [
    (b"GET / HTTP/1.1\nHost: a\n\n", 400, "bare LF line ends"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400, "obs-fold"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400, "control byte in a value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n", 400, "DEL in a value"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "HTTP version other than 1.0/1.1"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     "Transfer-Encoding with Content-Length"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "Transfer-Encoding on HTTP/1.0"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0000000000000000001\r\n\r\nx", 400,
     "Content-Length over 18 digits"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000001\r\nx\r\n0\r\n\r\n", 400,
     "chunk size over 16 hex digits"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;a\x01\r\nx\r\n0\r\n\r\n", 400,
     "control byte in a chunk extension"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\n\r\n", 400,
     "bare LF in trailers"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\r\n b\r\n\r\n", 400,
     "obs-fold in trailers"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431, "head over max_head_bytes"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: v\r\n" * MAX_HEADERS + b"\r\n", 431, "more than max_headers"),
]


@pytest.mark.parametrize("stream, status, what", STRICT, ids=[s[2] for s in STRICT])
def test_documented_strictness(stream, status, what):
    assert run_h11([stream]).kind == "ok", f"h11 refuses it: drop '{what}' from the strictness list"
    ours = run_ours([stream])
    assert (ours.kind, ours.status) == ("refused", status), (what, ours)
    check(stream, [stream])


def test_documented_leniency_empty_lines_before_the_request_line():
    stream = b"\r\n\r\n" + OK_HEAD
    assert run_h11([stream]).kind == "refused"
    ours = run_ours([stream])
    assert ours.kind == "ok" and ours.head.target == b"/"
    check(stream, [stream])


def test_documented_leniency_http10_keep_alive():
    stream = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    assert run_h11([stream]).kind == "ok"
    assert run_ours([stream]).head.keep_alive is True
    check(stream, [stream])


# -- inputs h11 refuses: ours must refuse them too (the fuzzer's findings are kept here as fixed cases) ---

CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
REFUSED_BY_H11 = [
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", "TE chunked, gzip"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "TE gzip, chunked"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     "two TE fields"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", "conflicting CL"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 01\r\n\r\nx", "CL list 1, 01"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nx", "CL of 5000 digits"),
    (b"GET / HTTP/1.1\r\n\r\n", "no Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "two Hosts"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n", "space before the colon"),
    (b"GET / HTTP/1.1\r\n folded\r\nHost: a\r\n\r\n", "obs-fold first"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", "NUL in a value"),
    (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", "bad method"),
    (CHUNKED_HEAD + b"1\r\nxx\r\n0\r\n\r\n", "chunk data longer than its size"),
    (CHUNKED_HEAD + b"5 ;x\r\nhello\r\n0\r\n\r\n", "BWS before a chunk extension"),
    # Found by the fuzzer: h11 validates framing fields in trailers (EndOfMessage headers go through
    # normalize_and_validate); ours drops trailers after a field-line check only, so accepts these.
    (CHUNKED_HEAD + b"0\r\nContent-Length: x\r\n\r\n", "trailer Content-Length: x"),
    (CHUNKED_HEAD + b"0\r\nContent-Length: 1, 2\r\n\r\n", "trailer conflicting Content-Length"),
    (CHUNKED_HEAD + b"0\r\nTransfer-Encoding: gzip\r\n\r\n", "trailer Transfer-Encoding: gzip"),
    (CHUNKED_HEAD + b"0\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
     "two trailer Transfer-Encoding fields"),
]


@pytest.mark.parametrize("stream, what", REFUSED_BY_H11, ids=[s[1] for s in REFUSED_BY_H11])
def test_what_h11_refuses_ours_refuses(stream, what):
    assert run_h11([stream]).kind == "refused", what
    assert run_ours([stream]).kind == "refused", what
    check(stream, [stream])
