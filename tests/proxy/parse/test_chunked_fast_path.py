"""The whole-chunk fast path (ChunkedDecoder.take_whole, and ResponseReader's unbuffered read) against the
state machine alone.

The oracle is the same decoder with its fast path switched off (`SlowDecoder.take_whole` takes nothing):
every call must return the same bytes (same grouping), raise the same error (status and message), and
leave the same bytes buffered, whatever the split points -- whole chunks per piece, as over the wire,
or anywhere. h11 stays the oracle of the state machine itself (tests/fuzz).
"""

from __future__ import annotations

import itertools
import random

import pytest

import proxy.parse.response as response_mod
from proxy.parse.chunked import ChunkedDecoder, ChunkError
from proxy.parse.response import ResponseError, ResponseReader


class SlowDecoder(ChunkedDecoder):
    """The state machine only."""

    __slots__ = ()

    def take_whole(self, buf, out) -> int:
        return 0


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENT = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"tok"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n')


def chunk(data: bytes, size: bytes | None = None, ext: bytes = b"", end: bytes = b"\r\n") -> bytes:
    return (b"%x" % len(data) if size is None else size) + ext + b"\r\n" + data + end


# Chunks, good and bad, the fast path must take or leave exactly as the state machine would.
GOOD = [
    chunk(EVENT), chunk(b"a"), chunk(b"x" * 300), chunk(b"0123456789", size=b"A"),
    chunk(b"0123456789", size=b"00000000000000a"), chunk(b"abc", size=b"0000000000000003"),
    chunk(b"abc", ext=b";x=y"), chunk(b"abc", ext=b";"), chunk(b"abc", ext=b" \t"),
    chunk(b"\r\n\r\n"), chunk(b"3\r\nabc\r\n"),
]
LAST = [b"0\r\n\r\n", b"000\r\n\r\n", b"0;last\r\n\r\n", b"0\r\nX-T: 1\r\nY: two words\r\n\r\n"]
BAD = [
    b"\r\n", b"g\r\nabc\r\n", b"0x3\r\nabc\r\n", b"+3\r\nabc\r\n", b" 3\r\nabc\r\n", b"-1\r\n", b"3_0\r\n",
    b";x\r\n", b"8000000000000001\r\n", b"ffffffffffffffff\r\n", b"10000000000000000\r\n",
    b"00000000000000003\r\nabc\r\n", b"3 ;x\r\nabc\r\n", b"3\r\nabcX\r\n", b"3\r\nabc\rX", b"3\r\nabc\n",
    b"3\nabc\r\n", b"3\r\r\nabc\r\n", b"3;a\x00b\r\nabc\r\n", b"3\x00\r\nabc\r\n", b"3\r\nab\r\n\r\n",
    b"2\r\nabc\r\n", b"3;" + b"e" * 1100 + b"\r\nabc\r\n", b"0\r\nno colon\r\n\r\n",
    b"0\r\nContent-Length: 1\r\n\r\n", b"0\r\nX: " + b"t" * 300 + b"\r\n\r\n",
]


def outcome(call):
    try:
        return ("ok", call())
    except (ChunkError, ResponseError) as exc:
        return ("error", getattr(exc, "status", None), getattr(exc, "message", str(exc)))


def run_decoder(cls, pieces: list[bytes], eof: str | None) -> list:
    decoder = cls(200)
    buf = bytearray()
    log = []
    for i, piece in enumerate(pieces + [b""] if eof else pieces):
        buf += piece
        last = eof is not None and i >= len(pieces) - (eof != "after")
        result = outcome(lambda: decoder.read(buf, last))  # noqa: B023
        log.append((result, bytes(buf), decoder.complete))
        if result[0] == "error" or decoder.complete:
            break
    return log


def run_reader(pieces: list[bytes], eof: str | None, slow: bool, monkeypatch) -> list:
    with monkeypatch.context() as m:
        if slow:
            m.setattr(response_mod, "ChunkedDecoder", SlowDecoder)
        reader = ResponseReader()
        reader.feed(SSE_HEAD)
        assert reader.next_head().chunked
    log = []
    if eof == "with the last piece":  # EOF recorded before the last read is decoded
        pieces = pieces[:-1] + [pieces[-1] + b"EOF"]
    for piece in pieces + [b""] if eof == "after" else pieces:
        if piece.endswith(b"EOF"):
            reader.feed(piece[:-3])
            reader.feed(b"")
        else:
            reader.feed(piece)
        while True:
            result = outcome(reader.read_body)
            log.append((result, bytes(reader.buf), reader.complete))
            if result[0] == "error" or reader.complete:
                return log
            if result[1] is None:
                break
            assert type(result[1]) is bytes and result[1]
    return log


def pieces_of(rng: random.Random, parts: list[bytes]) -> list[bytes]:
    """Whole parts per piece (one or several, as a stream arrives), or cut anywhere."""
    mode = rng.randrange(4)
    if mode == 0:
        return parts
    if mode == 1:
        out, i = [], 0
        while i < len(parts):
            k = rng.randint(1, 4)
            out.append(b"".join(parts[i:i + k]))
            i += k
        return out
    data = b"".join(parts)
    if mode == 2 and len(data) < 400:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(set(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def bodies(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        parts = [rng.choice(GOOD) for _ in range(rng.randint(0, 6))]
        if rng.random() < 0.5:
            parts.insert(rng.randint(0, len(parts)), rng.choice(BAD))
        if rng.random() < 0.8:
            parts.append(rng.choice(LAST))
        if rng.random() < 0.2:
            parts.append(b"HTTP/1.1 200 OK\r\n")  # the next response, pipelined
        if not parts:
            continue
        yield pieces_of(rng, parts), rng.choice([None, "after", "with the last piece"])


def test_decoder_fast_path_agrees_with_the_state_machine() -> None:
    for pieces, eof in bodies(1, 3000):
        assert run_decoder(ChunkedDecoder, pieces, eof) == run_decoder(SlowDecoder, pieces, eof), pieces


def test_reader_fast_path_agrees_with_the_state_machine(monkeypatch) -> None:
    for pieces, eof in bodies(2, 3000):
        fast = run_reader(pieces, eof, False, monkeypatch)
        assert fast == run_reader(pieces, eof, True, monkeypatch), pieces


def test_one_chunk_per_read_comes_out_as_a_slice_of_the_read() -> None:
    reader = ResponseReader()
    reader.feed(SSE_HEAD)
    reader.next_head()
    for _ in range(3):
        reader.feed(chunk(EVENT))
        assert reader.read_body() == EVENT
        assert reader.read_body() is None and not reader.buf
    reader.feed(chunk(EVENT) + b"0\r\n\r\n")
    assert reader.read_body() == EVENT and reader.complete
    assert reader.read_body() == b"" and not reader.buf


def test_whole_chunks_then_a_partial_one_come_out_in_one_call() -> None:
    reader = ResponseReader()
    reader.feed(SSE_HEAD)
    reader.next_head()
    reader.feed(chunk(b"abc") + chunk(b"defg") + b"5\r\nhi")
    assert reader.read_body() == b"abcdefghi"
    assert reader.read_body() is None and reader.buf == b""
    reader.feed(b"jkl\r\n")
    assert reader.read_body() == b"jkl"
    reader.feed(b"a;x=y\r\n0123456789\r\n0\r\n\r\n")  # an extension: the state machine's
    assert reader.read_body() == b"0123456789" and reader.complete


@pytest.mark.parametrize("bad, message", [
    (b"3\r\nabcX\r\n", "missing CRLF after chunk data"),
    (b"g\r\n", "bad chunk size"),
    (b"00000000000000003\r\nabc\r\n", "bad chunk size"),
    (b"8000000000000001\r\n", "chunk size too large"),
    (b"3\r\r\nabc\r\n", "bad chunk size"),
])
def test_a_bad_chunk_after_whole_ones_fails_the_call(bad, message) -> None:
    reader = ResponseReader()
    reader.feed(SSE_HEAD)
    reader.next_head()
    reader.feed(chunk(EVENT) + chunk(b"abc") + bad)
    with pytest.raises(ResponseError, match=message):
        reader.read_body()


def test_eof_after_whole_chunks_is_reported_by_the_next_call() -> None:
    reader = ResponseReader()
    reader.feed(SSE_HEAD)
    reader.next_head()
    reader.feed(chunk(b"abc") + b"3\r\nde")
    reader.feed(b"")
    assert reader.read_body() == b"abcde"
    with pytest.raises(ResponseError, match="connection closed mid-body"):
        reader.read_body()
    reader = ResponseReader()
    reader.feed(SSE_HEAD)
    reader.next_head()
    reader.feed(chunk(b"abc"))
    reader.feed(b"")
    assert reader.read_body() == b"abc"
    with pytest.raises(ResponseError, match="connection closed mid-body"):
        reader.read_body()
    for rest in (b"3", b"3\r", b"3\r\n", b"3;x\r\n"):  # whole chunks, then no data yet, then EOF
        reader = ResponseReader()
        reader.feed(SSE_HEAD)
        reader.next_head()
        reader.feed(chunk(b"abc") + rest)
        reader.feed(b"")
        assert reader.read_body() == b"abc"
        with pytest.raises(ResponseError, match="connection closed mid-body"):
            reader.read_body()


def test_take_whole_takes_plain_whole_chunks_only() -> None:
    decoder = ChunkedDecoder(100)
    out: list = []
    data = chunk(b"abc") + chunk(b"0123456789", size=b"0000000A") + chunk(b"x", ext=b";e") + chunk(b"y")
    assert decoder.take_whole(data, out) == len(chunk(b"abc") + chunk(b"0123456789", size=b"0000000A"))
    assert out == [b"abc", b"0123456789"]
    for partial in (b"", b"3", b"3\r", b"3\r\n", b"3\r\nabc", b"3\r\nabc\r", b"0\r\n\r\n", b"3 \r\nabc\r\n"):
        assert decoder.take_whole(partial, out) == 0
    buf = bytearray(b"3\r\nab")
    assert decoder.read(buf, False) == b"ab"  # mid-chunk now: not at a boundary
    assert decoder.take_whole(chunk(b"z"), out) == 0
    assert out == [b"abc", b"0123456789"]


def test_byte_at_a_time_stays_linear_in_a_long_size_line() -> None:
    # A partial size line is probed at most 18 bytes deep by the fast path, each call.
    decoder = ChunkedDecoder(100)
    buf = bytearray()
    for b in b"3;" + b"e" * 1000:
        buf.append(b)
        assert decoder.read(buf, False) is None
    buf += b"\r\nabc\r\n"
    assert decoder.read(buf, False) == b"abc" and not buf
