"""A minimal HTTP/1.1 response reader for the upstream side (vLLM / uvicorn), on a byte buffer.

Strategy: the upstream is a known peer on the private network speaking plain HTTP/1.1 responses;
h11's general machinery (event objects, header validation, a state machine per event) cost more CPU
per request than all of the gateway's own logic, so this side parses by hand -- strictly, and with
limits, because a broken upstream must become a clean 502, never a hang or a confused pool:
- status line `HTTP/1.x NNN reason`, headers `name: value` (names lowercased), head <= 64 KiB;
- body framing per RFC 9112 6.3: no body for 1xx/204/304 (and HEAD, which we never send);
  `Transfer-Encoding: chunked` (must be the final coding); else `Content-Length` (one valid value);
  else read until close (never reusable);
- chunked bodies: proxy/parse/chunked.py, the same strict decoder as the request side;
- keep-alive unless `Connection: close` or HTTP/1.0 without `keep-alive`.
Anything else raises `ResponseError`. The reader never blocks: `feed()` bytes in, pull what is
complete out; the caller owns the socket and the timeouts.
"""

from __future__ import annotations

from proxy.parse.chunked import ChunkedDecoder, ChunkError

MAX_HEAD = 65536


class ResponseError(Exception):
    """The upstream did not speak HTTP/1.1 correctly."""


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


def parse_head(block: bytes) -> ResponseHead:
    """Parse a head (without the final CRLFCRLF)."""
    lines = block.split(b"\r\n")
    status_line = lines[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise ResponseError(f"bad status line {status_line[:80]!r}")
    version = parts[0][5:]
    status = int(parts[1])
    reason = parts[2] if len(parts) == 3 else b""
    headers = []
    content_length = None
    chunked = False
    connection = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise ResponseError(f"bad header line {line[:80]!r}")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or (content_length is not None and int(value) != content_length):
                raise ResponseError("bad Content-Length")
            content_length = int(value)
        elif name == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise ResponseError(f"unsupported Transfer-Encoding {value[:40]!r}")
            chunked = True
        elif name == b"connection":
            connection = value.lower()
        headers.append((name, value))
    if chunked:
        content_length = None  # RFC 9112 6.3: Transfer-Encoding overrides Content-Length
    if version == b"1.1":
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection
    if status < 200 or status in (204, 304):
        content_length, chunked = 0, False
    return ResponseHead(status, reason, headers, content_length, chunked, keep_alive, version)


class ResponseReader:
    """Incremental reader of one response at a time on a keep-alive connection."""

    __slots__ = ("_chunked", "_remaining", "_state", "buf", "complete", "eof", "head")

    # body states
    _CL, _CHUNKED, _UNTIL_CLOSE, _DONE = range(4)

    def __init__(self) -> None:
        self.buf = bytearray()
        self.head: ResponseHead | None = None
        self._remaining = 0
        self._chunked: ChunkedDecoder | None = None
        self._state = self._DONE
        self.eof = False
        self.complete = False

    def reset(self) -> None:
        """Ready for the next response on the same connection (leftover bytes mean a confused peer)."""
        self.head = None
        self.complete = False
        self._state = self._DONE

    def feed(self, data: bytes) -> None:
        if data:
            self.buf += data
        else:
            self.eof = True

    def next_head(self) -> ResponseHead | None:
        """A complete final (non-1xx) head if buffered, else None. Raises ResponseError."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise ResponseError("response head too large")
                if self.eof:
                    raise ResponseError("connection closed before a response head")
                return None
            head = parse_head(bytes(self.buf[:end]))
            del self.buf[:end + 4]
            if 100 <= head.status < 200:
                continue  # informational: skip
            self.head = head
            if head.chunked:
                self._state = self._CHUNKED
                self._chunked = ChunkedDecoder(MAX_HEAD)
            elif head.content_length is not None:
                self._remaining = head.content_length
                self._state = self._CL
            else:
                self._state = self._UNTIL_CLOSE
                head.keep_alive = False
            self.complete = self._state == self._CL and self._remaining == 0
            if self.complete:
                self._state = self._DONE
            return head

    def read_body(self) -> bytes | None:
        """Body bytes available now (b"" once complete); None if more must be read from the socket.
        Raises ResponseError on bad framing or a premature close."""
        buf = self.buf
        state = self._state
        if state == self._CL:
            if buf:
                n = min(len(buf), self._remaining)
                data = bytes(buf[:n])
                del buf[:n]
                self._remaining -= n
                if self._remaining == 0:
                    self._state = self._DONE
                    self.complete = True
                return data
            if self.eof:
                raise ResponseError("connection closed mid-body")
            return None
        if state == self._UNTIL_CLOSE:
            if buf:
                data = bytes(buf)
                buf.clear()
                return data
            if self.eof:
                self._state = self._DONE
                self.complete = True
                return b""
            return None
        if state == self._DONE:
            return b""
        return self._read_chunked()

    def _read_chunked(self) -> bytes | None:
        try:
            data = self._chunked.read(self.buf, self.eof)
        except ChunkError as exc:
            raise ResponseError(exc.message) from None
        if self._chunked.complete:
            self._state = self._DONE
            self.complete = True
        return data
