"""The simulated vLLM OpenAI server: routes, generation timing and the books.

Routes are vLLM's: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses (+ GET
/v1/responses/{id}, POST /v1/responses/{id}/cancel), /v1/messages (+ /count_tokens),
/v1/audio/transcriptions and /translations, /score, /v1/score, /rerank, /v1/rerank, /v2/rerank,
/pooling, /classify, /tokenize, /detokenize, /v1/models, /health, /version, /metrics. Every
generating route hands `_generate` a plan with one surface (`responses.Plan`, or the plans of
`responses_api`, `messages`, `audio`); pooling routes go through `_pool`; tokenize, detokenize and
count_tokens are answered by the API server alone and book nothing.

Strategy: one task per connection, one request/response cycle per loop turn; HTTP framing, socket
I/O and the bounds on idle/slow/huge input live in `wire`. What to answer is decided in
`planning`/`responses`; this module only decides *when* bytes go out and keeps the counters.

Rules:
- Time: step k of a stream is due at first + k / tokens_per_s (absolute deadlines, so drift
  never accumulates); unpaced streams are written in batches of `STREAM_BATCH` events
  (still one SSE event per token). Non-streaming answers are ready at first + decode time +
  latency. first = t0 + ttft, t0 being when the request body was complete -- unless the
  prefix-cache/scheduler model is on (`scheduler`): then a generation may first wait for a slot
  (`max_num_seqs`, FIFO, vllm:num_requests_waiting) and first = prefill end + ttft, the prefill
  being its uncached prompt tokens (`prefix_cache`) at `prefill_tokens_per_s` on the engine's one
  prefill timeline. The slot and the prompt's cache blocks are held until the answer ends. Pooling
  requests do not go through the scheduler.
- Disconnects: whenever we wait (slot, ttft, pacing, latency) the connection's own task parks on socket
  readability with the due time as its deadline -- no extra watcher task; EOF or a reset ends the
  generation, counted as aborted (`cancelled_total`, `finished_reason="abort"`), like vLLM's
  `with_cancellation` / StreamingResponse disconnect handling. Failed writes count the same way.
- `/metrics`, `/health` and `statistics()` read the same live counters, so the waker's idle
  detector sees exactly what a test sees. Auth applies to `/v1/*` only, as `vllm serve --api-key`.
- A bug on one connection is logged and closes that connection only; the server keeps serving.
- Faults, switchable at runtime (`set_fault`, or `POST /_sim/fault` with {"mode": ...}) so a healthy
  host can go sick and recover: "black_hole" accepts connections and reads requests but answers
  nothing -- /health included -- and in-flight generations stop writing (a TP engine hung in a
  collective, a host whose network half died); "stall" keeps /health at 200 while generations stop
  progressing and /metrics shows them running with `vllm:generation_tokens_total` frozen. Parked
  requests watch their sockets (a client that hangs up aborts its generation, as ever); clearing the
  fault lets them carry on. "inband_error" keeps the host healthy and fails generations in the engine:
  a stream writes `INBAND_TOKENS` tokens (fewer for a shorter answer) and then the API's in-band
  error (chat, completions, audio: vLLM's `data: {"error": ...}` + `data: [DONE]`, ending the response
  cleanly; Messages: an `error` event; Responses: vLLM cannot render it, so the stream is cut), a
  non-streaming answer is vLLM's 500 "Internal server error"; both count as finished_reason "error".
  Pooling and tokenizer routes answer as ever.
- `vllm:generation_tokens_total` moves while generations run (streams by the tokens written,
  non-streaming answers by their decode schedule), as vLLM's does per engine step, so a long healthy
  generation never looks stalled.
- Background Responses (`background: true`) run in a nursery of `serve`, with the engine's timeline
  and books but no socket; `cancel` cancels that task.
- Probes (`User-Agent: spotinference-probe`, backends/probe.py) to /health and /metrics are answered
  but not recorded in `requests`, `responses` or `requests_total`: they are the gateway's background
  traffic, not a test's.
"""

from __future__ import annotations

import collections
import functools
import hmac
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import msgspec
import trio

from backends.sim import audio, messages, responses_api
from backends.sim.planning import Planner
from backends.sim.pooling import Pooler
from backends.sim.responses import (
    VLLM_VERSION,
    Generation,
    SimError,
    SimOptions,
    embeddings_body,
    error,
    models_body,
)
from backends.sim.responses_api import ResponsesPlan, ResponseStore, Stored
from backends.sim.scheduler import Scheduler, Ticket
from backends.sim.wire import JSON, MAX_HEAD_BYTES, Conn, Refused, Request, read_request, sse_head

log = logging.getLogger(__name__)

STREAM_BATCH = 32  # unpaced SSE events per write
RECORDED = 200  # entries kept in `requests` / `responses`
RECORDED_BODY_BYTES = 4 * 1024 * 1024  # a longer answer is recorded as its first 4 MiB

_ENGINE_REASON = {"stop": "stop", "tool_calls": "stop", "length": "length", "abort": "abort", "error": "error"}
FAULTS = ("black_hole", "stall", "inband_error")
_PARKING = ("black_hole", "stall")  # faults that hold requests until cleared
INBAND_TOKENS = 3  # tokens an "inband_error" stream writes before its error event
FAULT_PATH = b"/_sim/fault"
PROBE_AGENT = b"spotinference-probe"  # backends.probe.USER_AGENT


class RecordedRequest(NamedTuple):
    """One request as received: method, target, headers (lower-case names), body."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


class SimStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the server's counters (requests, generations, tokens, connections)."""

    requests_total: int  # HTTP requests received, every route
    running: int  # generations in progress (vllm:num_requests_running summed over models)
    finished_total: int  # generations answered completely
    cancelled_total: int  # generations aborted: client gone, write failed, or die_after_events
    finished_stop: int
    finished_length: int
    finished_tool_calls: int
    finished_error: int  # generations that failed in the engine (the "inband_error" fault)
    errors_total: int  # 4xx answers
    prompt_tokens_total: int
    generation_tokens_total: int
    open_connections: int
    waiting: int = 0  # generations queued for a slot (vllm:num_requests_waiting summed; `max_num_seqs`)
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache (`kv_cache_tokens`)
    prefix_cache_hits_total: int = 0  # of those, tokens found cached


class _Model:
    """Per-model counters behind /metrics."""

    __slots__ = ("generation", "hits", "live", "prompt", "queries", "running", "success", "waiting")

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0  # queued for a slot (max_num_seqs)
        self.queries = 0  # prefix cache: prompt tokens queried, and hit
        self.hits = 0
        self.prompt = 0
        self.generation = 0  # tokens of finished generations
        self.live: set[Callable[[float], int]] = set()  # tokens so far of each running generation
        self.success = {"stop": 0, "length": 0, "abort": 0, "error": 0}

    def generated(self, now: float) -> int:
        return self.generation + sum(f(now) for f in self.live)


class _FaultMode(msgspec.Struct):
    mode: str | None = None


class SimServer:
    """A simulated vLLM OpenAI-compatible server (see the module docstring).

    Mutable knobs, read on every request: `healthy` (False -> /health answers 503, as vLLM with a
    dead engine; the API keeps serving), `fault` (set with `set_fault`: None, "black_hole", "stall"
    or "inband_error", see the module docstring) and `die_after_events` (a stream started while it is set is
    closed abruptly after that many SSE events -- role, token, usage and [DONE] chunks all count --
    without the terminating chunk). `requests` records every parsed request on arrival;
    `responses` records every answer body (de-chunked, exactly as sent, partial when cut) when the
    answer ends -- so the two line up index for index for sequential traffic, and by completion
    order under concurrency; bodies past RECORDED_BODY_BYTES are recorded as their prefix.
    """

    def __init__(self, options: SimOptions = SimOptions()) -> None:  # noqa: B008 (frozen, shared)
        self.options = options
        self.healthy = True
        self.fault: str | None = None
        self.die_after_events: int | None = None
        self._parked: set[trio.CancelScope] = set()  # requests waiting for the fault to clear
        self._frozen: dict[str, int] = {}  # generation tokens per model when the stall began
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=RECORDED)
        self.responses: collections.deque[bytes] = collections.deque(maxlen=RECORDED)
        self._planner = Planner(options)
        self.scheduler = Scheduler(options.max_num_seqs, options.prefill_tokens_per_s,
                                   options.kv_cache_tokens, options.block_tokens)
        self._pooler = Pooler(self._planner)
        self.response_store = ResponseStore()  # POST /v1/responses with store; LRU, this server only
        self._background: trio.Nursery | None = None  # background Responses generations
        self._models = {name: _Model() for name in (*options.models, *options.embedding_models)}
        self._auth = b"Bearer " + options.api_key.encode() if options.api_key is not None else None
        self._totals = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "connections": 0,
                        "stop": 0, "length": 0, "tool_calls": 0, "error": 0}
        self._routes: dict[bytes, tuple[bytes, Callable[[Conn, Request], Awaitable[bool]]]] = {
            b"/v1/chat/completions": (b"POST", self._chat),
            b"/v1/completions": (b"POST", self._completion),
            b"/v1/embeddings": (b"POST", self._embeddings),
            b"/v1/responses": (b"POST", self._responses),
            b"/v1/messages": (b"POST", self._messages),
            b"/v1/messages/count_tokens": (b"POST", self._count_tokens),
            b"/v1/audio/transcriptions": (b"POST", self._transcriptions),
            b"/v1/audio/translations": (b"POST", self._translations),
            b"/score": (b"POST", self._score),
            b"/v1/score": (b"POST", self._score),
            b"/rerank": (b"POST", self._rerank),
            b"/v1/rerank": (b"POST", self._rerank),
            b"/v2/rerank": (b"POST", self._rerank),
            b"/pooling": (b"POST", self._pooling),
            b"/classify": (b"POST", self._classify),
            b"/tokenize": (b"POST", self._tokenize),
            b"/detokenize": (b"POST", self._detokenize),
            b"/v1/models": (b"GET", self._list_models),
            b"/health": (b"GET", self._health),
            b"/version": (b"GET", self._version),
            b"/metrics": (b"GET", self._metrics),
            FAULT_PATH: (b"POST", self._set_fault),
        }

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report `(host, port)` through task_status, and serve until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        if port == 0:  # several address families would each get their own random port
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        bound = listeners[0].socket.getsockname()[1]
        log.info("simulated vLLM serving %s on %s:%d", ",".join(self.options.models), host, bound)
        async with trio.open_nursery() as background:
            self._background = background
            task_status.started((host, bound))
            await trio.serve_listeners(self._connection, listeners)

    def set_fault(self, mode: str | None) -> None:
        """Make the host sick ("black_hole", "stall", "inband_error") or well again (None); see the module
        docstring."""
        if mode is not None and mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; expected one of {FAULTS} or None")
        if mode == self.fault:
            return
        if mode == "stall":
            now = _now()
            self._frozen = {name: m.generated(now) for name, m in self._models.items()}
        self.fault = mode
        log.warning("simulated vLLM: fault %s", mode or "cleared")
        if mode not in _PARKING:
            self._frozen = {}
            parked, self._parked = self._parked, set()
            for scope in parked:
                scope.cancel()

    def _generation_tokens(self, name: str, model: _Model, now: float) -> int:
        frozen = self._frozen.get(name) if self.fault == "stall" else None
        return model.generated(now) if frozen is None else frozen

    def statistics(self) -> SimStatistics:
        """An immutable snapshot of the counters (the same ones /metrics renders)."""
        t = self._totals
        now = _now()
        return SimStatistics(
            requests_total=t["requests"], running=sum(m.running for m in self._models.values()),
            finished_total=t["finished"], cancelled_total=t["cancelled"], finished_stop=t["stop"],
            finished_length=t["length"], finished_tool_calls=t["tool_calls"], finished_error=t["error"],
            errors_total=t["errors"],
            prompt_tokens_total=sum(m.prompt for m in self._models.values()),
            generation_tokens_total=sum(self._generation_tokens(n, m, now) for n, m in self._models.items()),
            open_connections=t["connections"], waiting=sum(m.waiting for m in self._models.values()),
            prefix_cache_queries_total=sum(m.queries for m in self._models.values()),
            prefix_cache_hits_total=sum(m.hits for m in self._models.values()))

    # -- connection loop -------------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        self._totals["connections"] += 1
        conn = Conn(stream)
        try:
            with conn.scope:  # a phase deadline passing ends the connection (and aborts its generation)
                while True:
                    try:
                        request = await read_request(conn)
                    except Refused as refused:
                        self._totals["errors"] += 1
                        conn.linger = True
                        await conn.respond(refused.status, refused.body, False, refused.content_type)
                        return
                    if request is None:
                        return
                    if not _is_probe(request):
                        self._totals["requests"] += 1
                        self.requests.append(RecordedRequest(request.method.decode(),
                                                             request.target.decode("latin-1"),
                                                             request.headers, request.body))
                    if self.fault == "black_hole" and request.path != FAULT_PATH \
                            and not await self._park(conn):
                        return  # the client gave up on the silence
                    if not await self._dispatch(conn, request):
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; an interrupted generation was already counted as aborted
        except Exception:  # a simulator bug: lose this connection, keep serving the others
            log.exception("simulated vLLM: unexpected error on a connection")
        finally:
            self._totals["connections"] -= 1
            await conn.close()

    async def _dispatch(self, conn: Conn, request: Request) -> bool:
        """Answer one request; returns whether the connection stays open."""
        if self._auth is not None and request.path.startswith(b"/v1") \
                and not _same(request.fields.get(b"authorization", b""), self._auth):
            return await self._error(conn, request, 401, b'{"error":"Unauthorized"}')
        route = self._routes.get(request.path)
        if route is None:
            route = self._stored_route(request.path)
        if route is None:
            return await self._error(conn, request, 404, b'{"detail":"Not Found"}')
        method, handler = route
        if request.method != method:
            return await self._error(conn, request, 405, b'{"detail":"Method Not Allowed"}',
                                     b"allow: %s\r\n" % method)
        return await handler(conn, request)

    def _stored_route(self, path: bytes) -> tuple[bytes, Callable[[Conn, Request], Awaitable[bool]]] | None:
        """GET /v1/responses/{id} and POST /v1/responses/{id}/cancel (FastAPI path parameters)."""
        prefix = b"/v1/responses/"
        if not path.startswith(prefix):
            return None
        parts = path[len(prefix):].split(b"/")
        rid = urllib.parse.unquote(parts[0].decode("latin-1"))
        if not rid:
            return None
        if len(parts) == 1:
            return b"GET", functools.partial(self._retrieve, rid=rid)
        if len(parts) == 2 and parts[1] == b"cancel":
            return b"POST", functools.partial(self._cancel, rid=rid)
        return None

    # -- routes ------------------------------------------------------------------------------------

    async def _chat(self, conn: Conn, request: Request) -> bool:
        return await self._generate(conn, request, lambda r: self._planner.chat(r.body, _request_id(r)))

    async def _completion(self, conn: Conn, request: Request) -> bool:
        return await self._generate(conn, request, lambda r: self._planner.completion(r.body, _request_id(r)))

    async def _embeddings(self, conn: Conn, request: Request) -> bool:
        def compute(body: bytes, _rid: str | None) -> tuple[str, int, bytes]:
            model, vectors, prompt, b64 = self._planner.embeddings(body)
            return model, prompt, embeddings_body(model, vectors, prompt, b64)
        return await self._pool(conn, request, compute)

    async def _score(self, conn: Conn, request: Request) -> bool:
        return await self._pool(conn, request, self._pooler.score)

    async def _rerank(self, conn: Conn, request: Request) -> bool:
        return await self._pool(conn, request, self._pooler.rerank)

    async def _pooling(self, conn: Conn, request: Request) -> bool:
        return await self._pool(conn, request, self._pooler.pooling)

    async def _classify(self, conn: Conn, request: Request) -> bool:
        return await self._pool(conn, request, self._pooler.classify)

    async def _pool(self, conn: Conn, request: Request,
                    compute: Callable[[bytes, str | None], tuple[str, int, bytes]]) -> bool:
        """A pooling request (embeddings, score, rerank, pooling, classify): one engine request that
        prefills its prompt and generates nothing, answered after `latency_ms`."""
        t0 = trio.current_time()
        try:
            _json_only(request)
            model, prompt, body = compute(request.body, _request_id(request))
        except SimError as exc:
            return await self._error(conn, request, exc.status, exc.body)
        counters = self._models[model]
        counters.running += 1
        counters.prompt += prompt
        outcome = "abort"
        try:
            if self.options.latency_ms > 0 and not await self._sleep_watching(
                    conn, t0 + self.options.latency_ms / 1000):
                return False
            if self.fault in _PARKING and not await self._park(conn):
                return False
            self.responses.append(body)
            await conn.respond(200, body, request.keep_alive)
            outcome = "stop"
            return request.keep_alive
        finally:
            self._finish(counters, outcome, 0)

    async def _tokenize(self, conn: Conn, request: Request) -> bool:
        return await self._answer(conn, request, self._pooler.tokenize)

    async def _detokenize(self, conn: Conn, request: Request) -> bool:
        return await self._answer(conn, request, self._pooler.detokenize)

    async def _count_tokens(self, conn: Conn, request: Request) -> bool:
        return await self._answer(conn, request, lambda body: messages.count_tokens(self._planner, body))

    async def _answer(self, conn: Conn, request: Request, compute: Callable[[bytes], bytes]) -> bool:
        """A JSON request answered by the API server alone (no engine request, nothing booked)."""
        try:
            _json_only(request)
            body = compute(request.body)
        except SimError as exc:
            return await self._error(conn, request, exc.status, exc.body)
        return await self._ok(conn, request, body)

    async def _messages(self, conn: Conn, request: Request) -> bool:
        return await self._generate(conn, request, lambda r: messages.plan(self._planner, r.body, _request_id(r)))

    async def _transcriptions(self, conn: Conn, request: Request) -> bool:
        return await self._speech(conn, request, "transcribe")

    async def _translations(self, conn: Conn, request: Request) -> bool:
        return await self._speech(conn, request, "translate")

    async def _speech(self, conn: Conn, request: Request, task: str) -> bool:
        def plan_for(r: Request) -> audio.AudioPlan:
            return audio.plan(self._planner, task, r.fields.get(b"content-type", b""), r.body, _request_id(r))
        return await self._generate(conn, request, plan_for, json_only=False)

    async def _responses(self, conn: Conn, request: Request) -> bool:
        try:
            _json_only(request)
            plan = responses_api.plan(self._planner, self.response_store, request.body)
        except SimError as exc:
            return await self._error(conn, request, exc.status, exc.body)
        if plan.request.background and plan.store is not None and not plan.stream \
                and self._background is not None:
            stored = plan.queued()
            self._background.start_soon(self._run_background, plan, stored)
            return await self._ok(conn, request, stored.body())
        return await self._generate(conn, request, lambda _r: plan)

    async def _run_background(self, plan: ResponsesPlan, stored: Stored) -> None:
        """A background Responses generation: the engine's timeline with nobody waiting on a socket;
        the finished response replaces the queued one in the store (unless it was cancelled)."""
        o = self.options
        t0 = trio.current_time()
        counters = self._models[plan.model]
        counters.prompt += plan.prompt_tokens
        ticket = self.scheduler.enqueue()
        live: Callable[[float], int] | None = None
        outcome = "abort"
        with trio.CancelScope() as scope:
            stored.task = scope
            try:
                first = await self._admit(None, ticket, plan, counters, t0)
                assert first is not None  # nobody to hang up
                live = functools.partial(_live_scheduled, plan.completion_tokens, first, o.tokens_per_s)
                counters.live.add(live)
                ready = first + o.latency_ms / 1000
                if o.tokens_per_s > 0:
                    ready += max(plan.max_steps - 1, 0) / o.tokens_per_s
                await trio.sleep_until(ready)
                while self.fault in _PARKING:
                    with trio.CancelScope() as parked:
                        self._parked.add(parked)
                        try:
                            await trio.sleep_forever()
                        finally:
                            self._parked.discard(parked)
                if self.fault == "inband_error":
                    stored.response["status"] = "failed"
                    outcome = "error"
                else:
                    plan.final()
                    outcome = plan.finish
            finally:
                stored.task = None
                if live is not None:
                    counters.live.discard(live)
                tokens = plan.completion_tokens if outcome not in ("abort", "error") else \
                    (live(trio.current_time()) if outcome == "abort" and live is not None else 0)
                self._finish(counters, outcome, tokens, ticket)

    async def _retrieve(self, conn: Conn, request: Request, rid: str) -> bool:
        item = self.response_store.get(rid) if self.options.enable_responses_store else None
        if item is None:
            exc = responses_api.not_found(rid)
            return await self._error(conn, request, exc.status, exc.body)
        return await self._ok(conn, request, item.body())

    async def _cancel(self, conn: Conn, request: Request, rid: str) -> bool:
        item = self.response_store.get(rid) if self.options.enable_responses_store else None
        exc: SimError | None = None
        if item is None:
            exc = responses_api.not_found(rid)
        elif item.response.get("status") not in ("queued", "in_progress"):
            exc = responses_api.cancel_refused()
        if exc is not None:
            return await self._error(conn, request, exc.status, exc.body)
        assert item is not None
        item.response["status"] = "cancelled"
        if item.task is not None:
            item.task.cancel()
        return await self._ok(conn, request, item.body())

    async def _list_models(self, conn: Conn, request: Request) -> bool:
        names = (*self.options.models, *self.options.embedding_models)
        return await self._ok(conn, request, models_body(names, self.options.max_model_len))

    async def _health(self, conn: Conn, request: Request) -> bool:
        status = 200 if self.healthy else 503
        if not _is_probe(request):
            self.responses.append(b"")
        await conn.respond(status, b"", request.keep_alive, None)
        return request.keep_alive

    async def _version(self, conn: Conn, request: Request) -> bool:
        return await self._ok(conn, request, b'{"version":"%s"}' % VLLM_VERSION.encode())

    async def _metrics(self, conn: Conn, request: Request) -> bool:
        kind = b"text/plain; version=0.0.4; charset=utf-8"
        if _is_probe(request):
            await conn.respond(200, self.metrics_text(), request.keep_alive, kind)
            return request.keep_alive
        return await self._ok(conn, request, self.metrics_text(), kind)

    async def _set_fault(self, conn: Conn, request: Request) -> bool:
        try:
            mode = msgspec.json.decode(request.body or b"{}", type=_FaultMode).mode
            self.set_fault(mode)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return await self._error(conn, request, 400, msgspec.json.encode({"detail": str(exc)}))
        return await self._ok(conn, request, msgspec.json.encode({"mode": self.fault}))

    def metrics_text(self) -> bytes:
        """Prometheus text with vLLM's metric names and labels (`engine`, `model_name`)."""
        out: list[str] = []
        now = _now()

        def family(name: str, kind: str, doc: str, value: Callable[[_Model], float],
                   reasons: tuple[str, ...] = ("",)) -> None:
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
            for model, c in self._models.items():
                label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                for reason in reasons:
                    extra = f'finished_reason="{reason}",' if reason else ""
                    number = c.success[reason] if reason else value(c)
                    out.append(f'{name}{{engine="0",{extra}model_name="{label}"}} {float(number)!r}\n')

        family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               lambda c: c.running)
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               lambda c: c.waiting)
        cache = self.scheduler.cache
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               (lambda c: cache.usage()) if cache is not None else (lambda c: min(1.0, c.running / 256)))
        family("vllm:prefix_cache_queries_total", "counter",
               "Prefix cache queries, in terms of number of queried tokens.", lambda c: c.queries)
        family("vllm:prefix_cache_hits_total", "counter",
               "Prefix cache hits, in terms of number of cached tokens.", lambda c: c.hits)
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               lambda c: c.prompt)
        tokens = {id(m): self._generation_tokens(n, m, now) for n, m in self._models.items()}
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               lambda c: tokens[id(c)])
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.",
               lambda c: 0, ("abort", "error", "length", "stop"))
        return "".join(out).encode()

    # -- generation ----------------------------------------------------------------------------------

    async def _generate(self, conn: Conn, request: Request, plan_for: Callable[[Request], Generation], *,
                        json_only: bool = True) -> bool:
        """One generation of any API: `plan_for` turns the request into a plan (chat/completions `Plan`, or
        a Responses/Messages/audio plan with the same surface) or raises SimError."""
        t0 = trio.current_time()
        try:
            if json_only:
                _json_only(request)
            plan = plan_for(request)
        except SimError as exc:
            return await self._error(conn, request, exc.status, exc.body)
        counters = self._models[plan.model]
        counters.prompt += plan.prompt_tokens
        ticket = self.scheduler.enqueue()
        sent: list[bytes] = []
        outcome = "abort"
        o = self.options
        live: Callable[[float], int] | None = None
        try:
            first = await self._admit(conn, ticket, plan, counters, t0)
            if first is None:
                return False  # the client gave up while it waited for a slot
            if plan.stream:
                live = functools.partial(_live_streamed, plan, sent)
            else:
                live = functools.partial(_live_scheduled, plan.completion_tokens, first, o.tokens_per_s)
            counters.live.add(live)
            if plan.stream:
                ended = await self._stream(conn, plan, first, sent)
                if ended is not None:
                    outcome = ended
                return outcome != "abort" and request.keep_alive
            ready = first + o.latency_ms / 1000
            if o.tokens_per_s > 0:
                ready += max(plan.max_steps - 1, 0) / o.tokens_per_s
            if ready > trio.current_time() and not await self._sleep_watching(conn, ready):
                return False
            if self.fault in _PARKING and not await self._park(conn):
                return False
            if self.fault == "inband_error":
                status, body = plan.error_body()
                sent.append(body)
                await conn.respond(status, body, request.keep_alive)
                outcome = "error"
                return request.keep_alive
            body = plan.body()
            sent.append(body)
            await conn.respond(200, body, request.keep_alive)
            outcome = plan.finish
            return request.keep_alive
        finally:
            self.responses.append(b"".join(sent)[:RECORDED_BODY_BYTES])
            if live is not None:
                counters.live.discard(live)
            if outcome in ("abort", "error"):  # what reached the wire (the error event is not a token)
                tokens = plan.streamed_tokens(len(sent) - (outcome == "error"))
            else:
                tokens = plan.completion_tokens
            self._finish(counters, outcome, tokens, ticket)

    async def _admit(self, conn: Conn | None, ticket: Ticket, plan: Generation, counters: _Model,
                     t0: float) -> float | None:
        """Wait for a slot (`max_num_seqs`; FIFO, watching the socket if there is one), then start the
        request on the engine (prefix cache, prefill): when its first token is due, or None if the
        client hung up while it waited. Admitted at once, the clock is t0 (today's timing exactly)."""
        now = t0
        if not ticket.admitted:
            assert ticket.scope is not None
            counters.waiting += 1
            try:
                with ticket.scope:  # cancelled when the scheduler hands this request a slot
                    if conn is None:
                        await trio.sleep_forever()
                    elif not await self._watch_forever(conn):
                        return None
            finally:
                counters.waiting -= 1
            now = trio.current_time()
        counters.running += 1
        sched = self.scheduler
        start = sched.start(ticket, plan.prompt_sequences() if sched.cache is not None else [],
                            plan.prompt_tokens, now)
        counters.queries += start.queried
        counters.hits += start.hits
        return start.prefill_end + self.options.ttft_ms / 1000

    def _finish(self, counters: _Model, outcome: str, tokens: int, ticket: Ticket | None = None) -> None:
        """Book one generation: outcome is its finish_reason, "error" when the engine failed it, or
        "abort" when it was cut (or gave up waiting for a slot). `ticket`: its place in the scheduler
        (pooling requests have none), handed on to the next waiting request."""
        if ticket is None or ticket.started:
            counters.running -= 1
        if ticket is not None:
            self.scheduler.finish(ticket, _now())
        counters.generation += tokens
        counters.success[_ENGINE_REASON[outcome]] += 1
        if outcome == "abort":
            self._totals["cancelled"] += 1
        else:
            self._totals["finished"] += 1
            self._totals[outcome] += 1

    async def _stream(self, conn: Conn, plan: Generation, first: float, sent: list[bytes]) -> str | None:
        """Write the SSE stream, its first token due at `first`; its outcome (the plan's finish, or
        "error" after an in-band error), None if it was cut (client gone, write failed, fault injected)."""
        try:
            return await self._pump(conn, plan, first, sent)
        except trio.BrokenResourceError:
            return None

    async def _pump(self, conn: Conn, plan: Generation, first: float, sent: list[bytes]) -> str | None:
        rate = self.options.tokens_per_s
        paced = rate > 0 or first > trio.current_time()
        die = self.die_after_events
        conn.scope.deadline = math.inf  # a stream is not idle; only a write that stalls gets a limit
        out = [sse_head()]
        step_due = -1
        fail_at = min(INBAND_TOKENS, max(plan.completion_tokens - 1, 0))
        for step, event in plan.events():
            if self.fault is not None:
                if self.fault == "inband_error":
                    if len(sent) >= plan.overhead and plan.streamed_tokens(len(sent)) >= fail_at:
                        error = plan.inband_error()
                        if error is None:  # vLLM's own failure here breaks the stream: cut it
                            await conn.write(out)
                            return None
                        out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(error), error))
                        sent.append(error)
                        await conn.write(out)
                        return "error"
                else:
                    if self.fault == "stall":
                        await conn.write(out)  # what was generated goes out; then nothing more
                    if not await self._park(conn):
                        return None
            if paced and step != step_due and step >= 0:  # negative steps go out at once (t0)
                step_due = step
                due = first + step / rate if rate > 0 else first
                if due > trio.current_time():
                    await conn.write(out)
                    if not await self._sleep_watching(conn, due):
                        return None
            out.append(b"%x\r\n%s\r\n" % (len(event), event))
            sent.append(event)
            if die is not None and len(sent) >= die:
                await conn.write(out)
                return None  # the caller closes the connection without the last chunk
            if len(out) >= STREAM_BATCH:
                await conn.write(out)
        out.append(b"0\r\n\r\n")
        await conn.write(out)
        return plan.finish

    async def _sleep_watching(self, conn: Conn, deadline: float) -> bool:
        """Sleep until `deadline` while watching the socket; False if the client hung up first.

        One task, no watcher: park on readability with the deadline as a cancel scope. Bytes that
        arrive meanwhile (a pipelined request) are kept for the next cycle, up to MAX_HEAD_BYTES.
        """
        with trio.move_on_at(deadline):
            return await self._watch_forever(conn)
        return True

    async def _watch_forever(self, conn: Conn) -> bool:
        """Keep what arrives (up to MAX_HEAD_BYTES) until cancelled; False as soon as the client hangs up.
        The caller's scope ends the wait."""
        if conn.scope.deadline != math.inf:  # waiting is not idling: no phase limit applies
            conn.scope.deadline = math.inf
        while len(conn.buffer) <= MAX_HEAD_BYTES:
            try:
                data = await conn.receive()
            except trio.BrokenResourceError:
                return False
            if not data:
                return False
            conn.buffer += data
        await trio.sleep_forever()

    async def _park(self, conn: Conn) -> bool:
        """Wait until the fault is cleared, watching the socket; False if the client hung up first.
        Bytes that arrive meanwhile (a pipelined request) are kept, up to MAX_HEAD_BYTES."""
        with trio.CancelScope() as parked:
            self._parked.add(parked)
            try:
                if self.fault not in _PARKING:
                    return True
                return await self._watch_forever(conn)
            finally:
                self._parked.discard(parked)
        return True

    # -- answers ---------------------------------------------------------------------------------------

    async def _ok(self, conn: Conn, request: Request, body: bytes, content_type: bytes = JSON) -> bool:
        self.responses.append(body)
        await conn.respond(200, body, request.keep_alive, content_type)
        return request.keep_alive

    async def _error(self, conn: Conn, request: Request, status: int, body: bytes,
                     extra: bytes = b"") -> bool:
        self._totals["errors"] += 1
        self.responses.append(body)
        await conn.respond(status, body, request.keep_alive, JSON, extra)
        return request.keep_alive


def _same(given: bytes, expected: bytes) -> bool:
    scheme, _, token = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + token, expected)


def _json_only(request: Request) -> None:
    """vLLM's `validate_json_request` dependency: the media type must be application/json."""
    media = request.fields.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if media != b"application/json":
        raise error(400, "Unsupported Media Type: Only 'application/json' is allowed", "Bad Request")


def _now() -> float:
    """trio's clock; outside a trio run (a snapshot taken after the test's loop ended) no generation
    runs, so any time will do."""
    try:
        return trio.current_time()
    except RuntimeError:
        return math.inf


def _request_id(request: Request) -> str | None:
    """The `X-Request-Id` header, which vLLM uses as the base of its response ids."""
    rid = request.fields.get(b"x-request-id")
    return rid.decode("latin-1") if rid else None


def _is_probe(request: Request) -> bool:
    return request.fields.get(b"user-agent", b"").startswith(PROBE_AGENT)


def _live_streamed(plan: Generation, sent: list[bytes], now: float) -> int:
    """Tokens a running stream has written so far."""
    return plan.streamed_tokens(len(sent))


def _live_scheduled(total: int, first_at: float, rate: float, now: float) -> int:
    """Tokens a running non-streaming generation has decoded by `now` (first at `first_at`, then `rate`/s)."""
    if now < first_at:
        return 0
    if rate <= 0:
        return total
    return min(total, 1 + int((now - first_at) * rate))


__all__ = ["RecordedRequest", "SimOptions", "SimServer", "SimStatistics"]
