"""The simulated vLLM OpenAI server: routes, generation timing and the books.

Strategy: one task per connection, one request/response cycle per loop turn; HTTP framing, socket
I/O and the bounds on idle/slow/huge input live in `wire`. What to answer is decided in
`planning`/`responses`; this module only decides *when* bytes go out and keeps the counters.

Rules:
- Time: step k of a stream is due at t0 + ttft + k / tokens_per_s (absolute deadlines, so drift
  never accumulates); unpaced streams are written in batches of `STREAM_BATCH` events
  (still one SSE event per token). Non-streaming answers are ready at t0 + ttft + decode time +
  latency. t0 is when the request body was complete.
- Disconnects: whenever we wait (ttft, pacing, latency) the connection's own task parks on socket
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
  fault lets them carry on.
- `vllm:generation_tokens_total` moves while generations run (streams by the tokens written,
  non-streaming answers by their decode schedule), as vLLM's does per engine step, so a long healthy
  generation never looks stalled.
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
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import msgspec
import trio

from backends.sim.planning import Planner
from backends.sim.responses import (
    VLLM_VERSION,
    Plan,
    SimError,
    SimOptions,
    embeddings_body,
    error,
    models_body,
)
from backends.sim.wire import JSON, MAX_HEAD_BYTES, Conn, Refused, Request, read_request, sse_head

log = logging.getLogger(__name__)

STREAM_BATCH = 32  # unpaced SSE events per write
RECORDED = 200  # entries kept in `requests` / `responses`
RECORDED_BODY_BYTES = 4 * 1024 * 1024  # a longer answer is recorded as its first 4 MiB

_ENGINE_REASON = {"stop": "stop", "tool_calls": "stop", "length": "length", "abort": "abort"}
FAULTS = ("black_hole", "stall")
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
    errors_total: int  # 4xx answers
    prompt_tokens_total: int
    generation_tokens_total: int
    open_connections: int


class _Model:
    """Per-model counters behind /metrics."""

    __slots__ = ("generation", "live", "prompt", "running", "success")

    def __init__(self) -> None:
        self.running = 0
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
    dead engine; the API keeps serving), `fault` (set with `set_fault`: None, "black_hole" or
    "stall", see the module docstring) and `die_after_events` (a stream started while it is set is
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
        self._models = {name: _Model() for name in (*options.models, *options.embedding_models)}
        self._auth = b"Bearer " + options.api_key.encode() if options.api_key is not None else None
        self._totals = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "connections": 0,
                        "stop": 0, "length": 0, "tool_calls": 0}
        self._routes: dict[bytes, tuple[bytes, Callable[[Conn, Request], Awaitable[bool]]]] = {
            b"/v1/chat/completions": (b"POST", self._chat),
            b"/v1/completions": (b"POST", self._completion),
            b"/v1/embeddings": (b"POST", self._embeddings),
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
        task_status.started((host, bound))
        await trio.serve_listeners(self._connection, listeners)

    def set_fault(self, mode: str | None) -> None:
        """Make the host sick ("black_hole", "stall") or well again (None); see the module docstring."""
        if mode is not None and mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; expected one of {FAULTS} or None")
        if mode == self.fault:
            return
        if mode == "stall":
            now = _now()
            self._frozen = {name: m.generated(now) for name, m in self._models.items()}
        self.fault = mode
        log.warning("simulated vLLM: fault %s", mode or "cleared")
        if mode is None:
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
            finished_length=t["length"], finished_tool_calls=t["tool_calls"], errors_total=t["errors"],
            prompt_tokens_total=sum(m.prompt for m in self._models.values()),
            generation_tokens_total=sum(self._generation_tokens(n, m, now) for n, m in self._models.items()),
            open_connections=t["connections"])

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
            return await self._error(conn, request, 404, b'{"detail":"Not Found"}')
        method, handler = route
        if request.method != method:
            return await self._error(conn, request, 405, b'{"detail":"Method Not Allowed"}',
                                     b"allow: %s\r\n" % method)
        return await handler(conn, request)

    # -- routes ------------------------------------------------------------------------------------

    async def _chat(self, conn: Conn, request: Request) -> bool:
        return await self._generate(conn, request, self._planner.chat)

    async def _completion(self, conn: Conn, request: Request) -> bool:
        return await self._generate(conn, request, self._planner.completion)

    async def _embeddings(self, conn: Conn, request: Request) -> bool:
        t0 = trio.current_time()
        try:
            _json_only(request)
            model, vectors, prompt, b64 = self._planner.embeddings(request.body)
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
            if self.fault is not None and not await self._park(conn):
                return False
            body = embeddings_body(model, vectors, prompt, b64)
            self.responses.append(body)
            await conn.respond(200, body, request.keep_alive)
            outcome = "stop"
            return request.keep_alive
        finally:
            self._finish(counters, outcome, 0)

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
               lambda c: 0)
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               lambda c: min(1.0, c.running / 256))
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               lambda c: c.prompt)
        tokens = {id(m): self._generation_tokens(n, m, now) for n, m in self._models.items()}
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               lambda c: tokens[id(c)])
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.",
               lambda c: 0, ("abort", "error", "length", "stop"))
        return "".join(out).encode()

    # -- generation ----------------------------------------------------------------------------------

    async def _generate(self, conn: Conn, request: Request, plan_for: Callable[..., Plan]) -> bool:
        t0 = trio.current_time()
        try:
            _json_only(request)
            rid = request.fields.get(b"x-request-id")
            plan = plan_for(request.body, rid.decode("latin-1") if rid else None)
        except SimError as exc:
            return await self._error(conn, request, exc.status, exc.body)
        counters = self._models[plan.model]
        counters.running += 1
        counters.prompt += plan.prompt_tokens
        sent: list[bytes] = []
        outcome = "abort"
        o = self.options
        if plan.stream:
            live = functools.partial(_live_streamed, plan, sent)
        else:
            live = functools.partial(_live_scheduled, plan.completion_tokens, t0 + o.ttft_ms / 1000, o.tokens_per_s)
        counters.live.add(live)
        try:
            if plan.stream:
                if await self._stream(conn, plan, t0, sent):
                    outcome = plan.choices[0].finish
                return outcome != "abort" and request.keep_alive
            ready = t0 + (o.ttft_ms + o.latency_ms) / 1000
            if o.tokens_per_s > 0:
                ready += max(plan.max_steps - 1, 0) / o.tokens_per_s
            if ready > trio.current_time() and not await self._sleep_watching(conn, ready):
                return False
            if self.fault is not None and not await self._park(conn):
                return False
            body = plan.body()
            sent.append(body)
            await conn.respond(200, body, request.keep_alive)
            outcome = plan.choices[0].finish
            return request.keep_alive
        finally:
            self.responses.append(b"".join(sent)[:RECORDED_BODY_BYTES])
            counters.live.discard(live)
            tokens = plan.completion_tokens if outcome != "abort" else _streamed_tokens(plan, sent)
            self._finish(counters, outcome, tokens)

    def _finish(self, counters: _Model, outcome: str, tokens: int) -> None:
        """Book one generation: outcome is its finish_reason, or "abort" when it was cut."""
        counters.running -= 1
        counters.generation += tokens
        counters.success[_ENGINE_REASON[outcome]] += 1
        if outcome == "abort":
            self._totals["cancelled"] += 1
        else:
            self._totals["finished"] += 1
            self._totals[outcome] += 1

    async def _stream(self, conn: Conn, plan: Plan, t0: float, sent: list[bytes]) -> bool:
        """Write the SSE stream; False if it was cut (client gone, write failed, fault injected)."""
        try:
            return await self._pump(conn, plan, t0, sent)
        except trio.BrokenResourceError:
            return False

    async def _pump(self, conn: Conn, plan: Plan, t0: float, sent: list[bytes]) -> bool:
        rate = self.options.tokens_per_s
        first = t0 + self.options.ttft_ms / 1000
        paced = rate > 0 or first > t0
        die = self.die_after_events
        conn.scope.deadline = math.inf  # a stream is not idle; only a write that stalls gets a limit
        out = [sse_head()]
        step_due = -1
        for step, event in plan.events():
            if self.fault is not None:
                if self.fault == "stall":
                    await conn.write(out)  # what was generated goes out; then nothing more
                if not await self._park(conn):
                    return False
            if paced and step != step_due:
                step_due = step
                due = first + step / rate if rate > 0 else first
                if due > trio.current_time():
                    await conn.write(out)
                    if not await self._sleep_watching(conn, due):
                        return False
            out.append(b"%x\r\n%s\r\n" % (len(event), event))
            sent.append(event)
            if die is not None and len(sent) >= die:
                await conn.write(out)
                return False  # the caller closes the connection without the last chunk
            if len(out) >= STREAM_BATCH:
                await conn.write(out)
        out.append(b"0\r\n\r\n")
        await conn.write(out)
        return True

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
                if self.fault is None:
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


def _is_probe(request: Request) -> bool:
    return request.fields.get(b"user-agent", b"").startswith(PROBE_AGENT)


def _live_streamed(plan: Plan, sent: list[bytes], now: float) -> int:
    """Tokens a running stream has written so far."""
    return _streamed_tokens(plan, sent)


def _live_scheduled(total: int, first_at: float, rate: float, now: float) -> int:
    """Tokens a running non-streaming generation has decoded by `now` (first at `first_at`, then `rate`/s)."""
    if now < first_at:
        return 0
    if rate <= 0:
        return total
    return min(total, 1 + int((now - first_at) * rate))


def _streamed_tokens(plan: Plan, sent: list[bytes]) -> int:
    """Tokens that reached the wire before an abort (events minus role/usage/[DONE] chunks)."""
    if not plan.stream:
        return 0
    roles = len(plan.choices) if plan.kind == "chat" else 0
    return max(0, min(plan.completion_tokens, len(sent) - roles))


__all__ = ["RecordedRequest", "SimOptions", "SimServer", "SimStatistics"]
