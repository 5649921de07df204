"""The simulated vLLM OpenAI server: a trio + h11 HTTP/1.1 loop that pumps `Plan`s onto sockets.

Strategy: one task per connection, one request/response cycle per loop turn. h11 parses each request
(a fresh `h11.Connection` per cycle, fed the bytes left over from the previous one); responses are
hand-encoded with the headers uvicorn puts on vLLM's answers (`date`, `server: uvicorn`, then
Starlette's `content-length`/`content-type`, or `transfer-encoding: chunked` for SSE), which keeps
the simulator well clear of being a benchmark's bottleneck. What to answer is decided in
`planning`/`responses`; this module only decides *when* bytes go out and keeps the books.

Rules:
- Time: step k of a stream is due at t0 + ttft + k / tokens_per_s (absolute, `trio.sleep_until`,
  so drift never accumulates); unpaced streams are written in batches of `STREAM_BATCH` events
  (still one SSE event per token). Non-streaming answers are ready at t0 + ttft + decode time +
  latency. t0 is when the request body was complete.
- Disconnects: whenever we wait, a watcher reads the socket; EOF cancels the generation, which is
  then counted as aborted (`cancelled_total`, `finished_reason="abort"`), like vLLM's
  `with_cancellation` / StreamingResponse disconnect handling. Failed writes count the same way.
- Bounds: idle keep-alive `KEEPALIVE_IDLE_S` (uvicorn's 5 s default, which vLLM keeps), request
  head+body within `REQUEST_READ_S`, heads up to `MAX_HEAD_BYTES`, bodies up to `MAX_BODY_BYTES`
  (413), writes stalled past `WRITE_S` abort the stream, the recording deques hold 200 entries.
- `/metrics`, `/health` and `statistics()` read the same live counters, so the waker's idle
  detector sees exactly what a test sees. Auth applies to `/v1/*` only, as `vllm serve --api-key`.
"""

from __future__ import annotations

import collections
import email.utils
import hmac
import logging
import math
import socket
import time
from typing import Awaitable, Callable, NamedTuple

import h11
import msgspec
import trio

from backends.sim.planning import Planner
from backends.sim.responses import (
    VLLM_VERSION, Plan, SimError, SimOptions, embeddings_body, error, models_body,
)

log = logging.getLogger(__name__)

KEEPALIVE_IDLE_S = 5.0
REQUEST_READ_S = 30.0
WRITE_S = 60.0
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
RECEIVE_BYTES = 65536
STREAM_BATCH = 32
RECORDED = 200
_FAIRNESS = 16

_JSON = b"application/json"
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ndate: %s\r\nserver: uvicorn\r\n"
             b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            405: b"Method Not Allowed", 413: b"Request Entity Too Large", 503: b"Service Unavailable"}
_ENGINE_REASON = {"stop": "stop", "tool_calls": "stop", "length": "length", "abort": "abort"}


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

    __slots__ = ("running", "prompt", "generation", "success")

    def __init__(self) -> None:
        self.running = 0
        self.prompt = 0
        self.generation = 0
        self.success = {"stop": 0, "length": 0, "abort": 0, "error": 0}


class _Conn:
    """One accepted socket: non-blocking stdlib I/O parked on trio's `wait_readable`/`wait_writable`.

    The fast path costs one syscall per read or write and no scheduler round trip; `_FAIRNESS`
    operations in a row without waiting end in a checkpoint, so a busy connection (an unpaced
    stream, a pipelining client) still lets the others run and still sees cancellation.
    """

    __slots__ = ("sock", "buffer", "scope", "linger", "eager")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""  # received bytes of the next request (pipelining)
        # one scope per connection; its deadline follows the phase (idle, reading, writing, waiting)
        self.scope = trio.CancelScope()
        self.linger = False  # closing after an error answer: drain unread input so no RST eats it
        self.eager = 0  # operations since this connection last yielded to the scheduler

    def phase(self, seconds: float) -> None:
        self.scope.deadline = trio.current_time() + seconds

    async def _yield_sometimes(self) -> None:
        self.eager += 1
        if self.eager >= _FAIRNESS:
            self.eager = 0
            await trio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        """Up to RECEIVE_BYTES; b"" at EOF. Resets and other socket errors -> BrokenResourceError."""
        while True:
            try:
                data = self.sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                self.eager = 0
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            await self._yield_sometimes()
            return data

    async def send(self, data: bytes) -> None:
        """Write all of `data`, waiting for buffer space as needed (the flow control)."""
        sent = 0
        view = None
        while True:
            try:
                sent += self.sock.send(data if view is None else view[sent:])
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            if sent >= len(data):
                await self._yield_sometimes()
                return
            view = memoryview(data)
            self.eager = 0
            await trio.lowlevel.wait_writable(self.sock)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class _Request(NamedTuple):
    method: bytes
    path: bytes
    headers: dict[bytes, bytes]
    body: bytes
    keep_alive: bool


class SimServer:
    """A simulated vLLM OpenAI-compatible server (see the module docstring).

    Mutable knobs, read on every request: `healthy` (False -> /health answers 503, as vLLM with a
    dead engine; the API keeps serving) and `die_after_events` (a stream started while it is set is
    closed abruptly after that many SSE events -- role, token, usage and [DONE] chunks all count --
    without the terminating chunk). `requests` records every parsed request on arrival;
    `responses` records every answer body (de-chunked, exactly as sent, partial when cut) when the
    answer ends -- so the two line up index for index for sequential traffic, and by completion
    order under concurrency.
    """

    def __init__(self, options: SimOptions = SimOptions()) -> None:
        self.options = options
        self.healthy = True
        self.die_after_events: int | None = None
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=RECORDED)
        self.responses: collections.deque[bytes] = collections.deque(maxlen=RECORDED)
        self._planner = Planner(options)
        self._models = {name: _Model() for name in (*options.models, *options.embedding_models)}
        self._auth = b"Bearer " + options.api_key.encode() if options.api_key is not None else None
        self._totals = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "connections": 0,
                        "stop": 0, "length": 0, "tool_calls": 0}
        self._date_second = -1
        self._date = b""
        self._routes: dict[bytes, tuple[bytes, Callable[[_Conn, _Request], Awaitable[bool]]]] = {
            b"/v1/chat/completions": (b"POST", self._chat),
            b"/v1/completions": (b"POST", self._completion),
            b"/v1/embeddings": (b"POST", self._embeddings),
            b"/v1/models": (b"GET", self._list_models),
            b"/health": (b"GET", self._health),
            b"/version": (b"GET", self._version),
            b"/metrics": (b"GET", self._metrics),
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

    def statistics(self) -> SimStatistics:
        t = self._totals
        return SimStatistics(
            requests_total=t["requests"], running=sum(m.running for m in self._models.values()),
            finished_total=t["finished"], cancelled_total=t["cancelled"], finished_stop=t["stop"],
            finished_length=t["length"], finished_tool_calls=t["tool_calls"], errors_total=t["errors"],
            prompt_tokens_total=sum(m.prompt for m in self._models.values()),
            generation_tokens_total=sum(m.generation for m in self._models.values()),
            open_connections=t["connections"])

    # -- connection loop -------------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        self._totals["connections"] += 1
        sock = socket.socket(fileno=stream.socket.detach())  # trio set TCP_NODELAY on accept
        sock.setblocking(False)
        conn = _Conn(sock)
        try:
            with conn.scope:  # a phase deadline passing ends the connection (and aborts its generation)
                while True:
                    request = await self._read(conn)
                    if request is None or not await self._dispatch(conn, request):
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; an interrupted generation was already counted as aborted
        except Exception:  # a simulator bug: lose this connection, keep serving the others
            log.exception("simulated vLLM: unexpected error on a connection")
        finally:
            self._totals["connections"] -= 1
            if conn.linger:
                with trio.CancelScope(shield=True):
                    await _lingering_close(conn)
            conn.close()

    async def _read(self, conn: _Conn) -> _Request | None:
        """The next request, or None when the connection should close (EOF, bad or huge input)."""
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        data, conn.buffer = conn.buffer, b""
        # One deadline per cycle on the fast path: the idle allowance also covers parsing and an
        # immediate answer; a request that needs more reads, or an answer that waits, moves it.
        conn.phase(KEEPALIVE_IDLE_S)
        if not data:
            data = await conn.receive()
            if not data:
                return None
        parser.receive_data(data)
        head: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        slow = False
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    if not slow:
                        slow = True
                        conn.phase(REQUEST_READ_S)
                    parser.receive_data(await conn.receive())
                elif type(event) is h11.Data:
                    chunks.append(event.data)
                    size += len(event.data)
                    if size > MAX_BODY_BYTES:
                        return await self._refuse(conn, 413, b'{"detail":"Request Entity Too Large"}')
                elif type(event) is h11.Request:
                    head = event
                    headers = list(event.headers)
                    fields = dict(headers)
                    if int(fields.get(b"content-length", 0)) > MAX_BODY_BYTES:
                        return await self._refuse(conn, 413, b'{"detail":"Request Entity Too Large"}')
                    if parser.they_are_waiting_for_100_continue:
                        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                elif type(event) is h11.EndOfMessage:
                    break
                else:  # ConnectionClosed before a request started
                    return None
        except h11.RemoteProtocolError:
            return await self._refuse(conn, 400, b"Invalid HTTP request received.",
                                      b"text/plain; charset=utf-8")
        assert head is not None
        if slow:
            conn.phase(WRITE_S)
        conn.buffer = parser.trailing_data[0]
        keep = head.http_version == b"1.1" and b"close" not in fields.get(b"connection", b"").lower()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._totals["requests"] += 1
        self.requests.append(RecordedRequest(head.method.decode(), head.target.decode("latin-1"),
                                             headers, body))
        return _Request(head.method, head.target.split(b"?", 1)[0], fields, body, keep)

    async def _refuse(self, conn: _Conn, status: int, body: bytes, content_type: bytes = _JSON) -> None:
        """Answer input we will not read (uvicorn's wording for bad HTTP) and close."""
        self._totals["errors"] += 1
        conn.linger = True
        await self._send(conn, status, body, False, content_type)

    async def _dispatch(self, conn: _Conn, request: _Request) -> bool:
        """Answer one request; returns whether the connection stays open."""
        if self._auth is not None and request.path.startswith(b"/v1") \
                and not _same(request.headers.get(b"authorization", b""), self._auth):
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

    async def _chat(self, conn: _Conn, request: _Request) -> bool:
        return await self._generate(conn, request, self._planner.chat)

    async def _completion(self, conn: _Conn, request: _Request) -> bool:
        return await self._generate(conn, request, self._planner.completion)

    async def _embeddings(self, conn: _Conn, request: _Request) -> bool:
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
            if self.options.latency_ms > 0:
                if not await self._sleep_watching(conn, t0 + self.options.latency_ms / 1000):
                    return False
                conn.phase(WRITE_S)
            body = embeddings_body(model, vectors, prompt, b64)
            self.responses.append(body)
            await self._send(conn, 200, body, request.keep_alive)
            outcome = "stop"
            return request.keep_alive
        finally:
            self._finish(counters, outcome, outcome, 0)

    async def _list_models(self, conn: _Conn, request: _Request) -> bool:
        names = (*self.options.models, *self.options.embedding_models)
        return await self._ok(conn, request, models_body(names, self.options.max_model_len))

    async def _health(self, conn: _Conn, request: _Request) -> bool:
        status = 200 if self.healthy else 503
        self.responses.append(b"")
        await self._send(conn, status, b"", request.keep_alive, None)
        return request.keep_alive

    async def _version(self, conn: _Conn, request: _Request) -> bool:
        return await self._ok(conn, request, b'{"version":"%s"}' % VLLM_VERSION.encode())

    async def _metrics(self, conn: _Conn, request: _Request) -> bool:
        return await self._ok(conn, request, self.metrics_text(),
                              b"text/plain; version=0.0.4; charset=utf-8")

    def metrics_text(self) -> bytes:
        """Prometheus text with vLLM's metric names and labels (`engine`, `model_name`)."""
        out: list[str] = []

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
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               lambda c: c.generation)
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.",
               lambda c: 0, ("abort", "error", "length", "stop"))
        return "".join(out).encode()

    # -- generation ----------------------------------------------------------------------------------

    async def _generate(self, conn: _Conn, request: _Request, plan_for: Callable[..., Plan]) -> bool:
        t0 = trio.current_time()
        try:
            _json_only(request)
            rid = request.headers.get(b"x-request-id")
            plan = plan_for(request.body, rid.decode("latin-1") if rid else None)
        except SimError as exc:
            return await self._error(conn, request, exc.status, exc.body)
        counters = self._models[plan.model]
        counters.running += 1
        counters.prompt += plan.prompt_tokens
        sent: list[bytes] = []
        outcome = "abort"
        try:
            if plan.stream:
                if await self._stream(conn, plan, t0, sent):
                    outcome = plan.choices[0].finish
                return outcome != "abort" and request.keep_alive
            o = self.options
            ready = t0 + (o.ttft_ms + o.latency_ms) / 1000
            if o.tokens_per_s > 0:
                ready += max(plan.max_steps - 1, 0) / o.tokens_per_s
            if ready > trio.current_time():
                if not await self._sleep_watching(conn, ready):
                    return False
                conn.phase(WRITE_S)
            body = plan.body()
            sent.append(body)
            await self._send(conn, 200, body, request.keep_alive)
            outcome = plan.choices[0].finish
            return request.keep_alive
        finally:
            self.responses.append(b"".join(sent))
            tokens = plan.completion_tokens if outcome != "abort" else _streamed_tokens(plan, sent)
            self._finish(counters, outcome, outcome, tokens)

    def _finish(self, counters: _Model, reason: str, outcome: str, tokens: int) -> None:
        counters.running -= 1
        counters.generation += tokens
        counters.success[_ENGINE_REASON[reason]] += 1
        if outcome == "abort":
            self._totals["cancelled"] += 1
        else:
            self._totals["finished"] += 1
            self._totals[outcome] += 1

    async def _stream(self, conn: _Conn, plan: Plan, t0: float, sent: list[bytes]) -> bool:
        """Write the SSE stream; False if it was cut (client gone, write failed, fault injected)."""
        o = self.options
        if o.tokens_per_s <= 0 and o.ttft_ms <= 0:
            return await self._pump(conn, plan, t0, sent)
        done = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, conn, nursery.cancel_scope)
            try:  # inside a nursery an I/O error would surface as an ExceptionGroup: keep it plain
                done = await self._pump(conn, plan, t0, sent)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()
        return done

    async def _pump(self, conn: _Conn, plan: Plan, t0: float, sent: list[bytes]) -> bool:
        rate = self.options.tokens_per_s
        first = t0 + self.options.ttft_ms / 1000
        paced = rate > 0 or first > t0
        die = self.die_after_events
        out = [_SSE_HEAD % self._date_header()]
        step_due = -1
        for step, event in plan.events():
            if paced and step != step_due:
                step_due = step
                due = first + step / rate if rate > 0 else first
                if due > trio.current_time():
                    await self._write(conn, out)
                    conn.scope.deadline = math.inf
                    await trio.sleep_until(due)
            out.append(b"%x\r\n%s\r\n" % (len(event), event))
            sent.append(event)
            if die is not None and len(sent) >= die:
                await self._write(conn, out)
                return False  # the caller closes the connection without the last chunk
            if len(out) >= STREAM_BATCH:
                await self._write(conn, out)
        out.append(b"0\r\n\r\n")
        await self._write(conn, out)
        return True

    async def _sleep_watching(self, conn: _Conn, deadline: float) -> bool:
        """Sleep until `deadline`; False if the client hung up first."""
        conn.scope.deadline = math.inf
        finished = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, conn, nursery.cancel_scope)
            await trio.sleep_until(deadline)
            finished = True
            nursery.cancel_scope.cancel()
        return finished

    async def _watch(self, conn: _Conn, scope: trio.CancelScope) -> None:
        """Read while a generation runs: EOF or a reset cancels it; early bytes are kept."""
        while len(conn.buffer) <= MAX_HEAD_BYTES:
            try:
                data = await conn.receive()
            except trio.BrokenResourceError:
                data = b""
            if not data:
                scope.cancel()
                return
            conn.buffer += data
        await trio.sleep_forever()

    # -- writing -------------------------------------------------------------------------------------

    def _date_header(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    async def _write(self, conn: _Conn, parts: list[bytes]) -> None:
        if parts:
            data = b"".join(parts)
            parts.clear()
            conn.phase(WRITE_S)
            await conn.send(data)

    async def _send(self, conn: _Conn, status: int, body: bytes, keep: bool,
                    content_type: bytes | None = _JSON, extra: bytes = b"") -> None:
        head = b"HTTP/1.1 %d %s\r\ndate: %s\r\nserver: uvicorn\r\n%scontent-length: %d\r\n" % (
            status, _REASONS.get(status, b""), self._date_header(), extra, len(body))
        if content_type is not None:
            head += b"content-type: %s\r\n" % content_type
        if not keep:
            head += b"connection: close\r\n"
        await conn.send(head + b"\r\n" + body)

    async def _ok(self, conn: _Conn, request: _Request, body: bytes, content_type: bytes = _JSON) -> bool:
        self.responses.append(body)
        await self._send(conn, 200, body, request.keep_alive, content_type)
        return request.keep_alive

    async def _error(self, conn: _Conn, request: _Request, status: int, body: bytes,
                     extra: bytes = b"") -> bool:
        self._totals["errors"] += 1
        self.responses.append(body)
        await self._send(conn, status, body, request.keep_alive, _JSON, extra)
        return request.keep_alive


async def _lingering_close(conn: _Conn) -> None:
    """Half-close, then discard what the client still sends (bounded), so the answer is read."""
    with trio.move_on_after(1.0):
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < MAX_BODY_BYTES and (data := await conn.receive()):
                drained += len(data)
        except (OSError, trio.BrokenResourceError):
            pass


def _same(given: bytes, expected: bytes) -> bool:
    scheme, _, token = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + token, expected)


def _json_only(request: _Request) -> None:
    """vLLM's `validate_json_request` dependency: the media type must be application/json."""
    media = request.headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if media != b"application/json":
        raise error(400, "Unsupported Media Type: Only 'application/json' is allowed", "Bad Request")


def _streamed_tokens(plan: Plan, sent: list[bytes]) -> int:
    """Tokens that reached the wire before an abort (events minus role/usage/[DONE] chunks)."""
    if not plan.stream:
        return 0
    roles = len(plan.choices) if plan.kind == "chat" else 0
    return max(0, min(plan.completion_tokens, len(sent) - roles))


__all__ = ["RecordedRequest", "SimOptions", "SimServer", "SimStatistics"]
