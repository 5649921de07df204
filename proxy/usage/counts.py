"""Token counts as vLLM reports them, and the one place that turns its raw object into ours.

Strategy: vLLM's `UsageInfo` has an optional `completion_tokens` (embeddings carry none at all) and may
omit `total_tokens`; `Usage` is always complete (missing counts are 0, a missing total is the sum).
The Responses API (``ResponseUsage``) and Anthropic Messages (``AnthropicUsage``) name the same counts
``input_tokens`` / ``output_tokens``; `RawUsage` takes both spellings and the chat names win where both
are present. Every tap decodes into `RawUsage` and converts with `to_usage`.

An object carrying none of the five counts is not usage: `to_usage` returns None and every caller
treats that as "not found, keep looking". A Responses body echoes the request's ``tools``, whose JSON
schemas may well have a property named ``usage`` (``"usage":{"type":"object"}``) before the real one.
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
    # The Responses API's ResponseUsage and Anthropic's usage object.
    input_tokens: int | None = None
    output_tokens: int | None = None


usage_decoder = msgspec.json.Decoder(RawUsage)


def to_usage(raw: RawUsage) -> Usage | None:
    """Our `Usage` from a decoded usage object; None when it carries no count at all (not usage)."""
    p = raw.prompt_tokens if raw.prompt_tokens is not None else raw.input_tokens
    c = raw.completion_tokens if raw.completion_tokens is not None else raw.output_tokens
    t = raw.total_tokens
    if p is None and c is None and t is None:
        return None
    p = p or 0
    c = c or 0
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=t if t is not None else p + c)
