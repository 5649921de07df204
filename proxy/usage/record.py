"""The usage row of one finished request, for the usage log (log.py): the billing record.

Strategy: one row per billed request (`BILLED`: every endpoint that makes vLLM compute; whatever its status), with
vLLM's own token counts as the taps read them, the key's name and the timings. When vLLM's count
never came, the row carries what the request was settled at (usage/taps.py `settlement`: a stream's
counted events, else the up-front charge) and says so (`estimated`). Requests the gateway answers
itself (models, health, metrics) are not billed and get no row.
"""

from __future__ import annotations

from proxy.exchange import Exchange
from proxy.usage.log import UsageRow
from proxy.usage.taps import settlement

# Every route that makes an upstream compute (count_tokens, tokenize and detokenize do not; a stored
# response's retrieve or cancel is not new work).
BILLED = frozenset(("chat", "completions", "embeddings", "responses", "messages", "transcriptions",
                    "translations", "rerank", "score", "pooling", "classify"))


def usage_row(ex: Exchange) -> UsageRow | None:
    if ex.endpoint not in BILLED:
        return None
    total, estimated = settlement(ex)
    return UsageRow(
        ts=ex.ts, request_id=ex.request_id.decode("latin-1"), key_name=ex.key.name if ex.key is not None else None,
        model=ex.model, tier=ex.tier, endpoint=ex.endpoint, stream=ex.stream, status=ex.status,
        prompt_tokens=ex.prompt_tokens, completion_tokens=ex.completion_tokens, total_tokens=total,
        estimated=estimated, ttfb_ms=ex.ttfb_ms(), latency_ms=ex.latency_ms(), wake_ms=ex.wake_ms,
        upstream=ex.upstream, error_type=ex.error_type,
    )
