"""Token counts as vLLM reports them, and the one place that turns its raw object into ours.

Strategy: vLLM's `UsageInfo` has an optional `completion_tokens` (embeddings carry none at all) and may
omit `total_tokens`; `Usage` is always complete (missing counts are 0, a missing total is the sum).
Both taps decode into `RawUsage` and convert with `to_usage`.
"""

from __future__ import annotations

import msgspec


class Usage(msgspec.Struct, frozen=True):
    """Token counts as vLLM reports them (``UsageInfo``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class RawUsage(msgspec.Struct):
    # vLLM's UsageInfo has Optional completion_tokens; embeddings carry no completion_tokens at all.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


usage_decoder = msgspec.json.Decoder(RawUsage)


def to_usage(raw: RawUsage) -> Usage:
    p = raw.prompt_tokens or 0
    c = raw.completion_tokens or 0
    t = raw.total_tokens if raw.total_tokens is not None else p + c
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=t)
