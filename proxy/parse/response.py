"""A strict HTTP/1.1 response reader for the upstream side (vLLM / uvicorn), on a byte buffer.

Strategy: the upstream is a peer on the private network speaking plain HTTP/1.1 responses; h11's
general machinery (event objects, header validation, a state machine per event) cost more CPU per
request than all of the gateway's own logic, so this side parses by hand -- held to the same rules
as the client side (proxy/parse/request.py), because the gateway relays what it reads and a broken
or hostile upstream must become a clean 502, never a relayed bad head, a hang or a confused pool:
- Heads are found with one `find(b"\\r\\n\\r\\n")` per call, resumed where the last call stopped,
  and checked as a whole: one `translate` proves the head holds no control byte but HTAB and the
  CRLF pairs that split its lines (so no bare LF or CR, no NUL, no CR/LF inside a value), one regex
  proves every field line starts `token:` (no obs-fold, no whitespace before the colon, no invalid
  name). An incomplete head is scanned as it arrives: a bare LF or a bad status line is refused at
  once, not at the first-byte timeout. Head <= 64 KiB.
- Status line `HTTP/1.1 NNN reason` or `HTTP/1.0 NNN reason` (the reason may be empty or absent),
  NNN 100-599. 101 is refused: we never ask for an upgrade (upstream/headers.py drops Upgrade).
- Framing (RFC 9112 6.3) as the request side: Transfer-Encoding with Content-Length -> error;
  Transfer-Encoding on HTTP/1.0 -> error; Transfer-Encoding other than exactly one `chunked` ->
  error -- the gateway re-frames what it relays and decodes no other coding, so even `gzip, chunked`
  (valid HTTP) is refused; Content-Length 1*DIGIT of at most 18 digits, repeated or comma-listed
  values must be identical strings. No body for 1xx/204/304 (and HEAD, which we never send); else
  chunked; else Content-Length; else read until close (never reusable).
- Chunked bodies: proxy/parse/chunked.py, the same strict decoder as the request side. The hot path of
  a stream: a read that arrives while nothing is buffered is held as the `bytes` it came in, not copied
  into the buffer; `read_body` takes the whole plain chunks at its front straight out of it
  (`ChunkedDecoder.take_whole`: a chunk's data is one slice of the read, no bytearray round trip) and
  only the rest -- a partial chunk, the last chunk, anything unusual -- goes into the buffer for the
  state machine, in the same call: what each call returns or raises is what it was without the fast path.
- keep-alive: HTTP/1.1 unless a `Connection` header lists `close`; HTTP/1.0 only with `keep-alive`
  (tokens of all Connection headers, case-insensitive).
Anything else raises `ResponseError` (upstream/connection.py turns it into `UpstreamClosed`, which
the request path answers with 502). The reader never blocks: `feed()` bytes in, pull what is
complete out; the caller owns the socket and the timeouts.
"""

from __future__ import annotations

from proxy.parse.chunked import FIELD_OK as _FIELD_OK
from proxy.parse.chunked import ChunkedDecoder, ChunkError
from proxy.parse.fields import FieldError, split_fields

MAX_HEAD = 65536
MAX_CONTENT_LENGTH_DIGITS = 18  # as the request side: < 10**18 bytes, and int() never sees a huge string

# A CRLF in a head not followed by `token:` -- obs-fold, no colon, whitespace before the colon.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
_VERSIONS = {b"HTTP/1.1": b"1.1", b"HTTP/1.0": b"1.0"}

# body states
_CL, _CHUNKED, _UNTIL_CLOSE, _DONE = range(4)


class ResponseError(Exception):
    """The upstream did not speak HTTP/1.1 correctly."""


class ResponseClosed(ResponseError):
    """The connection closed before a single byte of a response head: a reset, not bad HTTP (a request
    on a reused keep-alive connection the server was closing may be sent again)."""


class ResponseHead:
    __slots__ = ("chunked", "content_length", "headers", "http_version", "keep_alive", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 content_length: int | None, chunked: bool, keep_alive: bool, http_version: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.http_version = http_version


def _status_line(line: bytes) -> tuple[bytes, int, bytes]:
    """(version, status, reason) of a status line already known to hold no control byte but HTAB."""
    parts = line.split(b" ", 2)
    version = _VERSIONS.get(parts[0])
    code = parts[1] if len(parts) > 1 else b""
    if version is None or len(code) != 3 or not code.isdigit() or not b"100" <= code <= b"599":
        raise ResponseError(f"bad status line {line[:80]!r}")
    if code == b"101":
        raise ResponseError("unexpected 101 Switching Protocols")
    return version, int(code), parts[2] if len(parts) == 3 else b""


def _content_length(values: list[bytes]) -> int:
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= MAX_CONTENT_LENGTH_DIGITS:
            return int(value)
    first = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit() or len(item) > MAX_CONTENT_LENGTH_DIGITS:  # b"".isdigit() is False
                raise ResponseError(f"bad Content-Length {item[:40]!r}")
            if first is None:
                first = item
            elif item != first:
                raise ResponseError("conflicting Content-Length")
    return int(first)


def parse_head(block: bytes) -> ResponseHead:
    """Parse a complete head (without the final CRLFCRLF)."""
    lines = block.split(b"\r\n")
    try:
        headers, framing = split_fields(block, lines, _FRAMING, "response")
    except FieldError as exc:
        raise ResponseError(str(exc)) from None
    version, status, reason = _status_line(lines[0])
    keep_alive = version == b"1.1"
    content_length = None
    chunked = False
    if framing is not None:
        cl = te = conn = None
        for name, value in framing:
            if name == b"content-length":
                cl = [value] if cl is None else cl + [value]
            elif name == b"transfer-encoding":
                te = [value] if te is None else te + [value]
            else:
                conn = [value] if conn is None else conn + [value]
        if te is not None:
            if cl is not None:
                raise ResponseError("both Transfer-Encoding and Content-Length")
            if version == b"1.0":
                raise ResponseError("Transfer-Encoding in an HTTP/1.0 response")
            if len(te) != 1 or te[0].lower() != b"chunked":
                raise ResponseError(f"unsupported Transfer-Encoding {b', '.join(te)[:40]!r}")
            chunked = True
        elif cl is not None:
            content_length = _content_length(cl)
        if conn is not None:
            tokens = [t.strip(b" \t") for v in conn for t in v.lower().split(b",")]
            if b"close" in tokens:
                keep_alive = False
            elif version == b"1.0":
                keep_alive = b"keep-alive" in tokens
    if status < 200 or status in (204, 304):
        content_length, chunked = 0, False
    return ResponseHead(status, reason, headers, content_length, chunked, keep_alive, version)


class ResponseReader:
    """Incremental reader of one response at a time on a keep-alive connection."""

    __slots__ = ("_chunked", "_fresh", "_lf_scan", "_line_checked", "_remaining", "_scan", "_state", "buf",
                 "complete", "eof", "head")

    def __init__(self) -> None:
        self.buf = bytearray()
        self._fresh: bytes | None = None  # chunked body: a read not yet decoded, the buffer empty before it
        self.head: ResponseHead | None = None
        self._remaining = 0
        self._chunked: ChunkedDecoder | None = None
        self._state = _DONE
        self._scan = 0             # where the next search for the head's end starts
        self._lf_scan = 0          # incomplete head: LFs before this offset are checked
        self._line_checked = False  # incomplete head: its status line is checked
        self.eof = False
        self.complete = False

    def reset(self) -> None:
        """Ready for the next response on the same connection (leftover bytes mean a confused peer)."""
        self.head = None
        self.complete = False
        self._state = _DONE
        self._scan = self._lf_scan = 0
        self._line_checked = False

    def feed(self, data: bytes) -> None:
        if data:
            if self._fresh is not None:
                self.buf += self._fresh
                self._fresh = None
            elif self._state == _CHUNKED and not self.buf:
                self._fresh = data  # read_body decodes it in place
                return
            self.buf += data
        else:
            self.eof = True

    def next_head(self) -> ResponseHead | None:
        """A complete final (non-1xx) head if buffered, else None. Raises ResponseError."""
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n", self._scan)
            if end < 0:
                self._incomplete_head()
                return None
            if end > MAX_HEAD:
                raise ResponseError("response head too large")
            head = parse_head(bytes(buf[:end]))
            del buf[:end + 4]
            self._scan = self._lf_scan = 0
            self._line_checked = False
            if head.status < 200:
                continue  # informational (100, 103): skip
            self.head = head
            if head.chunked:
                self._state = _CHUNKED
                self._chunked = ChunkedDecoder(MAX_HEAD)
            elif head.content_length is not None:
                self._remaining = head.content_length
                self._state = _CL
            else:
                self._state = _UNTIL_CLOSE
                head.keep_alive = False
            self.complete = self._state == _CL and self._remaining == 0
            if self.complete:
                self._state = _DONE
            return head

    def _incomplete_head(self) -> None:
        """No head end buffered: refuse now what can never become a valid head."""
        buf = self.buf
        size = len(buf)
        if size > MAX_HEAD:
            raise ResponseError("response head too large")
        i = buf.find(b"\n", self._lf_scan)
        while i >= 0:
            if i == 0 or buf[i - 1] != 13:
                raise ResponseError("bare LF in response head")
            if not self._line_checked:
                line = bytes(buf[:i - 1])
                if line.translate(None, _FIELD_OK):
                    raise ResponseError("control character in status line")
                _status_line(line)
                self._line_checked = True
            i = buf.find(b"\n", i + 1)
        self._lf_scan = size
        self._scan = max(0, size - 3)
        if self.eof:
            if size == 0:
                raise ResponseClosed("connection closed before a response head")
            raise ResponseError("connection closed inside a response head")

    def read_body(self) -> bytes | None:
        """Body bytes available now (b"" once complete); None if more must be read from the socket.
        Raises ResponseError on bad framing or a premature close."""
        state = self._state
        if state == _CHUNKED:
            fresh = self._fresh
            if fresh is not None:
                self._fresh = None
                out: list[bytes] = []
                used = self._chunked.take_whole(fresh, out)
                if used == len(fresh):
                    return out[0] if len(out) == 1 else b"".join(out)
                self.buf += fresh[used:] if used else fresh
                if out:
                    # The rest in the same call, as `ChunkedDecoder.read` would have it: one piece per call,
                    # and an EOF that comes after whole chunks is for the next call to report.
                    rest = self._read_chunked(False)
                    if rest:
                        out.append(rest)
                    return out[0] if len(out) == 1 else b"".join(out)
            elif not self.buf and not self.eof:
                return None  # what the decoder would say: nothing buffered, not complete, no EOF
            return self._read_chunked(self.eof)
        buf = self.buf
        if state == _CL:
            if buf:
                n = min(len(buf), self._remaining)
                data = bytes(buf[:n])
                del buf[:n]
                self._remaining -= n
                if self._remaining == 0:
                    self._state = _DONE
                    self.complete = True
                return data
            if self.eof:
                raise ResponseError("connection closed mid-body")
            return None
        if state == _UNTIL_CLOSE:
            if buf:
                data = bytes(buf)
                buf.clear()
                return data
            if self.eof:
                self._state = _DONE
                self.complete = True
                return b""
            return None
        return b""  # _DONE

    def _read_chunked(self, eof: bool) -> bytes | None:
        try:
            data = self._chunked.read(self.buf, eof)
        except ChunkError as exc:
            raise ResponseError(exc.message) from None
        if self._chunked.complete:
            self._state = _DONE
            self.complete = True
        return data
