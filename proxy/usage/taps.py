"""Which usage tap watches a response, what it found, and what the request is settled and recorded at.

Strategy: a non-streamed answer is watched by `BodyTail` (the first top-level ``usage`` object, read
as the bytes go by). A Responses API or Anthropic Messages stream (the view's ``api``) is watched by
`EventUsageTap`: those APIs always report usage in their last events, so nothing is asked or removed.
A chat or completions stream is watched by `SseUsageTap`; vLLM reports a stream's counts only when
asked (`stream_options.include_usage`), so the gateway makes sure the request asks (include_usage.py,
decided from the decoded view, never from a byte search) and, when the client itself did not ask, the
tap removes the answer again, so the client sees exactly the stream it asked for.

When vLLM's own count never arrives (no usage event, the client gone mid-stream, the upstream failing),
the request is never settled at 0 (`settlement`): a stream that relayed token events is settled at the
prompt estimate it was charged plus one token per event; anything else at its up-front charge. Either
way the record says so (``estimated``). Only a request that provably cost nothing settles at 0: it never
reached an upstream, or the upstream refused it with a 4xx (vLLM validates before it schedules).
"""

from __future__ import annotations

from proxy.exchange import Exchange
from proxy.usage.body_usage import BodyTail
from proxy.usage.event_tap import EventUsageTap
from proxy.usage.include_usage import ask_for_usage, client_asked
from proxy.usage.sse_tap import SseUsageTap


def choose_tap(view, body: bytes) -> tuple[bytes, SseUsageTap | BodyTail | EventUsageTap]:
    """(the body to send upstream, the tap for its response)."""
    if not view.stream:
        # A Responses body echoes the request's tools and text.format schemas before its usage, and a
        # Messages body holds model-written tool_use inputs before it: either may plant a "usage"
        # object, so those take the body's LAST one (vLLM's own, at the end).
        return body, BodyTail(last=view.api in ("responses", "messages"))
    api = view.api
    if api != "chat":
        prompt = view.estimate_prompt_tokens(len(body))
        if api == "plain":  # audio's stream: chat-shaped chunks, usage only if the client asked
            return body, SseUsageTap(strip_usage_chunk=False, prompt_estimate=prompt)
        return body, EventUsageTap(api, prompt_estimate=prompt)
    opts = view.stream_options
    asked = client_asked(opts)
    prompt = view.estimate_prompt_tokens(len(body))
    sent = ask_for_usage(body, opts, asked)
    return (body if sent is None else sent), SseUsageTap(strip_usage_chunk=not asked, prompt_estimate=prompt)


def read_tap(ex: Exchange, tap) -> None:
    """Copy what the tap found into the request's record (at the end of the relay)."""
    usage = tap.usage
    if usage is not None:
        ex.prompt_tokens = usage.prompt_tokens
        ex.completion_tokens = usage.completion_tokens
        ex.total_tokens = usage.total_tokens
        ex.estimated = False
    elif ex.stream and tap.events:
        # Roughly one event per token (plus the opening role chunk): flagged as estimated.
        prompt = tap.prompt_estimate
        ex.prompt_tokens = prompt
        ex.completion_tokens = tap.events
        ex.total_tokens = (prompt or 0) + tap.events
        ex.estimated = True


def settlement(ex: Exchange) -> tuple[int | None, bool]:
    """(the total tokens the request is settled and recorded at, whether that total is an estimate).

    vLLM's count when it came (or the tap's estimate from the stream's events); None (settled at 0)
    when the request provably cost nothing; else the up-front charge, estimated (None when nothing was
    charged: a key without a token limit).
    """
    if ex.total_tokens is not None:
        return ex.total_tokens, ex.estimated
    if ex.t_upstream is None:
        return None, False  # never sent to an upstream: nothing ran
    if ex.upstream is not None and 400 <= ex.status < 500 and ex.status != 499:
        return None, False  # the upstream refused it before generating
    return (ex.charged_tokens or None), True
