"""vLLM's token usage from the end of a non-streamed answer, without decoding the answer.

Strategy: the ``usage`` object sits near the end of vLLM's JSON (after ``choices``). `BodyTail` passes
the bytes through untouched and keeps only the last few KiB; at the end `usage_from_body` finds the last
``"usage":`` key in that tail and decodes just the object after it, jumping between braces (a character
walk only when a string in between holds a brace or an escape). A literal ``"usage"`` followed by ``:``
can only be a key: inside JSON strings quotes are escaped, so model output cannot fake it.
"""

from __future__ import annotations

import msgspec

from proxy.usage.counts import Usage, to_usage, usage_decoder


def usage_from_body(body_tail: bytes) -> Usage | None:
    """vLLM's ``usage`` object from the end of a non-streaming JSON answer (or the whole answer).

    Finds the last ``"usage"`` key followed by ``:`` and decodes only the object after it, so a long
    completion is never decoded. Returns None when the tail holds no complete usage object.
    """
    pos = len(body_tail)
    while True:
        k = body_tail.rfind(b'"usage"', 0, pos)
        if k < 0:
            return None
        j = k + 7
        n = len(body_tail)
        while j < n and body_tail[j] in b" \t\r\n":
            j += 1
        if j < n and body_tail[j] == 58:  # ':'
            j += 1
            while j < n and body_tail[j] in b" \t\r\n":
                j += 1
            if j < n and body_tail[j] == 123:  # '{'
                end = _object_end(body_tail, j)
                if end < 0:
                    return None
                try:
                    return to_usage(usage_decoder.decode(body_tail[j:end]))
                except msgspec.DecodeError:
                    return None
            return None  # "usage": null
        pos = k


def _object_end(buf: bytes, start: int) -> int:
    # End (exclusive) of the JSON object starting at buf[start] == '{', or -1. Jumps from brace to
    # brace with bytes.find (C speed) rather than walking characters, then checks the span: if a
    # quoted string in it holds a brace or an escape, the careful per-character walk decides.
    close = buf.find(b"}", start)
    if close < 0:
        return -1
    depth = buf.count(b"{", start, close) - 1
    while depth > 0:
        nxt = buf.find(b"}", close + 1)
        if nxt < 0:
            return _object_end_slow(buf, start)
        depth += buf.count(b"{", close + 1, nxt) - 1
        close = nxt
    end = close + 1
    if buf.find(b"\\", start, end) >= 0 or _braces_in_strings(buf, start, end):
        return _object_end_slow(buf, start)
    return end


def _braces_in_strings(buf: bytes, start: int, end: int) -> bool:
    # Quoted spans of vLLM's usage object are field names; a brace inside one (or an unbalanced
    # quote) needs the slow walk.
    parts = buf[start:end].split(b'"')
    if len(parts) % 2 == 0:
        return True
    quoted = b"".join(parts[1::2])
    return b"{" in quoted or b"}" in quoted


def _object_end_slow(buf: bytes, start: int) -> int:
    depth = 0
    i = start
    n = len(buf)
    while i < n:
        c = buf[i]
        if c == 34:  # '"'
            i += 1
            while i < n:
                c = buf[i]
                if c == 92:  # backslash
                    i += 2
                    continue
                if c == 34:
                    break
                i += 1
        elif c == 123:
            depth += 1
        elif c == 125:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


# -- request side ------------------------------------------------------------------------------------


class BodyTail:
    """The tap for a non-streaming answer: passes bytes through untouched and keeps only the last
    `keep` bytes, where vLLM puts `usage` (after `choices`); `usage` is decoded once, at the end."""

    __slots__ = ("_keep", "_tail", "events", "usage")
    rewrites = False

    def __init__(self, keep: int = 4096) -> None:
        self._tail = b""
        self._keep = keep
        self.usage: Usage | None = None
        self.events = 0

    def feed(self, data: bytes) -> bytes:
        if len(data) >= self._keep:
            self._tail = data[-self._keep:]
        else:
            self._tail = (self._tail + data)[-self._keep:]
        return data

    def finish(self) -> bytes:
        self.usage = usage_from_body(self._tail)
        return b""
