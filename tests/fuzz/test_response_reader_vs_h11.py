"""Differential fuzz: proxy/parse/response.py (our upstream response reader) against h11 0.16 in the client
role (a `GET` sent first, so the response is read as the answer to it).

Byte streams are built from HTTP/1.1 response grammar pieces with hostile variants: status lines (other
versions, 2- and 4-digit and 0xx codes, 101, reasons with control bytes), 1xx interim responses, header
names and values with control bytes and obs-text, bare LF and obs-fold (also hiding a second
Content-Length or a Transfer-Encoding), duplicate and comma-listed Content-Length, 5,000-digit
Content-Length, Transfer-Encoding variants (`gzip, chunked`, `chunked, gzip`, two fields), chunk sizes
with leading zeros and huge hex, extensions, trailers, 204/304/1xx without a body, close-delimited
bodies -- fed in random pieces, then EOF. The strict contract (the upstream is trusted only to speak
HTTP correctly; anything doubtful must become a 502, never a confused connection):

- h11 refuses -> ours refuses (raises `ResponseError`, nothing else);
- h11 accepts -> ours accepts with the same status, reason, version, headers (names lowercased; h11's
  normalisation of Content-Length / Transfer-Encoding applied to ours), framing and body bytes, and
  never keeps alive a connection h11 would close (HTTP/1.0 `keep-alive` aside, documented); or ours
  refuses and one of the strictness rules below holds;
- MUST refuse even though h11 accepts (proxy/parse/response.py's documented rules, the request side's):
  bare LF line ends (h11 splits lines on LF, so a bare LF can hide a field from a CRLF-only reader) and
  obs-fold, in the head and in trailers; control bytes but HTAB in the head or trailers; HTTP versions
  other than 1.0/1.1; status codes outside 100-599; Transfer-Encoding with Content-Length or on
  HTTP/1.0; Content-Length over 18 digits; chunk sizes over 16 hex digits or 2**63, control bytes in
  chunk extensions, chunk lines over 1 KiB; a head over 64 KiB;
- MAY refuse: a head or trailers within a few bytes of their 64 KiB limit (the exact edge depends on
  how the bytes arrived).
The reader never sends HEAD (proxy/parse/response.py), so HEAD responses are not generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import pytest
from h11._headers import get_comma_header, normalize_and_validate
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.parse.response import MAX_HEAD, ResponseError, ResponseReader
from tests.fuzz._common import (
    SHARED,
    Picker,
    chunked_body,
    chunked_reasons,
    content_length,
    fuzz_settings,
    head_end,
    head_reasons,
    mutated,
    split,
    vchars,
)


@dataclass
class Outcome:
    kind: str                  # "ok", "refused", "incomplete"
    stage: str = ""
    message: str = ""
    head: object = None        # h11.Response or ResponseHead
    body: bytes = b""
    extra: dict = field(default_factory=dict)


def run_h11(chunks: list[bytes]) -> Outcome:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method="GET", target="/v1/models", headers=[("Host", "upstream")]))
    conn.send(h11.EndOfMessage())
    head = None
    body = []
    infos = []
    try:
        for data in [*chunks, b""]:
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    break
                if isinstance(ev, h11.InformationalResponse):
                    infos.append(ev.status_code)
                elif isinstance(ev, h11.Response):
                    head = ev
                elif isinstance(ev, h11.Data):
                    body.append(bytes(ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    return Outcome("ok", head=head, body=b"".join(body),
                                   extra={"infos": infos, "closed_by_eof": conn.their_state is not h11.DONE})
                else:
                    raise TypeError(f"unexpected h11 event {ev!r}")
    except h11.RemoteProtocolError as exc:
        return Outcome("refused", "body" if head is not None else "head", str(exc), head)
    return Outcome("incomplete", head=head)


def run_ours(chunks: list[bytes]) -> Outcome:
    reader = ResponseReader()
    head = None
    body = []
    try:
        for data in [*chunks, b""]:
            reader.feed(data)
            if head is None:
                head = reader.next_head()
                if head is None:
                    continue
            while True:
                got = reader.read_body()
                if got is None:
                    break
                if got == b"":
                    assert reader.complete
                    return Outcome("ok", head=head, body=b"".join(body))
                body.append(got)
    except ResponseError as exc:  # any other exception is a bug: it fails the test
        return Outcome("refused", "body" if head is not None else "head", str(exc), head)
    return Outcome("incomplete", head=head)


def strictness(stream: bytes, ref: Outcome) -> dict[str, bool]:
    """The strictness rules a stream h11 accepted breaks: name -> True when ours MUST refuse it (False:
    ours may refuse it -- a limit whose exact edge depends on how the bytes arrived)."""
    reasons: dict[str, bool] = {}
    pos = 0
    for _ in range(len(ref.extra["infos"]) + 1):  # every head: the interim ones and the final one
        end = head_end(stream, pos)
        reasons.update(dict.fromkeys(head_reasons(stream[pos:end]), True))
        if end - pos > MAX_HEAD + 1:
            reasons["head over 64 KiB"] = end - pos > MAX_HEAD + 4
        pos = end
    resp = ref.head
    if resp.http_version not in (b"1.0", b"1.1"):
        reasons["HTTP version other than 1.0/1.1"] = True
    if not 100 <= resp.status_code <= 599:
        reasons["status outside 100-599"] = True
    te = any(name == b"transfer-encoding" for name, _ in resp.headers)
    cl = [value for name, value in resp.headers if name == b"content-length"]
    if te and cl:
        reasons["Transfer-Encoding with Content-Length"] = True
    if te and resp.http_version == b"1.0":
        reasons["Transfer-Encoding on HTTP/1.0"] = True
    if cl and len(cl[0]) > 18:
        reasons["Content-Length over 18 digits"] = True
    if te and resp.status_code not in (204, 304):
        for name, statuses in chunked_reasons(stream[pos:], MAX_HEAD).items():
            reasons[name] = 431 not in statuses  # the trailer limit's edge: may
    return reasons


def check(stream: bytes, chunks: list[bytes]) -> str:
    ours = run_ours(chunks)
    ref = run_h11(chunks)
    assert ours.kind != "incomplete", ours
    assert ref.kind != "incomplete", ref
    label = f"h11 {ref.kind} {ref.stage}".strip() + f" / ours {ours.kind} {ours.stage}".rstrip()
    if ref.kind == "refused":
        assert ours.kind == "refused", f"h11 refused ({ref.message}) but ours accepted: {_show(ours)}"
        return label
    reasons = strictness(stream, ref)
    must = sorted(name for name, required in reasons.items() if required)
    if ours.kind == "refused":
        assert reasons, f"h11 accepted, ours refused ({ours.message}) for no documented reason"
        return label
    assert not must, f"ours accepted what it must refuse: {must}; got {_show(ours)}"
    mine, theirs = ours.head, ref.head
    assert mine.status == theirs.status_code
    assert mine.reason == theirs.reason
    assert mine.http_version == theirs.http_version
    assert all(name == name.lower() for name, _ in mine.headers)
    assert list(normalize_and_validate(list(mine.headers), _parsed=True)) == list(theirs.headers)
    no_body = theirs.status_code in (204, 304)
    te = get_comma_header(theirs.headers, b"transfer-encoding")
    cl = get_comma_header(theirs.headers, b"content-length")
    if no_body:
        assert (mine.chunked, mine.content_length) == (False, 0)
    else:
        assert mine.chunked == bool(te)
        assert mine.content_length == (None if te else int(cl[0]) if cl else None)
    assert ours.body == ref.body
    tokens = get_comma_header(theirs.headers, b"connection")
    close_delimited = not no_body and not te and not cl
    if mine.keep_alive:  # ours may close more often than h11, never less
        assert not close_delimited, "keep-alive on a close-delimited body"
        assert b"close" not in tokens, f"keep-alive despite Connection: close ({tokens})"
        if mine.http_version == b"1.0":
            assert b"keep-alive" in tokens  # documented: HTTP/1.0 keep-alive is honoured
    return label


def _show(o: Outcome) -> str:
    h = o.head
    if h is None:
        return repr(o)
    return (f"{o.kind}: {h.status} {h.reason!r} HTTP/{h.http_version.decode()} headers={h.headers} "
            f"content_length={h.content_length} chunked={h.chunked} keep_alive={h.keep_alive} body={o.body!r}")


# -- generating responses (shared pieces: tests/fuzz/_common.py) ------------------------------------------

P = {**SHARED,  # name: (valid, hostile)
    "version": (st.sampled_from([b"HTTP/1.1"] * 3 + [b"HTTP/1.0"]),
                st.sampled_from([b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"http/1.1", b"HTTP/11", b"HTTP/1", b"",
                                 b"HTTP/1.1\x00", b"ICY"])),
    "status": (st.sampled_from([b"200"] * 6 + [b"201", b"204", b"304", b"400", b"404", b"429", b"500", b"503", b"299"]),
               st.sampled_from([b"099", b"000", b"1000", b"20", b"2OO", b"101", b"100", b"199", b"-20", b" 200",
                                b"\xd9\xa2\xd9\xa0\xd9\xa0"])),
    "reason": (st.one_of(st.sampled_from([b" OK", b" Not Found", b"", b" ", b" Caf\xc3\xa9", b" a\tb", b" OK  "]),
                         vchars.map(lambda v: b" " + v)),
               st.sampled_from([b" O\x00K", b" O\x01K", b" a\x7f", b" \x0b", b" a\rb", b"\tOK", b" \x1b[0m"])),
    "interim": (st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]),
                st.sampled_from([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", b"HTTP/1.1 199 X\r\n\r\n",
                                 b"HTTP/1.1 100 Continue\n\n", b"HTTP/1.1 100\r\nX: a\r\n b\r\n\r\n"])),
    "lead": (st.just(b""), st.sampled_from([b"\r\n", b"\n", b" ", b"\x00"])),
    "tail": (st.sampled_from([b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]),
             st.sampled_from([b"\r\n", b"garbage", b"\n"])),
}


@st.composite
def response_streams(draw) -> bytes:
    pick = Picker(draw, P)
    interim = b"".join(pick("interim") for _ in range(draw(st.sampled_from([0] * 6 + [1, 2]))))
    status_line = pick("version") + pick("sep") + pick("status") + pick("reason")
    headers: list[bytes] = []
    mode = draw(st.sampled_from(["close", "cl", "cl", "cl", "cl_twice", "te", "te", "te", "te_twice", "te_cl"]))
    payload = draw(st.binary(max_size=40))
    body = payload if mode == "close" else b""
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
    headers.append(b"Content-Type: " + draw(st.sampled_from([b"application/json", b"text/event-stream"])))
    for _ in range(draw(st.integers(0, 4))):
        headers.append(pick("name") + pick("colon") + pick("value"))
    for _ in range(draw(st.sampled_from([0] * 4 + [1, 2]))):
        headers.append(b"Connection: " + pick("connection"))
    if pick.chance(40):  # a long line straddling MAX_HEAD
        headers.append(b"X-Long: " + b"a" * draw(st.integers(MAX_HEAD - 300, MAX_HEAD + 100)))
    headers = draw(st.permutations(headers))
    if pick.chance(12):  # obs-fold, possibly hiding a framing field
        i = draw(st.integers(0, len(headers) - 1))
        headers.insert(i + 1, draw(st.sampled_from([b" folded", b"\tfolded", b" Content-Length: 1",
                                                    b"\tTransfer-Encoding: chunked"])))
    head = status_line + pick("eol") + b"".join(h + pick("eol") for h in headers) + pick("head_end")
    return draw(mutated(pick("lead") + interim + head + body + pick("tail"), probability=0.15))


@given(st.data())
@fuzz_settings(300)
def test_response_reader_agrees_with_h11(data):
    stream = data.draw(response_streams(), label="stream")
    chunks = data.draw(split(stream), label="chunks")
    event(check(stream, chunks))


# -- fixed cases: the strict contract on the inputs the brief names ---------------------------------------

OK_CL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
MUST_REFUSE = [
    # bare LF: h11 reads two fields where a CRLF-only reader reads one ("a\nContent-Length: 5")
    (b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 5\r\n\r\nhello", "bare LF hiding a Content-Length"),
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi", "bare LF line ends"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX: a\n\r\n", "bare LF in trailers"),
    # obs-fold: h11 unfolds it into the previous value
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: a\r\n b\r\n\r\nhi", "obs-fold"),
    (b"HTTP/1.1 200 OK\r\nX: a\r\n Content-Length: 5\r\n\r\nhello", "obs-fold hiding a Content-Length"),
]
REFUSED_BY_H11 = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nx", "Content-Length of 5000 digits"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 20 + b"\r\n\r\nx", "Content-Length of 21 digits"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "TE gzip, chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", "TE chunked, gzip"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", "TE gzip"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "two TE fields"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 05\r\nContent-Length: 5\r\n\r\nhello", "CL 05 and 5"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi", "conflicting CL"),
    (b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nhi", "NUL in the reason"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nhi", "NUL in a value"),
    (b"HTTP/1.1 200 OK\r\nX@Y: a\r\nContent-Length: 2\r\n\r\nhi", "non-token field name"),
    (b"HTTP/1.1 099 X\r\n\r\n", "status 099"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + OK_CL, "101 without an upgrade asked"),
    (b"HTTP/1.1 200 OK\r\n folded\r\nContent-Length: 2\r\n\r\nhi", "obs-fold first"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: x\r\n\r\n",
     "trailer Content-Length: x"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi", "EOF mid-body"),
    (b"", "EOF before a head"),
]


@pytest.mark.parametrize("stream, what", MUST_REFUSE, ids=[s[1] for s in MUST_REFUSE])
def test_must_refuse_though_h11_accepts(stream, what):
    assert run_h11([stream]).kind == "ok", what
    assert run_ours([stream]).kind == "refused", what
    check(stream, [stream])


@pytest.mark.parametrize("stream, what", REFUSED_BY_H11, ids=[s[1] for s in REFUSED_BY_H11])
def test_what_h11_refuses_ours_refuses(stream, what):
    assert run_h11([stream]).kind == "refused", what
    assert run_ours([stream]).kind == "refused", what


ACCEPTED = [
    (OK_CL, "Content-Length"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK_CL, "1xx first"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", "204 without a body"),
    (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", "304 without a body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: v\r\n\r\n", "chunked"),
    (b"HTTP/1.0 200 OK\r\n\r\nuntil close", "close-delimited"),
    (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", "no reason phrase"),
]


@pytest.mark.parametrize("stream, what", ACCEPTED, ids=[s[1] for s in ACCEPTED])
def test_accepted_like_h11(stream, what):
    assert run_h11([stream]).kind == "ok", what
    assert run_ours([stream]).kind == "ok", what
    check(stream, [stream])
