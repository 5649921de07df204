"""Shared pieces of the fuzzers: example counts, hypothesis settings, byte-stream splitting, mutation.

`SPOTINFERENCE_FUZZ_EXAMPLES=N` raises (or lowers) every fuzzer's example count for a long run; the
default keeps the whole tests/fuzz folder to well under a minute on a small machine. No example
database (it would write .hypothesis/ into the repository root); a failure prints its reproduction
blob and the falsifying example instead.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time

import h11
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ENV = "SPOTINFERENCE_FUZZ_EXAMPLES"


def examples(default: int) -> int:
    value = os.environ.get(ENV, "").strip()
    return int(value) if value else default


def fuzz_settings(default: int):
    return settings(max_examples=examples(default), deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# Bytes that break HTTP parsers: controls, line ends, separators, obs-text, DEL.
HOSTILE = [b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b",", b";", b"\x7f", b"\x80", b"\xff", b"\x01",
           b"\x0b", b"\x0c", b"\x1f", b"0", b"a", b"\xc3\xa9", b"\r\n ", b"\n\n"]


@st.composite
def mutated(draw, data: bytes, probability: float = 0.2) -> bytes:
    """`data`, sometimes with 1-3 single-byte insertions, deletions or replacements of hostile bytes."""
    if not data or draw(st.floats(0, 1)) >= probability:
        return data
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(HOSTILE))
        if op == "insert":
            out[pos:pos] = piece
        elif op == "delete":
            del out[pos]
        else:
            out[pos:pos + 1] = piece
    return bytes(out)


@st.composite
def split(draw, data: bytes) -> list[bytes]:
    """`data` cut at random points into non-empty pieces (sometimes one byte at a time)."""
    if not data:
        return []
    if len(data) <= 400 and draw(st.integers(0, 19)) == 0:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8, unique=True))
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# -- facts about a byte stream that h11 accepted, for the documented strictness of our readers ---------

BLANK_LINE = re.compile(rb"\n\r?\n")        # h11's end of a head (ReceiveBuffer.maybe_extract_lines)
BARE_LF = re.compile(rb"(?<!\r)\n")
CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # controls but HTAB, LF and CR
BARE_CR = re.compile(rb"\r(?!\n)")
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(;.*)?[ \t]*")  # h11's chunk_header, less its CRLF


def head_end(stream: bytes, start: int = 0) -> int | None:
    """Where h11 ends a head that starts at `start` (after its blank line), or None."""
    if stream[start:start + 1] == b"\n":
        return start + 1
    if stream[start:start + 2] == b"\r\n":
        return start + 2
    m = BLANK_LINE.search(stream, start)
    return m.end() if m else None


def head_lines(region: bytes) -> list[bytes]:
    """The lines of a head region as h11 splits them (on LF, one CR stripped), without the blank line."""
    lines = region.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return lines[:-2] if len(lines) >= 2 else lines


def head_reasons(region: bytes) -> dict[str, set[int]]:
    """Which documented strictness rules (shared by both readers) a head h11 accepted breaks."""
    reasons: dict[str, set[int]] = {}
    if BARE_LF.search(region):
        reasons["bare LF in head"] = {400}
    if BARE_CR.search(region):
        reasons["bare CR in head"] = {400}
    lines = head_lines(region)
    if any(line[:1] in (b" ", b"\t") for line in lines[1:]):
        reasons["obs-fold"] = {400}
    if CTL.search(region):
        reasons["control byte in head"] = {400}
    return reasons


def walk_chunked(body: bytes) -> tuple[list[bytes], bytes | None]:
    """The chunk-size lines and the trailer region (None if incomplete) of a chunked body, walked with
    h11's grammar: only used on bodies h11 accepted."""
    i = 0
    lines = []
    while True:
        j = body.find(b"\r\n", i)
        if j < 0:
            return lines, None
        line = body[i:j]
        m = CHUNK_LINE.fullmatch(line)
        if m is None:
            return lines, None
        lines.append(line)
        size = int(m.group(1), 16)
        if size == 0:
            end = head_end(body, j + 2)
            return lines, None if end is None else body[j + 2:end]
        i = j + 2 + size + 2


def chunked_reasons(body: bytes, max_trailer: int) -> dict[str, set[int]]:
    """Which documented strictness rules of proxy/parse/chunked.py a chunked body h11 accepted breaks."""
    reasons: dict[str, set[int]] = {}
    lines, trailers = walk_chunked(body)
    for line in lines:
        semi = line.find(b";")
        size_text = line[:semi] if semi >= 0 else line.rstrip(b" \t")
        if len(size_text) > 16:
            reasons["chunk size over 16 hex digits"] = {400}
        elif size_text and int(size_text, 16) > 2 ** 63:
            reasons["chunk size over 2**63"] = {400}
        if semi >= 0 and (CTL.search(line) or b"\r" in line or b"\n" in line):
            reasons["control byte in chunk extension"] = {400}
        if len(line) > 1024:
            reasons["chunk line over 1 KiB"] = {400}
    if trailers is not None:
        if BARE_LF.search(trailers):
            reasons["bare LF in trailers"] = {400}
        if BARE_CR.search(trailers) or CTL.search(trailers):
            reasons["control byte in trailers"] = {400}
        if any(line[:1] in (b" ", b"\t") for line in head_lines(trailers)):
            reasons["obs-fold in trailers"] = {400}
        if any(line.split(b":", 1)[0].lower() in (b"content-length", b"transfer-encoding")
               for line in head_lines(trailers)):
            reasons["a framing field in the trailers (RFC 9110 6.5.1)"] = {400}
        if len(trailers) >= max_trailer - 2:
            reasons["trailers over the limit"] = {431}
    return reasons


# -- grammar pieces shared by the request and response generators ------------------------------------
# Every piece has a valid pool and a hostile pool; each example draws a hostility rate (0 to 0.3) and
# takes each piece from the hostile pool with that probability, so that accepted, refused-by-one and
# refused-by-both streams all come up often.

TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VALUE_CHARS = bytes(range(0x21, 0x7F)) + b"\x80\xc3\xa9\xff"
tokens = st.binary(min_size=1, max_size=8).map(lambda b: bytes(TCHARS[x % len(TCHARS)] for x in b))
values = st.binary(max_size=16).map(lambda b: bytes(VALUE_CHARS[x % len(VALUE_CHARS)] for x in b))
vchars = st.binary(max_size=12).map(lambda b: bytes(0x21 + x % 94 for x in b))

SHARED = {  # name: (valid, hostile)
    "sep": (st.just(b" "), st.sampled_from([b"  ", b"\t", b"", b" \t"])),
    "eol": (st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\r\n"])),
    "head_end": (st.just(b"\r\n"), st.sampled_from([b"\n", b"\r\r\n", b"", b"\r"])),
    "colon": (st.sampled_from([b": ", b":", b":\t", b":  "]), st.sampled_from([b" :", b"\t:", b"", b"\x00:"])),
    "name": (st.one_of(st.sampled_from([b"X-Foo", b"User-Agent", b"Accept", b"content-type", b"Authorization",
                                        b"X-Request-Id", b"Trailer", b"TE", b"Keep-Alive", b"Upgrade"]), tokens),
             st.sampled_from([b"X Foo", b"", b"Foo ", b" Foo", b"\tFoo", b"Fo\x00o", b"Cont\xe9nt", b"X-\x7f",
                              b"X@Y", b"X\r", b"X\nY", b"X\x01"])),
    "value": (st.one_of(st.sampled_from([b"", b"x", b"application/json", b"Bearer sk-1", b"  padded\t", b"a\tb",
                                         b"caf\xc3\xa9", b"\xff\xfe", b"a  b"]), values),
              st.one_of(st.sampled_from([b"a\x00b", b"a\x01b", b"a\x7fb", b"a\rb", b"a\nb", b"a\x0bb", b"a\x0cb",
                                         b"a\r\n b", b"a\r\n\tb", b"a\n b", b"\x1b[31m", b"\x00",
                                         b"a\nContent-Length: 1", b"a\r\nTransfer-Encoding: chunked"]),
                        st.binary(max_size=16))),
    "connection": (st.sampled_from([b"close", b"keep-alive", b"Keep-Alive", b"close, keep-alive", b"upgrade",
                                    b"CLOSE", b"te, close", b"keep-alive, te"]),
                   st.sampled_from([b"closed", b"", b",,close,,", b"clo se", b"close\x00"])),
    "te": (st.sampled_from([b"chunked", b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"\tchunked"]),
           st.sampled_from([b"chunked, gzip", b"gzip, chunked", b"gzip,chunked", b"chunked,", b",chunked",
                            b"chunked;q=1", b"identity", b"gzip", b"chunked, chunked", b"x-chunked", b"",
                            b"identity, chunked", b"chunked\x00", b"chun ked", b"chunked\x0b"])),
    "ext": (st.sampled_from([b""] * 6 + [b";a=b", b";a", b'; x="y;z"', b";\tx", b" ", b"\t", b";\xff", b";"]),
            st.sampled_from([b";\x01", b" ;x", b";x\r", b";" + b"x" * 1100, b";\x7f", b";a=b\x00", b";\n", b"\x00"])),
    "chunk_end": (st.just(b"\r\n"), st.sampled_from([b"\n", b"", b"\r", b"\r\r\n", b"x\r\n"])),
    "trailer": (st.sampled_from([b"X-T: v", b"x-t:", b"Host: other", b"X: " + b"t" * 200, b"Content-Length: 5",
                                 b"Transfer-Encoding: chunked", b"Expires: 0"]),
                st.sampled_from([b" folded", b"\tfolded", b"Content-Length: x", b"Content-Length: 1, 2",
                                 b"Transfer-Encoding: gzip", b"X\x00: y", b"X: \x01", b"X: a\rb", b"Bad Name: v",
                                 b":v", b"X: a\x7f"])),
    "size": (st.none(),
             st.sampled_from([b"FFFFFFFFFFFFFFFFF", b"8000000000000000", b"8000000000000001", b"7fffffffffffffff",
                              b"0000000000000000005", b"00000000000000000000005", b"ffffffffffffffffffff",
                              b"-1", b"0x5", b"+5", b"5 5", b"g", b""])),
    "zeros": (st.sampled_from([0, 0, 0, 1, 3]), st.sampled_from([15, 16, 17, 20])),
    "last": (st.sampled_from([b"0", b"00", b"000"]), st.sampled_from([b"0" * 17, b"0" * 21, b"", b"O"])),
    "cl": (st.sampled_from(["exact", "exact", "exact", "zeros", "list", "list_nospace"]),
           st.sampled_from(["plus1", "minus1", "conflict", "digits19", "digits20", "digits21", "digits5000",
                            "negative", "plus", "hex", "empty", "space"])),
}


class Picker:
    """Draws grammar pieces from `pools`, the hostile variant with this example's hostility rate."""

    def __init__(self, draw, pools: dict) -> None:
        self.draw = draw
        self.pools = pools
        self.rate = draw(st.sampled_from([0.0, 0.0, 0.02, 0.05, 0.1, 0.3]))

    def __call__(self, name: str):
        valid, hostile = self.pools[name]
        if self.rate and self.draw(st.integers(0, 999)) < self.rate * 1000:
            return self.draw(hostile)
        return self.draw(valid)

    def chance(self, one_in: int) -> bool:
        return self.draw(st.integers(0, one_in - 1)) == 0


def content_length(form: str, n: int) -> bytes:
    return {
        "exact": b"%d" % n, "plus1": b"%d" % (n + 1), "minus1": b"%d" % max(n - 1, 0), "zeros": b"000%d" % n,
        "list": b"%d, %d" % (n, n), "list_nospace": b"%d,%d" % (n, n), "conflict": b"%d, %d" % (n, n + 1),
        "digits19": b"0" * 18 + b"%d" % n, "digits20": b"0" * 19 + b"%d" % n, "digits21": b"1" + b"0" * 20,
        "digits5000": b"9" * 5000, "negative": b"-%d" % n, "plus": b"+%d" % n, "hex": b"0x%x" % n, "empty": b"",
        "space": b"%d %d" % (n, n),
    }[form]


def chunked_body(draw, pick: Picker) -> bytes:
    out = []
    for data in draw(st.lists(st.binary(min_size=1, max_size=24), max_size=4)):
        size = len(data) + (draw(st.sampled_from([-1, 1])) if pick.chance(20) else 0)
        text = b"%x" % max(size, 1)
        if draw(st.booleans()):
            text = text.upper()
        text = b"0" * pick("zeros") + text
        text = pick("size") or text
        out.append(text + pick("ext") + pick("eol") + data + pick("chunk_end"))
    out.append(pick("last") + pick("ext") + pick("eol"))
    for _ in range(draw(st.integers(0, 3))):
        out.append(pick("trailer") + pick("eol"))
    out.append(pick("head_end"))
    return b"".join(out)


def read_response(conn: h11.Connection, sock: socket.socket, deadline: float) -> tuple[int | None, dict, bytes, str]:
    """One response read with h11 (the oracle) from `sock` until `deadline` (time.monotonic):
    (status or None, headers, body, "" or what went wrong: a timeout, a close, invalid HTTP)."""
    status, headers, body = None, {}, bytearray()
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                left = deadline - time.monotonic()
                if left <= 0:
                    return status, headers, bytes(body), "timed out"
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                conn.receive_data(chunk)
            elif isinstance(ev, h11.InformationalResponse):
                continue
            elif isinstance(ev, h11.Response):
                status = ev.status_code
                headers = {k.decode(): v.decode("latin-1") for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return status, headers, bytes(body), ""
            else:
                return status, headers, bytes(body), f"connection closed ({ev!r})"
    except h11.RemoteProtocolError as exc:
        return status, headers, bytes(body), f"invalid HTTP from the gateway: {exc}"
    except TimeoutError:
        return status, headers, bytes(body), "timed out"


class LoopThread:
    """A trio loop in a daemon thread, for fuzzers whose hypothesis tests are synchronous: `start()`
    returns once `serve` (the subclass's, an async method that starts what it needs and then calls
    `ready()`) is serving; `stop()` cancels it and joins the thread (bounded). `token` runs calls
    into the loop from the test thread (trio.from_thread)."""

    name = "fuzz-loop"

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self.token = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    async def serve(self, nursery: trio.Nursery) -> None:
        raise NotImplementedError

    def ready(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._ready.set()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"{self.name}: not serving within 30 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self.token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            except trio.RunFinishedError:
                pass
        self._thread.join(15)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 -- reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await self.serve(nursery)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
