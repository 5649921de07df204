"""RESP2, the Redis protocol, without I/O: `encode` a command, `Reader` the replies.

Strategy: the client (redis.py) owns the socket; this module only turns bytes into replies and back, so
the fuzzers can drive it one byte at a time. `encode(*args)` writes a command as an array of bulk
strings (the one form Redis reads from clients: binary-safe, no quoting). `Reader.feed()` appends to one
bytearray; `Reader.next()` returns the next complete reply or `NEED_DATA`. It keeps a position into that
buffer instead of slicing what it consumes off the front, and remembers where the search for the
current line's end stopped, so bytes fed one at a time are scanned once (O(n), never re-scanned); the
consumed prefix is dropped on a later feed, when everything was consumed or once it passes COMPACT_AT
and half the buffer. Arrays are built as their elements arrive (a stack of open arrays), so a reply's
finished elements are never parsed twice either.

Replies: simple string -> bytes (b"OK"), bulk string -> bytes, null bulk and null array -> None,
integer -> int, array -> list (nested), error -> a `ReplyError` *returned* in place (the caller decides:
`execute` raises it, a pipeline keeps it in its list).

Strict, and bounded, because the bytes come from the network: a line must end in CRLF and hold no other
CR or LF, a type byte other than + - : $ * (RESP3 included) is refused, lengths and integers are
canonical decimals (no sign but a lone -1 for null, no leading zeros, no spaces), bulk data must be
followed by CRLF. A bulk over MAX_BULK, an array over MAX_ARRAY elements, arrays nested deeper than
MAX_DEPTH, or a line over MAX_LINE bytes (with or without its CRLF yet) raises `ProtocolError` before
anything that size is allocated: the buffer holds at most one bulk plus one read, and elements exist
only once their bytes have arrived (whose rate the client's round-trip timeout bounds). After a
ProtocolError the stream is out of sync: the reader raises it again on every call.
"""

from __future__ import annotations

MAX_BULK = 64 * 1024 * 1024
MAX_ARRAY = 1_048_576
MAX_DEPTH = 16
MAX_LINE = 64 * 1024
COMPACT_AT = 64 * 1024
MAX_INT = 2 ** 63 - 1  # Redis integers are signed 64-bit
MIN_INT = -2 ** 63
_COPY_VIA_VIEW = 4096  # bulks at least this long are copied out once, through a memoryview

Arg = bytes | str | float  # a command argument (float includes int, as for type checkers)

_CR, _LF = 13, 10
_SIMPLE, _ERROR, _INTEGER, _BULK, _ARRAY = b"+-:$*"


class ProtocolError(Exception):
    """The server sent bytes that are not RESP2 (or past this module's bounds): the connection is unusable."""


class ReplyError(Exception):
    """An error reply (``-ERR ...``), returned by `Reader.next()` like any other reply.

    `message` is the text after the ``-``; `code` its first word (``ERR``, ``NOSCRIPT``, ``WRONGTYPE``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.partition(" ")[0]

    def __repr__(self) -> str:
        return f"ReplyError({self.message!r})"


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
_PENDING = _Sentinel("_PENDING")  # a header was read; its bulk data or array elements follow


# -- encoding -------------------------------------------------------------------------------------

def _arg_bytes(arg: Arg) -> bytes:
    """One argument as Redis reads it: bytes as they are, str as UTF-8, int and float in decimal."""
    kind = type(arg)
    if kind is bytes:
        return arg
    if kind is str:
        return arg.encode()
    if kind is int:
        return b"%d" % arg
    if kind is float:
        return repr(arg).encode()
    if isinstance(arg, bool):
        raise TypeError("a Redis argument must be bytes, str, int or float, not bool")
    if isinstance(arg, bytes):  # subclasses (an enum member, say): as their base type
        return bytes(arg)
    if isinstance(arg, str):
        return str.encode(arg)
    if isinstance(arg, int):
        return b"%d" % int(arg)
    if isinstance(arg, float):
        return float.__repr__(arg).encode()
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not {type(arg).__name__}")


def encode(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings: ``*N\\r\\n$len\\r\\narg\\r\\n...``."""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        data = _arg_bytes(arg)
        append(b"$%d\r\n" % len(data))
        append(data)
        append(b"\r\n")
    return b"".join(parts)


# -- decoding -------------------------------------------------------------------------------------

def _length(line: bytearray, what: str, limit: int) -> int:
    """The count after ``$`` or ``*``: a canonical decimal up to `limit`, or -1 (null)."""
    digits = line[1:]
    if digits.isdigit() and (digits[0] != 0x30 or len(digits) == 1):
        if len(digits) > 10 or int(digits) > limit:
            raise ProtocolError(f"{what} of {digits[:20].decode()} over the limit of {limit}")
        return int(digits)
    if digits == b"-1":
        return -1
    raise ProtocolError(f"bad {what}: {bytes(line[:40])!r}")


def _integer(line: bytearray) -> int:
    digits = line[2:] if line[1:2] == b"-" else line[1:]
    if digits.isdigit() and len(digits) <= 19 and (digits[0] != 0x30 or len(digits) == 1):
        value = int(line[1:])
        if MIN_INT <= value <= MAX_INT:
            return value
    raise ProtocolError(f"bad integer reply: {bytes(line[:40])!r}")


class Reader:
    """Replies from a byte stream fed in pieces of any size."""

    __slots__ = ("_buf", "_bulk", "_error", "_pos", "_scan", "_stack")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0      # start of the unconsumed bytes
        self._scan = 0     # where the search for the current line's LF resumes (>= _pos)
        self._bulk = -1    # length of a bulk whose header was read and whose data is awaited
        self._stack: list[tuple[list, int]] = []  # open arrays: (elements so far, elements wanted)
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        buf = self._buf
        pos = self._pos
        if pos and (pos == len(buf) or (pos > COMPACT_AT and 2 * pos > len(buf))):
            del buf[:pos]
            self._scan -= pos
            self._pos = 0
        buf += data

    def next(self) -> object:
        """The next complete reply, or NEED_DATA. Raises ProtocolError (again and again) on a bad stream."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> object:
        while True:
            if self._bulk >= 0:
                value = self._bulk_data()
                if value is NEED_DATA:
                    return NEED_DATA
            else:
                line = self._line()
                if line is None:
                    return NEED_DATA
                value = self._value(line)
                if value is _PENDING:
                    continue
            stack = self._stack
            while stack:
                items, wanted = stack[-1]
                items.append(value)
                if len(items) < wanted:
                    break
                stack.pop()
                value = items
            else:
                return value

    def _line(self) -> bytearray | None:
        """The next line without its CRLF, or None when its end has not arrived."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\n", self._scan)
        if end < 0:
            if len(buf) - pos > MAX_LINE + 1:
                raise ProtocolError(f"a line of over {MAX_LINE} bytes")
            self._scan = len(buf)
            return None
        if end - pos > MAX_LINE + 1:
            raise ProtocolError(f"a line of over {MAX_LINE} bytes")
        if end == pos or buf[end - 1] != _CR:
            raise ProtocolError("a line not ended by CRLF")
        line = buf[pos:end - 1]
        if b"\r" in line:
            raise ProtocolError("a CR inside a line")
        if not line:
            raise ProtocolError("an empty line")
        self._pos = self._scan = end + 1
        return line

    def _value(self, line: bytearray) -> object:
        """The reply a line stands for, or _PENDING when bulk data or array elements follow."""
        kind = line[0]
        if kind == _BULK:
            n = _length(line, "bulk length", MAX_BULK)
            if n < 0:
                return None
            self._bulk = n
            return _PENDING
        if kind == _SIMPLE:
            return bytes(line[1:])
        if kind == _INTEGER:
            return _integer(line)
        if kind == _ERROR:
            return ReplyError(line[1:].decode("utf-8", "replace"))
        if kind == _ARRAY:
            return self._open_array(line)
        raise ProtocolError(f"unknown reply type {bytes(line[:1])!r}")

    def _open_array(self, line: bytearray) -> object:
        n = _length(line, "array length", MAX_ARRAY)
        if n < 0:
            return None
        if len(self._stack) >= MAX_DEPTH:
            raise ProtocolError(f"arrays nested deeper than {MAX_DEPTH}")
        if n == 0:
            return []
        self._stack.append(([], n))
        return _PENDING

    def _bulk_data(self) -> object:
        buf, start, n = self._buf, self._pos, self._bulk
        end = start + n
        if len(buf) < end + 2:
            return NEED_DATA
        if buf[end] != _CR or buf[end + 1] != _LF:
            raise ProtocolError("bulk data not followed by CRLF")
        if n < _COPY_VIA_VIEW:
            value = bytes(buf[start:end])
        else:
            with memoryview(buf) as view, view[start:end] as part:
                value = bytes(part)
        self._pos = self._scan = end + 2
        self._bulk = -1
        return value
