"""A strict, sans-I/O HTTP/1.1 request reader for the client side, on a byte buffer.

Strategy: h11 was the largest single CPU cost per request (its event objects, per-line regexes and
per-event state machine). Like the upstream reader (proxy/parse/response.py) this side parses by
hand -- but clients are untrusted, so it is strict first and fast second; anything doubtful is a
`RequestError` whose `status` is the answer to send (then close the connection):
- Heads are found with one `find(b"\\r\\n\\r\\n")` per call, resumed where the last call stopped
  (bytes fed one at a time stay O(n)), and checked as a whole: one `translate` proves the head holds
  no control byte but HTAB and CRLF pairs, one regex proves every field line starts `token:`; the
  per-line loop then only splits, lowercases and strips. Bodies are sliced off the front of the
  bytearray (`del buf[:n]` is O(1) there). No I/O, no timeouts: the caller owns both.
- Request line `METHOD SP target SP HTTP/1.x`: method a token, target 1*VCHAR (like h11), version
  exactly HTTP/1.1 or HTTP/1.0 (other HTTP/d.d -> 505, anything else -> 400). Empty lines before
  it are skipped (RFC 9112 2.2), counted against `max_head_bytes`.
- Line endings are CRLF only. A bare LF (or CR) anywhere in a head, chunk line or trailer is 400
  -- and an incomplete head is scanned as it arrives, so a bare-LF client, a TLS handshake (first
  byte not a token char, as h11's early check) or a bad request line is refused at once, not at the
  head timeout.
- Field lines `name: value`: name a token with no whitespace before the colon, value stripped of
  OWS; no obs-fold (400, RFC 9112 5.2); no control bytes but HTAB in values (obs-text allowed).
  Head > max_head_bytes (including an incomplete head that already is) or > max_headers -> 431.
- Framing (RFC 9112 6): Transfer-Encoding with Content-Length -> 400; Transfer-Encoding on
  HTTP/1.0 -> 400; Transfer-Encoding other than exactly one `chunked` -> 501 (as h11);
  Content-Length 1*DIGIT (at most 18), repeated or comma-listed values must be identical strings
  (as h11); neither -> no body. HTTP/1.1 needs exactly one Host, HTTP/1.0 at most one (as h11).
- keep_alive: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`
  (tokens, case-insensitive). expect_continue: an HTTP/1.1 `Expect` listing `100-continue`
  (case-insensitive, as h11; HTTP/1.0 expectations are ignored, RFC 9110 10.1.1).
- Chunked bodies: proxy/parse/chunked.py (shared with the upstream reader); trailers bounded by
  max_head_bytes (431).
Deliberate differences from h11 (0.16), all refusals of what h11 accepts except the first two:
empty lines before a request line are skipped (h11: 400 "no request line received"); HTTP/1.0
keep-alive is honoured (h11 always closes 1.0); bare LF line endings (h11 accepts), obs-fold (h11
unfolds), control bytes other than HTAB in values (h11 allows all but NUL/VT/FF), non-HTAB
controls in chunk extensions, HTTP versions other than 1.0/1.1 (h11 accepts any d.d: 505 here),
Transfer-Encoding with Content-Length (h11: TE wins), Transfer-Encoding on HTTP/1.0 (h11 accepts),
Content-Length over 18 digits / chunk sizes over 16 hex digits (h11: 20), and a head that arrived
whole but is over the limit (h11 bounds only incomplete events).
"""

from __future__ import annotations

import re

from proxy.parse.chunked import ChunkedDecoder, ChunkError
from proxy.parse.fields import FieldError, split_fields

_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TCHAR_SET = frozenset(_TCHAR)
_VCHAR = bytes(range(0x21, 0x7F))
# A CRLF in a head not followed by `token:` -- obs-fold, no colon, whitespace before the colon.
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_FRAMING = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"expect"))

# reader states
_HEAD, _CL, _CHUNKED, _DONE = range(4)


class RequestError(Exception):
    """The client did not speak HTTP/1.1 correctly; answer `status` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.message!r})"


def target_path(target: bytes) -> bytes:
    """The path of a request target, without its query."""
    q = target.find(b"?")
    return target if q < 0 else target[:q]


def origin_form(target: bytes) -> bytes:
    """Absolute-form (`http://host:8080/v1/models?x`, which RFC 9112 3.2.2 says a server MUST accept)
    as origin-form (`/v1/models?x`; an empty path is `/`), so routing and the upstream (uvicorn takes the
    target as the path) see one shape. Anything else (`*`, authority-form) comes back as it is and
    routes nowhere. The dispatcher calls it only for a target that does not start with `/`."""
    low = target[:8].lower()
    skip = 7 if low.startswith(b"http://") else 8 if low.startswith(b"https://") else 0
    if not skip:
        return target
    slash = target.find(b"/", skip)
    query = target.find(b"?", skip)
    if query >= 0 and (slash < 0 or query < slash):
        return b"/" + target[query:]
    return b"/" if slash < 0 else target[slash:]


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


class RequestHead:
    __slots__ = ("chunked", "content_length", "expect_continue", "headers", "http_version", "keep_alive",
                 "method", "target")

    def __init__(self, method: bytes, target: bytes, http_version: bytes,
                 headers: list[tuple[bytes, bytes]], content_length: int | None, chunked: bool,
                 keep_alive: bool, expect_continue: bool) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue

    def __repr__(self) -> str:
        return (f"RequestHead({self.method!r} {self.target!r} HTTP/{self.http_version.decode()}, "
                f"{len(self.headers)} headers, content_length={self.content_length}, "
                f"chunked={self.chunked}, keep_alive={self.keep_alive})")


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise _bad("malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        version = b"1.1"
    elif version == b"HTTP/1.0":
        version = b"1.0"
    elif _HTTP_VERSION.fullmatch(version):
        raise RequestError(505, "HTTP version not supported")
    else:
        raise _bad("malformed request line")
    if not method or method.translate(None, _TCHAR):
        raise _bad("malformed method")
    if not target or target.translate(None, _VCHAR):
        raise _bad("malformed request target")
    return method, target, version


def _content_length(values: list[bytes]) -> int:
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= 18:
            return int(value)
    first = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit() or len(item) > 18:  # b"".isdigit() is False
                raise _bad("bad Content-Length")
            if first is None:
                first = item
            elif item != first:
                raise _bad("conflicting Content-Length")
    return int(first)


def _tokens(values: list[bytes]) -> list[bytes]:
    """The lowercased members of comma-separated list fields (values already stripped)."""
    if len(values) == 1 and b"," not in values[0]:
        return [values[0].lower()]
    return [t.strip(b" \t") for v in values for t in v.lower().split(b",")]


def _parse_head(block: bytes, max_headers: int) -> RequestHead:
    """Parse a complete head (without the final CRLFCRLF, at least one byte)."""
    lines = block.split(b"\r\n")
    method, target, version = _request_line(lines[0])  # first, as when a head comes in pieces
    n = len(lines) - 1
    if n > max_headers:
        raise RequestError(431, "too many header fields")
    try:
        headers, framing = split_fields(block, lines, _FRAMING, "request")
    except FieldError as exc:
        raise _bad(str(exc)) from None
    keep_alive = version == b"1.1"
    if framing is None:
        if keep_alive:
            raise _bad("missing Host header")
        return RequestHead(method, target, version, headers, None, False, False, False)
    hosts = 0
    cl = te = conn = expect = None
    for name, value in framing:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            cl = [value] if cl is None else cl + [value]
        elif name == b"transfer-encoding":
            te = [value] if te is None else te + [value]
        elif name == b"connection":
            conn = [value] if conn is None else conn + [value]
        else:
            expect = [value] if expect is None else expect + [value]
    if hosts != 1 and (hosts or keep_alive):
        raise _bad("missing Host header" if not hosts else "multiple Host headers")
    content_length = None
    chunked = False
    if te is not None:
        if cl is not None:
            raise _bad("both Transfer-Encoding and Content-Length")
        if version == b"1.0":
            raise _bad("Transfer-Encoding in an HTTP/1.0 request")
        if len(te) != 1 or te[0].lower() != b"chunked":
            raise RequestError(501, "only Transfer-Encoding: chunked is supported")
        chunked = True
    elif cl is not None:
        content_length = _content_length(cl)
    if conn is not None:
        tokens = _tokens(conn)
        if b"close" in tokens:
            keep_alive = False
        elif version == b"1.0":
            keep_alive = b"keep-alive" in tokens
    expect_continue = expect is not None and version == b"1.1" and b"100-continue" in _tokens(expect)
    return RequestHead(method, target, version, headers, content_length, chunked, keep_alive,
                       expect_continue)


class RequestReader:
    """Incremental reader of one request at a time on a (possibly pipelined) connection.

    feed() bytes (b"" = EOF); next_head() until a head; read_body() until b""; next_request().
    After a RequestError the connection is unusable: answer `status` and close."""

    __slots__ = ("_buf", "_chunked", "_eof", "_lf_scan", "_line_checked", "_remaining", "_scan", "_skipped", "_state",
                 "body_complete", "max_head_bytes", "max_headers")

    def __init__(self, max_head_bytes: int = 32768, max_headers: int = 100) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.body_complete = False
        self._buf = bytearray()
        self._state = _HEAD
        self._eof = False
        self._remaining = 0       # Content-Length left
        self._chunked: ChunkedDecoder | None = None
        self._scan = 0            # where the next search for a line/head end starts
        self._lf_scan = 0         # incomplete head: LFs before this offset are checked
        self._line_checked = False
        self._skipped = 0         # empty lines skipped before this request line (bytes)

    @property
    def closed(self) -> bool:
        """EOF seen and nothing left to parse."""
        return self._eof and not self._buf

    def has_partial(self) -> bool:
        """Bytes of a head not yet complete are buffered (waiting for a head, not idle)."""
        return self._state == _HEAD and len(self._buf) > 0

    def feed(self, data: bytes) -> None:
        if self._eof:
            if data:
                raise RuntimeError("data fed after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_request(self) -> None:
        """Ready for the next head; pipelined bytes already buffered are kept."""
        if not self.body_complete:
            raise RuntimeError("next_request() before the request body is complete")
        self.body_complete = False
        self._state = _HEAD
        self._scan = self._lf_scan = self._skipped = 0
        self._line_checked = False

    # -- head ------------------------------------------------------------------------------------
    def next_head(self) -> RequestHead | None:
        """The next request head, or None if more bytes are needed (or on a clean EOF: see
        `closed`). Raises RequestError."""
        if self._state != _HEAD:
            raise RuntimeError("next_head() before next_request()")
        buf = self._buf
        if buf.startswith(b"\r\n"):
            self._skip_empty_lines()
        room = self.max_head_bytes - self._skipped
        end = buf.find(b"\r\n\r\n", self._scan, room)
        if end < 0:
            self._incomplete_head(room)
            return None
        head = _parse_head(bytes(buf[:end]), self.max_headers)
        del buf[:end + 4]
        self._scan = self._lf_scan = self._skipped = 0
        self._line_checked = False
        if head.chunked:
            self._state = _CHUNKED
            self._chunked = ChunkedDecoder(self.max_head_bytes)
            self.body_complete = False
        elif head.content_length:
            self._state = _CL
            self._remaining = head.content_length
            self.body_complete = False
        else:
            self._state = _DONE
            self.body_complete = True
        return head

    def _skip_empty_lines(self) -> None:
        buf = self._buf
        n = 0
        most = self.max_head_bytes - self._skipped
        while n < most and buf.startswith(b"\r\n", n):
            n += 2
        del buf[:n]
        self._skipped += n
        self._scan = self._lf_scan = 0
        if self._skipped >= self.max_head_bytes:
            raise _bad("too many empty lines")

    def _incomplete_head(self, room: int) -> None:
        buf = self._buf
        size = len(buf)
        if size >= room:
            raise RequestError(431, "request head too large")
        if size:
            # Refuse what can never become a head now rather than at the head timeout.
            if buf[0] not in _TCHAR_SET and not (size == 1 and buf[0] == 13):
                raise _bad("malformed request line")
            i = buf.find(b"\n", self._lf_scan)
            while i >= 0:
                if buf[i - 1] != 13:
                    raise _bad("bare LF in request head")
                if not self._line_checked:
                    _request_line(bytes(buf[:i - 1]))
                    self._line_checked = True
                i = buf.find(b"\n", i + 1)
            self._lf_scan = size
            self._scan = max(0, size - 3)
        if self._eof and size:
            raise _bad("connection closed mid-head")

    # -- body ------------------------------------------------------------------------------------
    def read_body(self) -> bytes | None:
        """Body bytes available now (b"" once the body is complete; at once when there is none);
        None if more bytes are needed. Raises RequestError on bad framing or EOF mid-body."""
        state = self._state
        if state == _CL:
            buf = self._buf
            size = len(buf)
            if size:
                remaining = self._remaining
                if size <= remaining:
                    data = bytes(buf)
                    buf.clear()
                else:
                    data = bytes(buf[:remaining])
                    del buf[:remaining]
                    size = remaining
                self._remaining = remaining = remaining - size
                if not remaining:
                    self._state = _DONE
                    self.body_complete = True
                return data
            if self._eof:
                raise _bad("connection closed mid-body")
            return None
        if state == _DONE:
            return b""
        if state == _HEAD:
            raise RuntimeError("read_body() without a request head")
        try:
            data = self._chunked.read(self._buf, self._eof)
        except ChunkError as exc:
            raise RequestError(exc.status, exc.message) from None
        if self._chunked.complete:
            self._state = _DONE
            self.body_complete = True
        return data
