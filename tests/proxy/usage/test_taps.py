"""SseUsageTap, usage_from_body and inject_include_usage against vLLM-shaped bytes.

The streams below follow vLLM's wire format: compact pydantic JSON, one ``data: ...\\n\\n`` event per
chunk, ``"usage":null`` on ordinary chunks when include_usage is on, and a final ``"choices":[]`` event
carrying the usage object before ``data: [DONE]``.
"""

from __future__ import annotations

import itertools
import json
import random

import msgspec
import pytest

from proxy.usage.body_usage import usage_from_body
from proxy.usage.counts import Usage
from proxy.usage.include_usage import inject_include_usage
from proxy.usage.sse_tap import SseUsageTap

HEAD = b'{"id":"chatcmpl-7f3a","object":"chat.completion.chunk","created":1718000000,"model":"qwen3-coder",'


def chunk(delta: str, finish: str | None = None, usage: bytes = b',"usage":null') -> bytes:
    fin = b"null" if finish is None else json.dumps(finish).encode()
    return (
        b"data: " + HEAD + b'"choices":[{"index":0,"delta":' + delta.encode()
        + b',"logprobs":null,"finish_reason":' + fin + b"}]" + usage + b"}\n\n"
    )


USAGE_EVENT = (
    b"data: " + HEAD
    + b'"choices":[],"usage":{"prompt_tokens":17,"total_tokens":23,"completion_tokens":6}}\n\n'
)
DONE = b"data: [DONE]\n\n"

ORDINARY = [
    chunk('{"role":"assistant","content":""}'),
    chunk('{"content":"Hello"}'),
    # Model output that mentions the patterns the tap looks for: escaped inside a JSON string.
    chunk(json.dumps({"content": 'say "choices":[] and "usage":{"x":1}'})),
    chunk('{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}'),
    chunk('{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\": 1}"}}]}'),
    chunk('{"content":""}', finish="stop"),
]
STREAM = b"".join(ORDINARY) + USAGE_EVENT + DONE
STRIPPED = b"".join(ORDINARY) + DONE
EXPECTED_USAGE = Usage(prompt_tokens=17, completion_tokens=6, total_tokens=23)


def run_tap(pieces: list[bytes], strip: bool) -> tuple[bytes, SseUsageTap]:
    tap = SseUsageTap(strip_usage_chunk=strip)
    out = b"".join(tap.feed(p) for p in pieces) + tap.finish()
    return out, tap


def split_at(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("strip", [True, False])
def test_every_two_way_split(strip: bool) -> None:
    expected = STRIPPED if strip else STREAM
    for k in range(len(STREAM) + 1):
        out, tap = run_tap(split_at(STREAM, k), strip)
        assert out == expected, k
        assert tap.usage == EXPECTED_USAGE, k
        assert tap.events == len(ORDINARY), k


@pytest.mark.parametrize("strip", [True, False])
def test_byte_at_a_time_and_three_way_splits(strip: bool) -> None:
    expected = STRIPPED if strip else STREAM
    out, tap = run_tap([STREAM[i : i + 1] for i in range(len(STREAM))], strip)
    assert out == expected and tap.usage == EXPECTED_USAGE and tap.events == len(ORDINARY)
    n = len(STREAM)
    for a in range(0, n, 13):
        for b in range(a, n, 17):
            out, tap = run_tap(split_at(STREAM, a, b), strip)
            assert out == expected, (a, b)
            assert tap.usage == EXPECTED_USAGE


def test_random_splits_with_waking_comments_and_crlf() -> None:
    rng = random.Random(4)
    stream = b": waking\n\n: waking\n\n" + STREAM
    crlf = stream.replace(b"\n", b"\r\n")
    for src, expected in ((stream, b": waking\n\n: waking\n\n" + STRIPPED),
                          (crlf, (b": waking\n\n: waking\n\n" + STRIPPED).replace(b"\n", b"\r\n"))):
        for _ in range(300):
            cuts = sorted(rng.sample(range(1, len(src)), rng.randint(1, 40)))
            out, tap = run_tap(split_at(src, *cuts), True)
            assert out == expected
            assert tap.usage == EXPECTED_USAGE


def test_ordinary_pieces_pass_without_copy() -> None:
    tap = SseUsageTap(strip_usage_chunk=True)
    for event in ORDINARY:
        assert tap.feed(event) is event
    assert tap.feed(USAGE_EVENT) == b""
    assert tap.feed(DONE) is DONE
    assert tap.finish() == b""


def test_keep_mode_returns_input_object() -> None:
    tap = SseUsageTap(strip_usage_chunk=False)
    for piece in split_at(STREAM, 100, 700, len(STREAM) - 20):
        assert tap.feed(piece) is piece
    assert tap.usage == EXPECTED_USAGE


def test_held_back_is_at_most_the_undecided_line() -> None:
    # A piece that ends inside an ordinary event's "choices" array lets everything before it out, and
    # the held part is released as soon as the array's first byte shows the line is ordinary.
    event = ORDINARY[1]
    cut = event.index(b'"choices":[') + 5
    tap = SseUsageTap(strip_usage_chunk=True)
    assert tap.feed(ORDINARY[0] + event[:cut]) == ORDINARY[0]
    assert tap.feed(event[cut:]) == event


def test_no_usage_event_counts_events() -> None:
    # The client vanished before the end: no usage, the event count is the estimate's basis.
    partial = b"".join(ORDINARY[:4])
    out, tap = run_tap([partial[:50], partial[50:]], True)
    assert out == partial
    assert tap.usage is None
    assert tap.events == 4


def test_truncated_final_line_is_released() -> None:
    data = ORDINARY[0] + ORDINARY[1][:40]
    out, tap = run_tap([data], True)
    assert out == data and tap.events == 1


def test_usage_event_at_end_without_blank_line_is_stripped() -> None:
    body = ORDINARY[0] + USAGE_EVENT[:-1]  # "...}\n" then EOF
    out, tap = run_tap(split_at(body, len(ORDINARY[0]) + 30), True)
    assert out == ORDINARY[0]
    assert tap.usage == EXPECTED_USAGE
    unterminated = ORDINARY[0] + USAGE_EVENT[:-2]  # no newline at all
    out, tap = run_tap([unterminated], True)
    assert out == ORDINARY[0] and tap.usage == EXPECTED_USAGE


def test_continuous_usage_stats_chunks_are_not_stripped() -> None:
    running = b',"usage":{"prompt_tokens":17,"total_tokens":18,"completion_tokens":1}'
    stream = chunk('{"content":"Hi"}', usage=running) + USAGE_EVENT + DONE
    for k in range(len(stream) + 1):
        out, tap = run_tap(split_at(stream, k), True)
        assert out == chunk('{"content":"Hi"}', usage=running) + DONE
        assert tap.usage == EXPECTED_USAGE


def test_completions_endpoint_and_error_event() -> None:
    text_chunk = (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
                  b'"choices":[{"index":0,"text":"Hi","logprobs":null,"finish_reason":null}],"usage":null}\n\n')
    usage = (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],'
             b'"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}\n\n')
    error = b'data: {"error":{"message":"boom","type":"server_error","code":500}}\n\n'
    stream = text_chunk + error + usage + DONE
    for k in range(len(stream) + 1):
        out, tap = run_tap(split_at(stream, k), True)
        assert out == text_chunk + error + DONE
        assert tap.usage == Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
        assert tap.events == 2


def test_choices_empty_without_usage_is_kept() -> None:
    odd = b"data: " + HEAD + b'"choices":[],"usage":null}\n\n'
    for k in range(len(odd) + 1):
        out, tap = run_tap(split_at(odd + DONE, k), True)
        assert out == odd + DONE and tap.usage is None


def test_usage_line_inside_a_multiline_event_is_kept() -> None:
    # Not a standalone event (another data line follows without a blank line): nothing is removed.
    odd = USAGE_EVENT[:-1] + b"data: more\n\n"
    for k in range(len(odd) + 1):
        out, _ = run_tap(split_at(odd, k), True)
        assert out == odd


# -- usage_from_body ---------------------------------------------------------------------------------

CHAT_BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"the \\"usage\\": {} field","tool_calls":[]},'
    b'"logprobs":null,"finish_reason":"stop","stop_reason":null}],'
    b'"usage":{"prompt_tokens":12,"total_tokens":40,"completion_tokens":28,"prompt_tokens_details":null},'
    b'"prompt_logprobs":null,"kv_transfer_params":null}'
)


def test_usage_from_whole_body_and_from_a_tail() -> None:
    want = Usage(prompt_tokens=12, completion_tokens=28, total_tokens=40)
    assert usage_from_body(CHAT_BODY) == want
    start = CHAT_BODY.index(b'"usage":{"prompt')
    for k in range(0, start + 1, 7):
        assert usage_from_body(CHAT_BODY[k:]) == want


def test_usage_from_body_missing_null_truncated_embeddings() -> None:
    assert usage_from_body(b'{"id":"x","choices":[]}') is None
    assert usage_from_body(b'{"id":"x","usage":null}') is None
    assert usage_from_body(CHAT_BODY[: CHAT_BODY.index(b"28")]) is None
    assert usage_from_body(b"") is None
    emb = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"model":"e",' \
          b'"usage":{"prompt_tokens":5,"total_tokens":5}}'
    assert usage_from_body(emb) == Usage(prompt_tokens=5, completion_tokens=0, total_tokens=5)
    spaced = b'{"usage" : { "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3 }}'
    assert usage_from_body(spaced) == Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)


# -- inject_include_usage ----------------------------------------------------------------------------


def test_inject_fast_path_is_a_pure_insertion() -> None:
    body = (b'{"model":"qwen3-coder","stream":true,"vendor_x":{"k":[1,2.50,"\xc3\xa9"]},'
            b'"messages":[{"role":"user","content":"hi \\"stream_opts\\""}]}')
    new = inject_include_usage(body)
    assert new is not None
    inserted = b'"stream_options":{"include_usage":true},'
    assert new.replace(inserted, b"", 1) == body
    assert json.loads(new) == {**json.loads(body), "stream_options": {"include_usage": True}}


def test_inject_whitespace_and_empty_object() -> None:
    body = b'  \n{ "model": "m", "stream": true }\n'
    new = inject_include_usage(body)
    assert json.loads(new) == {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    assert json.loads(inject_include_usage(b"{ }")) == {"stream_options": {"include_usage": True}}


def test_inject_existing_stream_options() -> None:
    body = b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true},"n":1}'
    new = inject_include_usage(body)
    assert json.loads(new) == {"model": "m", "stream": True, "n": 1,
                               "stream_options": {"continuous_usage_stats": True, "include_usage": True}}
    assert list(json.loads(new)) == ["model", "stream", "stream_options", "n"]  # key order kept
    off = b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}'
    assert json.loads(inject_include_usage(off))["stream_options"] == {"include_usage": True}
    null = b'{"model":"m","stream":true,"stream_options":null}'
    assert json.loads(inject_include_usage(null))["stream_options"] == {"include_usage": True}
    on = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
    assert inject_include_usage(on) is on


@pytest.mark.parametrize("body", [
    b"", b"   ", b"[1,2]", b"not json", b'{', b'{"stream_options":"yes"}',
    b'{"stream_options":[true]}', b'"stream_options"',
])
def test_inject_refuses_what_it_cannot_do_safely(body: bytes) -> None:
    assert inject_include_usage(body) is None


def test_inject_fast_path_does_not_revalidate() -> None:
    # The schema layer has decoded the body before; a broken body stays broken in the same way.
    assert inject_include_usage(b'{"model":"m"') == b'{"stream_options":{"include_usage":true},"model":"m"'


def test_injected_bodies_decode_with_msgspec() -> None:
    for body in (b'{"model":"m","stream":true}', b'{"model":"m","stream":true,"stream_options":{}}'):
        assert msgspec.json.decode(inject_include_usage(body))["stream_options"]["include_usage"] is True


def test_fast_object_end_agrees_with_the_character_walk():
    """The brace-jumping scanner must find the same end as the careful walk on any input."""
    import random

    from proxy.usage.body_usage import _object_end, _object_end_slow

    rnd = random.Random(7)
    alphabet = b'{}":,\\ab1 '
    cases = [b'{"a":"}{","b":{"c":"{"}}z', b'{"a":"\\"}","b":1}', b'{"a":{', b"{}", b'{"a":"x}"}']
    cases += [b"{" + bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 14))) for _ in range(5000)]
    for case in cases:
        assert _object_end(case, 0) == _object_end_slow(case, 0), case
