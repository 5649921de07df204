"""vLLM's token usage from a non-streamed answer, without decoding the answer or holding it.

Strategy: `BodyTail` passes the bytes through untouched and keeps a window of the last `_KEEP` bytes.
Usage normally sits in that window at the end (after ``choices``), and `finish` finds it there as it
always did: the last ``"usage":`` key, and only the object after it decoded, jumping between braces
(a character walk only when a string in between holds a brace or an escape). But vLLM puts ``usage``
BEFORE ``prompt_logprobs``, ``prompt_token_ids`` and ``kv_transfer_params``, and with
``return_token_ids`` or ``prompt_logprobs`` on a long prompt megabytes follow it. So the bytes that
leave the window are searched before they go, and the first usage object found ends the search: the
rest of the body (those megabytes) is never looked at. The search runs on ``{`` with ``bytes.find``
(memchr speed), looking back from each for ``"usage" :``; a brace-dense region (a JSON or code answer,
small embeddings) switches to searching the key itself. A short answer (all in the window) costs what
it always did.

A chat or completions body holds exactly one ``usage`` key: ``choices`` carry none and have no
free-form keys, and model output cannot forge one -- inside JSON strings quotes are escaped, so a
literal ``"usage"`` followed by ``:`` can only be a key (``"usage"`` as a whole string value,
``"content":"usage"``, is not followed by ``:`` and is passed over). An object under a ``usage`` key that
carries no count (`to_usage` None), or does not decode as one, is not usage and the search goes on past
it: a Responses body echoes the request's ``tools``, whose JSON schemas may hold a property named
``usage``.

Those echoed schemas (and Anthropic ``tool_use`` inputs, model-written objects) come BEFORE the real
usage and are free-form: a client can put a complete ``"usage":{"input_tokens":0}`` there. So for the
Responses API and Anthropic Messages, whose real usage is the last top-level member but a few (and
nothing client-shaped follows it), ``BodyTail(last=True)`` keeps searching and takes the LAST usage
object in the body instead of the first. It reads every byte then (same search, same speed, just no
early stop). A later ``"usage":null`` does not undo an earlier object in that mode (vLLM always reports
usage in those bodies).

``response_id``: the top-level ``"id"`` string when the body is a JSON object whose first member is
``id`` (vLLM's Response object ``{"id":"resp_...``; its Anthropic message ``{"id":"chatcmpl-...`` -- vLLM
reuses the chat completion's id there), read from the first `_ID_SPAN` bytes and never past them. Only
printable ASCII (no quote or backslash), 1-256 characters, is taken; anything else is None.

Measured (one tap over the whole body, CPython 3.11; the old 4 KiB tail / a msgspec decode of a Struct
with only ``usage``, which skips the other fields but needs the whole body held and joined / this):
655 B answer 3 / 1.4 / 3 us; 45 KB answer 3.5-5 / 14-18 / 10-11 us; 1.4 MB answer 13 / 410-530 /
68 us; usage then 0.6 MB of prompt_token_ids: missed / 570-830 / 5 us; usage then 6 MB of
prompt_logprobs: missed / 5350 / 12-15 us; a 500 KB brace-dense JSON answer 8 / 320-340 / 340-390 us
(the key search); 8.5 MB of float embeddings 61 / - / 600 us.
"""

from __future__ import annotations

import re

import msgspec

from proxy.usage.counts import Usage, to_usage, usage_decoder

_KEY = b'"usage"'
_KEEP = 4096  # the window kept at the end of the body
_CAP = 4096  # the most bytes examined for one usage object (vLLM's is about 100)
_LOOK = 64  # bytes kept before the window, for a key whose object starts in it
# Every _DENSE braces: when they are closer than _GAP bytes apart on average (a JSON or code answer;
# a brace costs a Python-level look-back, ~0.3 us, the key search ~0.5 us per KB), search the key.
_DENSE = 16
_GAP = 512
_WS = b" \t\r\n"

# What `_usage_at` found at a key.
_MORE = 0  # the buffer ends before the answer is known
_NO = 1  # no object there (a string value "usage", "usage": null), or one too long
_YES = 2
_SKIP = 3  # a complete object that is not usage (no counts, or not a usage shape): look further

_ID_SPAN = 512  # the response id is looked for in the first bytes only
_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([\x20\x21\x23-\x5b\x5d-\x7e]{1,256})"')
# A head that may still become the match above once more bytes arrive.
_ID_OPEN = re.compile(rb'\s*(?:\{\s*(?:"(?:i(?:d(?:"\s*(?::\s*(?:"[\x20\x21\x23-\x5b\x5d-\x7e]{0,256})?)?)?)?)?)?)?')


def first_id(head: bytes) -> tuple[bool, str | None]:
    """(decided, the id) for the first bytes of a body: decided once the id is read or cannot be."""
    m = _ID.match(head)
    if m is not None:
        return True, m.group(1).decode("ascii")
    if len(head) >= _ID_SPAN or _ID_OPEN.fullmatch(head) is None:
        return True, None
    return False, None


def _usage_at(buf: bytes, k: int) -> tuple[int, Usage | None]:
    """Parse ``"usage" : {...}`` with the key's opening quote at ``buf[k]``."""
    n = len(buf)
    j = k + 7
    while j < n and buf[j] in _WS:
        j += 1
    if j >= n:
        return _MORE, None
    if buf[j] != 58:  # ':'
        return _NO, None
    j += 1
    while j < n and buf[j] in _WS:
        j += 1
    if j >= n:
        return _MORE, None
    if buf[j] != 123:  # '{'
        return _NO, None
    window = buf[j : j + _CAP]
    end = _object_end(window, 0)
    if end < 0:
        return (_MORE if len(window) < _CAP else _NO), None
    try:
        usage = to_usage(usage_decoder.decode(window[:end]))
    except msgspec.DecodeError:
        return _SKIP, None
    return (_SKIP, None) if usage is None else (_YES, usage)


def _key_before(buf: bytes, i: int) -> int:
    """Where ``"usage"`` starts if the ``{`` at ``buf[i]`` is its value (``"usage" : {``), else -1."""
    j = i - 1
    while j >= 0 and buf[j] in _WS:
        j -= 1
    if j < 0 or buf[j] != 58:  # ':'
        return -1
    j -= 1
    while j >= 0 and buf[j] in _WS:
        j -= 1
    k = j - 6
    return k if k >= 0 and buf.startswith(_KEY, k) else -1


def usage_from_body(body_tail: bytes) -> Usage | None:
    """vLLM's ``usage`` object from the end of a non-streaming JSON answer (or the whole answer).

    Finds the last ``"usage"`` key followed by ``:`` and decodes only the object after it, so a long
    completion is never decoded; an object there that is not usage is passed over (the one before it
    is looked at). Returns None when the tail holds no complete usage object.
    """
    pos = len(body_tail)
    while True:
        k = body_tail.rfind(_KEY, 0, pos)
        if k < 0:
            return None
        state, usage = _usage_at(body_tail, k)
        if state == _YES:
            return usage
        if state == _SKIP:
            pos = k
            continue
        j = k + 7
        while j < len(body_tail) and body_tail[j] in _WS:
            j += 1
        if j < len(body_tail) and body_tail[j] == 58:
            return None  # the last usage key holds null, or is cut short
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


class BodyTail:
    """The tap for a non-streaming answer: passes bytes through untouched and reads vLLM's ``usage``
    object wherever it is (see the module docstring); keeps at most `_KEEP` + `_LOOK` bytes (and the
    first `_ID_SPAN` while the response id is undecided).

    ``last=False`` (chat, completions, embeddings): the first usage object ends the search.
    ``last=True`` (Responses API, Anthropic Messages): the last one in the body is taken.
    """

    __slots__ = ("_done", "_edge", "_head", "_last", "_tail", "events", "response_id", "usage")
    rewrites = False

    def __init__(self, *, last: bool = False) -> None:
        self.usage: Usage | None = None
        self.response_id: str | None = None
        self.events = 0
        self._last = last
        self._done = False
        self._head: bytes | None = b""  # the first bytes, while the response id is undecided
        self._tail = b""  # the last bytes seen, up to _KEEP (not searched yet)
        self._edge = b""  # the last _LOOK bytes before the window (searched already)

    def feed(self, data: bytes) -> bytes:
        if self._head is not None:
            self._take_id(data)
        if self._done:
            return data
        tail = self._tail
        if len(data) < _KEEP:
            buf = tail + data  # small
            cut = len(buf) - _KEEP
            if cut <= 0:
                self._tail = buf
                return data
            if not self._evict(buf, cut):
                self._tail = buf[cut:]
            return data
        # A big piece: the whole window leaves, and all of `data` but its last _KEEP bytes; `data` is
        # searched where it is, not copied.
        if tail and self._evict(tail + data[:_CAP], len(tail)):
            return data
        cut = len(data) - _KEEP
        if cut and self._evict(data, cut):
            return data
        self._tail = data[cut:]
        return data

    def _take_id(self, data: bytes) -> None:
        head = self._head + data[: _ID_SPAN - len(self._head)]
        decided, found = first_id(head)
        if decided:
            self.response_id = found
            self._head = None
        else:
            self._head = head

    def _evict(self, buf: bytes, cut: int) -> bool:
        """buf[:cut] leaves the window: search it (an object that starts there may end past it).
        True when the search is over (the first usage object found, in first mode)."""
        usage = self._search(buf, cut)
        if usage is not None:
            self.usage = usage
            if not self._last:
                self._done = True
                self._tail = self._edge = b""
                return True
        self._edge = buf[cut - _LOOK : cut] if cut >= _LOOK else (self._edge + buf[:cut])[-_LOOK:]
        return False

    def finish(self) -> bytes:
        self._head = None  # an undecided id at the end: the body ended inside it
        if not self._done:
            usage = usage_from_body(self._edge + self._tail)
            if usage is not None or not self._last:
                self.usage = usage
            self._done = True
        self._tail = self._edge = b""
        return b""

    def _search(self, buf: bytes, cut: int) -> Usage | None:
        find = buf.find
        i = find(b"{", 0, cut)
        seen = 0
        found = None
        while i >= 0:
            if i < _LOOK and self._edge:
                # The key may start in the bytes before this region.
                look = self._edge + buf[: i + _CAP]
                k = _key_before(look, i + len(self._edge))
            else:
                look = buf
                k = _key_before(buf, i)
            if k >= 0:
                state, usage = _usage_at(look, k)
                if state == _YES:
                    if not self._last:
                        return usage
                    found = usage
            seen += 1
            if not seen % _DENSE and i < seen * _GAP:
                more = self._search_keys(buf, max(0, i - _LOOK), cut)
                return found if more is None else more
            i = find(b"{", i + 1, cut)
        return found

    def _search_keys(self, buf: bytes, start: int, cut: int) -> Usage | None:
        # A brace-dense region: look for the key itself (keys that start before `cut`).
        find = buf.find
        found = None
        k = find(_KEY, start, cut + len(_KEY) - 1)
        while k >= 0:
            state, usage = _usage_at(buf, k)
            if state == _YES:
                if not self._last:
                    return usage
                found = usage
            k = find(_KEY, k + 1, cut + len(_KEY) - 1)
        return found
