"""One request's record, from head received to the last byte: who, what, where, how long, how it ended.

Strategy: handlers fill the fields as the request moves along; `finish()` runs exactly once (from the
dispatcher's `finally`, cancellation included) and hands the record to `Gateway.request_finished`:
limits settled, metrics, usage row, access log line. A client that vanished before the response completed is
recorded as status 499 (nginx's convention), with whatever the upstream had reported.
Times are `time.perf_counter()` seconds; the wall-clock timestamp is taken once at the start.
"""

from __future__ import annotations

import itertools
import os
import time

_RID_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


# Generated ids: a random per-process prefix and a counter -- unique without a syscall per request.
_RID_PREFIX = os.urandom(6).hex().encode()
_rid_counter = itertools.count(1)


def _request_id(headers) -> bytes:
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= 128 and all(c in _RID_OK for c in value):
                return value
            break
    return b"%s%010x" % (_RID_PREFIX, next(_rid_counter))


MODEL_MAX = 256  # characters of a client's model name kept in records, logs and error messages


def model_label(name: str) -> str:
    """A client's model name as records keep it: whole up to MODEL_MAX characters, else cut and marked
    (a 200 KB unrouted name must not land verbatim in the access log and the usage table)."""
    if len(name) <= MODEL_MAX:
        return name
    return f"{name[:MODEL_MAX]}...[{len(name)} chars]"


class Exchange:
    __slots__ = (
        "_done",
        "charged_tokens",
        "client",
        "completion_tokens",
        "dialect",
        "early_head",
        "endpoint",
        "error_type",
        "estimated",
        "gw",
        "key",
        "method",
        "model",
        "prompt_tokens",
        "request_id",
        "sse_events",
        "status",
        "stream",
        "t0",
        "t_end",
        "t_first_byte",
        "t_upstream",
        "tier",
        "total_tokens",
        "ts",
        "upstream",
        "wake_ms",
    )

    def __init__(self, gw, request, client: str) -> None:
        self.gw = gw
        self.client = client
        self.method = request.method
        self.request_id = _request_id(request.headers)
        self.t0 = time.perf_counter()
        self.ts = time.time()
        self.endpoint = ""
        self.dialect = 0  # errors.OPENAI; routes.py sets the route's
        self.key = None
        self.model: str | None = None
        self.tier: str | None = None
        self.stream = False
        self.status = 0
        self.error_type: str | None = None
        self.t_upstream: float | None = None   # request sent upstream
        self.t_first_byte: float | None = None  # upstream response head received
        self.t_end: float | None = None
        self.upstream: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.total_tokens: int | None = None
        self.estimated = False
        self.wake_ms: float | None = None
        self.sse_events = 0
        self.charged_tokens = 0
        self.early_head = False  # a waiting stream got its 200 SSE head before the upstream answered
        self._done = False

    def fail(self, err) -> None:
        self.status = err.status_for(self.dialect)
        self.error_type = err.code or err.type

    def finish(self, client_gone: bool) -> None:
        if self._done:
            return
        self._done = True
        self.t_end = time.perf_counter()
        if self.status == 0 or (client_gone and self.status < 400):
            self.status = 499
            self.error_type = self.error_type or "client_closed"
        self.gw.request_finished(self)

    # -- derived timings (ms) --
    def latency_ms(self) -> float:
        return ((self.t_end or time.perf_counter()) - self.t0) * 1000.0

    def ttfb_ms(self) -> float | None:
        return None if self.t_first_byte is None else (self.t_first_byte - self.t0) * 1000.0

    def gateway_ms(self) -> float:
        """Time the gateway itself spent before the upstream got the request (routing, validation,
        auth; a wake wait excluded); the whole latency for a request that never went upstream."""
        if self.t_upstream is None:
            return self.latency_ms()
        ms = (self.t_upstream - self.t0) * 1000.0
        if self.wake_ms:
            ms = max(0.0, ms - self.wake_ms)
        return ms
