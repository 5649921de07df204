"""Gateway-level fuzz: hostile requests through a real socket to a real gateway in front of a recording
upstream.

Setup (module fixture): one trio thread runs a tiny h11 upstream on 127.0.0.1 (port 0) that records
every request it receives and answers like vLLM (JSON with usage; SSE streams with one event per token
and a usage event only when the LAST `stream_options` member asks `include_usage: true`, as Python's
json reads duplicates; it "generates" 5 prompt tokens + n * min(max_tokens, 16)), and the gateway
(`run_gateway`, auth on: an unlimited key and a key with a small tpm). The tests drive it with blocking
sockets from the test thread and read each answer with h11 (so the gateway's framing is checked too).

Cases: OpenAI-shaped bodies for /v1/chat/completions, /v1/completions, /v1/embeddings with hostile values
(wrong types, 400-digit ints, 1e400, zero/negative n and max_tokens, 10k-deep nesting, raw invalid
UTF-8 in strings, keys and unknown fields, duplicate keys, escaped keys such as "stream\\u005foptions"
and "m\\u006fdel", huge strings, non-object bodies) under normal or hostile heads (bad, duplicate,
too-short and too-long Content-Length, Content-Length with Transfer-Encoding, gzip codings, broken
chunking, long and many header lines, bare LF, obs-fold, NUL, HTTP/2.0, a TLS hello...).

Asserts, for every case:
- the answer is a 4xx in the OpenAI envelope {"error": {"message", "type", "param", "code"}}
  (proxy/errors.py), or a 2xx that the upstream produced (its id is in the body); never a 5xx for a
  client fault -- except 501 (a transfer coding the gateway does not implement) and 505 (an HTTP
  version it does not support), which RFC 9112 prescribes for those faults, each only when the head
  has that fault;
- where the fault is unambiguous the status (and the `param` naming the field) is the expected one:
  invalid UTF-8 -> 400, a 400-digit int or 1e400 in a field the gateway validates -> 400 naming it,
  n/max_tokens out of range -> 400 naming it, a body over max_body_bytes -> 413, a head fault -> its
  4xx (or 501/505);
- nothing invalid reaches the upstream: every body it got is strict UTF-8 JSON (no NaN/Infinity), an
  object whose model is one the tier serves, and a streamed one asks for usage (the gateway's meter
  depends on it); the upstream's own HTTP parser (h11) accepted every request;
- the worker stays up: a normal request on a new connection gets a 200 from the upstream after every
  case;
- (second test) a key with a small tpm cannot get more tokens generated than its budget allows: over a
  burst of the same hostile streaming body (escaped and duplicated stream_options, include_usage
  false/null, n > 1, ...), tokens the upstream generated <= tpm + tpm/60 * elapsed + the largest single
  request (the bucket may go into debt by one request; buckets.py).
Example counts: 150 and 40 by default; SPOTINFERENCE_FUZZ_EXAMPLES=N for more (both).
"""

from __future__ import annotations

import functools
import json
import socket
import time
from dataclasses import dataclass, field

import h11
import pytest
import trio
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.admit import keys
from proxy.gateway import Gateway, build_runtime
from proxy.process.services import run_gateway
from tests.fuzz._common import LoopThread, examples, fuzz_settings, read_response
from tests.support.gateway import make_config

MODELS = ("sim-chat", "sim-embed")
MAX_BODY = 1024 * 1024
TPM = 300
EXAMPLES, TPM_EXAMPLES = 150, 40
ENVELOPE = {"message", "type", "param", "code"}
READ_TIMEOUT = 15.0


# -- the recording upstream -------------------------------------------------------------------------------


class _Huge(int):
    """An int too long for Python's int() limit, kept as its digits (valid JSON all the same)."""


def _parse_int(text: str):
    return int(text) if len(text) < 4000 else _Huge(0)


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


@dataclass
class Received:
    number: int
    method: bytes
    target: bytes
    headers: list
    body: bytes
    problems: list[str] = field(default_factory=list)
    generated: int = 0


class RecordingUpstream:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.violations: list[str] = []  # HTTP the upstream's h11 refused
        self.generated = 0                # tokens "generated" so far, all requests
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        return self.url

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        try:
            while True:
                request, body = None, bytearray()
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(ev, h11.Request):
                        request = ev
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:  # ConnectionClosed
                        return
                status, headers, parts = self._answer(request, bytes(body))
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                for part in parts:
                    await stream.send_all(conn.send(h11.Data(data=part)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            self.violations.append(f"upstream h11 refused the gateway's request: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    def _answer(self, request: h11.Request, body: bytes):
        if request.method == b"GET":  # health probes, /metrics
            text = b"vllm:generation_tokens_total 0\n" if request.target.startswith(b"/metrics") else b"{}"
            return 200, [("content-type", "text/plain"), ("content-length", str(len(text)))], [text]
        rec = Received(len(self.received) + 1, request.method, request.target, list(request.headers), body)
        self.received.append(rec)
        try:
            obj = json.loads(body.decode("utf-8"), parse_int=_parse_int, parse_constant=_no_constants)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            rec.problems.append(f"not strict UTF-8 JSON: {type(exc).__name__}: {str(exc)[:100]}")
            return _json(400, {"object": "error", "message": "bad JSON", "type": "BadRequestError", "code": 400})
        if not isinstance(obj, dict):
            rec.problems.append(f"not a JSON object: {type(obj).__name__}")
            return _json(400, {"object": "error", "message": "not an object", "type": "BadRequestError", "code": 400})
        model = obj.get("model")
        if model not in MODELS:
            rec.problems.append(f"model {model!r} is not one the tier serves")
        stream = obj.get("stream") is True
        opts = obj.get("stream_options")
        usage_asked = isinstance(opts, dict) and opts.get("include_usage") is True
        if stream and not usage_asked:
            rec.problems.append(f"a stream that does not ask for usage: stream_options={opts!r}")
        n = obj.get("n")
        n = n if type(n) is int and 1 <= n <= 128 else 1
        wanted = obj.get("max_completion_tokens", obj.get("max_tokens"))
        per = min(wanted, 16) if type(wanted) is int and wanted >= 0 else 16
        embeddings = request.target.startswith(b"/v1/embeddings")
        if embeddings:
            n, per = 1, 0
        rec.generated = 5 + n * per
        self.generated += rec.generated
        usage = {"prompt_tokens": 5, "completion_tokens": n * per, "total_tokens": rec.generated}
        rid = f"up-{rec.number}"
        chat = request.target.startswith(b"/v1/chat")
        if embeddings:
            return _json(200, {"object": "list", "model": model, "usage": usage,
                               "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5]}]})
        if not stream:
            choices = [{"index": i, "finish_reason": "length",
                        **({"message": {"role": "assistant", "content": "t" * per}} if chat else {"text": "t" * per})}
                       for i in range(n)]
            return _json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": 1,
                               "model": model, "choices": choices, "usage": usage})
        kind = "chat.completion.chunk" if chat else "text_completion"
        events = []
        for i in range(n):
            for _ in range(per):
                delta = {"delta": {"content": "t"}} if chat else {"text": "t"}
                events.append({"id": rid, "object": kind, "created": 1, "model": model,
                               "choices": [{"index": i, "finish_reason": None, **delta}]})
        if usage_asked:
            events.append({"id": rid, "object": kind, "created": 1, "model": model, "choices": [], "usage": usage})
        parts = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
        parts.append(b"data: [DONE]\n\n")
        return 200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")], parts


def _json(status: int, obj) -> tuple:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return status, [("content-type", "application/json"), ("content-length", str(len(data)))], [data]


# -- the gateway, in a trio thread --------------------------------------------------------------------------


class Harness(LoopThread):
    name = "gateway-fuzz"

    def __init__(self, tmp) -> None:
        super().__init__()
        self.keys_path = tmp / "keys.toml"
        # One unlimited key, and a fresh small-tpm key per rate-limit example (cycled past the count).
        self.open_key = "sk-si-fuzz-open"
        self.tiny_keys = [f"sk-si-fuzz-tiny-{i}" for i in range(min(examples(TPM_EXAMPLES), 500) + 20)]
        self.tiny_used = 0
        records = [keys.KeyRecord(name="fuzz", hash=keys.digest(self.open_key))]
        records += [keys.KeyRecord(name=f"tiny-{i}", hash=keys.digest(k), tpm=TPM) for i, k in enumerate(self.tiny_keys)]
        keys.write(self.keys_path, keys.KeysFile(keys=records))
        self.upstream = RecordingUpstream()
        self.port = 0

    async def serve(self, nursery: trio.Nursery) -> None:
        url = await self.upstream.start(nursery)
        config = make_config([url], keys_file=str(self.keys_path),
                             server={"max_body_bytes": MAX_BODY, "request_head_s": 3.0, "request_body_s": 3.0,
                                     "body_grace_s": 2.0})
        gw = Gateway(build_runtime(config))
        _host, self.port = await nursery.start(functools.partial(run_gateway, config, gateway=gw))
        self.ready()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("gateway-fuzz"))
    h.start()
    yield h
    h.stop()


# -- the client -------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None
    headers: dict
    body: bytes
    error: str = ""


def exchange(port: int, data: bytes, *, half_close: bool = False) -> Answer:
    """Send `data` on a new connection; read one response with h11 (None status: no response)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "gw"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway may refuse (and close) before it has read everything
        return Answer(*read_response(conn, sock, time.monotonic() + READ_TIMEOUT))


CHAT_OK = b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'


def request(body: bytes, *, key: str, path: bytes = b"/v1/chat/completions", extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def envelope_of(answer: Answer) -> dict:
    try:
        obj = json.loads(answer.body)
    except ValueError:
        raise AssertionError(f"{answer.status} with a body that is not JSON: {answer.body[:200]!r}") from None
    assert isinstance(obj, dict) and set(obj) == {"error"}, obj
    err = obj["error"]
    assert isinstance(err, dict) and set(err) == ENVELOPE, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    return err


# -- hostile bodies -----------------------------------------------------------------------------------------

HUGE_INT = b"1" + b"0" * 399
BASE = {
    "chat": [(b"model", b'"sim-chat"'), (b"messages", b'[{"role":"user","content":"hi"}]')],
    "completions": [(b"model", b'"sim-chat"'), (b"prompt", b'"hi"')],
    "embeddings": [(b"model", b'"sim-embed"'), (b"input", b'"hi"')],
}
PATHS = {"chat": b"/v1/chat/completions", "completions": b"/v1/completions", "embeddings": b"/v1/embeddings"}
OPTIONAL = {
    "chat": {b"stream": [b"true", b"false"], b"max_tokens": [b"4", b"16"], b"n": [b"1", b"2"], b"seed": [b"7"],
             b"temperature": [b"0.5"], b"top_p": [b"1"], b"stop": [b'["x"]'], b"max_completion_tokens": [b"8"],
             b"user": [b'"u"'], b"stream_options": [b'{"include_usage":true}', b'{"include_usage":false}', b"{}"],
             b"presence_penalty": [b"0"], b"logprobs": [b"true"]},
    "completions": {b"stream": [b"true", b"false"], b"max_tokens": [b"4", b"0"], b"n": [b"1", b"3"],
                    b"seed": [b"7"], b"temperature": [b"1"], b"echo": [b"true"], b"logprobs": [b"1"],
                    b"stream_options": [b'{"include_usage":false}']},
    "embeddings": {b"encoding_format": [b'"float"', b'"base64"'], b"dimensions": [b"8"], b"user": [b'"u"']},
}
# Fields the gateway's view validates (admit/schemas.py), by kind.
INT_FIELDS = {"chat": {b"n", b"max_tokens", b"max_completion_tokens", b"seed", b"top_logprobs"},
              "completions": {b"n", b"max_tokens", b"seed", b"logprobs"}, "embeddings": {b"dimensions"}}
FLOAT_FIELDS = {"chat": {b"temperature", b"top_p", b"presence_penalty", b"frequency_penalty"},
                "completions": {b"temperature", b"top_p", b"presence_penalty", b"frequency_penalty"},
                "embeddings": set()}
BAD_UTF8 = [b'"\xff\xfe"', b'"a\xc0\xafb"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b'"\x80"']
VALUES = {  # kind: values
    "huge_int": [HUGE_INT, b"-" + b"9" * 400],
    "huge_float": [b"1e400", b"-1E400"],
    "int64_edge": [b"9223372036854775808", b"-9223372036854775809", b"18446744073709551616"],
    "zero": [b"0"], "negative": [b"-1", b"-100"],
    "odd_number": [b"1.5", b"1e3", b"1e-400", b"-0", b"0.0"],
    "not_json_number": [b"NaN", b"Infinity", b"-Infinity", b"01", b"0x10", b"1_000", b"+1", b".5"],
    "wrong_type": [b'"str"', b"true", b"null", b"[]", b"{}", b"[1,2]", b'{"a":1}', b'""'],
    "bad_utf8": BAD_UTF8,
    "escapes": [b'"\\ud800"', b'"\\u0000"', b'"\\udfff\\ud800"', b'"\\x41"', b'"a\x00b"', b'"a\nb"'],
    "deep": [b"[" * 10000 + b"]" * 10000, b'{"a":' * 10000 + b"1" + b"}" * 10000],
    "huge_string": [b'"' + b"a" * 200_000 + b'"', b'"' + b"a" * (MAX_BODY + 1000) + b'"'],
}
KINDS = sorted(VALUES) + ["huge_int", "huge_int", "huge_float", "bad_utf8", "bad_utf8", "zero", "negative"]
ESCAPED = {b"model": [b"m\\u006fdel", b"\\u006d\\u006f\\u0064\\u0065\\u006c"],
           b"stream_options": [b"stream\\u005foptions", b"\\u0073tream_options", b"stream_option\\u0073"],
           b"stream": [b"\\u0073tream", b"strea\\u006d"], b"max_tokens": [b"max\\u005ftokens"],
           b"n": [b"\\u006e"], b"messages": [b"messag\\u0065s"], b"prompt": [b"pr\\u006fmpt"],
           b"input": [b"\\u0069nput"]}


@dataclass
class Case:
    endpoint: str
    body: bytes
    mutations: list = field(default_factory=list)   # (what, field, kind)
    expect_status: int | None = None
    expect_param: str | None = None
    why: str = ""


def _encode(members: list[tuple[bytes, bytes]], ws: bytes) -> bytes:
    return b"{" + (b"," + ws).join(b'"' + k + b'":' + ws + v for k, v in members) + b"}"


@st.composite
def bodies(draw) -> Case:
    endpoint = draw(st.sampled_from(["chat", "chat", "completions", "embeddings"]))
    members = list(BASE[endpoint])
    optional = OPTIONAL[endpoint]
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=min(4, len(optional)), unique=True)):
        members.append((name, draw(st.sampled_from(optional[name]))))
    names = {k for k, _ in members}
    if b"stream_options" in names and b"stream" not in names:
        members.append((b"stream", b"true"))
    case = Case(endpoint, b"")
    known = sorted(INT_FIELDS[endpoint] | FLOAT_FIELDS[endpoint] | {b"model", b"stream", b"stream_options"})
    whole = None
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        what = draw(st.sampled_from(["set", "set", "set", "dup", "escape", "bad_key", "unknown", "whole"]))
        if what in ("set", "unknown"):
            name = draw(st.sampled_from(known)) if what == "set" else draw(st.sampled_from(
                [b"x_extra", b"messages", b"prompt", b"input", b"user", b"stop", b"tools"]))
            kind = draw(st.sampled_from(KINDS))
            value = draw(st.sampled_from(VALUES[kind]))
            for i, (k, _) in enumerate(members):
                if k == name:
                    members[i] = (name, value)
                    break
            else:
                members.append((name, value))
            case.mutations.append((what, name, kind))
        elif what == "dup":
            name = draw(st.sampled_from([k for k, _ in members]))
            value = draw(st.sampled_from([b'"gpt-x"', b"true", b"false", b"null", b"1", b'{"include_usage":false}',
                                          b'"sim-chat"', b'"sim-embed"']))
            members.insert(draw(st.integers(0, len(members))), (name, value))
            case.mutations.append((what, name, "dup"))
        elif what == "escape":
            candidates = [k for k, _ in members if k in ESCAPED]
            if not candidates:
                continue
            name = draw(st.sampled_from(candidates))
            spelled = draw(st.sampled_from(ESCAPED[name]))
            members = [(spelled if k == name else k, v) for k, v in members]
            case.mutations.append((what, name, "escape"))
        elif what == "bad_key":
            members.append((draw(st.sampled_from([b"k\xff", b"\xc3", b"x\xed\xa0\x80"])), b"1"))
            case.mutations.append((what, b"", "bad_utf8"))
        else:
            whole = draw(st.sampled_from([b"", b"[]", b'"x"', b"1", b"null", b"{", b'{"model":', b"}{",
                                          b"\xef\xbb\xbf", b"trailing", b"\xff"]))
            case.mutations.append((what, b"", "bom" if whole == b"\xef\xbb\xbf" else "whole"))
    body = _encode(members, draw(st.sampled_from([b"", b" ", b"\n\t "])))
    if whole is not None:
        body = {b"\xef\xbb\xbf": b"\xef\xbb\xbf" + body, b"trailing": body + b" x"}.get(whole, whole)
    case.body = body
    _expectations(case, members)
    return case


def _expectations(case: Case, members) -> None:
    """The answer a single unambiguous fault must get (None: any 2xx/4xx will do)."""
    if len(case.body) > MAX_BODY:  # refused on its declared size, before a byte of it is read
        case.expect_status, case.why = 413, "body over max_body_bytes"
        return
    try:
        case.body.decode("utf-8")
    except UnicodeDecodeError:
        case.expect_status, case.why = 400, "invalid UTF-8"
        return
    if len(case.mutations) != 1:
        return
    what, name, kind = case.mutations[0]
    if what == "whole":
        case.expect_status, case.why = 400, "not a JSON object"
        return
    if what != "set":
        return
    param = name.decode()
    ep = case.endpoint
    if name in INT_FIELDS[ep] and kind == "huge_int":
        case.expect_status, case.expect_param, case.why = 400, param, "a 400-digit int"
    elif name in FLOAT_FIELDS[ep] and kind == "huge_float":
        case.expect_status, case.expect_param, case.why = 400, param, "1e400"
    elif name == b"n" and kind in ("zero", "negative") and ep != "embeddings":
        case.expect_status, case.expect_param, case.why = 400, param, "n < 1"
    elif name in (b"max_tokens", b"max_completion_tokens") and ep == "chat" and kind in ("zero", "negative"):
        case.expect_status, case.expect_param, case.why = 400, param, f"{param} < 1"
    elif name == b"max_tokens" and ep == "completions" and kind == "negative":
        case.expect_status, case.expect_param, case.why = 400, param, "max_tokens < 0"
    elif kind == "not_json_number":
        case.expect_status, case.why = 400, "not valid JSON"
    elif kind == "wrong_type" and name in INT_FIELDS[ep] | FLOAT_FIELDS[ep] and members_value(members, name) != b"null":
        case.expect_status, case.expect_param, case.why = 400, param, f"{param} of the wrong type"


def members_value(members, name: bytes) -> bytes | None:
    value = None
    for k, v in members:
        if k == name:
            value = v
    return value


# -- hostile heads ------------------------------------------------------------------------------------------

HEADS = ["normal"] * 10 + [
    "http10", "absolute", "query", "expect", "chunked", "chunked_bad", "cl_short", "cl_long", "cl_nonnum",
    "cl_neg", "cl_conflict", "cl_te", "te_gzip", "te_gzip_chunked", "long_header", "many_headers", "bare_lf",
    "obs_fold", "nul_value", "ctype_text", "ctype_missing", "no_host", "http20", "bad_path", "get_method",
    "no_auth", "bad_auth", "tls", "space_in_target", "lower_method"]
HEAD_EXPECT = {"chunked_bad": {400}, "cl_short": {400}, "cl_nonnum": {400}, "cl_neg": {400}, "cl_conflict": {400},
               "cl_te": {400}, "te_gzip": {501}, "te_gzip_chunked": {501}, "long_header": {431},
               "many_headers": {431}, "obs_fold": {400}, "nul_value": {400}, "ctype_text": {400}, "no_host": {400},
               "http20": {505}, "bad_path": {404}, "get_method": {405}, "no_auth": {401}, "bad_auth": {401},
               "space_in_target": {400}, "lower_method": {405},
               # no CRLFCRLF: refused at once as bad (400), or as too large (431) when what arrived is
               # already past max_head_bytes
               "bare_lf": {400, 431}, "tls": {400, 431}}
# The 5xx a client fault may get: RFC 9112 6.1 (501, unknown transfer coding) and 2.3 (505, version).
RFC_5XX = {"te_gzip": 501, "te_gzip_chunked": 501, "http20": 505}


def build_request(head: str, body: bytes, path: bytes, key: str) -> tuple[bytes, bool]:
    """(the bytes to send, whether to half-close after them)."""
    auth = b"Authorization: Bearer " + key.encode() + b"\r\n"
    ctype = b"Content-Type: application/json\r\n"
    method, version, host, target = b"POST", b"HTTP/1.1", b"Host: gw\r\n", path
    extra = b""
    length = b"Content-Length: %d\r\n" % len(body)
    payload = body
    half_close = False
    eol = b"\r\n"
    if head == "http10":
        version = b"HTTP/1.0"
    elif head == "absolute":
        target = b"http://gw" + path
    elif head == "query":
        target = path + b"?x=1&y=%ff"
    elif head == "expect":
        extra = b"Expect: 100-continue\r\n"
    elif head in ("chunked", "chunked_bad"):
        length = b"Transfer-Encoding: chunked\r\n"
        mid = len(body) // 2
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:mid], body[mid:]) if p) + b"0\r\n\r\n"
        if head == "chunked_bad":
            payload = b"zz\r\n" + payload
    elif head == "cl_short":
        length = b"Content-Length: %d\r\n" % (len(body) + 10)
        half_close = True
    elif head == "cl_long":
        length = b"Content-Length: %d\r\n" % max(0, len(body) - 5)
    elif head == "cl_nonnum":
        length = b"Content-Length: abc\r\n"
    elif head == "cl_neg":
        length = b"Content-Length: -%d\r\n" % len(body)
    elif head == "cl_conflict":
        length += b"Content-Length: %d\r\n" % (len(body) + 1)
    elif head == "cl_te":
        length += b"Transfer-Encoding: chunked\r\n"
    elif head == "te_gzip":
        length = b"Transfer-Encoding: gzip\r\n"
    elif head == "te_gzip_chunked":
        length = b"Transfer-Encoding: gzip, chunked\r\n"
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif head == "long_header":
        extra = b"X-Long: " + b"a" * 40_000 + b"\r\n"
    elif head == "many_headers":
        extra = b"".join(b"X-%d: v\r\n" % i for i in range(150))
    elif head == "bare_lf":
        eol = b"\n"
    elif head == "obs_fold":
        extra = b"X-Fold: a\r\n folded\r\n"
    elif head == "nul_value":
        extra = b"X-Nul: a\x00b\r\n"
    elif head == "ctype_text":
        ctype = b"Content-Type: text/plain\r\n"
    elif head == "ctype_missing":
        ctype = b""
    elif head == "no_host":
        host = b""
    elif head == "http20":
        version = b"HTTP/2.0"
    elif head == "bad_path":
        target = b"/v1/nothing-here"
    elif head == "get_method":
        method = b"GET"
        target = path
    elif head == "no_auth":
        auth = b""
    elif head == "bad_auth":
        auth = b"Authorization: Bearer sk-si-not-a-key\r\n"
    elif head == "tls":
        return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), False
    elif head == "space_in_target":
        target = path + b" x"
    elif head == "lower_method":
        method = b"post"
    fields = (host + ctype + auth + extra + length).replace(b"\r\n", eol)
    return method + b" " + target + b" " + version + eol + fields + eol + payload, half_close


# -- the tests ----------------------------------------------------------------------------------------------


def check_upstream_since(h: Harness, start: int) -> list[Received]:
    got = h.upstream.received[start:]
    problems = [(r.number, p, r.body[:120]) for r in got for p in r.problems]
    assert not problems, f"invalid request(s) reached the upstream: {problems}"
    assert not h.upstream.violations, h.upstream.violations
    return got


def assert_alive(h: Harness) -> None:
    before = len(h.upstream.received)
    answer = exchange(h.port, request(CHAT_OK, key=h.open_key))
    assert answer.status == 200, f"the gateway stopped answering normal requests: {answer}"
    assert b'"id":"up-' in answer.body and len(h.upstream.received) > before


@given(case=bodies(), head=st.sampled_from(HEADS))
@fuzz_settings(EXAMPLES)
def test_hostile_requests_get_a_clean_answer_and_reach_no_upstream(harness, case, head):
    h = harness
    data, half_close = build_request(head, case.body, PATHS[case.endpoint], h.open_key)
    before = len(h.upstream.received)
    answer = exchange(h.port, data, half_close=half_close)
    event(f"{head}: {answer.status}")
    assert answer.status is not None, f"no answer at all ({answer.error}) to {data[:300]!r}"
    assert not answer.error, answer.error
    status = answer.status
    forwarded = check_upstream_since(h, before)
    if 200 <= status < 300:
        assert forwarded, f"{status} but nothing reached the upstream"
        if answer.headers.get("content-type", "").startswith("text/event-stream"):
            assert answer.body.endswith(b"data: [DONE]\n\n"), answer.body[-200:]
        else:
            assert b'"id":"up-' in answer.body or b'"object":"list"' in answer.body, answer.body[:200]
    elif status in RFC_5XX.values():
        assert RFC_5XX.get(head) == status, f"{status} without the fault it is reserved for ({head})"
        envelope_of(answer)
    else:
        assert 400 <= status < 500, f"{status} from the gateway for a client-side fault: {answer.body[:300]!r}"
        envelope_of(answer)
    expected = HEAD_EXPECT.get(head)
    if expected is not None and len(case.body) > MAX_BODY and head in ("cl_short", "ctype_text"):
        expected = expected | {413}  # the declared size is refused before the content type is looked at
    if expected is not None:
        assert status in expected, f"{head}: expected {expected}, got {status} {answer.body[:200]!r}"
    elif case.expect_status is not None and head not in ("cl_long",):
        assert status == case.expect_status, (
            f"{case.why}: expected {case.expect_status}, got {status} {answer.body[:300]!r}")
        if case.expect_param is not None:
            assert envelope_of(answer)["param"] == case.expect_param, (case.why, answer.body[:300])
    assert_alive(h)


# -- a small tpm holds against hostile streaming bodies ---------------------------------------------------

STREAM_OPTIONS = [
    b'"stream_options":{"include_usage":false}', b'"stream_options":{"include_usage":null}',
    b'"stream_options":{}', b'"stream_options":null', b'"stream\\u005foptions":{"include_usage":false}',
    b'"\\u0073tream_options":{"include_usage":false}', b'"stream_options":{"include\\u005fusage":false}',
    b'"stream_options":{"include_usage":true},"stream_options":{"include_usage":false}',
    b'"stream_options":{"include_usage":true},"stream\\u005foptions":{"include_usage":false}',
    b'"stream_options":{"include_usage":false,"continuous_usage_stats":true}',
    b'"stream_options":{"include_usage":true,"include_usage":false}', b"",
]


@st.composite
def metered_streams(draw) -> tuple[bytes, bytes]:
    chat = draw(st.booleans())
    parts = [b'"model":"sim-chat"',
             b'"messages":[{"role":"user","content":"hi"}]' if chat else b'"prompt":"hi"',
             draw(st.sampled_from([b'"stream":true', b'"\\u0073tream":true', b'"stream":false,"stream":true']))]
    parts += [p for p in [draw(st.sampled_from(STREAM_OPTIONS))] if p]
    for extra in draw(st.lists(st.sampled_from([b'"max_tokens":16', b'"n":4', b'"n":1', b'"max_tokens":1',
                                                b'"max\\u005ftokens":16', b'"user":"u"', b'"max_tokens":' + HUGE_INT,
                                                b'"n":0', b'"max_tokens":1e400']),
                               max_size=3, unique=True)):
        parts.append(extra)
    parts = draw(st.permutations(parts))
    path = b"/v1/chat/completions" if chat else b"/v1/completions"
    return b"{" + b",".join(parts) + b"}", path


@given(stream=metered_streams())
@fuzz_settings(TPM_EXAMPLES)
def test_a_small_tpm_holds_against_hostile_streaming_bodies(harness, stream):
    h = harness
    body, path = stream
    key = h.tiny_keys[h.tiny_used % len(h.tiny_keys)]  # a full bucket, as far as the count allows
    h.tiny_used += 1
    start_tokens = h.upstream.generated
    start_n = len(h.upstream.received)
    t0 = time.monotonic()
    statuses = []
    for _ in range(30):
        answer = exchange(h.port, request(body, key=key, path=path))
        statuses.append(answer.status)
        assert answer.status is not None and not answer.error, answer
        if answer.status != 200:
            assert answer.status in (400, 429), (answer.status, answer.body[:300])
            envelope_of(answer)
            break
    elapsed = time.monotonic() - t0
    got = h.upstream.received[start_n:]
    used = h.upstream.generated - start_tokens
    largest = max((r.generated for r in got), default=0)
    budget = TPM + TPM / 60 * elapsed + largest
    event(f"admitted {statuses.count(200)} of {len(statuses)}")
    assert used <= budget, (f"key with tpm={TPM} got {used} tokens generated in {elapsed:.1f} s "
                            f"(budget {budget:.0f}) with {body!r}: statuses {statuses}")
    check_upstream_since(h, start_n)


# -- fixed cases: the faults the fuzzers are for, each on one input ---------------------------------------

CHAT = b'"model":"sim-chat","messages":[{"role":"user","content":"hi"}]'
FIXED = [
    # (what, path, body, key, status, param)
    ("invalid UTF-8 in an unknown field", b"/v1/chat/completions", b"{" + CHAT + b',"x":"\xff"}', "open", 400, None),
    ("invalid UTF-8 in a key", b"/v1/chat/completions", b"{" + CHAT + b',"k\xff":1}', "open", 400, None),
    ("a UTF-8-encoded surrogate", b"/v1/chat/completions", b"{" + CHAT + b',"x":"\xed\xa0\x80"}', "open", 400, None),
    ("400-digit max_tokens", b"/v1/chat/completions", b"{" + CHAT + b',"max_tokens":' + HUGE_INT + b"}", "open", 400,
     "max_tokens"),
    ("400-digit n", b"/v1/chat/completions", b"{" + CHAT + b',"n":' + HUGE_INT + b"}", "open", 400, "n"),
    ("400-digit max_completion_tokens", b"/v1/chat/completions",
     b"{" + CHAT + b',"max_completion_tokens":' + HUGE_INT + b"}", "open", 400, "max_completion_tokens"),
    ("400-digit completions max_tokens", b"/v1/completions",
     b'{"model":"sim-chat","prompt":"hi","max_tokens":' + HUGE_INT + b"}", "open", 400, "max_tokens"),
    ("400-digit dimensions", b"/v1/embeddings", b'{"model":"sim-embed","input":"hi","dimensions":' + HUGE_INT + b"}",
     "open", 400, "dimensions"),
    ("400-digit max_tokens on a metered key", b"/v1/chat/completions",
     b"{" + CHAT + b',"max_tokens":' + HUGE_INT + b"}", "tiny", 400, "max_tokens"),
    ("1e400 temperature", b"/v1/chat/completions", b"{" + CHAT + b',"temperature":1e400}', "open", 400, "temperature"),
    ("n = 0", b"/v1/chat/completions", b"{" + CHAT + b',"n":0}', "open", 400, "n"),
    ("max_tokens = -1", b"/v1/completions", b'{"model":"sim-chat","prompt":"hi","max_tokens":-1}', "open", 400,
     "max_tokens"),
    ("escaped stream_options, include_usage false", b"/v1/chat/completions",
     b"{" + CHAT + b',"stream":true,"stream\\u005foptions":{"include_usage":false}}', "open", 200, None),
    ("escaped model key", b"/v1/chat/completions",
     b'{"m\\u006fdel":"sim-chat","messages":[{"role":"user","content":"hi"}]}', "open", 200, None),
    ("duplicate model: the last one counts", b"/v1/chat/completions", b"{" + CHAT + b',"model":"gpt-x"}', "open", 404,
     "model"),
    ("10k-deep nesting", b"/v1/chat/completions", b"{" + CHAT + b',"x":' + b"[" * 10000 + b"]" * 10000 + b"}", "open",
     None, None),
    ("a 5000-digit int in an unknown field", b"/v1/chat/completions", b"{" + CHAT + b',"x":1' + b"0" * 5000 + b"}",
     "open", None, None),
]


@pytest.mark.parametrize("what, path, body, key, status, param", FIXED, ids=[f[0] for f in FIXED])
def test_fixed_cases(harness, what, path, body, key, status, param):
    h = harness
    secret = h.open_key if key == "open" else h.tiny_keys[-1]
    before = len(h.upstream.received)
    answer = exchange(h.port, request(body, key=secret, path=path))
    assert answer.status is not None and not answer.error, answer
    check_upstream_since(h, before)
    if status is not None:
        assert answer.status == status, (what, answer.status, answer.body[:300])
    else:
        assert 200 <= answer.status < 300 or 400 <= answer.status < 500, (what, answer.status, answer.body[:300])
    if 400 <= answer.status < 500:
        err = envelope_of(answer)
        if param is not None:
            assert err["param"] == param, (what, err)
    assert_alive(h)


def test_examples_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv("SPOTINFERENCE_FUZZ_EXAMPLES", "7")
    assert examples(150) == 7
    monkeypatch.delenv("SPOTINFERENCE_FUZZ_EXAMPLES")
    assert examples(150) == 150
