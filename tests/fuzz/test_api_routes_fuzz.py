"""Gateway-level fuzz of the routes beyond chat: the Responses API, Anthropic Messages, the pooling family,
audio and stored responses, through a real socket to a real gateway in front of the real simulated vLLM.

Setup (module fixture): one trio thread runs `backends.sim.server.SimServer` (auto tool choice, the
hermes parser; models "sim-chat" and "sim-embed") and the gateway (`run_gateway`, a keys file with one
key, max_body_bytes 256 KiB, max_audio_bytes 128 KiB, upstream first byte / between chunks 10 s). One
stored response (store: true) and one background response are created at start; their ids, and every
id a Responses answer brings back during the run, feed the stored-response cases. The tests drive the
gateway with blocking sockets from the test thread, one connection per request, and read each answer
with h11 (so the gateway's framing is checked too). Every JSON and audio request also gets a random
head: the target as is, with a query, in absolute form, with a trailing slash or upper-cased (404); the
route's method or another (405); Content-Length, `Expect: 100-continue` or chunked framing cut at random
points; and, one time in four, a GET /healthz pipelined right behind it in the same write.

Cases:
1. POST /v1/responses: valid bodies (model, input as a string or an item list, max_output_tokens,
   stream, previous_response_id (known or not), instructions, tools, tool_choice, temperature, top_p,
   store, background) with hostile values mixed in (wrong types, 400-digit ints, 1e400, int64 edges,
   nulls, 10k-deep nesting, unicode, lone surrogates, raw controls, invalid UTF-8 in values and keys,
   duplicate and escaped keys, huge strings, non-object JSON), sometimes single-byte mutations.
2. POST /v1/messages and /v1/messages/count_tokens (Anthropic's shape: model, max_tokens, messages
   with string or block content, system, stream, temperature, top_k, top_p, stop_sequences, tools,
   tool_choice, metadata), the key as `Authorization: Bearer`, `x-api-key`, missing, wrong, empty,
   Basic, or a wrong one before the right one.
3. POST /v1/rerank, /rerank, /v2/rerank, /v1/score, /score, /pooling, /classify, /tokenize,
   /detokenize JSON bodies, hostile as above.
4. POST /v1/audio/transcriptions and /translations: a multipart body built properly around a tiny
   WAV, then damaged (truncated, boundary wrong / missing / empty / too long / twice in the
   Content-Type, part headers mutated, model or file part missing, file without a filename, model twice,
   too many parts, huge model value, huge file, bad UTF-8, bare LF, preamble, no closing delimiter,
   byte mutations) or sent with another content type.
5. GET /v1/responses/{id} and POST /v1/responses/{id}/cancel (and other methods, HEAD included) with
   known, created, random, too long and malformed ids and random path suffixes.

Invariants, for every example:
- the gateway answers one complete, valid HTTP/1.1 response within 20 s (never a cut connection);
- never a 5xx: when one comes, the failure says whether the simulator logged an exception (the sim
  broke) or the gateway's crash barrier counted one (the gateway broke);
- the status is one the route can give: the gateway's own 400 / 401 / 404 / 405 / 413, or -- for a
  body the gateway forwarded -- what the simulator answers (200, 400, 404, 422); where the
  request's fault is unambiguous (computed by an independent oracle over the body: Python's json with
  the gateway's documented rules for each route), exactly the expected status and `param`, and
  whether it was forwarded at all;
- a gateway-originated error is in the route's envelope (OpenAI's {"error": {"message", "type",
  "param", "code"}}; Anthropic's {"type": "error", "error": {"type", "message"}} on /v1/messages*, its
  type matching the status) and a 400 names its param or the body;
- what was forwarded reached the simulator byte for byte (the original bytes go upstream), as
  strict UTF-8 JSON for the JSON routes;
- a 200 stream ends properly: Responses with `response.completed`, Messages with `message_stop`,
  audio with `data: [DONE]`;
- a connection the gateway keeps open after its answer answers the pipelined GET /healthz, and only
  it (a refused body the gateway did not read must close the connection, not be parsed as a request);
- GET /healthz still answers 200 afterwards, and the gateway's internal error counter
  (`spotinference_internal_errors_total`) stays 0 (checked again through GET /metrics at the end).
The simulator's own faults the fuzz found are kept as fixed cases (SIM_FAULTS): they fail until
backends/sim/ answers them as vLLM does.
Example counts: 120 / 120 / 100 / 120 / 80 by default; SPOTINFERENCE_FUZZ_EXAMPLES=N for N each.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import logging
import math
import re
import socket
import time
import traceback
import wave
from dataclasses import dataclass
from typing import NamedTuple

import h11
import pytest
import trio
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from backends.sim.server import SimOptions, SimServer
from proxy.admit import keys
from proxy.gateway import Gateway, build_runtime
from proxy.process.services import run_gateway
from tests.fuzz._common import LoopThread, examples, fuzz_settings, mutated, read_response
from tests.support.gateway import make_config

MODELS = ("sim-chat", "sim-embed")
MAX_BODY = 256 * 1024
MAX_AUDIO = 128 * 1024
INT32 = 2**31 - 1
READ_TIMEOUT = 20.0
KEY = "sk-si-fuzz-routes-0123456789"
SIM_STATUSES = {200, 400, 404, 422}  # what the simulator answers these routes (backends/sim/)
EXAMPLES = {"responses": 120, "messages": 120, "pooling": 100, "audio": 120, "stored": 80}
ENVELOPE = {"message", "type", "param", "code"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


# -- the harness: the simulated vLLM and the gateway in a trio thread -------------------------------------


class _SimLog(logging.Handler):
    """Keeps the simulator's logged exceptions (a bug on one of its connections)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self.records.append(text)


class Harness(LoopThread):
    name = "api-routes-fuzz"

    def __init__(self, tmp) -> None:
        super().__init__()
        self.keys_path = tmp / "keys.toml"
        keys.write(self.keys_path, keys.KeysFile(keys=[keys.KeyRecord(name="fuzz", hash=keys.digest(KEY))]))
        self.port = 0
        self.sim: SimServer | None = None
        self.gw: Gateway | None = None
        self.sim_log = _SimLog()
        self.known: collections.deque[str] = collections.deque(maxlen=64)  # recent ids, to pick from
        self.seen: set[str] = set()  # every id the gateway has seen made (its map holds 100,000)
        self.stored_id = ""
        self.background_id = ""

    def start(self) -> None:
        logging.getLogger("backends.sim").addHandler(self.sim_log)
        super().start()

    def stop(self) -> None:
        logging.getLogger("backends.sim").removeHandler(self.sim_log)
        super().stop()

    async def serve(self, nursery: trio.Nursery) -> None:
        self.sim = SimServer(SimOptions(enable_auto_tool_choice=True, tool_call_parser="hermes"))
        host, sim_port = await nursery.start(self.sim.serve, "127.0.0.1", 0)
        config = make_config([f"http://{host}:{sim_port}"], models=MODELS, keys_file=str(self.keys_path),
                             server={"max_body_bytes": MAX_BODY, "max_audio_bytes": MAX_AUDIO,
                                     "request_head_s": 5.0, "request_body_s": 5.0, "body_grace_s": 3.0},
                             upstream={"first_byte_s": 10.0, "between_chunks_s": 10.0})
        self.gw = Gateway(build_runtime(config))
        _host, self.port = await nursery.start(functools.partial(run_gateway, config, gateway=self.gw))
        self.ready()

    # -- looking inside, from the test thread ------------------------------------------------------------

    def sim_seen(self) -> tuple[int, bytes | None]:
        """(requests the simulator has received, the body of the last one)."""
        def look():
            last = self.sim.requests[-1].body if self.sim.requests else None
            return self.sim.statistics().requests_total, last
        return trio.from_thread.run_sync(look, trio_token=self.token)

    def internal_errors(self) -> float:
        def look():
            return sum(s.value for m in self.gw.metrics.internal_errors.collect() for s in m.samples
                       if s.name.endswith("_total"))
        return trio.from_thread.run_sync(look, trio_token=self.token)

    def remember(self, answer: Answer) -> None:
        """Keep the id of a Responses answer (the gateway remembers it too)."""
        for rid in re.findall(rb'"id":"(resp_[0-9a-f]{32})"', answer.body[:4096] + answer.body[-65536:]):
            rid = rid.decode()
            if rid not in self.seen:
                self.seen.add(rid)
                self.known.append(rid)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("api-routes-fuzz"))
    try:
        h.start()
        stored = exchange(h.port, post(b"/v1/responses", b'{"model":"sim-chat","input":"hello","store":true,'
                                       b'"max_output_tokens":4}'))
        assert stored.status == 200, stored
        h.stored_id = json.loads(stored.body)["id"]
        queued = exchange(h.port, post(b"/v1/responses", b'{"model":"sim-chat","input":"later","store":true,'
                                       b'"background":true}'))
        assert queued.status == 200, queued
        h.background_id = json.loads(queued.body)["id"]
        h.remember(stored)
        h.remember(queued)
        yield h
    finally:
        h.stop()


# -- the client -------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None
    headers: dict
    body: bytes
    error: str = ""
    second: Answer | None = None  # the answer to a pipelined GET /healthz, when the connection stayed open
    kept_alive: bool = False  # whether h11 found the connection reusable after the first answer


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


def exchange(port: int, data: bytes, *, method: bytes = b"POST", pipeline: bool = False) -> Answer:
    """Send `data` (and, with `pipeline`, a GET /healthz right behind it, in the same write) on a new
    connection; read the answer with h11 (None status: no response) and, if the connection stayed open,
    the pipelined one."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "gw"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    deadline = time.monotonic() + READ_TIMEOUT
    answers: list[Answer] = []
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        try:
            sock.sendall(data + (HEALTHZ if pipeline else b""))
        except OSError:
            pass  # the gateway may refuse (and close) before it has read everything
        while True:
            got = _read_one(conn, sock, deadline)
            answers.append(got)
            if got.error or not pipeline or len(answers) == 2:
                break
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break  # the gateway closes after this answer: the pipelined request is not for it
            got.kept_alive = True
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/healthz", headers=[("Host", "gw")]))
            conn.send(h11.EndOfMessage())
    first = answers[0]
    if len(answers) == 2:
        first.second = answers[1]
    return first


def _read_one(conn: h11.Connection, sock: socket.socket, deadline: float) -> Answer:
    return Answer(*read_response(conn, sock, deadline))


AUTH = {  # mode: (header lines, whether the key is accepted)
    "bearer": (b"Authorization: Bearer " + KEY.encode() + b"\r\n", True),
    "bearer_lower": (b"authorization: bearer " + KEY.encode() + b"\r\n", True),
    "x-api-key": (b"x-api-key: " + KEY.encode() + b"\r\n", True),
    "empty_then_right": (b"x-api-key: \r\nAuthorization: Bearer " + KEY.encode() + b"\r\n", True),
    "none": (b"", False),
    "wrong_bearer": (b"Authorization: Bearer sk-si-not-a-key\r\n", False),
    "wrong_x_api_key": (b"x-api-key: sk-si-not-a-key\r\n", False),
    "empty_bearer": (b"Authorization: Bearer \r\n", False),
    "basic": (b"Authorization: Basic " + KEY.encode() + b"\r\n", False),
    "wrong_then_right": (b"x-api-key: sk-wrong\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n", False),
}
MOSTLY_BEARER = ["bearer"] * 12 + ["x-api-key", "none", "wrong_bearer"]
ANY_AUTH = ["bearer"] * 5 + ["x-api-key"] * 4 + sorted(AUTH)


def post(path: bytes, body: bytes, *, auth: str = "bearer", ctype: bytes | None = b"application/json",
         method: bytes = b"POST", head: Head | None = None) -> bytes:
    """One request; `head` (drawn by `heads()`) varies the target, the method and the framing."""
    lines = b"Content-Type: " + ctype + b"\r\n" if ctype is not None else b""
    framing = b"Content-Length: %d\r\n" % len(body)
    payload = body
    if head is not None:
        method = head.method or method
        path = {"query": path + b"?x=1&y=%ff", "absolute": b"http://gw" + path, "slash": path + b"/",
                "upper": path.upper()}.get(head.target, path)
        if head.framing == "expect":
            framing += b"Expect: 100-continue\r\n"
        elif head.framing == "chunked":
            framing = b"Transfer-Encoding: chunked\r\n"
            cuts = sorted({c for c in head.cuts if 0 < c < len(body)})
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return (method + b" " + path + b" HTTP/1.1\r\nHost: gw\r\n" + lines + AUTH[auth][0] + framing + b"\r\n"
            + payload)


class Head(NamedTuple):
    target: str  # plain, query, absolute, slash (404), upper (404)
    method: bytes | None  # None: the route's; another: 405
    framing: str  # length, expect (100-continue), chunked
    cuts: tuple[int, ...]
    pipeline: bool  # a GET /healthz right behind the request, in the same write


@st.composite
def heads(draw) -> Head:
    target = draw(st.sampled_from(["plain"] * 14 + ["query", "absolute", "slash", "upper"]))
    method = draw(st.sampled_from([None] * 20 + [b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]))
    framing = draw(st.sampled_from(["length"] * 6 + ["expect", "chunked", "chunked"]))
    cuts = tuple(draw(st.lists(st.integers(1, 1 << 20), max_size=4))) if framing == "chunked" else ()
    return Head(target, method, framing, cuts, draw(st.integers(0, 3)) == 0)


def head_expect(head: Head, dialect: str) -> tuple[Expect, str] | None:
    """What the target or the method alone decides (before the key is looked at), and its dialect."""
    if head.target in ("slash", "upper"):
        return gateway_error(404, f"an unknown path ({head.target})"), "openai"
    if head.method is not None:
        return gateway_error(405, f"{head.method!r} on a POST route"), dialect
    return None


# -- the checks every example ends with ----------------------------------------------------------------------


class Expect(NamedTuple):
    statuses: frozenset[int] | None  # None: any the route can give
    params: frozenset[str] = frozenset()  # for a gateway 400: one of these (or a path below one)
    forwarded: bool | None = None  # whether the simulator must (True) or must not (False) see it
    why: str = ""


UNKNOWN = Expect(None)


def gateway_error(status: int, why: str, *params: str) -> Expect:
    return Expect(frozenset({status}), frozenset(params), False, why)


def origin_of_5xx(h: Harness, answer: Answer, forwarded: bool, errors_before: float, sim_log_before: int) -> str:
    sim = h.sim_log.records[sim_log_before:]
    gw = h.internal_errors() - errors_before
    if gw:
        return f"the GATEWAY broke: its crash barrier counted {gw:.0f} internal error(s) (traceback on stderr)"
    if sim:
        return "the SIMULATOR broke (it logged an exception, so the gateway answered for a dead upstream):\n" + sim[-1]
    code = None
    try:
        err = json.loads(answer.body).get("error")
        code = err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        pass
    if code == "upstream_timeout":
        return "the SIMULATOR hung: the gateway timed out waiting for it"
    if forwarded and code not in ("bad_gateway", "upstream_unavailable", "internal_error"):
        return f"the SIMULATOR answered {answer.status} itself (the gateway relayed it, as it relays vLLM's errors)"
    return "the GATEWAY answered it without a logged exception"


def envelope(answer: Answer, dialect: str) -> dict:
    """The gateway's error envelope for `dialect`; returns {message, type, param (None for Anthropic)}."""
    try:
        obj = json.loads(answer.body)
    except ValueError:
        raise AssertionError(f"{answer.status} with a body that is not JSON: {answer.body[:300]!r}") from None
    if dialect == "anthropic":
        assert isinstance(obj, dict) and set(obj) == {"type", "error"} and obj["type"] == "error", obj
        err = obj["error"]
        assert isinstance(err, dict) and set(err) == {"type", "message"}, err
        assert err["type"] == ANTHROPIC_TYPES.get(answer.status, "invalid_request_error"), (answer.status, err)
        assert isinstance(err["message"], str) and err["message"], err
        return {"message": err["message"], "type": err["type"], "param": None}
    assert isinstance(obj, dict) and set(obj) == {"error"}, obj
    err = obj["error"]
    assert isinstance(err, dict) and set(err) == ENVELOPE, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


def names_param_or_body(err: dict, dialect: str) -> bool:
    message = err["message"]
    if err["param"] is not None:
        return True
    if err.get("code") == "bad_http" and ("request target" in message or "request line" in message):
        return True  # the HTTP reader's refusal of a target (the stored-response cases send odd ones)
    return "body" in message or "Content-Type" in message or (dialect == "anthropic" and "'" in message)


def param_matches(err: dict, params: frozenset[str], dialect: str) -> bool:
    for p in params:
        if dialect == "anthropic":
            if f"'{p}" in err["message"]:
                return True
        elif err["param"] is not None and (err["param"] == p or err["param"].startswith((p + "[", p + "."))):
            return True
    return False


def sse_events(body: bytes) -> list[tuple[str, bytes]]:
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        name, data = "", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode("latin-1")
            elif line.startswith(b"data:"):
                data += line[5:].strip()
        out.append((name, data))
    return out


def check_stream_end(answer: Answer, kind: str) -> None:
    events = sse_events(answer.body)
    assert events, f"an empty 200 stream: {answer.body[:300]!r}"
    name, data = events[-1]
    if kind == "responses":
        assert name == "response.completed", f"a Responses stream ended on {name!r}: {answer.body[-400:]!r}"
        assert json.loads(data)["type"] == "response.completed"
    elif kind == "messages":
        assert name == "message_stop", f"a Messages stream ended on {name!r}: {answer.body[-400:]!r}"
    else:
        assert data == b"[DONE]", f"an audio stream ended on {data[:200]!r}"
    assert not any(n == "error" for n, _ in events), f"an error event in a 200 stream: {answer.body[-600:]!r}"


def parse_int(text: str) -> int:
    """An int of any length (past Python's 4300-digit str limit: as large, with its sign)."""
    if len(text) < 4000:
        return int(text)
    return -(10**4000) if text.startswith("-") else 10**4000


def strict_json(body: bytes):
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(body.decode("utf-8"), parse_constant=no_constants, parse_int=parse_int)


def label(text: str) -> None:
    """A hypothesis event (statistics), when under @given."""
    if currently_in_test_context():
        event(text)


def assert_alive(h: Harness) -> None:
    answer = exchange(h.port, HEALTHZ, method=b"GET")
    assert answer.status == 200 and not answer.error, f"the gateway stopped answering /healthz: {answer}"


def run_case(h: Harness, data: bytes, expect: Expect, *, dialect: str, stream_kind: str | None,
             allowed: set[int], sent_body: bytes | None, json_route: bool, method: bytes = b"POST",
             pipeline: bool = False) -> Answer:
    """Send one request and hold its answer to every invariant (module docstring)."""
    errors_before = h.internal_errors()
    sim_log_before = len(h.sim_log.records)
    seen_before, _ = h.sim_seen()
    answer = exchange(h.port, data, method=method, pipeline=pipeline)
    seen_after, last_body = h.sim_seen()
    forwarded = seen_after > seen_before
    shown = data[:600]
    assert answer.status is not None, f"no answer at all ({answer.error}) to {shown!r}"
    assert not answer.error, f"{answer.error} (status {answer.status}) for {shown!r}; got {answer.body[-300:]!r}"
    status = answer.status
    label(f"{status}{' upstream' if forwarded else ''}")
    if status >= 500:
        raise AssertionError(f"{status} for {shown!r}\n-> {answer.body[:600]!r}\n"
                             f"{origin_of_5xx(h, answer, forwarded, errors_before, sim_log_before)}")
    assert seen_after - seen_before <= 1, "one request reached the simulator more than once"
    if forwarded:
        if sent_body is not None:
            assert last_body == sent_body, (
                f"the simulator got other bytes than the client sent: {last_body[:200]!r} vs {sent_body[:200]!r}")
        if json_route:
            try:
                strict_json(last_body)
            except (UnicodeDecodeError, ValueError) as exc:
                raise AssertionError(f"invalid JSON reached the simulator ({exc}): {last_body[:300]!r}") from None
            except RecursionError:
                pass  # deep, but valid JSON
        assert status in SIM_STATUSES, f"{status} from the simulator for {shown!r}: {answer.body[:300]!r}"
        if status == 200 and stream_kind and answer.headers.get("content-type", "").startswith("text/event-stream"):
            check_stream_end(answer, stream_kind)
            label(f"{stream_kind} stream")
        elif status == 200 and method != b"HEAD":
            assert isinstance(json.loads(answer.body), dict), answer.body[:300]
        elif method != b"HEAD":
            assert isinstance(json.loads(answer.body), dict), answer.body[:300]  # the simulator's error body
    else:
        assert status in allowed, f"{status} from the gateway for {shown!r}: {answer.body[:300]!r}"
        if method != b"HEAD":
            err = envelope(answer, dialect)
            if status == 400:
                assert names_param_or_body(err, dialect), f"a 400 that names neither a param nor the body: {err}"
            if status == 405:
                assert answer.headers.get("allow"), answer.headers
    if expect.statuses is not None:
        assert status in expect.statuses, (
            f"{expect.why}: expected {sorted(expect.statuses)}, got {status} {answer.body[:400]!r} for {shown!r}")
    if expect.forwarded is not None:
        assert forwarded == expect.forwarded, (
            f"{expect.why}: {'not ' if not forwarded else ''}forwarded, expected otherwise; {status} "
            f"{answer.body[:300]!r} for {shown!r}")
    if expect.params and not forwarded and status == 400 and method != b"HEAD":
        err = envelope(answer, dialect)
        assert param_matches(err, expect.params, dialect), (
            f"{expect.why}: expected the param {sorted(expect.params)}, got {err} for {shown!r}")
    if answer.kept_alive:  # the connection stayed open: the pipelined request is answered, and only it
        second = answer.second
        assert second is not None and second.status == 200 and not second.error, (
            f"after {status} on a kept-alive connection the pipelined GET /healthz got {second} for {shown!r}")
        assert second.body == b'{"status":"ok"}', second.body[:200]
        label("pipelined request answered")
    got = h.internal_errors() - errors_before
    assert not got, f"the gateway counted {got:.0f} internal error(s) on {shown!r} (traceback on stderr)"
    assert len(h.sim_log.records) == sim_log_before, (
        f"the simulator logged an exception on {shown!r}:\n{h.sim_log.records[-1]}")
    assert_alive(h)
    return answer


# -- the oracle: what the gateway must do with a JSON body (admit/api_views.py's documented rules) ------------


class Spec(NamedTuple):
    kind: str  # str, int, num, bool, list_obj, obj, any, content, messages, str_list
    required: bool = False
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True, repr=False)
class Api:
    name: str
    paths: tuple[bytes, ...]
    dialect: str
    base: tuple[tuple[bytes, bytes], ...]
    optional: dict
    spec: dict
    stream_kind: str | None = None

    def __repr__(self) -> str:
        return f"<Api {self.name}>"


class Pairs(list):
    """A JSON object as Python's json reads it, every member kept in order (duplicates included)."""


class Unknowable(Exception):
    """The oracle cannot say (a lone surrogate, nesting past Python's recursion limit, a 5000-digit int)."""


def _py(value):
    if isinstance(value, Pairs):
        return {k: _py(v) for k, v in value}
    if isinstance(value, list):
        return [_py(v) for v in value]
    if isinstance(value, str) and any("\ud800" <= c <= "\udfff" for c in value):
        raise Unknowable("lone surrogate")
    return value


def _block_ok(b) -> bool:
    return isinstance(b, dict) and isinstance(b.get("type"), str)


def _content_ok(c) -> bool:
    return isinstance(c, str) or (isinstance(c, list) and all(_block_ok(b) for b in c))


def accepts(spec: Spec, v) -> bool:
    if v is None:
        return not spec.required
    k = spec.kind
    if k == "any":
        return True
    if k == "str":
        return isinstance(v, str) and (spec.lo is None or len(v) >= spec.lo) and (spec.hi is None or len(v) <= spec.hi)
    if k == "int":
        return type(v) is int and spec.lo <= v <= spec.hi
    if k == "num":
        if type(v) is int:
            return spec.lo <= v <= spec.hi
        return type(v) is float and math.isfinite(v) and spec.lo <= v <= spec.hi
    if k == "bool":
        return type(v) is bool
    if k == "list_obj":
        return isinstance(v, list) and all(isinstance(x, dict) for x in v)
    if k == "obj":
        return isinstance(v, dict)
    if k == "str_list":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if k == "content":
        return _content_ok(v)
    if k == "messages":
        return isinstance(v, list) and len(v) >= 1 and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and "content" in m
            and _content_ok(m["content"]) for m in v)
    raise AssertionError(k)


def predict(api: Api, body: bytes) -> Expect:
    """What the gateway must answer `body` on `api`'s routes (the key being good)."""
    if len(body) > MAX_BODY:
        return gateway_error(413, "a body over max_body_bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return gateway_error(400, "invalid UTF-8")

    def no_constants(name):
        raise json.JSONDecodeError(f"{name} is not JSON", text, 0)

    try:
        doc = json.loads(text, object_pairs_hook=Pairs, parse_constant=no_constants, parse_int=parse_int)
    except json.JSONDecodeError:
        return gateway_error(400, "not JSON")
    except RecursionError:
        return UNKNOWN
    if not isinstance(doc, Pairs):
        return gateway_error(400, "not a JSON object")
    try:
        members = [(k, _py(v)) for k, v in doc]
        if any("\ud800" <= c <= "\udfff" for k, _ in members for c in k):
            raise Unknowable("lone surrogate in a key")
    except (Unknowable, RecursionError):
        return UNKNOWN
    specs = {k.decode(): s for k, s in api.spec.items()}
    for k, v in members:  # msgspec validates every occurrence, in document order
        spec = specs.get(k)
        if spec is not None and not accepts(spec, v):
            return gateway_error(400, f"{k!r} = {str(v)[:60]!r} is not {spec.kind}", k)
    last = dict(members)
    missing = [k for k, s in specs.items() if s.required and k not in last]
    if missing:
        return gateway_error(400, f"missing {missing}", *missing)
    if api.name == "responses":
        given_input = last.get("input")
        if not isinstance(given_input, str | list):
            return gateway_error(400, "input missing, null or neither a string nor an array", "input")
    if last["model"] not in MODELS:
        return gateway_error(404, "a model no tier serves", "model")
    return Expect(frozenset(SIM_STATUSES), forwarded=True, why="a body the gateway accepts")


# -- hostile JSON values ---------------------------------------------------------------------------------------

HUGE_INT = b"1" + b"0" * 399
BAD_UTF8 = [b'"\xff\xfe"', b'"a\xc0\xafb"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b'"\x80"']
VALUES = {
    "huge_int": [HUGE_INT, b"-" + b"9" * 400],
    "huge_float": [b"1e400", b"-1E400"],
    "int_edge": [b"2147483647", b"2147483648", b"9223372036854775808", b"-9223372036854775809",
                 b"18446744073709551616"],
    "small": [b"0", b"-1", b"-0", b"1", b"3"],
    "odd_number": [b"1.5", b"1e3", b"1e-400", b"0.0", b"2.0000001", b"1.0"],
    "not_json": [b"NaN", b"Infinity", b"-Infinity", b"01", b"0x10", b"1_000", b"+1", b".5", b"'x'", b"undefined",
                 b"tru", b'"unterminated'],
    "wrong_type": [b'"str"', b"true", b"false", b"null", b"[]", b"{}", b"[1,2]", b'{"a":1}', b'""', b'["x"]'],
    "bad_utf8": BAD_UTF8,
    "escapes": [b'"\\ud800"', b'"\\u0000"', b'"\\udfff\\ud800"', b'"\\x41"', b'"a\x00b"', b'"a\nb"', b'"a\tb"',
                b'"\\ud83d\\ude00"'],
    "unicode": [b'"caf\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x98\x80"', b'"\\u00e9\\u4e2d"', b'"\xe2\x80\xae\xef\xbb\xbf"',
                b'"' + "ø".encode() * 300 + b'"'],
    "deep": [b"[" * 10000 + b"]" * 10000, b'{"a":' * 10000 + b"1" + b"}" * 10000, b"[" * 200 + b"]" * 200],
    "huge_string": [b'"' + b"a" * 60_000 + b'"', b'"' + b"a" * (MAX_BODY + 1000) + b'"'],
    "long_digits": [b"1" + b"0" * 5000],
}
KINDS = sorted(VALUES) + ["huge_int", "wrong_type", "wrong_type", "small", "bad_utf8"]
WHOLE = [b"", b"[]", b'"x"', b"1", b"null", b"true", b"{", b'{"model":', b"}{", b"[{}]", b"\xef\xbb\xbf", b"trailing",
         b"\xff", b"{}", b" ", b"{\"model\":\"sim-chat\"}garbage"]
ESCAPED = {b"model": [b"m\\u006fdel", b"\\u006d\\u006f\\u0064\\u0065\\u006c"], b"input": [b"\\u0069nput"],
           b"stream": [b"\\u0073tream"], b"max_tokens": [b"max\\u005ftokens"], b"messages": [b"messag\\u0065s"],
           b"max_output_tokens": [b"max_output\\u005ftokens"], b"previous_response_id": [b"previous_response\\u005fid"]}
UNKNOWN_FIELDS = [b"x_extra", b"user", b"metadata", b"\xc3\xa9", b"", b"__proto__", b"stream_options"]

KNOWN_PREV = b'"@KNOWN@"'  # replaced, at test time, by an id the gateway has seen made

TOOL_FN = (b'{"type":"function","name":"get_weather","description":"w","parameters":{"type":"object",'
           b'"properties":{"city":{"type":"string"}},"required":["city"]}}')
ANTHROPIC_TOOL = (b'{"name":"get_weather","description":"w","input_schema":{"type":"object",'
                  b'"properties":{"city":{"type":"string"}},"required":["city"]}}')

RESPONSES = Api(
    "responses", (b"/v1/responses",), "openai",
    base=((b"model", b'"sim-chat"'), (b"input", b'"hi"')),
    optional={
        b"input": [b'"hello there"', b'[{"role":"user","content":"hi"}]',
                   b'[{"type":"message","role":"user","content":[{"type":"input_text","text":"hello"}]}]',
                   b'[]', b'[{"role":"developer","content":"be terse"},{"role":"user","content":"go"}]',
                   (b'[{"type":"function_call","call_id":"c1","name":"get_weather","arguments":"{}"},'
                   b'{"type":"function_call_output","call_id":"c1","output":"sunny"}]'),
                   b'[{"role":"user","content":[{"type":"input_text","text":5}]}]', b'[1]', b'[{"role":5}]',
                   b'[{"type":"function_call","name":5,"arguments":7}]'],
        b"max_output_tokens": [b"1", b"4", b"16", b"null"],
        b"stream": [b"true", b"false", b"null"],
        b"previous_response_id": [KNOWN_PREV, KNOWN_PREV, b'"resp_0000"', b"null"],
        b"instructions": [b'"Be brief."', b'""', b"null"],
        b"tools": [b"[" + TOOL_FN + b"]", b"[]", b'[{"type":"web_search"}]', (b'[{"type":"function","name":"f",'
                   b'"parameters":"not a schema"}]'), b'[{"type":"function","name":7,"parameters":{"type":"object"}}]'],
        b"tool_choice": [b'"auto"', b'"none"', b'"required"', b'{"type":"function","name":"get_weather"}', b"5"],
        b"temperature": [b"0", b"0.7", b"2", b"null"],
        b"top_p": [b"1", b"0.5"],
        b"store": [b"true", b"false"],
        b"background": [b"false", b"true"],
        b"metadata": [b'{"k":"v"}'],
        b"text": [b'{"format":{"type":"text"}}'],
        b"include": [b'["message.output_text.logprobs"]'],
        b"top_logprobs": [b"2", HUGE_INT],
        b"max_tool_calls": [b"1", HUGE_INT],
    },
    spec={b"model": Spec("str", True, 1), b"input": Spec("any"), b"stream": Spec("bool"),
          b"max_output_tokens": Spec("int", False, 1, INT32), b"previous_response_id": Spec("str", False, 1, 256),
          b"instructions": Spec("str"), b"store": Spec("bool"), b"background": Spec("bool"),
          b"temperature": Spec("num", False, 0, 2), b"top_p": Spec("num", False, 0, 1), b"tools": Spec("list_obj")},
    stream_kind="responses",
)

_MESSAGE_OPTIONAL = {
    b"messages": [b'[{"role":"user","content":[{"type":"text","text":"hi"}]}]',
                  b'[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"}]',
                  (b'[{"role":"user","content":"w?"},{"role":"assistant","content":[{"type":"tool_use","id":"t1",'
                  b'"name":"get_weather","input":{"city":"x"}}]},{"role":"user","content":[{"type":"tool_result",'
                  b'"tool_use_id":"t1","content":"sunny"}]}]'),
                  b'[{"role":"system","content":"x"}]', b'[]', b'[{"role":"user"}]', b'[{"role":"user","content":5}]',
                  b'[{"role":"user","content":[{"type":"text","text":5}]}]', b'[{"role":"user","content":[{}]}]',
                  b'[{"role":"user","content":[{"type":"image","source":{"type":"base64","data":"x"}}]}]'],
    b"system": [b'"Be brief."', b'[{"type":"text","text":"sys"}]', b"null", b'[{"text":"x"}]'],
    b"tools": [b"[" + ANTHROPIC_TOOL + b"]", b"[]", b'[{"name":"f"}]'],
}
MESSAGES = Api(
    "messages", (b"/v1/messages",), "anthropic",
    base=((b"model", b'"sim-chat"'), (b"max_tokens", b"16"), (b"messages", b'[{"role":"user","content":"hi"}]')),
    optional={
        **_MESSAGE_OPTIONAL,
        b"max_tokens": [b"1", b"4", b"64"],
        b"stream": [b"true", b"false", b"null"],
        b"temperature": [b"0", b"0.5", b"1"],
        b"top_k": [b"0", b"5"],
        b"top_p": [b"0.9", b"1"],
        b"stop_sequences": [b'["x"]', b"[]"],
        b"tool_choice": [b'{"type":"auto"}', b'{"type":"any"}', b'{"type":"tool","name":"get_weather"}',
                         b'{"type":"none"}', b'{"type":"tool","name":"nope"}'],
        b"metadata": [b'{"user_id":"u"}'],
        b"thinking": [b'{"type":"enabled","budget_tokens":1024}'],
    },
    spec={b"model": Spec("str", True, 1), b"max_tokens": Spec("int", True, 1, INT32),
          b"messages": Spec("messages", True), b"system": Spec("content"), b"stream": Spec("bool"),
          b"temperature": Spec("num", False, 0, 1), b"top_p": Spec("num", False, 0, 1),
          b"top_k": Spec("int", False, 0, INT32), b"stop_sequences": Spec("str_list"), b"tools": Spec("list_obj"),
          b"tool_choice": Spec("obj"), b"metadata": Spec("obj")},
    stream_kind="messages",
)
COUNT_TOKENS = Api(
    "count_tokens", (b"/v1/messages/count_tokens",), "anthropic",
    base=((b"model", b'"sim-chat"'), (b"messages", b'[{"role":"user","content":"hi"}]')),
    optional={**_MESSAGE_OPTIONAL, b"max_tokens": [b"16", HUGE_INT], b"tool_choice": [b'{"type":"auto"}']},
    spec={b"model": Spec("str", True, 1), b"messages": Spec("messages", True), b"system": Spec("content"),
          b"tools": Spec("list_obj")},
)
_MODEL_ONLY = {b"model": Spec("str", True, 1)}
POOLING = [
    Api("rerank", (b"/v1/rerank", b"/rerank", b"/v2/rerank"), "openai",
        base=((b"model", b'"sim-embed"'), (b"query", b'"q"'), (b"documents", b'["a","b","c"]')),
        optional={b"top_n": [b"1", b"0", b"-1", b'"2"', HUGE_INT], b"documents": [b"[]", b'"solo"', b"[1]"],
                  b"query": [b'["a","b"]', b"5"], b"return_documents": [b"true"]},
        spec=_MODEL_ONLY),
    Api("score", (b"/v1/score", b"/score"), "openai",
        base=((b"model", b'"sim-embed"'), (b"text_1", b'"a"'), (b"text_2", b'["b","c"]')),
        optional={b"text_1": [b'["a","b"]', b"[]", b"5"], b"text_2": [b"[]", b'"b"'],
                  b"queries": [b'["q"]'], b"documents": [b'["d"]'], b"truncate_prompt_tokens": [b"3"]},
        spec=_MODEL_ONLY),
    Api("pooling", (b"/pooling",), "openai",
        base=((b"model", b'"sim-embed"'), (b"input", b'"hi"')),
        optional={b"input": [b'["a","b"]', b"[1,2,3]", b"[[1,2],[3]]", b"[]", b"5", b'[{"a":1}]'],
                  b"encoding_format": [b'"float"', b'"base64"', b'"hex"'],
                  b"messages": [b'[{"role":"user","content":"hi"}]', b'[{"content":[{"type":"text","text":5}]}]',
                                b'"x"']},
        spec=_MODEL_ONLY),
    Api("classify", (b"/classify",), "openai",
        base=((b"model", b'"sim-embed"'), (b"input", b'"hi"')),
        optional={b"input": [b'["a","b"]', b'""', b"null", b"[1,2]"],
                  b"messages": [b'[{"role":"user","content":"x"}]', b'[{"content":[{"text":[]}]}]']},
        spec=_MODEL_ONLY),
    Api("tokenize", (b"/tokenize",), "openai",
        base=((b"model", b'"sim-chat"'), (b"prompt", b'"hello world"')),
        optional={b"add_special_tokens": [b"true", b"false"], b"return_token_strs": [b"true"],
                  b"messages": [b'[{"role":"user","content":"hi"}]', b'[{"role":"user","content":[{"text":5}]}]',
                                b'[{"role":5}]'],
                  b"add_generation_prompt": [b"true"], b"continue_final_message": [b"true"],
                  b"tools": [b"[" + TOOL_FN + b"]"], b"prompt": [b"5", b'""']},
        spec=_MODEL_ONLY),
    Api("detokenize", (b"/detokenize",), "openai",
        base=((b"model", b'"sim-chat"'), (b"tokens", b"[1,2,3]")),
        optional={b"tokens": [b"[]", b"[-1]", b'["a"]', b"[1.5]", b"[" + HUGE_INT + b"]", b"[true]", b"5"]},
        spec=_MODEL_ONLY),
]
MODEL_VALUES = [b'"sim-chat"', b'"sim-embed"', b'"nope"', b'""', b'"' + b"m" * 300 + b'"', b"null", b"5"]


class JsonCase(NamedTuple):
    api: Api
    path: bytes
    body: bytes
    auth: str
    what: tuple
    head: Head


def _encode(members: list[tuple[bytes, bytes]], ws: bytes) -> bytes:
    return b"{" + (b"," + ws).join(b'"' + k + b'":' + ws + v for k, v in members) + b"}"


@st.composite
def json_cases(draw, apis: list[Api], auths: list[str]) -> JsonCase:
    api = draw(st.sampled_from(apis))
    path = draw(st.sampled_from(api.paths))
    members = list(api.base)
    for name in draw(st.lists(st.sampled_from(sorted(api.optional)), max_size=4, unique=True)):
        value = draw(st.sampled_from(api.optional[name]))
        for i, (k, _) in enumerate(members):
            if k == name:
                members[i] = (name, value)
                break
        else:
            members.append((name, value))
    if api.stream_kind and draw(st.integers(0, 3)) == 0:  # streams more often than the optional pool gives
        members = [(k, v) for k, v in members if k != b"stream"] + [(b"stream", b"true")]
    members = draw(st.permutations(members)) if draw(st.integers(0, 3)) == 0 else members
    whats = []
    whole = None
    known = sorted(api.spec)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))):
        what = draw(st.sampled_from(["set", "set", "set", "model", "dup", "escape", "bad_key", "unknown", "drop",
                                     "whole"]))
        if what in ("set", "unknown"):
            name = draw(st.sampled_from(known if what == "set" else UNKNOWN_FIELDS))
            kind = draw(st.sampled_from(KINDS))
            value = draw(st.sampled_from(VALUES[kind]))
            if draw(st.booleans()) or all(k != name for k, _ in members):  # moved to the end
                members = [(k, v) for k, v in members if k != name] + [(name, value)]
            else:  # replaced where it stands
                members = [(k, value if k == name else v) for k, v in members]
            whats.append((what, name, kind))
        elif what == "model":
            members = [(k, v) for k, v in members if k != b"model"]
            members.insert(draw(st.integers(0, len(members))), (b"model", draw(st.sampled_from(MODEL_VALUES))))
            whats.append((what,))
        elif what == "dup":
            name = draw(st.sampled_from([k for k, _ in members] or [b"model"]))
            value = draw(st.sampled_from([b'"nope"', b"true", b"null", b"1", b'"sim-chat"', b'"sim-embed"', b"[]",
                                          b"{}", HUGE_INT]))
            members.insert(draw(st.integers(0, len(members))), (name, value))
            whats.append((what, name))
        elif what == "escape":
            candidates = [k for k, _ in members if k in ESCAPED]
            if candidates:
                name = draw(st.sampled_from(candidates))
                spelled = draw(st.sampled_from(ESCAPED[name]))
                members = [(spelled if k == name else k, v) for k, v in members]
                whats.append((what, name))
        elif what == "bad_key":
            members.append((draw(st.sampled_from([b"k\xff", b"\xc3", b"x\xed\xa0\x80", b"\\ud800"])), b"1"))
            whats.append((what,))
        elif what == "drop" and members:
            name = draw(st.sampled_from([k for k, _ in members]))
            members = [(k, v) for k, v in members if k != name]
            whats.append((what, name))
        elif what == "whole":
            whole = draw(st.sampled_from(WHOLE))
            whats.append((what, whole[:20]))
    body = _encode(members, draw(st.sampled_from([b"", b" ", b"\n\t "])))
    if whole is not None:
        body = {b"\xef\xbb\xbf": b"\xef\xbb\xbf" + body, b"trailing": body + b" x"}.get(whole, whole)
    body = draw(mutated(body, 0.1))
    return JsonCase(api, path, body, draw(st.sampled_from(auths)), tuple(whats), draw(heads()))


def run_json_case(h: Harness, case: JsonCase) -> Answer:
    body = case.body
    if KNOWN_PREV in body:
        ids = list(h.known)
        body = body.replace(KNOWN_PREV, json.dumps(ids[len(body) % len(ids)]).encode())
    ok = AUTH[case.auth][1]
    expect = predict(case.api, body) if ok else gateway_error(401, f"key mode {case.auth}")
    dialect = case.api.dialect
    decided = head_expect(case.head, dialect)
    if decided is not None:
        expect, dialect = decided
    allowed = {400, 401, 404, 405, 413}
    answer = run_case(h, post(case.path, body, auth=case.auth, head=case.head), expect, dialect=dialect,
                      stream_kind=case.api.stream_kind, allowed=allowed, sent_body=body, json_route=True,
                      pipeline=case.head.pipeline)
    if case.api.name == "responses" and answer.status == 200:
        h.remember(answer)
    return answer


# -- 1. the Responses API --------------------------------------------------------------------------------------


@given(case=json_cases([RESPONSES], MOSTLY_BEARER))
@fuzz_settings(EXAMPLES["responses"])
def test_responses_bodies(harness, case):
    run_json_case(harness, case)


# -- 2. Anthropic Messages and count_tokens ----------------------------------------------------------------------


@given(case=json_cases([MESSAGES, MESSAGES, COUNT_TOKENS], ANY_AUTH))
@fuzz_settings(EXAMPLES["messages"])
def test_messages_bodies_and_keys(harness, case):
    run_json_case(harness, case)


# -- 3. the pooling family and the tokenizer -----------------------------------------------------------------------


@given(case=json_cases(POOLING, MOSTLY_BEARER))
@fuzz_settings(EXAMPLES["pooling"])
def test_pooling_family_bodies(harness, case):
    run_json_case(harness, case)


# -- 4. audio: multipart bodies, built then damaged -----------------------------------------------------------------


def _wav(seconds: float = 0.05, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x01" * int(seconds * rate))
    return buf.getvalue()


WAV = _wav()
BOUNDARIES = [b"fuzzboundary", b"----WebKitFormBoundary7MA4YWxkTrZu0gW", b"a'()+_,-./:=?b", b"x" * 70, b"7"]
AUDIO_PATHS = [b"/v1/audio/transcriptions", b"/v1/audio/translations"]
AUDIO_EXTRA = {  # optional text fields, valid values
    "stream": [b"true", b"false", b"1", b"0"],
    "response_format": [b"json", b"text", b"verbose_json", b"srt"],
    "language": [b"en"], "temperature": [b"0.2", b"x"], "prompt": [b"a hint"],
    "max_completion_tokens": [b"3", b"0"], "stream_include_usage": [b"true"],
    "timestamp_granularities[]": [b"word"],
}
DAMAGE = ["truncate", "ct_boundary_wrong", "ct_no_boundary", "ct_boundary_empty", "ct_boundary_long",
          "ct_boundary_twice", "ct_quoted", "ct_type", "header_mangle", "drop_model", "drop_file", "file_no_filename",
          "dup_model", "too_many_parts", "huge_model", "huge_prompt", "huge_file", "bad_utf8_model", "stream_bad",
          "model_unknown", "model_embed", "bare_lf", "preamble", "blank_preamble", "epilogue", "no_closing",
          "cte_base64", "mutate"]
NON_MULTIPART = [b"application/json", b"text/plain", b"multipart/mixed; boundary=fuzzboundary",
                 b"application/x-www-form-urlencoded", None, b"", b"multipart/form-data-x; boundary=fuzzboundary"]


def _part(name: bytes, value: bytes, *, filename: bytes | None = None, extra: bytes = b"") -> tuple[bytes, bytes]:
    head = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        head += b'; filename="' + filename + b'"'
    return head + extra, value


def _form(parts: list[tuple[bytes, bytes]], boundary: bytes) -> bytes:
    out = b"".join(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + value + b"\r\n" for head, value in parts)
    return out + b"--" + boundary + b"--\r\n"


class AudioCase(NamedTuple):
    path: bytes
    ctype: bytes | None
    body: bytes
    auth: str
    damage: tuple[str, ...]
    stream: bool
    head: Head


@st.composite
def audio_cases(draw) -> AudioCase:
    boundary = draw(st.sampled_from(BOUNDARIES))
    file_part = _part(b"file", WAV, filename=b"a.wav", extra=b"\r\nContent-Type: audio/wav")
    parts = [file_part, _part(b"model", b"sim-chat")]
    fields = {}
    for name in draw(st.lists(st.sampled_from(sorted(AUDIO_EXTRA)), max_size=3, unique=True)):
        fields[name] = draw(st.sampled_from(AUDIO_EXTRA[name]))
        parts.append(_part(name.encode(), fields[name]))
    parts = draw(st.permutations(parts))
    # RFC 2045 5.1: a parameter value is a token or a quoted string (a boundary with tspecials is quoted)
    shown = boundary if re.fullmatch(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+", boundary) else b'"' + boundary + b'"'
    ctype = b"multipart/form-data; boundary=" + shown
    damage = tuple(draw(st.lists(st.sampled_from(DAMAGE), max_size=2, unique=True)))
    cut = None
    for d in damage:
        if d == "ct_boundary_wrong":
            ctype = b"multipart/form-data; boundary=other" + boundary[:10]
        elif d == "ct_no_boundary":
            ctype = b"multipart/form-data"
        elif d == "ct_boundary_empty":
            ctype = b'multipart/form-data; boundary=""'
        elif d == "ct_boundary_long":
            ctype = b"multipart/form-data; boundary=" + b"b" * 71
        elif d == "ct_boundary_twice":
            ctype = (ctype or b"multipart/form-data") + b"; boundary=" + shown
        elif d == "ct_quoted":
            ctype = b'multipart/form-data; boundary="' + boundary + b'"'
        elif d == "ct_type":
            ctype = draw(st.sampled_from(NON_MULTIPART))
        elif d == "header_mangle":
            i = draw(st.integers(0, len(parts) - 1))
            parts[i] = (draw(mutated(parts[i][0], 1.0)), parts[i][1])
        elif d == "drop_model":
            parts = [p for p in parts if b'name="model"' not in p[0]]
        elif d == "drop_file":
            parts = [p for p in parts if p is not file_part]
        elif d == "file_no_filename":
            parts = [_part(b"file", WAV) if p is file_part else p for p in parts]
        elif d == "dup_model":
            parts.append(_part(b"model", draw(st.sampled_from([b"sim-chat", b"nope"]))))
        elif d == "too_many_parts":
            parts += [_part(b"x%d" % i, b"v") for i in range(70)]
        elif d == "huge_model":
            parts = [p for p in parts if b'name="model"' not in p[0]] + [_part(b"model", b"m" * 5000)]
        elif d == "huge_prompt":
            parts.append(_part(b"prompt", b"p" * 50_000))
        elif d == "huge_file":
            parts.append(_part(b"file2", b"\x00" * (MAX_AUDIO + 100), filename=b"big.wav"))
        elif d == "bad_utf8_model":
            parts = [p for p in parts if b'name="model"' not in p[0]] + [_part(b"model", b"sim-\xff")]
        elif d == "stream_bad":
            parts = [p for p in parts if b'name="stream"' not in p[0]] + [_part(b"stream", b"maybe")]
        elif d == "model_unknown":
            parts = [p for p in parts if b'name="model"' not in p[0]] + [_part(b"model", b"nope")]
        elif d == "model_embed":
            parts = [p for p in parts if b'name="model"' not in p[0]] + [_part(b"model", b"sim-embed")]
        elif d == "cte_base64":
            parts = [p for p in parts if b'name="model"' not in p[0]] + [
                _part(b"model", b"c2ltLWNoYXQ=", extra=b"\r\nContent-Transfer-Encoding: base64")]
    body = _form(parts, boundary)
    for d in damage:
        if d == "truncate":
            cut = draw(st.integers(0, max(0, len(body) - 3)))
        elif d == "bare_lf":
            body = body.replace(b"\r\n", b"\n")
        elif d == "preamble":
            body = b"this is a preamble\r\n" + body
        elif d == "blank_preamble":
            body = b"\r\n\r\n" + body
        elif d == "epilogue":
            body += b"an epilogue\r\n"
        elif d == "no_closing":
            body = body[: body.rfind(b"--" + boundary + b"--")]
        elif d == "mutate":
            body = draw(mutated(body, 1.0))
    if cut is not None:
        body = body[:cut]
    stream = fields.get("stream") in (b"true", b"1")
    return AudioCase(draw(st.sampled_from(AUDIO_PATHS)), ctype, body, draw(st.sampled_from(MOSTLY_BEARER)),
                     damage, stream, draw(heads()))


AUDIO_EXPECT = {  # a single damage whose answer is certain -> (status, params, forwarded)
    "ct_boundary_wrong": (400, (), False), "ct_no_boundary": (400, (), False), "ct_boundary_empty": (400, (), False),
    "ct_boundary_long": (400, (), False), "ct_boundary_twice": (400, (), False), "ct_type": (400, (), False),
    "drop_model": (400, ("model",), False), "drop_file": (400, ("file",), False),
    "file_no_filename": (400, ("file",), False), "dup_model": (400, ("model",), False),
    "too_many_parts": (400, (), False), "huge_model": (400, ("model",), False), "huge_file": (413, (), False),
    "bad_utf8_model": (400, ("model",), False), "stream_bad": (400, ("stream",), False),
    "model_unknown": (404, ("model",), False), "bare_lf": (400, (), False), "preamble": (400, (), False),
    "no_closing": (400, (), False), "truncate": (400, (), False), "cte_base64": (400, ("model",), False),
    "ct_quoted": (None, (), True), "blank_preamble": (None, (), True), "epilogue": (None, (), True),
    "huge_prompt": (None, (), True), "model_embed": (None, (), True),
}


@given(case=audio_cases())
@fuzz_settings(EXAMPLES["audio"])
def test_audio_multipart_bodies(harness, case):
    h = harness
    data = post(case.path, case.body, auth=case.auth, ctype=case.ctype, head=case.head)
    decided = head_expect(case.head, "openai")
    if decided is not None:
        expect = decided[0]
    elif not AUTH[case.auth][1]:
        expect = gateway_error(401, f"key mode {case.auth}")
    elif len(case.body) > MAX_AUDIO:
        # declared: refused before a byte is read; chunked: the content type and boundary are checked first
        expect = gateway_error(413, "a body over max_audio_bytes") if case.head.framing != "chunked" else \
            Expect(frozenset({400, 413}), forwarded=False, why="a chunked body over max_audio_bytes")
    elif not case.damage:
        expect = Expect(frozenset(SIM_STATUSES), forwarded=True, why="a well-formed transcription request")
    elif len(case.damage) == 1 and case.damage[0] in AUDIO_EXPECT:
        status, params, forwarded = AUDIO_EXPECT[case.damage[0]]
        statuses = frozenset({status}) if status is not None else frozenset(SIM_STATUSES)
        expect = Expect(statuses, frozenset(params), forwarded, f"damage {case.damage[0]}")
    else:
        expect = UNKNOWN
    run_case(h, data, expect, dialect="openai", stream_kind="audio" if case.stream else None,
             allowed={400, 401, 404, 405, 413}, sent_body=case.body, json_route=False, pipeline=case.head.pipeline)


# -- 5. stored responses: retrieve and cancel ------------------------------------------------------------------------

_ID_RE = re.compile(rb"/v1/responses/([A-Za-z0-9._-]{1,256})(/cancel)?")
ID_KINDS = ["stored", "stored", "background", "created", "created", "random", "resp_random", "long", "too_long",
            "badchars", "empty", "pct", "unicode", "dots"]
SUFFIXES = [b""] * 5 + [b"/cancel"] * 5 + [b"/", b"/cancel/", b"/cancel/x", b"/x", b"/Cancel", b"//cancel",
                                           b"?x=1", b"/cancel?x=1", b"%2Fcancel", b"/cancel/../cancel"]
METHODS = [b"GET"] * 5 + [b"POST"] * 5 + [b"DELETE", b"PUT", b"HEAD", b"PATCH", b"OPTIONS"]
ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."


class StoredCase(NamedTuple):
    method: bytes
    id_kind: str
    pick: int
    random_id: str
    suffix: bytes
    body: bytes
    ctype: bytes | None
    auth: str
    pipeline: bool


# A request inside a body: answered as one (its /version answer in place of the pipelined /healthz one)
# if the gateway ever took an unread body for the next request.
SMUGGLED = b"GET /version HTTP/1.1\r\nHost: gw\r\n\r\n"


@st.composite
def stored_cases(draw) -> StoredCase:
    return StoredCase(
        method=draw(st.sampled_from(METHODS)), id_kind=draw(st.sampled_from(ID_KINDS)),
        pick=draw(st.integers(0, 1000)), random_id=draw(st.text(ID_CHARS, min_size=1, max_size=40)),
        suffix=draw(st.sampled_from(SUFFIXES)),
        body=draw(st.sampled_from([b"", b"", b"{}", b'{"x":1}', b"garbage\xff", b"[" * 300, SMUGGLED])),
        ctype=draw(st.sampled_from([None, None, b"application/json", b"text/plain"])),
        auth=draw(st.sampled_from(MOSTLY_BEARER)), pipeline=draw(st.integers(0, 2)) == 0)


def stored_id(h: Harness, case: StoredCase) -> bytes:
    kind = case.id_kind
    if kind == "stored":
        return h.stored_id.encode()
    if kind == "background":
        return h.background_id.encode()
    if kind == "created":
        ids = list(h.known)
        return ids[case.pick % len(ids)].encode()
    if kind == "random":
        return case.random_id.encode()
    if kind == "resp_random":
        return b"resp_" + b"%032x" % (case.pick * 7919)
    if kind == "long":
        return b"r" * 256
    if kind == "too_long":
        return b"r" * 257
    if kind == "badchars":
        return b"resp_a b"[: 6 + case.pick % 3] + b"!*$"[case.pick % 3: case.pick % 3 + 1]
    if kind == "empty":
        return b""
    if kind == "pct":
        return b"resp_%41%2F"
    if kind == "unicode":
        return "résp_é".encode()
    return b".."


def predict_stored(h: Harness, case: StoredCase, target: bytes) -> Expect:
    path = target.split(b"?", 1)[0]
    m = _ID_RE.fullmatch(path)
    if m is None:
        return Expect(frozenset({400, 404}), why="no such route (or a target the parser refuses)")
    method = b"POST" if m.group(2) else b"GET"
    if case.method != method:
        return gateway_error(405, f"{case.method!r} on a {method.decode()} route")
    if not AUTH[case.auth][1]:
        return gateway_error(401, f"key mode {case.auth}")
    rid = m.group(1).decode()
    if rid not in h.seen:
        return gateway_error(404, "an id the gateway never saw made", "response_id")
    if method == b"POST" and case.ctype == b"text/plain":
        return gateway_error(400, "a cancel with a non-JSON content type")
    # forwarded to its home, which holds it only if it was made with store (else the simulator's 404);
    # a cancel of a response that is not queued or in progress is the simulator's 400
    if method == b"GET":
        return Expect(frozenset({200, 404}), forwarded=True, why="a known id")
    return Expect(frozenset({200, 400, 404}), forwarded=True, why="a known id's cancel")


@given(case=stored_cases())
@fuzz_settings(EXAMPLES["stored"])
def test_stored_response_routes(harness, case):
    h = harness
    target = b"/v1/responses/" + stored_id(h, case) + case.suffix
    data = post(target, case.body, auth=case.auth, ctype=case.ctype, method=case.method)
    expect = predict_stored(h, case, target)
    answer = run_case(h, data, expect, dialect="openai", stream_kind=None, allowed={400, 401, 404, 405},
                      sent_body=None, json_route=False, method=case.method, pipeline=case.pipeline)
    if answer.status == 200 and case.method == b"GET" and case.id_kind == "stored":
        assert json.loads(answer.body)["id"] == h.stored_id, answer.body[:300]


# -- the simulator's faults the fuzz found, one input each --------------------------------------------------------
# Each is a body the gateway rightly accepts (its views check only what they document) and forwards; the
# simulated vLLM then fails on it -- it drops the connection without an answer (the gateway's 502, correct for a
# dead upstream), or answers 500 -- where vLLM answers 400 (pydantic validation) or 200. These fail until
# backends/sim/ is fixed; the gateway's side of each (502 bad_gateway in the envelope, the worker up, no
# internal error) is what run_case checks along the way.

SIM_FAULTS = [
    ("responses-input-text-not-a-string", b"/v1/responses",
     b'{"model":"sim-chat","input":[{"role":"user","content":[{"type":"input_text","text":5}]}]}'),
    ("responses-function-call-arguments-not-a-string", b"/v1/responses",
     b'{"model":"sim-chat","input":[{"type":"function_call","name":"f","arguments":7}]}'),
    ("responses-empty-input-with-a-function-tool", b"/v1/responses",
     b'{"model":"sim-chat","input":[],"tools":[' + TOOL_FN + b"]}"),
    ("pooling-message-part-text-not-a-string", b"/pooling",
     b'{"model":"sim-embed","messages":[{"content":[{"type":"text","text":5}]}]}'),
    ("classify-message-part-text-not-a-string", b"/classify",
     b'{"model":"sim-embed","messages":[{"content":[{"text":5}]}]}'),
    ("tokenize-message-part-text-not-a-string", b"/tokenize",
     b'{"model":"sim-chat","messages":[{"role":"user","content":[{"text":5}]}]}'),
    # tool_choice auto (the default) with max_tokens shorter than the call: vLLM's hermes parser finds no
    # complete call and answers the text; the simulator parses the cut arguments and answers 500.
    ("messages-tool-call-cut-by-max-tokens", b"/v1/messages",
     b'{"model":"sim-chat","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"tools":['
     + ANTHROPIC_TOOL + b"]}"),
]


@pytest.mark.parametrize("path, body", [f[1:] for f in SIM_FAULTS], ids=[f[0] for f in SIM_FAULTS])
def test_simulator_answers_bodies_the_gateway_forwards(harness, path, body):
    dialect = "anthropic" if path.startswith(b"/v1/messages") else "openai"
    run_case(harness, post(path, body), Expect(frozenset(SIM_STATUSES), forwarded=True, why="forwarded"),
             dialect=dialect, stream_kind=None, allowed=set(), sent_body=body, json_route=True)


# -- across the run ------------------------------------------------------------------------------------------------------


def test_the_stored_response_is_retrieved_from_its_home(harness):
    h = harness
    answer = exchange(h.port, post(b"/v1/responses/" + h.stored_id.encode(), b"", ctype=None, method=b"GET"),
                      method=b"GET")
    assert answer.status == 200 and json.loads(answer.body)["id"] == h.stored_id, answer


def test_metrics_show_no_internal_errors(harness):
    h = harness
    answer = exchange(h.port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n", method=b"GET")
    assert answer.status == 200 and not answer.error, answer
    counted = [line for line in answer.body.decode().splitlines()
               if line.startswith("spotinference_internal_errors_total")]
    assert all(float(line.rsplit(" ", 1)[1]) == 0 for line in counted), counted
    assert h.internal_errors() == 0


def test_examples_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv("SPOTINFERENCE_FUZZ_EXAMPLES", "7")
    assert examples(60) == 7

