"""Fuzz: proxy/cluster/resp.py's Reader (RESP2 replies) on generated streams, valid and hostile.

Replies are generated as trees -- bulk strings holding CRLF, ``$3``, ``*1`` and any byte; simple
strings; errors (any text but CR / LF); 64-bit integers; null bulks and null arrays; arrays nested up
to the reader's depth limit -- and written by a reference encoder of this file's own, several per stream.

Asserts:
- a valid stream, cut into random pieces (sometimes one byte at a time), decodes to exactly the replies
  it was built from, in order, and then to NEED_DATA;
- hostile bytes (random, RESP fragments glued at random, mutated valid streams) never raise anything
  but ProtocolError, which then sticks; every `next()` returns, and a stream yields at most one reply
  per byte; what it yields (and whether it fails) depends on the bytes only, not on how they are cut;
- the bounds: a bulk over MAX_BULK, an array over MAX_ARRAY elements, nesting over MAX_DEPTH, a line
  over MAX_LINE bytes with or without its CRLF are refused as soon as their header or line is in,
  before anything that size is allocated; at the bounds themselves they are accepted.
Example counts: 300 by default (fewer for the bounds); SPOTINFERENCE_FUZZ_EXAMPLES=N for more.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.cluster.resp import (
    MAX_ARRAY,
    MAX_BULK,
    MAX_DEPTH,
    MAX_LINE,
    NEED_DATA,
    ProtocolError,
    Reader,
    ReplyError,
)
from tests.fuzz._common import fuzz_settings, mutated, split

# -- the reference: reply trees, their bytes, their decoded value ------------------------------------

NO_EOL = {ord("\r"): None, ord("\n"): None}
tricky_bulks = st.sampled_from([b"", b"\r\n", b"a\r\nb", b"$3\r\n", b"*1\r\n:1\r\n", b"\r", b"\n", b"-ERR\r\n",
                                b"\x00\xff", b"+OK"])
leaves = st.one_of(
    st.tuples(st.just("bulk"), st.one_of(st.binary(max_size=40), tricky_bulks)),
    st.tuples(st.just("simple"), st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
    st.tuples(st.just("error"), st.one_of(st.sampled_from(["ERR unknown", "NOSCRIPT No matching script", "X"]),
                                          st.text(max_size=20).map(lambda s: s.translate(NO_EOL))),
              ),
    st.tuples(st.just("int"), st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.integers(-5, 5))),
    st.just(("null_bulk",)),
    st.just(("null_array",)),
)
trees = st.recursive(leaves, lambda kids: st.lists(kids, max_size=5).map(lambda xs: ("array", xs)),
                     max_leaves=30)


def ref_encode(tree) -> bytes:
    kind = tree[0]
    if kind == "bulk":
        return b"$%d\r\n%s\r\n" % (len(tree[1]), tree[1])
    if kind == "simple":
        return b"+%s\r\n" % tree[1]
    if kind == "error":
        return b"-%s\r\n" % tree[1].encode()
    if kind == "int":
        return b":%d\r\n" % tree[1]
    if kind == "null_bulk":
        return b"$-1\r\n"
    if kind == "null_array":
        return b"*-1\r\n"
    return b"*%d\r\n" % len(tree[1]) + b"".join(ref_encode(kid) for kid in tree[1])


def expected(tree):
    kind = tree[0]
    if kind in ("bulk", "simple", "int"):
        return tree[1]
    if kind == "error":
        return ("ReplyError", tree[1])
    if kind in ("null_bulk", "null_array"):
        return None
    return [expected(kid) for kid in tree[1]]


def normalized(value):
    """A decoded reply in `expected`'s form (ReplyError compares by identity)."""
    if isinstance(value, ReplyError):
        assert value.code == value.message.partition(" ")[0]
        return ("ReplyError", value.message)
    if isinstance(value, list):
        return [normalized(v) for v in value]
    assert value is None or type(value) in (bytes, int), value
    return value


def depth(tree) -> int:
    return 1 + max((depth(kid) for kid in tree[1]), default=0) if tree[0] == "array" else 0


def decode_all(pieces: list[bytes]) -> tuple[list, bool]:
    """Feed `pieces` one by one, taking every complete reply after each: (replies, failed)."""
    reader = Reader()
    out: list = []
    budget = len(pieces) + sum(len(p) for p in pieces) + 1  # a reply takes >= 3 bytes: more is a loop
    for piece in pieces:
        reader.feed(piece)
        while True:
            budget -= 1
            assert budget >= 0, "next() keeps returning replies: a loop"
            try:
                reply = reader.next()
            except ProtocolError:
                with pytest.raises(ProtocolError):  # sticky: the stream is out of sync for good
                    reader.next()
                return out, True
            if reply is NEED_DATA:
                break
            out.append(normalized(reply))
    return out, False


# -- valid streams --------------------------------------------------------------------------------

@given(st.data())
@fuzz_settings(300)
def test_replies_decode_identically_however_cut(data):
    replies = data.draw(st.lists(trees.filter(lambda t: depth(t) <= MAX_DEPTH), min_size=1, max_size=5),
                        label="replies")
    stream = b"".join(ref_encode(t) for t in replies)
    pieces = data.draw(split(stream), label="pieces")
    event(f"pieces: {min(len(pieces), 10)}{'+' if len(pieces) > 10 else ''}")
    got, failed = decode_all(pieces)
    assert not failed
    assert got == [expected(t) for t in replies]


@given(st.data())
@fuzz_settings(100)
def test_nesting_over_the_limit_is_refused(data):
    levels = data.draw(st.integers(MAX_DEPTH - 1, MAX_DEPTH + 3), label="levels")
    leaf = data.draw(st.sampled_from([b":1\r\n", b"*0\r\n", b"$-1\r\n", b"*-1\r\n", b"$2\r\n\r\n\r\n"]))
    array_levels = levels + (leaf == b"*0\r\n")
    stream = b"*1\r\n" * levels + leaf
    got, failed = decode_all(data.draw(split(stream), label="pieces"))
    assert failed == (array_levels > MAX_DEPTH)
    assert len(got) == (0 if failed else 1)


# -- hostile bytes --------------------------------------------------------------------------------

FRAGMENTS = [b"+OK\r\n", b"$3\r\n", b"abc", b"\r\n", b"*2\r\n", b"*-1\r\n", b":-12\r\n", b"-ERR x\r\n",
             b"$-1\r\n", b"*0\r\n", b"$0\r\n", b"\r", b"\n", b"*99999999999\r\n", b"$-2\r\n", b"_\r\n",
             b"%1\r\n", b"*1\r\n", b"$01\r\n", b":+1\r\n", b": 1\r\n", b"$1\r\nab", b"+\r\n", b"-\r\n", b":\r\n",
             b"$67108865\r\n", b"*1048577\r\n", b":9223372036854775808\r\n", b"\x00", b"$ 3\r\n"]


@st.composite
def hostile(draw) -> bytes:
    how = draw(st.sampled_from(["random", "fragments", "mutated"]))
    event(f"hostile: {how}")
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "fragments":
        return b"".join(draw(st.lists(st.sampled_from(FRAGMENTS), max_size=20)))
    valid = b"".join(ref_encode(t) for t in draw(st.lists(trees, min_size=1, max_size=3)))
    return draw(mutated(valid, probability=1.0))


@given(st.data())
@fuzz_settings(300)
def test_hostile_bytes_raise_only_protocol_error_and_do_not_depend_on_the_cut(data):
    stream = data.draw(hostile(), label="stream")
    whole = decode_all([stream] if stream else [])
    cut = decode_all(data.draw(split(stream), label="pieces"))
    event("failed" if whole[1] else "accepted")
    assert cut == whole


# -- the bounds -----------------------------------------------------------------------------------

def _first(stream: bytes):
    reader = Reader()
    reader.feed(stream)
    return reader.next()


@pytest.mark.parametrize(("header", "ok"), [
    (b"$%d\r\n" % MAX_BULK, True), (b"$%d\r\n" % (MAX_BULK + 1), False), (b"$99999999999\r\n", False),
    (b"*%d\r\n" % MAX_ARRAY, True), (b"*%d\r\n" % (MAX_ARRAY + 1), False), (b"*99999999999\r\n", False),
])
def test_length_bounds_are_checked_on_the_header(header, ok):
    if ok:
        assert _first(header) is NEED_DATA  # waits for the data; allocates nothing for it
    else:
        with pytest.raises(ProtocolError, match="over the limit"):
            _first(header)


def test_a_line_at_the_bound_is_accepted_and_one_byte_more_refused():
    assert _first(b"+" + b"a" * (MAX_LINE - 1) + b"\r\n") == b"a" * (MAX_LINE - 1)
    with pytest.raises(ProtocolError, match="line of over"):
        _first(b"+" + b"a" * MAX_LINE + b"\r\n")


@given(st.data())
@fuzz_settings(30)
def test_a_line_without_its_end_is_refused_once_past_the_bound(data):
    """However the bytes come, the reader refuses an endless line as soon as more than MAX_LINE + CR
    are buffered (and not before): a server cannot make it buffer a line without limit."""
    kind = data.draw(st.sampled_from([b"+", b"-", b":", b"$", b"*"]), label="kind")
    stream = kind + b"7" * (MAX_LINE + data.draw(st.integers(1, 3000)))
    reader = Reader()
    fed = 0
    for piece in data.draw(split(stream), label="pieces"):
        reader.feed(piece)
        fed += len(piece)
        if fed <= MAX_LINE + 1:
            assert reader.next() is NEED_DATA
        else:
            with pytest.raises(ProtocolError, match="line of over"):
                reader.next()
            return
    raise AssertionError("never refused")


def test_a_large_bulk_arrives_in_many_reads():
    value = bytes(range(256)) * 4096  # 1 MiB
    stream = b"*2\r\n$%d\r\n%s\r\n:7\r\n" % (len(value), value)
    reader = Reader()
    for i in range(0, len(stream), 65536):
        assert reader.next() is NEED_DATA
        reader.feed(stream[i:i + 65536])
    assert reader.next() == [value, 7]
    assert reader.next() is NEED_DATA


def test_many_small_replies_in_one_buffer():
    reader = Reader()
    reader.feed(b"+OK\r\n:1\r\n$1\r\nx\r\n" * 20000)
    got = [reader.next() for _ in range(60000)]
    assert got[:3] == [b"OK", 1, b"x"] and len(got) == 60000
    assert reader.next() is NEED_DATA
