"""The OpenAI error envelope, and every error the gateway itself originates.

Strategy: one exception type, `ApiError`, carries status, message, type, param, code and any extra
response headers. Handlers raise it; whoever answers the request sends it
with `Downstream.send_error` (the body from `ApiError.body()`: encoded here, never exception text from
elsewhere). The body shape is OpenAI's:
``{"error": {"message", "type", "param", "code"}}`` -- openai-python maps the status to its exception
class (400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError,
413/502/503 APIStatusError, 429 RateLimitError, 5xx InternalServerError) and reads `x-should-retry`
and `Retry-After` for its retry decision (`openai/_base_client.py: _should_retry`).

Routes speak one of three dialects (`Dialect`, chosen by the route table): the OpenAI envelope above
(chat, completions, embeddings, the Responses API, the rest); Anthropic's on `/v1/messages*`,
``{"type": "error", "error": {"type", "message"}}`` with its types per status (400
invalid_request_error, 401 authentication_error, 403 permission_error, 404 not_found_error, 413
request_too_large, 429 rate_limit_error, 500 and other 5xx api_error, and the gateway's 503s -- nothing
reachable, overloaded -- as 529 overloaded_error: anthropic-sdk raises the matching classes and retries
429/5xx/529 unless `x-should-retry: false`). In-band (after a 200 SSE head) each API has its own shape:
chat's ``data: {"error": ...}``, the Responses API's ``event: error`` with ``{"type": "error", "code",
"message", "param"}``, Anthropic's ``event: error`` with its envelope.

Constructors below are the only place where status, type and code are paired, so they stay in sync.
"""

from __future__ import annotations

import msgspec

_encoder = msgspec.json.Encoder()

# Dialects: the error shape a route's clients parse.
OPENAI = 0
RESPONSES = 1  # OpenAI's envelope; its own in-band event
ANTHROPIC = 2

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    529: "overloaded_error"}


class ApiError(Exception):
    """An error response in the OpenAI envelope."""

    __slots__ = ("code", "headers", "message", "param", "status", "type")

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def status_for(self, dialect: int) -> int:
        """The status a client of `dialect` gets: Anthropic's 529 for the gateway's 503s."""
        if dialect == ANTHROPIC and self.status == 503:
            return 529
        return self.status

    def body(self, dialect: int = OPENAI) -> bytes:
        """The JSON body: ``{"error": {...}}``, or Anthropic's ``{"type": "error", "error": {...}}``."""
        if dialect == ANTHROPIC:
            return _encoder.encode({"type": "error", "error": {"type": anthropic_type(self.status_for(dialect)),
                                                               "message": self.message}})
        return _encoder.encode(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.type!r}, code={self.code!r}, param={self.param!r})"


def sole_exception(exc: BaseException) -> BaseException:
    """The one exception an exception group wraps (through nested single-leaf groups), else `exc`
    itself: a nursery wraps what its body raised, and the handler above wants the thing itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def anthropic_type(status: int) -> str:
    """Anthropic's error type for a status (other 4xx: invalid_request_error; 5xx: api_error)."""
    found = _ANTHROPIC_TYPES.get(status)
    if found is not None:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


def inband_error(message: str, code: str, dialect: int = OPENAI) -> bytes:
    """A failed stream's last event, after its 200 head, in the stream's own API shape: chat's
    ``data: {"error": {...}}`` (openai-python raises APIError on it), the Responses API's
    ``event: error`` (``ResponseErrorEvent``), Anthropic's ``event: error`` with its envelope (the
    SDK raises on it). relay/inband.py sends it; the crash barrier too."""
    if dialect == RESPONSES:
        payload = _encoder.encode({"type": "error", "code": code, "message": message, "param": None})
        return b"event: error\ndata: " + payload + b"\n\n"
    if dialect == ANTHROPIC:
        payload = _encoder.encode({"type": "error", "error": {"type": "api_error", "message": message}})
        return b"event: error\ndata: " + payload + b"\n\n"
    payload = _encoder.encode({"error": {"message": message, "type": "server_error", "param": None,
                                         "code": code}})
    return b"data: " + payload + b"\n\n"


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param, code=code)


def invalid_api_key(message: str = "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>' "
                                   "(or 'x-api-key: <key>').") -> ApiError:
    return ApiError(401, message, "invalid_request_error", code="invalid_api_key")


def permission_denied(message: str) -> ApiError:
    return ApiError(403, message, "permission_error", code="tier_not_allowed")


def admin_required(message: str) -> ApiError:
    """403 on the operator's status page: a valid key that is not an admin key, or an open gateway
    asked from anywhere but loopback (proxy/admit/status.py)."""
    return ApiError(403, message, "permission_error", code="admin_required")


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown request URL: {path}.", "invalid_request_error", code="unknown_url")


def method_not_allowed(method: str, path: str, allowed: tuple[bytes, ...]) -> ApiError:
    # RFC 9110 15.5.6: a 405 carries Allow, the methods the target supports.
    return ApiError(405, f"Method {method} is not allowed on {path}.", "invalid_request_error",
                    code="method_not_allowed", headers=((b"allow", b", ".join(allowed)),))


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body exceeds the limit of {limit} bytes.", "invalid_request_error",
                    code="request_too_large")


SDK_MAX_RETRY_AFTER_S = 60.0


def rate_limited(message: str, retry_after_s: float, headers: tuple[tuple[bytes, bytes], ...] = ()) -> ApiError:
    """429. openai-python and anthropic-sdk honour Retry-After only up to 60 s and otherwise retry on
    their own short back-off -- into the same 429: past 60 s (or with no wait that helps, 0), tell them
    not to retry (`x-should-retry: false`, which both read first)."""
    no_retry = retry_after_s <= 0 or retry_after_s > SDK_MAX_RETRY_AFTER_S
    if no_retry and (b"x-should-retry", b"false") not in headers:
        headers += ((b"x-should-retry", b"false"),)
    if retry_after_s > 0:
        headers = ((b"retry-after", str(max(1, int(retry_after_s + 0.999))).encode()),) + headers
    return ApiError(429, message, "rate_limit_error", code="rate_limit_exceeded", headers=headers)


def upstream_unreachable(tier: str) -> ApiError:
    # 503: no upstream of the tier accepted a connection; the SDK retries it.
    return ApiError(503, f"No upstream of tier '{tier}' is reachable. Try again shortly.", "server_error",
                    code="upstream_unavailable")


def bad_gateway(tier: str, what: str) -> ApiError:
    return ApiError(502, f"The upstream of tier '{tier}' failed: {what}.", "server_error", code="bad_gateway")


def upstream_timeout(tier: str, what: str) -> ApiError:
    return ApiError(504, f"The upstream of tier '{tier}' timed out ({what}).", "server_error",
                    code="upstream_timeout")


def wake_timeout(tier: str, waited_s: float) -> ApiError:
    # x-should-retry: false -- the SDK must not repeat a 10-minute wait twice more.
    return ApiError(504, f"Tier '{tier}' did not become ready within the wake hard cap ({waited_s:.0f} s).",
                    "server_error", code="wake_timeout", headers=((b"x-should-retry", b"false"),))


def overloaded(message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, message, "server_error", code="overloaded",
                    headers=((b"retry-after", str(retry_after_s).encode()),))


def unknown_response(response_id: str) -> ApiError:
    # OpenAI's wording for an unknown id (its param names the path parameter).
    return ApiError(404, f"Response with id '{response_id}' not found.", "invalid_request_error",
                    param="response_id", code="response_not_found")
