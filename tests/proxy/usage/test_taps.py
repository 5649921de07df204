"""SseUsageTap, usage_from_body, BodyTail and ask_for_usage against vLLM-shaped bytes.

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

from proxy.admit.schemas import decode_chat, decode_completion
from proxy.usage.body_usage import BodyTail, usage_from_body
from proxy.usage.counts import Usage
from proxy.usage.include_usage import ask_for_usage, client_asked
from proxy.usage.sse_tap import SseUsageTap
from proxy.usage.taps import choose_tap

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


# -- ask_for_usage (include_usage.py), decided from the decoded view ---------------------------------


def ask(body: bytes) -> tuple[bytes | None, bool]:
    """(what goes upstream, whether the client asked) for a chat body, through the real schema."""
    opts = decode_chat(body).stream_options
    asked = client_asked(opts)
    return ask_for_usage(body, opts, asked), asked


MSGS = b'"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true'


def test_ask_without_stream_options_is_a_pure_append() -> None:
    body = (b'{"model":"qwen3-coder","stream":true,"vendor_x":{"k":[1,2.50,"\xc3\xa9"]},'
            b'"messages":[{"role":"user","content":"hi \\"stream_options\\""}]}')
    new, asked = ask(body)
    assert not asked
    appended = b',"stream_options":{"include_usage":true}'
    assert new == body[:-1] + appended + b"}"
    assert json.loads(new) == {**json.loads(body), "stream_options": {"include_usage": True}}


def test_ask_whitespace_and_empty_object() -> None:
    body = b'  \n{ "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true }\n'
    new, _ = ask(body)
    assert new == body.replace(b"true }", b'true ,"stream_options":{"include_usage":true}}')
    assert json.loads(new)["stream_options"] == {"include_usage": True}
    assert ask_for_usage(b"{ }", None, False) == b'{ "stream_options":{"include_usage":true}}'
    for broken in (b"", b"   ", b"[1]", b'{"model":"m"'):
        assert ask_for_usage(broken, None, False) is None


@pytest.mark.parametrize("spelling", [b'"stream_options"', b'"stream\\u005foptions"', b'"\\u0073tream_options"'])
def test_ask_null_or_absent_in_any_spelling_appends_the_last_member(spelling) -> None:
    # vLLM (Python's json) keeps the last duplicate: the appended member wins over an escaped null.
    body = b"{" + MSGS + b"," + spelling + b":null}"
    new, asked = ask(body)
    assert not asked and new == body[:-1] + b',"stream_options":{"include_usage":true}}'
    assert json.loads(new)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("spelling", [b'"stream_options"', b'"stream\\u005foptions"', b'"\\u0073tream\\u005f\\u006fptions"'])
def test_ask_include_usage_false_in_any_spelling_is_rewritten(spelling) -> None:
    body = b"{" + MSGS + b"," + spelling + b':{"include_usage":false},"n":1}'
    new, asked = ask(body)
    assert not asked
    assert json.loads(new) == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                               "stream_options": {"include_usage": True}, "n": 1}
    assert list(json.loads(new)) == ["model", "messages", "stream", "stream_options", "n"]  # key order kept


def test_ask_rewrites_the_last_duplicate_and_keeps_other_bytes() -> None:
    # The first stream_options says true, the last (what vLLM keeps) false: the view and vLLM agree on false.
    body = (b'{"model":"m","messages":[{"role":"user","content":"h\\u00e9 \\"x\\""}],"stream":true,'
            b'"stream_options":{"include_usage":true},"top_k":  5,"stream\\u005foptions":{"include_usage":false}}')
    new, asked = ask(body)
    assert not asked
    assert json.loads(new)["stream_options"] == {"include_usage": True}
    assert new.count(b"stream_options") == 1
    # Values other than stream_options keep their bytes (escapes included) exactly; spacing between
    # members does not matter.
    assert b'"messages":[{"role":"user","content":"h\\u00e9 \\"x\\""}]' in new and b'"top_k":5' in new


def test_ask_continuous_usage_stats() -> None:
    # Without include_usage: the client asked (vLLM's include_usage defaults to true); usage is set explicitly.
    body = b"{" + MSGS + b',"stream_options":{"continuous_usage_stats":true}}'
    new, asked = ask(body)
    assert asked
    assert json.loads(new)["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    # include_usage false with continuous stats: vLLM would send no usage at all, so neither kind may show.
    body = b"{" + MSGS + b',"stream_options":{"include_usage":false,"continuous_usage_stats":true}}'
    new, asked = ask(body)
    assert not asked
    assert json.loads(new)["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}


def test_ask_leaves_a_body_that_asks_as_sent() -> None:
    on = b"{" + MSGS + b',"stream_options":{"include_usage":true}}'
    new, asked = ask(on)
    assert asked and new is on
    escaped = b"{" + MSGS + b',"stream\\u005foptions":{"include\\u005fusage":true}}'
    new, asked = ask(escaped)
    assert asked and new is escaped


@pytest.mark.parametrize("opts, asked", [
    ({}, False), ({"include_usage": None}, False), ({"include_usage": False}, False),
    ({"include_usage": True}, True), ({"continuous_usage_stats": True}, True),
    ({"include_usage": None, "continuous_usage_stats": True}, True),
    ({"include_usage": False, "continuous_usage_stats": True}, False),
    ({"continuous_usage_stats": False}, False), (None, False),
])
def test_client_asked(opts, asked) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                       "stream_options": opts}).encode()
    assert client_asked(decode_chat(body).stream_options) is asked
    assert client_asked(decode_completion(body.replace(b'"messages"', b'"prompt":"x","m"')).stream_options) is asked


def test_asked_bodies_decode_with_msgspec() -> None:
    for body in (b"{" + MSGS + b"}", b"{" + MSGS + b',"stream_options":{}}'):
        new, _ = ask(body)
        assert msgspec.json.decode(new)["stream_options"]["include_usage"] is True
        assert decode_chat(new).stream_options.include_usage is True


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


# -- BodyTail: the first top-level usage object, wherever it is in the body ------------------------------

LONG_TAIL = (b',"prompt_logprobs":[null' + b''.join(b',{"%d":{"logprob":-0.5,"rank":1,"decoded_token":" usage"}}' % i
                                                     for i in range(400))
             + b'],"prompt_token_ids":[' + b",".join(b"%d" % i for i in range(2000)) + b'],"kv_transfer_params":null}')
VLLM_BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"usage","tool_calls":[{"function":{"name":"usage",'
    b'"arguments":"{\\"usage\\": {\\"prompt_tokens\\": 1}}"}}]},'
    b'"logprobs":null,"finish_reason":"stop","stop_reason":null,"token_ids":null}],"service_tier":null,'
    b'"system_fingerprint":null,"usage":{"prompt_tokens":12,"total_tokens":40,"completion_tokens":28,'
    b'"prompt_tokens_details":{"cached_tokens":4}}' + LONG_TAIL
)
WANT = Usage(prompt_tokens=12, completion_tokens=28, total_tokens=40)


def run_body(pieces: list[bytes]) -> BodyTail:
    tap = BodyTail()
    for p in pieces:
        assert tap.feed(p) is p  # passed through untouched
    assert tap.finish() == b""
    return tap


def test_body_tail_finds_usage_before_a_long_tail() -> None:
    assert len(LONG_TAIL) > 20_000
    assert run_body([VLLM_BODY]).usage == WANT
    # The string value "usage" (content, a function name, a token) and an escaped key are passed over.
    assert VLLM_BODY.index(b'"usage"') < VLLM_BODY.index(b'"usage":{"prompt_tokens":12')


def test_body_tail_every_split_around_the_usage_object() -> None:
    start = VLLM_BODY.index(b'"usage":{"prompt_tokens":12')
    end = VLLM_BODY.index(b"}}", start) + 2
    for k in range(start - 20, end + 20):
        assert run_body(split_at(VLLM_BODY, k)).usage == WANT, k
    for a in range(start - 10, end + 5, 3):
        for b in range(a, end + 10, 5):
            assert run_body(split_at(VLLM_BODY, a, b)).usage == WANT, (a, b)


def test_body_tail_byte_at_a_time_and_random_pieces() -> None:
    assert run_body([VLLM_BODY[i:i + 1] for i in range(len(VLLM_BODY))]).usage == WANT
    rng = random.Random(11)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(VLLM_BODY)), rng.randint(1, 30)))
        assert run_body(split_at(VLLM_BODY, *cuts)).usage == WANT


def test_body_tail_stops_looking_once_found() -> None:
    tap = BodyTail()
    start = VLLM_BODY.index(b'"usage":{"prompt')
    tap.feed(VLLM_BODY[: start + 5000])  # the usage object has left the window: found, nothing kept
    assert tap.usage == WANT and (tap._tail, tap._edge) == (b"", b"")
    tap.feed(b',"x":{"usage":{"prompt_tokens":1}}' * 1000 + b"}")  # a later "usage" key is not looked for
    tap.finish()
    assert tap.usage == WANT


def test_body_tail_keeps_at_most_a_bounded_window() -> None:
    tap = BodyTail()
    body = b'{"a":"' + b"x{" * 50_000 + b'","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3'
    for i in range(0, len(body), 1000):
        tap.feed(body[i:i + 1000])
        assert len(tap._tail) <= 4096 and len(tap._edge) <= 64
    tap.feed(b"}}")
    tap.finish()
    assert tap.usage == Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)


def test_body_tail_in_a_brace_dense_answer() -> None:
    # A JSON answer: escaped braces everywhere before usage; the search switches to the key itself.
    content = json.dumps([{"a": i, "b": {"c": "usage"}} for i in range(3000)])
    body = (b'{"id":"c","choices":[{"index":0,"message":{"role":"assistant","content":' + json.dumps(content).encode()
            + b'}}],"usage":{"prompt_tokens":7,"total_tokens":9,"completion_tokens":2}' + LONG_TAIL)
    want = Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9)
    for size in (1, 7, 100, 4096, 65536, len(body)):
        assert run_body([body[i:i + size] for i in range(0, len(body), size)]).usage == want, size


@pytest.mark.parametrize("body", [
    b'{"id":"x","choices":[]}', b'{"id":"x","usage":null}', b"", b"not json",
    VLLM_BODY[: VLLM_BODY.index(b"28")],  # cut inside the usage object
    b'{"usage":{"prompt_tokens":"many"}}',
    b'{"usage":{' + b'"x":1,' * 2000 + b'"prompt_tokens":1}}',  # longer than any usage object
])
def test_body_tail_without_a_usage_object(body) -> None:
    for k in (0, len(body) // 2, len(body)):
        assert run_body(split_at(body, k)).usage is None


def test_body_tail_embeddings_and_spacing() -> None:
    emb = (b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"model":"e",'
           b'"usage":{"prompt_tokens":5,"total_tokens":5}}')
    assert run_body([emb]).usage == Usage(prompt_tokens=5, completion_tokens=0, total_tokens=5)
    spaced = b'{"usage" \n: \t{ "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3 }}'
    for k in range(len(spaced) + 1):
        assert run_body(split_at(spaced, k)).usage == Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)


class _OnlyUsage(msgspec.Struct):
    usage: dict | None = None


def test_body_tail_agrees_with_decoding_the_whole_body() -> None:
    """Random vLLM-shaped bodies (text with braces, quotes, escapes and the word usage before; prompt
    extras of random length after), random pieces: the same usage as decoding the whole body."""
    rng = random.Random(5)
    words = ["usage", '"usage":{', "{", "}", " ", "\\", '"', "\n", "x" * 50, "é", ":", "usage\":{\"a\":1}"]
    for n in range(300):
        content = "".join(rng.choice(words) for _ in range(rng.randint(0, 400)))
        p, c = rng.randint(0, 10**6), rng.randint(0, 10**6)
        tail = {"prompt_logprobs": [None] + [{str(i): {"logprob": -1.0, "rank": 1, "decoded_token": "usage"}}
                                              for i in range(rng.choice([0, 10, 200, 2000]))],
                "prompt_token_ids": list(range(rng.choice([0, 5, 3000]))), "kv_transfer_params": None}
        body = json.dumps({"id": "c", "choices": [{"index": 0, "message": {"content": content}}],
                           "service_tier": None, "usage": {"prompt_tokens": p, "total_tokens": p + c,
                                                           "completion_tokens": c}, **tail},
                          separators=rng.choice([(",", ":"), (", ", ": ")]),
                          ensure_ascii=rng.random() < 0.5).encode()
        want = msgspec.json.decode(body, type=_OnlyUsage).usage
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 40))))
        got = run_body(split_at(body, *cuts)).usage
        assert got == Usage(**want), n


# -- the other APIs ---------------------------------------------------------------------------------------

def _planted(api_body: bytes) -> bytes:
    """A body whose echoed request part (over 4 KiB, before the real usage) holds a forged usage object."""
    forged = b'{"type":"object","properties":{"usage":{"input_tokens":0,"output_tokens":0}}}'
    return (b'{"id":"resp_1","object":"response","tools":[{"type":"function","name":"f","parameters":' + forged
            + b'}],"output":[{"type":"message","content":[{"type":"output_text","text":"' + b"x" * 8000
            + b'"}]}],' + api_body + b"}")


@pytest.mark.parametrize("path, body", [
    (b"/v1/responses", b'{"model":"sim-chat","input":"hi"}'),
    (b"/v1/messages", b'{"model":"sim-chat","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'),
])
def test_responses_and_messages_bodies_bill_their_last_usage(path, body):
    from proxy.admit.inference import DECODERS

    sent, tap = choose_tap(DECODERS[path](body), body)
    assert sent is body
    answer = _planted(b'"usage":{"input_tokens":11,"output_tokens":7,"total_tokens":18}')
    for i in range(0, len(answer), 1000):
        assert tap.feed(answer[i:i + 1000]) == answer[i:i + 1000]
    tap.finish()
    assert (tap.usage.prompt_tokens, tap.usage.completion_tokens, tap.usage.total_tokens) == (11, 7, 18)
    assert tap.response_id == "resp_1"


@pytest.mark.parametrize("path, body, api", [
    (b"/v1/responses", b'{"model":"sim-chat","input":"hi","stream":true}', "responses"),
    (b"/v1/messages", b'{"model":"sim-chat","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}',
     "messages"),
])
def test_named_event_streams_get_the_event_tap_and_an_unchanged_body(path, body, api):
    from proxy.admit.inference import DECODERS
    from proxy.usage.event_tap import EventUsageTap

    sent, tap = choose_tap(DECODERS[path](body), body)
    assert sent is body and isinstance(tap, EventUsageTap) and not tap.rewrites
    assert tap.prompt_estimate == len(body) // 4
