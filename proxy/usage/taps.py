"""Which usage tap watches a response, and what it found: vLLM's own token counts for the record.

Strategy: a non-streamed answer is watched by `BodyTail` (usage sits near the end of the JSON). A
stream is watched by `SseUsageTap`; vLLM reports a stream's counts only when asked
(`stream_options.include_usage`), so when the client did not ask, the gateway asks for it in the
request body (include_usage.py) and the tap removes the answer again, so the client sees exactly
the stream it asked for. When no usage arrives at all, a stream's completion tokens are estimated
from its event count and the record says so (`estimated`).
"""

from __future__ import annotations

from proxy.exchange import Exchange
from proxy.usage.body_usage import BodyTail
from proxy.usage.include_usage import inject_include_usage
from proxy.usage.sse_tap import SseUsageTap


def choose_tap(view, body: bytes) -> tuple[bytes, SseUsageTap | BodyTail]:
    """(the body to send upstream, the tap for its response)."""
    if not view.stream:
        return body, BodyTail()
    if view.include_usage:
        return body, SseUsageTap(strip_usage_chunk=False)
    injected = inject_include_usage(body)
    if injected is None:
        return body, SseUsageTap(strip_usage_chunk=False)
    return injected, SseUsageTap(strip_usage_chunk=True)


def read_tap(ex: Exchange, tap) -> None:
    """Copy what the tap found into the request's record."""
    usage = tap.usage
    if usage is not None:
        ex.prompt_tokens = usage.prompt_tokens
        ex.completion_tokens = usage.completion_tokens
        ex.total_tokens = usage.total_tokens
    elif ex.stream and tap.events:
        ex.completion_tokens = tap.events  # roughly one event per token; flagged as estimated
        ex.estimated = True
