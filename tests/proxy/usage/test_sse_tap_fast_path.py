"""SseUsageTap's fast paths (a whole ordinary event decided by a few byte comparisons) against its line
machine.

Fed one byte at a time, no line is ever whole in a piece, so the tap takes only its general path (the
regex, the held lines): that is the oracle. Fed one event per piece (the fast path of `feed`'s entry),
several events per piece (the fast path in the line loop) or cut anywhere, every stream must give the
same bytes out, the same usage and the same event count, stripping or not -- including the lines built
to look ordinary to a careless byte test: a spaced ``"choices" : []``, a nested ``"choices":[{`` after
an empty top-level array, ``[`` followed by whitespace, ``data:{`` without the space.
"""

from __future__ import annotations

import itertools
import random

import pytest

from proxy.usage.counts import Usage
from proxy.usage.sse_tap import SseUsageTap

HEAD = b'{"id":"chatcmpl-7f3a","object":"chat.completion.chunk","created":1718000000,"model":"qwen3-coder",'
USAGE = b'"usage":{"prompt_tokens":17,"total_tokens":23,"completion_tokens":6}'


def data(payload: bytes, end: bytes = b"\n\n") -> bytes:
    return b"data: " + payload + end


ORDINARY = [
    data(HEAD + b'"choices":[{"index":0,"delta":{"content":"tok"},"logprobs":null,"finish_reason":null}],'
         b'"usage":null}'),
    data(HEAD + b'"choices":[{"index":0,"delta":{"content":"say \\"choices\\":[] ok"},"logprobs":null,'
         b'"finish_reason":null}],"usage":null}'),
    data(b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"Hi",'
         b'"logprobs":null,"finish_reason":null}],"usage":null}'),
    data(HEAD + b'"choices":[{"index":0,"delta":{"content":"x"}}],' + USAGE + b"}"),  # continuous usage
    data(HEAD + b'"choices":[ {"index":0,"delta":{"content":"x"}}]}'),  # whitespace after `[`
    data(HEAD + b'"choices" : [{"index":0}]}'),  # spaced
    b"data:" + HEAD + b'"choices":[{"index":0}]}\n\n',  # no space after the colon
    data(b'{"error":{"message":"boom","type":"server_error","code":500}}'),  # no choices at all
    data(HEAD + b'"choices":[\x01]}'),  # not JSON, but ordinary to the regex too
]
USAGE_EVENTS = [
    data(HEAD + b'"choices":[],' + USAGE + b"}"),
    data(HEAD + b'"choices" : [ ],' + USAGE + b"}"),
    data(HEAD + b'"choices":[ ],' + USAGE + b"}"),
    data(HEAD + b'"choices":[\t]\t,' + USAGE + b"}"),
    # The first "choices" is the empty array: a nested one further on must not make it look ordinary.
    data(b'{"id":"x","choices" :[],' + USAGE + b',"extra":{"choices":[{"index":0}]}}'),
]
OTHER = [
    data(b"[DONE]"), b": ping\n\n", b"\n", b"event: x\ndata: {}\n\n", data(HEAD + b'"choices":[],"usage":null}'),
    data(HEAD + b'"choices":[{"index":0}]}', end=b"\r\n\r\n"), data(HEAD + b'"choices":[{"index":0}]}', end=b"\n"),
    data(HEAD + b'"choices":[],' + USAGE + b"}", end=b"\r\n\r\n"),
    data(HEAD + b'"choices":[],' + USAGE + b"}", end=b"\n") + b"data: more\n\n",  # not a standalone event
]
WANT = Usage(prompt_tokens=17, completion_tokens=6, total_tokens=23)


def run(pieces: list[bytes], strip: bool) -> tuple[bytes, Usage | None, int]:
    tap = SseUsageTap(strip_usage_chunk=strip)
    out = b"".join(tap.feed(p) for p in pieces) + tap.finish()
    return out, tap.usage, tap.events


def oracle(stream: bytes, strip: bool) -> tuple[bytes, Usage | None, int]:
    return run([stream[i:i + 1] for i in range(len(stream))], strip)


def test_each_kind_of_event_alone_agrees_with_the_line_machine() -> None:
    for event in ORDINARY + USAGE_EVENTS + OTHER:
        for strip in (True, False):
            assert run([event], strip) == oracle(event, strip), event


def test_ordinary_events_are_counted_and_pass_as_they_are() -> None:
    tap = SseUsageTap(strip_usage_chunk=True)
    for event in ORDINARY:
        assert tap.feed(event) is event
    assert tap.events == len(ORDINARY)  # every JSON data event but the usage one, error events included
    assert tap.usage is None


def test_usage_events_are_found_and_stripped_whole_or_in_pieces() -> None:
    for event in USAGE_EVENTS:
        for pieces in ([event], [event[:40], event[40:]], [ORDINARY[0] + event + data(b"[DONE]")]):
            out, usage, events = run(pieces, True)
            assert usage == WANT, event
            assert event not in out and out == b"".join(pieces).replace(event, b"")
            assert run(pieces, False) == (b"".join(pieces), WANT, events)


@pytest.mark.parametrize("strip", [True, False])
def test_random_streams_any_split_agree_with_the_line_machine(strip: bool) -> None:
    rng = random.Random(11 if strip else 12)
    kinds = ORDINARY * 4 + USAGE_EVENTS + OTHER
    for _ in range(400):
        events = [rng.choice(kinds) for _ in range(rng.randint(1, 8))]
        stream = b"".join(events)
        want = oracle(stream, strip)
        assert run(events, strip) == want, events  # one event per piece, as over the wire
        grouped, i = [], 0
        while i < len(events):
            k = rng.randint(1, 4)
            grouped.append(b"".join(events[i:i + k]))
            i += k
        assert run(grouped, strip) == want, events  # several per piece
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(1, 10))))
        bounds = [0, *cuts, len(stream)]
        assert run([stream[a:b] for a, b in itertools.pairwise(bounds)], strip) == want, (events, cuts)
