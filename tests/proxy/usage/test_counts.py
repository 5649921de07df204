"""counts.py: every API's spelling of the counts maps to one `Usage`; an object without counts is not
usage (and the SSE tap then does not take a ``choices: []`` event carrying one for the usage event)."""

from __future__ import annotations

import pytest

from proxy.usage.counts import RawUsage, Usage, to_usage, usage_decoder
from proxy.usage.sse_tap import SseUsageTap


@pytest.mark.parametrize(("raw", "want"), [
    (b'{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}', Usage(3, 4, 7)),
    (b'{"prompt_tokens":5,"total_tokens":5}', Usage(5, 0, 5)),  # embeddings
    (b'{"prompt_tokens":3,"completion_tokens":4}', Usage(3, 4, 7)),  # no total: the sum
    (b'{"prompt_tokens":3,"completion_tokens":null,"total_tokens":3}', Usage(3, 0, 3)),
    # The Responses API (ResponseUsage, with its details objects).
    ((b'{"input_tokens":21,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,'
      b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":26}'), Usage(21, 5, 26)),
    # Anthropic (no total; cache counts are not ours to add).
    (b'{"input_tokens":12,"output_tokens":7}', Usage(12, 7, 19)),
    (b'{"input_tokens":12,"output_tokens":7,"cache_read_input_tokens":100}', Usage(12, 7, 19)),
    (b'{"output_tokens":15}', Usage(0, 15, 15)),  # Anthropic's message_delta
    (b'{"input_tokens":2}', Usage(2, 0, 2)),
    (b'{"total_tokens":9}', Usage(0, 0, 9)),
    # Both spellings: the chat names win, each count on its own.
    (b'{"prompt_tokens":1,"input_tokens":2,"completion_tokens":3,"output_tokens":4}', Usage(1, 3, 4)),
    (b'{"prompt_tokens":null,"input_tokens":2,"completion_tokens":3,"output_tokens":4}', Usage(2, 3, 5)),
    (b'{"prompt_tokens":0,"input_tokens":2}', Usage(0, 0, 0)),  # 0 is present
])
def test_to_usage(raw: bytes, want: Usage) -> None:
    assert to_usage(usage_decoder.decode(raw)) == want


@pytest.mark.parametrize("raw", [
    b"{}", b'{"type":"object"}', b'{"type":"object","properties":{}}', b'{"prompt_tokens":null}',
    b'{"input_tokens":null,"output_tokens":null,"total_tokens":null}', b'{"cached_tokens":4}',
])
def test_an_object_without_counts_is_not_usage(raw: bytes) -> None:
    assert to_usage(usage_decoder.decode(raw)) is None


def test_raw_usage_defaults() -> None:
    assert to_usage(RawUsage()) is None
    assert to_usage(RawUsage(input_tokens=1, output_tokens=2)) == Usage(1, 2, 3)


def test_sse_tap_does_not_take_a_usage_event_without_counts() -> None:
    head = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    empty = head + b'"usage":{}}\n\n'
    real = head + b'"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\n\n'
    tap = SseUsageTap(strip_usage_chunk=True)
    assert tap.feed(empty) == empty  # not the usage event: kept, counted as an ordinary event
    assert tap.usage is None and tap.events == 1
    assert tap.feed(real) == b""
    assert tap.finish() == b""
    assert tap.usage == Usage(2, 1, 3)
