"""The access log line of one finished request: who, what, where, how it ended, how long it took.

Strategy: built from the request's record (`Exchange`) alone, after the response is done, so nothing
on the request path pays for it beyond one dict. It names the key by its NAME, never the secret, and
carries no prompt or output: the log may be shipped anywhere.
"""

from __future__ import annotations

from proxy.exchange import Exchange


def access_fields(ex: Exchange) -> dict:
    ttfb_ms = ex.ttfb_ms()
    return {
        "ts": round(ex.ts, 3), "event": "access", "request_id": ex.request_id.decode("latin-1"),
        "method": ex.method.decode("latin-1"), "endpoint": ex.endpoint,
        "key": ex.key.name if ex.key is not None else None,
        "model": ex.model, "tier": ex.tier, "stream": ex.stream, "status": ex.status,
        "error": ex.error_type, "upstream": ex.upstream, "latency_ms": round(ex.latency_ms(), 3),
        "ttfb_ms": None if ttfb_ms is None else round(ttfb_ms, 3), "wake_ms": ex.wake_ms,
        "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
    }
