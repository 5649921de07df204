"""vLLM's own token usage read out of a relayed SSE stream, without re-encoding a byte of it.

Strategy: the relay stays a byte pipe; this module only looks at it (the non-streamed case is
body_usage.py's).

* Streams. vLLM sends one ``data: <compact JSON>\\n\\n`` event per chunk. When the request carries
  ``stream_options.include_usage``, every ordinary chunk has ``"usage":null`` and one extra event comes
  before ``data: [DONE]``: ``{"id":..., "choices":[], "usage":{"prompt_tokens":..,"completion_tokens":..,
  "total_tokens":..}}`` (vLLM ``serving_chat.py`` / ``serving_completion.py``: ``final_usage_chunk`` with
  ``choices=[]``, dumped with ``exclude_none``; OpenAI documents the same shape). A client that did not ask
  for usage must not see that event, so the gateway injects ``include_usage`` (include_usage.py) and
  the tap removes the event again (`SseUsageTap(strip_usage_chunk=True)`); a client that asked gets the
  stream untouched (``strip_usage_chunk=False``). With ``continuous_usage_stats`` vLLM also puts a running
  ``usage`` object in ordinary chunks; the tap still reads only the ``choices: []`` event.
* The tap works line by line on arbitrary split points. A line is classified as soon as its first bytes
  allow: not a ``data:`` line, or a data line whose ``"choices"`` array starts with anything but ``]``,
  is ordinary and flows straight through. The common line, whole in its piece, is decided by a few byte
  comparisons, no regex: it starts ``data: {`` and its first ``"choices"`` (any match of the pattern
  starts at one) is followed by ``:[`` and a byte other than ``]`` or whitespace -- ordinary, counted
  (a piece that is exactly one such event returns before the line loop); every other line takes the
  regex, so only what can be the usage event is ever decoded. Only an undecided partial data line (its
  bytes before ``"choices":[`` -- vLLM puts ``id``, ``object``, ``created``, ``model`` first, ~100 bytes) or
  a candidate line (``"choices":[]``) is held back, and only when stripping. A candidate is decoded once, when
  complete; if it is the usage event, it and the blank line ending the event are dropped. Each input byte
  is examined a bounded number of times (a 64-byte probe window carries matches across split points), so
  `feed` is O(len(data)); when nothing is held or dropped it returns its argument itself, no copy.
* Line ends are ``\\n`` (``\\r\\n`` tolerated); bare ``\\r`` line ends (legal SSE, never sent by vLLM) are not
  split on, so such a stream passes through untouched and yields no usage.

A literal ``"choices"`` followed by ``:`` can only be a key: inside JSON strings quotes are
escaped, so model output cannot fake the patterns matched here.
"""

from __future__ import annotations

import re

import msgspec

from proxy.usage.counts import RawUsage, Usage, to_usage


class _UsageChunk(msgspec.Struct):
    choices: list[msgspec.Raw] | None = None
    usage: RawUsage | None = None


_chunk_decoder = msgspec.json.Decoder(_UsageChunk)


# ``"choices"`` then ``:`` then ``[`` then the first significant byte: ``]`` means an empty array.
_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*(\S)')
_PROBE_KEEP = 64
_HEAD_KEEP = 8

# Line states.
_START = 0  # at the first byte of a line
_PROBE = 1  # a line not yet classified (held when stripping)
_CAND = 2  # a data line with "choices":[] (held when stripping)
_PASS = 3  # an ordinary line: bytes flow through until its newline


def _payload_is_json(head: bytes) -> bool:
    # ``data:`` then optional space then ``{``: a JSON event (not ``[DONE]``, not an empty data line).
    return head.startswith(b"data:") and head[5:].lstrip(b" ")[:1] == b"{"


class SseUsageTap:
    """Watches one streamed response; optionally removes the usage-only event the gateway asked for.

    ``feed(piece)`` returns the bytes to send to the client for that piece, ``finish()`` whatever was
    held back when the upstream ends. ``usage`` is set once the usage event has been seen; ``events``
    counts JSON data events other than the usage event (vLLM sends about one per generated token, plus
    the opening role chunk), the basis of an estimate when usage never arrives (with `prompt_estimate`,
    the prompt tokens the request was charged up front).
    """

    __slots__ = ("_head", "_held", "_pending", "_pending_cr", "_probe", "_state", "_strip", "events",
                 "prompt_estimate", "usage")

    @property
    def rewrites(self) -> bool:
        """True when the relayed bytes may differ from the upstream's (the usage event is removed)."""
        return self._strip

    def __init__(self, *, strip_usage_chunk: bool, prompt_estimate: int | None = None) -> None:
        self.usage: Usage | None = None
        self.events = 0
        self.prompt_estimate = prompt_estimate  # the request's prompt tokens as charged (for an estimate)
        self._strip = strip_usage_chunk
        self._state = _START
        self._head = b""  # the first bytes of the current line
        self._probe = b""  # the last bytes of an undecided line, to match across split points
        self._held: list[bytes] = []  # the current line's bytes so far (PROBE/CAND)
        self._pending: bytes | None = None  # stripping: a usage line waiting for the blank line after it
        self._pending_cr = False

    # -- the public surface --------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Consume one upstream piece; return what the client should get for it."""
        if (self._state == _START and self._pending is None and data.startswith(b"data: {")
                and data.find(b"\n") == len(data) - 2 and data[-1] == 10):
            # The common piece, one whole event (`data: {...}\n\n`): if ordinary, decided at once (see below).
            k = data.find(b'"choices"')  # in the line: nothing but its newlines follows it
            if k >= 0 and data[k + 9] == 58 and data[k + 10] == 91:  # `:[`, both before the newlines
                c = data[k + 11]
                if c > 32 and c != 93:
                    self.events += 1
                    return data
        n = len(data)
        if not n:
            return data
        out: list[bytes] | None = None  # stripping only: pieces, when anything is held or dropped
        mark = 0  # data[mark:i] is still to be emitted
        i = 0
        find = data.find
        while i < n:
            if self._pending is not None:
                # A stripped usage line: drop the blank line that ends its event; anything else means it
                # was not a standalone event after all, so it goes out unchanged.
                b = data[i]
                if b == 13 and not self._pending_cr:
                    out = self._cut(out, data, mark, i)
                    self._pending_cr = True
                    i += 1
                    mark = i
                    continue
                if b == 10:
                    out = self._cut(out, data, mark, i)
                    self._pending = None
                    self._pending_cr = False
                    i += 1
                    mark = i
                    continue
                out = self._cut(out, data, mark, i)
                out.append(self._pending + (b"\r" if self._pending_cr else b""))
                self._pending = None
                self._pending_cr = False
                mark = i
                continue
            nl = find(b"\n", i)
            end = n if nl < 0 else nl + 1
            complete = nl >= 0
            state = self._state
            if state == _START and complete:
                # The common case: a whole line in this piece.
                if data.startswith(b"data: {", i):
                    # An ordinary chunk, decided by a few comparisons: the line's first "choices" (any match
                    # of _CHOICES starts at one) is followed by `:[` and a byte that is neither `]` nor
                    # whitespace. Anything else takes the regex below, which is exact.
                    k = find(b'"choices"', i, nl)
                    if k >= 0 and data[k + 9] == 58 and data[k + 10] == 91:  # each index <= nl in turn
                        c = data[k + 11]
                        if c > 32 and c != 93:
                            self.events += 1
                            i = end
                            if i < n and data[i] == 10:
                                i += 1  # the blank line ending the event: nothing to do at a line start
                            continue
                if data.startswith(b"data:", i):
                    m = _CHOICES.search(data, i, end)
                    if m is not None and m.group(1) == b"]":
                        line = data[i:end]
                        if self._take_usage(line):
                            if self._strip:
                                out = self._cut(out, data, mark, i)
                                mark = end
                                self._pending = line
                        else:
                            self._count(line)
                    elif _payload_is_json(data[i : i + _HEAD_KEEP]):
                        self.events += 1
                i = end
                continue
            if state == _PASS:
                if complete:
                    self._count_head()
                    self._end_line()
                i = end
                continue
            # START with a partial line, PROBE or CAND: this line is (still) held.
            seg = data[i:end]
            if self._strip:
                out = self._cut(out, data, mark, i)
                mark = end
            self._held.append(seg)
            if len(self._head) < _HEAD_KEEP:
                self._head = (self._head + seg)[:_HEAD_KEEP]
            if state != _CAND:
                state = self._classify(seg, complete)
            if state == _PASS:
                if self._strip:
                    out.append(b"".join(self._held))  # release: an ordinary line
                if complete:
                    self._count_head()
                    self._end_line()
                else:
                    self._held = []
                    self._state = _PASS
            elif complete:
                self._complete_held(out, state)
            else:
                self._state = state
            i = end
        if out is None:
            return data
        out.append(data[mark:])
        return b"".join(out)

    def finish(self) -> bytes:
        """The stream ended: return anything still held back (a trailing partial line)."""
        if self._pending is not None:
            # A usage event cut short of its blank line: it was still the usage event; drop it.
            self._pending = None
            self._pending_cr = False
            return b""
        if not self._held:
            self._end_line()
            return b""
        line = b"".join(self._held)
        if self._state == _CAND and self._take_usage(line):
            self._end_line()
            return b""
        self._end_line()  # an unterminated line is not an event: not counted
        return line if self._strip else b""

    # -- helpers ---------------------------------------------------------------------------------------

    @staticmethod
    def _cut(out: list[bytes] | None, data: bytes, mark: int, i: int) -> list[bytes]:
        if out is None:
            out = []
        if i > mark:
            out.append(data[mark:i])
        return out

    def _classify(self, seg: bytes, complete: bool) -> int:
        head = self._head
        if (len(head) >= 5 or complete) and not head.startswith(b"data:"):
            return _PASS
        window = self._probe + seg
        m = _CHOICES.search(window)
        if m is not None:
            return _CAND if m.group(1) == b"]" else _PASS
        if complete:
            return _PASS  # a data line without a choices array: [DONE], an error event
        self._probe = window[-_PROBE_KEEP:]
        return _PROBE

    def _complete_held(self, out: list[bytes] | None, state: int) -> None:
        line = b"".join(self._held)
        if state == _CAND and self._take_usage(line):
            if self._strip:
                self._pending = line
        else:
            if self._strip:
                out.append(line)  # type: ignore[union-attr]
            self._count(line)
        self._end_line()

    def _take_usage(self, line: bytes) -> bool:
        payload = line[5:].strip()
        try:
            chunk = _chunk_decoder.decode(payload)
        except msgspec.DecodeError:
            return False
        if chunk.choices is None or chunk.choices or chunk.usage is None:
            return False
        usage = to_usage(chunk.usage)
        if usage is None:
            return False  # no counts in it: not the usage event
        self.usage = usage
        return True

    def _count(self, line: bytes) -> None:
        if _payload_is_json(line[:_HEAD_KEEP]):
            self.events += 1

    def _count_head(self) -> None:
        if _payload_is_json(self._head):
            self.events += 1

    def _end_line(self) -> None:
        self._state = _START
        self._head = b""
        self._probe = b""
        if self._held:
            self._held = []
