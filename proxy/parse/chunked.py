"""Chunked transfer-coding (RFC 9112 7.1), decoded from a byte buffer: one decoder for both sides.

Strategy: the request reader (request.py, untrusted clients) and the upstream response reader
(response.py, vLLM) share this one strict decoder: chunk sizes of 1-16 hex digits (<= 2**63),
then `;ext` (no control bytes but HTAB) or trailing OWS (as h11: no whitespace before `;`), the size
line <= 1 KiB, CRLF after each chunk's data, trailers validated as field lines, bounded, and dropped;
a trailer that would speak of framing (Content-Length, Transfer-Encoding: RFC 9110 6.5.1) is refused --
h11 refuses the invalid ones, we refuse them all, as no reader may act on them after the body.
CRLF only: a bare LF or CR is an error. It reads from the caller's bytearray (the bytes after the
head), slices what it consumes off the front, and resumes line searches where the last call stopped,
so bytes fed one at a time stay O(n). The common case -- whole chunks already there, each a bare size
line (1-16 hex digits and CRLF, looked for in its first 18 bytes), its data and CRLF -- is taken by
index arithmetic in `take_whole` (the decoder stays at a chunk boundary; one slice per chunk, one `del`
for the lot; the response reader also runs it on a read it has not buffered, whose slices are the data
as bytes); anything else (a partial chunk, `;ext` or OWS, the last chunk and trailers, every error)
goes to the state machine in the same call, and it holds every rule above. Errors are
`ChunkError(status, message)`: 400, or 431 for trailers past the limit; the request reader turns them
into its RequestError, the response reader into its ResponseError.
"""

from __future__ import annotations

import re

MAX_CHUNK_LINE = 1024
MAX_CHUNK_SIZE = 2 ** 63
HEX = b"0123456789abcdefABCDEF"
HEX_SET = frozenset(HEX)
# Bytes allowed anywhere in a head line (and a chunk extension): HTAB, SP, VCHAR, obs-text.
FIELD_OK = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
FIELD_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")

_FRAMING_TRAILER = re.compile(rb"(?i)(?:content-length|transfer-encoding):")

_SIZE, _DATA, _CRLF, _TRAILERS, _DONE = range(5)


class ChunkError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> ChunkError:
    return ChunkError(400, message)


class ChunkedDecoder:
    """State of one chunked body."""

    __slots__ = ("_remaining", "_scan", "_state", "_trailer_bytes", "complete", "max_trailer_bytes")

    def __init__(self, max_trailer_bytes: int) -> None:
        self.max_trailer_bytes = max_trailer_bytes
        self.complete = False
        self._state = _SIZE
        self._remaining = 0      # bytes left in the current chunk
        self._scan = 0           # where the next search for a line end starts
        self._trailer_bytes = 0

    def take_whole(self, buf: bytes | bytearray, out: list) -> int:
        """The fast path, at a chunk boundary: append to `out` the data of each whole plain chunk at the
        front of `buf` (`HEX{1,16}\\r\\n`, size > 0, its data and CRLF all there) -- slices of `buf`, so
        bytearrays for a bytearray -- and return the bytes they take (0 if none, or not at a boundary).
        It stops, without raising, at anything else (a partial chunk, an extension, OWS, the last chunk,
        bad framing): that is the state machine's to accept or refuse, and each chunk taken here is one
        it would accept as is. `buf` is not changed: `read` slices it, the response reader takes a read
        that is not yet buffered (bytes) and buffers only what is left."""
        if self._state != _SIZE:
            return 0
        n = len(buf)
        pos = 0
        while True:
            nl = buf.find(b"\r\n", pos, pos + 18)  # 16 digits at most, then CRLF
            if nl <= pos:
                break
            size_text = buf[pos:nl]
            if size_text.translate(None, HEX):
                break
            start = nl + 2
            end = start + int(size_text, 16)
            if end == start or end + 2 > n or buf[end] != 13 or buf[end + 1] != 10:
                break
            out.append(buf[start:end])
            pos = end + 2
            if pos == n:
                break
        if pos:
            self._scan = 0
        return pos

    def read(self, buf: bytearray, eof: bool) -> bytes | None:
        """Body bytes available now (several chunks joined), b"" once complete, None if more bytes are
        needed. Raises ChunkError on bad framing, or on EOF before the end."""
        out: list = []
        while buf and not self.complete:
            state = self._state
            if state == _SIZE:
                used = self.take_whole(buf, out)
                if used:
                    if used == len(buf):
                        buf.clear()
                        break
                    del buf[:used]
                if buf[0] not in HEX_SET:
                    raise _bad("bad chunk size")
                nl = buf.find(b"\r\n", self._scan)
                if nl < 0:
                    if len(buf) > MAX_CHUNK_LINE + 1:  # + a CR whose LF may come next
                        raise _bad("chunk size line too long")
                    self._scan = len(buf) - 1
                    break
                if nl > MAX_CHUNK_LINE:
                    raise _bad("chunk size line too long")
                self._size_line(bytes(buf[:nl]))
                del buf[:nl + 2]
                self._scan = 0
            elif state == _DATA:
                size = len(buf)
                remaining = self._remaining
                if size <= remaining:
                    out.append(bytes(buf))
                    buf.clear()
                else:
                    out.append(bytes(buf[:remaining]))
                    del buf[:remaining]
                    size = remaining
                self._remaining = remaining = remaining - size
                if not remaining:
                    self._state = _CRLF
            elif state == _CRLF:
                if buf[0] != 13 or (len(buf) > 1 and buf[1] != 10):
                    raise _bad("missing CRLF after chunk data")
                if len(buf) < 2:
                    break
                del buf[:2]
                self._state = _SIZE
            else:  # _TRAILERS
                nl = buf.find(b"\r\n", self._scan)
                if nl < 0:
                    if self._trailer_bytes + len(buf) >= self.max_trailer_bytes:
                        raise ChunkError(431, "trailers too large")
                    self._scan = len(buf) - 1
                    break
                if nl == 0:
                    del buf[:2]
                    self._state = _DONE
                    self.complete = True
                    break
                if FIELD_LINE.fullmatch(buf, 0, nl) is None:
                    raise _bad("malformed trailer line")
                if _FRAMING_TRAILER.match(buf, 0, nl) is not None:
                    raise _bad("a framing field in the trailers")
                self._trailer_bytes += nl + 2
                if self._trailer_bytes >= self.max_trailer_bytes:
                    raise ChunkError(431, "trailers too large")
                del buf[:nl + 2]
                self._scan = 0
        if out:
            return b"".join(out)  # bytes (the fast path's pieces are bytearrays); one bytes piece as is
        if self.complete:
            return b""
        if eof:
            raise _bad("connection closed mid-body")
        return None

    def _size_line(self, line: bytes) -> None:
        semi = line.find(b";")
        if semi >= 0:
            if line.translate(None, FIELD_OK):
                raise _bad("control character in chunk extension")
            size_text = line[:semi]  # no BWS before `;` (as h11; RFC 9112 would allow it)
        else:
            size_text = line.rstrip(b" \t")  # trailing OWS, as h11
        if len(size_text) > 16 or size_text.translate(None, HEX):
            raise _bad("bad chunk size")
        size = int(size_text, 16)
        if size > MAX_CHUNK_SIZE:
            raise _bad("chunk size too large")
        if size:
            self._remaining = size
            self._state = _DATA
        else:
            self._state = _TRAILERS
