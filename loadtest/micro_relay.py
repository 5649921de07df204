"""Micro-benchmark of the relay's per-event CPU: upstream chunked decoding and the SSE usage tap.

Strategy: no sockets, no trio -- only the pure byte work the relay (proxy/relay/response.py `_take`)
does per upstream read. It builds a vLLM-shaped upstream response (head, a role chunk, `--tokens`
token chunks with ``"usage":null`` as the gateway's injected include_usage makes vLLM send them, a
finish chunk, the ``"choices":[]`` usage event and ``data: [DONE]``; every event one HTTP chunk,
`%x\\r\\n<event>\\r\\n`, the last carrying the ``0\\r\\n\\r\\n`` terminator), then times, per stream:

- decode: `ResponseReader.feed(piece)` then `read_body()` until it returns None or b"" (one feed per
  upstream chunk, as over the wire when each event arrives in its own read);
- tap strip / tap keep: `SseUsageTap.feed(event)` on the decoded events, `strip_usage_chunk` True / False;
- take strip / take keep: the whole of `_take`: feed, read_body, tap.feed, re-frame for the client.

Each figure is microseconds per event, best of `--repeat` runs of `--number` streams (timeit-style:
the minimum is the least disturbed by other load). `--batch K` feeds K chunks per read instead.
Run: `.venv/bin/python -m loadtest.micro_relay [--tokens 300] [--number 3] [--repeat 100] [--batch 1]`.
"""

from __future__ import annotations

import argparse
import json
import timeit

from proxy.parse.chunked import ChunkedDecoder
from proxy.parse.response import ResponseReader
from proxy.usage.sse_tap import SseUsageTap

HEAD = (b"HTTP/1.1 200 OK\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\nserver: uvicorn\r\n"
        b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
_ID = b'{"id":"chatcmpl-9f2c4e1ab3d84f6c8e0a7b5d1c3e9f20","object":"chat.completion.chunk",' \
      b'"created":1718000000,"model":"Qwen/Qwen3-Coder-30B-A3B-Instruct",'
_WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", "\n",
          " def", " main", "():", " return", ' "x"', " 42"]


def events(tokens: int) -> list[bytes]:
    """The SSE events of one streamed chat completion (include_usage on)."""
    def chunk(delta: bytes, finish: bytes = b"null") -> bytes:
        return (b"data: " + _ID + b'"choices":[{"index":0,"delta":' + delta
                + b',"logprobs":null,"finish_reason":' + finish + b'}],"usage":null}\n\n')

    out = [chunk(b'{"role":"assistant","content":""}')]
    out += [chunk(b'{"content":%s}' % json.dumps(_WORDS[i % len(_WORDS)]).encode()) for i in range(tokens)]
    out.append(chunk(b'{"content":""}', b'"stop"'))
    out.append(b"data: " + _ID + b'"choices":[],"usage":{"prompt_tokens":812,"total_tokens":%d,'
               b'"completion_tokens":%d}}\n\n' % (812 + tokens, tokens))
    out.append(b"data: [DONE]\n\n")
    return out


def wire(evs: list[bytes], batch: int) -> list[bytes]:
    """The upstream reads: `batch` chunks each; the terminator rides with the last."""
    chunks = [b"%x\r\n%s\r\n" % (len(e), e) for e in evs]
    chunks[-1] += b"0\r\n\r\n"
    return [b"".join(chunks[i:i + batch]) for i in range(0, len(chunks), batch)]


def _frame(data: bytes) -> bytes:  # proxy/accept/downstream.py Downstream.frame, chunked
    return b"%x\r\n%s\r\n" % (len(data), data)


def _reader() -> ResponseReader:
    reader = ResponseReader()
    reader.feed(HEAD)
    assert reader.next_head() is not None
    return reader


def run_decode(reads: list[bytes]) -> bytes:
    reader = _reader()
    read_body = reader.read_body
    feed = reader.feed
    out = []
    for data in reads:
        feed(data)
        while True:
            piece = read_body()
            if not piece:
                break
            out.append(piece)
    assert reader.complete
    return b"".join(out)


def run_tap(evs: list[bytes], strip: bool) -> SseUsageTap:
    tap = SseUsageTap(strip_usage_chunk=strip)
    feed = tap.feed
    for e in evs:
        feed(e)
    tap.finish()
    return tap


def run_take(reads: list[bytes], strip: bool) -> tuple[bytes, SseUsageTap]:
    reader = _reader()
    tap = SseUsageTap(strip_usage_chunk=strip)
    sent = []
    for data in reads:
        reader.feed(data)
        out = b""
        while True:  # relay `_take`
            piece = reader.read_body()
            if piece is None or not piece:
                break
            piece = tap.feed(piece)
            if not piece:
                continue
            out += _frame(piece)
        sent.append(out)
    rest = tap.finish()
    if rest:
        sent.append(_frame(rest))
    assert reader.complete
    return b"".join(sent), tap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=300, help="token chunks per stream")
    ap.add_argument("--number", type=int, default=3, help="streams per timed run")
    ap.add_argument("--repeat", type=int, default=100, help="timed runs; the best is reported")
    ap.add_argument("--batch", type=int, default=1, help="upstream chunks per read")
    args = ap.parse_args(argv)
    evs = events(args.tokens)
    reads = wire(evs, args.batch)
    n_events = len(evs)
    # Correctness first: the benchmark must measure the real behaviour.
    assert run_decode(reads) == b"".join(evs)
    for strip in (True, False):
        tap = run_tap(evs, strip)
        assert tap.events == n_events - 2 and tap.usage is not None, (tap.events, tap.usage)
        sent, _ = run_take(reads, strip)
        want = evs[:-2] + evs[-1:] if strip else evs
        if args.batch == 1:
            assert sent == b"".join(_frame(e) for e in want)
        assert ChunkedDecoder(0).read(bytearray(sent), False) == b"".join(want)
    cases = {
        "decode": lambda: run_decode(reads),
        "tap strip": lambda: run_tap(evs, True),
        "tap keep": lambda: run_tap(evs, False),
        "take strip": lambda: run_take(reads, True),
        "take keep": lambda: run_take(reads, False),
    }
    print(f"{n_events} events/stream, {len(reads)} reads, {sum(map(len, reads))} wire bytes; "
          f"best of {args.repeat} x {args.number} streams")
    for name, fn in cases.items():
        best = min(timeit.Timer(fn).repeat(repeat=args.repeat, number=args.number))
        print(f"{name:<11} {best / args.number / n_events * 1e6:7.3f} us/event")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
