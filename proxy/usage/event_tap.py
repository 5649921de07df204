"""Token usage read out of a relayed named-event SSE stream (the Responses API, Anthropic Messages),
without re-encoding or rewriting a byte of it.

Strategy: the relay stays a byte pipe; `EventUsageTap.feed` returns its argument itself. The stream is
``event: <type>\\n data: <json>\\n\\n`` per event (vLLM: ``responses/api_router.py``
``_convert_stream_to_sse_events`` and ``anthropic/serving.py`` ``wrap_data_with_event``); the tap works
line by line on arbitrary split points, ``\\r\\n`` tolerated (bare ``\\r`` line ends are not split on, as
in sse_tap.py).

* What each data line is. The JSON's own top-level ``"type"`` decides; the ``event:`` line (remembered
  until the blank line ending the event) only stands in when the JSON's type cannot be read. Where
  vLLM puts it differs by API, so cheap looks at the line's first `_HEAD` and last `_TAIL` bytes: the
  bytes the ``event:`` line implies (below); the first member (``data: {"type":"..."`` -- Anthropic: vLLM's ``AnthropicStreamEvent`` declares
  ``type`` first); the last member (``"type":"..."}`` at the end of the line -- the Responses API: its
  events are openai-python's models (``ResponseTextDeltaEvent``: ``content_index, delta, item_id,
  logprobs, output_index, sequence_number, type``), which declare ``type`` LAST, after the whole
  ``response`` in ``response.completed``); or after a few scalar members at the start
  (``{"index":0,"type":...``); failing all of them, a line of at most `_HEAD` bytes is decoded for
  it. A ``"type"`` before the object's final ``}``, or right after its ``{``, can only be a top-level
  key: inside JSON strings quotes are escaped, and a nested object's type would be followed by a
  second ``}``.
* Split points do not matter: what a line is, and whether a long one (over `_HEAD` bytes) streams
  through a BodyTail or is held, is decided from its first `_HEAD` bytes, its last `_TAIL` and its
  ``event:`` line only, so a line in one piece and the same line in a thousand give the same answer
  (the fuzzer holds any byte stream, hostile ones included, to that).
* Cost. The hot path is a delta event whose JSON confirms its ``event:`` line: one ``startswith`` or
  ``endswith`` with the bytes that line implies (``data: {"type":"<name>"`` / ``"type":"<name>"}``), no
  regex, no copy, no JSON decode -- the per-event figures below. Each input byte is examined a bounded
  number of times: the newline search, at most `_HEAD` bytes at a line's start and `_TAIL` at its end,
  and for the few events that carry usage one `BodyTail` pass or one decode of at most `_HOLD_CAP`.
* Responses usage: the ``usage`` object of ``response.completed`` (``response.incomplete`` and
  ``response.failed`` too, which carry one as well; vLLM itself sends ``response.completed`` with
  ``status`` "incomplete" instead), the last such event winning. That data line holds the WHOLE
  response -- the output (megabytes, possibly), the echoed ``tools`` and ``text.format`` (client JSON
  schemas, which may have a ``usage`` property or forge a whole usage object) -- so it is never held:
  its bytes stream through a ``BodyTail(last=True)`` (body_usage.py), which takes the LAST usage
  object, the response's own (``ResponsesResponse`` declares ``usage`` after ``output`` and ``tools``;
  only ``user`` and vLLM's ``input_messages`` / ``output_messages`` follow it). A long data line is
  streamed so when its type, as far as its first `_HEAD` bytes or its ``event:`` line tell, is one of
  those, or is not known at all (``type`` last, no ``event:`` line); its usage counts when its type,
  read at its end, is one of those. ``response_id``: ``response.id`` read from the first `_HEAD` bytes of
  ``response.created`` (``{"response":{"id":"resp_...``), or of ``response.in_progress`` or a terminal
  event when created was missed.
* Messages usage: ``message_start`` and ``message_delta`` are small (no echo of the request): held
  whole up to `_HOLD_CAP` (past it the event is given up, nothing counted) and decoded once complete.
  Input tokens: the last ``message_delta``'s ``usage.input_tokens`` when it has them (vLLM's does),
  else ``message_start``'s ``message.usage.input_tokens``; output tokens: the last ``message_delta``'s
  ``usage.output_tokens``. Until a ``message_delta`` comes there is no usage: a stream cut after
  ``message_start`` is settled as an estimate (taps.py: ``prompt_estimate`` -- set from
  ``message_start``'s input tokens, which are vLLM's own -- plus one token per delta event). ``response_id``:
  ``message_start``'s ``message.id`` (vLLM's is the chat completion's id, ``chatcmpl-...``, not
  ``msg_...``).
* ``events``: the delta events, the basis of an estimate when usage never arrives (about one per
  token): Responses ``response.*.delta`` (``output_text``, ``reasoning_text``,
  ``function_call_arguments``, ...), Anthropic ``content_block_delta`` (text, thinking and tool input
  alike). A line cut off by the end of the stream is not counted.

Invalid JSON, an ``error`` event, an unknown type, a line without a newline at the end: never an
exception; at worst no usage (and the estimate).

Measured (CPython 3.11 on the 2-core development machine, `feed` of one whole event per call,
vLLM's shapes, best of 7, three runs as the machine's load varied): SseUsageTap on a 208-byte chat
chunk (``"usage":null``), for comparison, 4.4-5.5 us per event stripping or keeping; a 210-byte
Responses ``response.output_text.delta`` event (``event:`` line and all) 3.8-4.4 us; a 117-byte
Anthropic ``content_block_delta`` 4.1-4.2 us; the Responses delta without its ``event:`` line (the
regexes) 5.4-6.9 us. Most of it is the line loop itself (3.7 us for the three lines of an event with
nothing done). A ``response.completed`` event with 10 MB of output
text: 2.4-3.6 ms in all, in 64 KiB pieces or one (the BodyTail pass), at most 1 MiB copied at once.
"""

from __future__ import annotations

import re

import msgspec

from proxy.usage.body_usage import BodyTail
from proxy.usage.counts import RawUsage, Usage, to_usage

_HEAD = 512  # the first bytes of a line kept (its type, the response id)
_TAIL = 128  # the last bytes of a line kept (a type that comes last)
_NAME_CAP = 256  # an event: line longer than this names nothing
_NAME_CONFIRM = 64  # a longer name is never confirmed by the bytes it implies (they must fit in _TAIL)
_HOLD_CAP = 64 * 1024  # the most of a small event (message_start, message_delta) held
_SLICE = 1 << 20  # a streamed line is fed to its BodyTail in slices of at most this

_TYPE = rb'"type"\s*:\s*"([^"\\]{1,64})"'
_FIRST_TYPE = re.compile(rb"data: ?\{\s*" + _TYPE)
_LAST_TYPE = re.compile(_TYPE + rb"\s*\}\s*\Z")
_SCALAR = rb'(?:"[^"\\]{0,64}"|-?[0-9][0-9.eE+-]{0,30}|true|false|null)'
_AFTER_SCALARS = re.compile(rb'data: ?\{\s*(?:"[^"\\]{0,64}"\s*:\s*' + _SCALAR + rb"\s*,\s*){1,16}" + _TYPE)
_EVENT_ID = re.compile(
    rb'data: ?\{\s*(?:"[^"\\]{0,64}"\s*:\s*' + _SCALAR + rb'\s*,\s*){0,4}"(?:response|message)"\s*:\s*'
    rb'\{\s*"id"\s*:\s*"([\x20\x21\x23-\x5b\x5d-\x7e]{1,256})"')

_RESPONSES = "responses"
_MESSAGES = "messages"
_TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
_HAS_ID = _TERMINAL | {b"response.created", b"response.in_progress"}
_MSG_START = b"message_start"
_MSG_DELTA = b"message_delta"
_MSG_USAGE = frozenset({_MSG_START, _MSG_DELTA})
_BLOCK_DELTA = b"content_block_delta"

# Line states.
_START = 0  # at the first byte of a line
_LINE = 1  # inside a line that began in an earlier piece


class _Message(msgspec.Struct):
    usage: RawUsage | None = None


class _MessageEvent(msgspec.Struct):
    type: str | None = None
    message: _Message | None = None
    usage: RawUsage | None = None


_message_decoder = msgspec.json.Decoder(_MessageEvent)


class _Typed(msgspec.Struct):
    type: str | None = None


_type_decoder = msgspec.json.Decoder(_Typed)


def _decoded_type(payload: bytes) -> bytes | None:
    try:
        typ = _type_decoder.decode(payload).type
    except msgspec.DecodeError:
        return None
    return None if typ is None else typ.encode()


def _counts(raw: RawUsage | None) -> tuple[int | None, int | None]:
    if raw is None:
        return None, None
    p = raw.prompt_tokens if raw.prompt_tokens is not None else raw.input_tokens
    c = raw.completion_tokens if raw.completion_tokens is not None else raw.output_tokens
    return p, c


def _scan(scan: BodyTail, data: bytes, i: int, end: int) -> None:
    """Feed data[i:end] to `scan` in slices of at most `_SLICE` (a whole piece as it is): a huge
    piece is never copied whole."""
    if i == 0 and end == len(data):
        scan.feed(data)
        return
    while i < end:
        j = min(end, i + _SLICE)
        scan.feed(data[i:j])
        i = j


def _is_delta(api: str, typ: bytes) -> bool:
    if api == _MESSAGES:
        return typ == _BLOCK_DELTA
    return typ.endswith(b".delta") and typ.startswith(b"response.")


class EventUsageTap:
    """Watches one Responses API (``api="responses"``) or Anthropic Messages (``api="messages"``)
    stream; never rewrites it. ``feed(piece)`` returns `piece` itself, ``finish()`` b"". ``usage`` is
    set once the stream's usage has been seen; ``events`` counts delta events (the basis of an
    estimate, with `prompt_estimate`, when usage never arrives); ``response_id`` is the response's
    (or message's) id."""

    __slots__ = ("_api", "_delta", "_delta_seen", "_event", "_head", "_held", "_held_len", "_in", "_len",
                 "_named", "_out", "_planned", "_pre", "_scan", "_state", "_suf", "_tail", "events",
                 "prompt_estimate", "response_id", "usage")

    rewrites = False

    def __init__(self, api: str, prompt_estimate: int | None = None) -> None:
        if api not in (_RESPONSES, _MESSAGES):
            raise ValueError(f"EventUsageTap: unknown api {api!r}")
        self._api = api
        self.usage: Usage | None = None
        self.events = 0
        self.prompt_estimate = prompt_estimate
        self.response_id: str | None = None
        self._event: bytes | None = None  # the current event's event: name
        self._named = self._pre = self._suf = b""  # the last event: name, its confirming bytes
        self._delta = False  # whether that name is a delta event's
        # Messages: counts from message_start, then the last message_delta.
        self._delta_seen = False
        self._in: int | None = None
        self._out: int | None = None
        # A line that spans pieces.
        self._state = _START
        self._head = b""
        self._tail = b""
        self._len = 0
        self._planned = False
        self._scan: BodyTail | None = None
        self._held: list[bytes] | None = None
        self._held_len = 0

    # -- the public surface --------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Consume one upstream piece; it goes to the client unchanged (returned as is)."""
        n = len(data)
        i = 0
        find = data.find
        while i < n:
            nl = find(b"\n", i)
            if nl < 0:
                self._more(data, i, n)
                break
            if self._state != _START:
                self._more(data, i, nl)
                self._end_line(True)
                i = nl + 1
                continue
            e = nl
            if e > i and data[e - 1] == 13:
                e -= 1
            # The hot path, inlined: a delta event's data line whose JSON confirms its event: line.
            if (self._delta and self._event is not None and data.startswith(b"data:", i)
                    and (data.endswith(self._suf, i, e) or data.startswith(self._pre, i, e))):
                self.events += 1
            elif e == i:
                self._event = None  # a blank line ends the event
            elif data.startswith(b"event:", i) and e - i <= _NAME_CAP:
                name = data[i + 6 : e].strip()
                if name == self._named:
                    self._event = name or None
                else:
                    self._name(name)
            else:
                self._whole(data, i, e, True)
            i = nl + 1
        return data

    def finish(self) -> bytes:
        """The stream ended: a line cut short is looked at (its usage taken if complete JSON, not
        counted as an event)."""
        if self._state != _START:
            self._end_line(False)
        return b""

    # -- what a line is ---------------------------------------------------------------------------------

    def _type(self, data: bytes, i: int, h: int, t: int, e: int) -> bytes | None:
        """The type of the data line data[i:e] from its first bytes data[i:h] and last data[t:e]: the
        event: line's when the JSON confirms it, else the JSON's first, last or after-scalars type, else
        the event: line's."""
        ev = self._event
        if ev is not None and (data.endswith(self._suf, t, e) or data.startswith(self._pre, i, h)):
            return ev
        m = _FIRST_TYPE.match(data, i, h) or _LAST_TYPE.search(data, t, e) or _AFTER_SCALARS.match(data, i, h)
        return ev if m is None else m.group(1)

    def _hint(self, head: bytes) -> bytes | None:
        # What a long line is, as far as its first _HEAD bytes (and its event: line) tell.
        m = _FIRST_TYPE.match(head) or _AFTER_SCALARS.match(head)
        return self._event if m is None else m.group(1)

    def _plans(self, hint: bytes | None) -> tuple[bool, bool]:
        """(stream it through a BodyTail, hold it): a long line that may carry usage."""
        if self._api == _RESPONSES:
            return hint is None or hint in _TERMINAL, False
        return False, hint is None or hint in _MSG_USAGE

    def _whole(self, data: bytes, i: int, e: int, complete: bool) -> None:
        """data[i:e] is a whole line (no newline, no trailing CR), all of it at hand."""
        if e == i:
            self._event = None  # a blank line ends the event
        elif data.startswith(b"data:", i):
            if e - i <= _HEAD:
                self._short(data, i, e, complete)
                return
            # A long line: the same decisions as when it comes in pieces (_more, _end_line).
            h = i + _HEAD
            streamed, hold = self._plans(self._hint(data[i:h]))
            scan = None
            if streamed:
                scan = BodyTail(last=True)
                _scan(scan, data, i, e)
            held = data[i:e] if hold and e - i <= _HOLD_CAP else None
            self._long(data[i:h], data[e - _TAIL : e], scan, held, complete)
        elif data.startswith(b"event:", i):
            self._name(data[i + 6 : e].strip() if e - i <= _NAME_CAP else None)
        # Anything else (a comment, id:, retry:) says nothing about usage.

    def _short(self, data: bytes, i: int, e: int, complete: bool) -> None:
        # A data line of at most _HEAD bytes.
        typ = self._type(data, i, e, max(i, e - _TAIL), e)
        if typ is None:
            typ = _decoded_type(data[i + 5 : e])  # its type elsewhere: decode the (short) line
            if typ is None:
                return
        api = self._api
        if _is_delta(api, typ):
            if complete:
                self.events += 1
        elif api == _RESPONSES:
            if typ in _HAS_ID and self.response_id is None:
                self._take_id(data, i, e)
            if typ in _TERMINAL:
                scan = BodyTail(last=True)
                scan.feed(data[i:e])
                scan.finish()
                if scan.usage is not None:
                    self.usage = scan.usage
        elif typ in _MSG_USAGE:
            self._message(data[i + 5 : e], typ, data, i, e)

    def _long(self, head: bytes, tail: bytes, scan: BodyTail | None, held: bytes | None,
              complete: bool) -> None:
        # A data line longer than _HEAD: its first and last bytes, its BodyTail or its bytes if planned.
        typ = self._type_long(head, tail)
        if typ is None:
            if held is None:
                return
            typ = b""  # the held line's own type decides
        api = self._api
        if _is_delta(api, typ):
            if complete:
                self.events += 1
        elif api == _RESPONSES:
            if typ in _HAS_ID and self.response_id is None:
                self._take_id(head, 0, len(head))
            if typ in _TERMINAL and scan is not None:
                scan.finish()
                if scan.usage is not None:
                    self.usage = scan.usage
        elif held is not None and (typ in _MSG_USAGE or not typ):
            self._message(held[5:], typ, head, 0, len(head))

    def _type_long(self, head: bytes, tail: bytes) -> bytes | None:
        ev = self._event
        if ev is not None and (tail.endswith(self._suf) or head.startswith(self._pre)):
            return ev
        m = _FIRST_TYPE.match(head) or _LAST_TYPE.search(tail) or _AFTER_SCALARS.match(head)
        return ev if m is None else m.group(1)

    def _name(self, name: bytes | None) -> None:
        # The event: line's type, and the two ways its data line confirms it cheaply: the JSON's
        # first member (Anthropic) or its last (the Responses API).
        self._event = name or None
        if name:
            self._named = name
            if len(name) <= _NAME_CONFIRM:
                self._pre = b'data: {"type":"' + name + b'"'
                self._suf = b'"type":"' + name + b'"}'
            else:
                self._pre = self._suf = b"\n"  # never in a line: not confirmed, the regexes decide
            self._delta = _is_delta(self._api, name)

    def _take_id(self, data: bytes, i: int, h: int) -> None:
        m = _EVENT_ID.match(data, i, h)
        if m is not None:
            self.response_id = m.group(1).decode("ascii")

    def _message(self, payload: bytes, typ: bytes, data: bytes, i: int, h: int) -> None:
        try:
            ev = _message_decoder.decode(payload)
        except msgspec.DecodeError:
            return
        if ev.type is not None:
            typ = ev.type.encode()  # the JSON's own type decides
        if typ == _MSG_START and ev.message is not None:
            p, c = _counts(ev.message.usage)
            if not self._delta_seen:
                self._in, self._out = p, c
                if p is not None:
                    self.prompt_estimate = p  # vLLM's own input count: exact even if the stream is cut
            elif self._in is None:
                self._in = p
            if self.response_id is None:
                self._take_id(data, i, h)
            if not self._delta_seen:
                return  # the output count comes with message_delta; a stream cut before it is estimated
        elif typ == _MSG_DELTA and ev.usage is not None:
            p, c = _counts(ev.usage)
            if p is None and c is None:
                return
            self._delta_seen = True
            if p is not None:
                self._in = p
            self._out = c
        else:
            return
        usage = to_usage(RawUsage(input_tokens=self._in, output_tokens=self._out))
        if usage is not None:
            self.usage = usage

    # -- a line that spans pieces ----------------------------------------------------------------------

    def _more(self, data: bytes, i: int, end: int) -> None:
        """More bytes of the current line, data[i:end] (no newline in them)."""
        if self._state == _START:
            self._state = _LINE
            self._head = b""
            self._tail = b""
            self._len = 0
            self._planned = False
            self._scan = None
            self._held = None
            self._held_len = 0
        if end == i:
            return
        before = self._head
        self._len += end - i
        if len(before) < _HEAD:
            self._head = before + data[i : min(end, i + _HEAD - len(before))]
        # One byte more than _TAIL: the line's last may be the CR of its CRLF.
        self._tail = (self._tail + data[max(i, end - _TAIL - 1) : end])[-_TAIL - 1 :]
        if self._planned:
            self._take(data, i, end)
        elif self._len >= _HEAD:
            # The first _HEAD bytes are in (all of them in `before` + this piece): decide.
            self._planned = True
            if self._head.startswith(b"data:"):
                streamed, hold = self._plans(self._hint(self._head))
                self._scan = BodyTail(last=True) if streamed else None
                self._held = [] if hold else None
            if before:
                self._take(before, 0, len(before))
            self._take(data, i, end)

    def _take(self, data: bytes, i: int, end: int) -> None:
        if self._scan is not None:
            _scan(self._scan, data, i, end)
        if self._held is not None:
            self._held_len += end - i
            if self._held_len > _HOLD_CAP + 1:  # (+1: a CR that ends the line)
                self._held = None  # too big for what it should be: given up
            else:
                self._held.append(data[i:end])

    def _end_line(self, complete: bool) -> None:
        self._state = _START
        head, tail = self._head, self._tail
        scan, held = self._scan, self._held
        self._head = self._tail = b""
        self._scan = None
        self._held = None
        n = self._len
        if tail.endswith(b"\r"):
            tail = tail[:-1]
            n -= 1
        if n <= _HEAD:
            # A short line: all of it is in the head (and nothing was planned for it).
            self._whole(head[:n], 0, n, complete)
            return
        tail = tail[-_TAIL:]
        if not head.startswith(b"data:"):
            if head.startswith(b"event:"):
                self._name(None)  # longer than any event name
            return
        line = None
        if held is not None and n <= _HOLD_CAP:
            line = b"".join(held)[:n]
        self._long(head, tail, scan, line, complete)
