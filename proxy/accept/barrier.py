"""The crash barrier: an unexpected exception ends one request, never the worker.

Strategy: the connection loop (connection.py) and the dispatcher (admit/routes.py) catch `Exception`
(never trio's Cancelled, a BaseException) around each request cycle and hand it here. `contain`
  - answers the client: a 500 in the OpenAI envelope if no response head was sent; an in-band error
    event and an abort for a stream whose 200 head is out; a plain abort for any other started body;
  - logs it once, with the exception type and the traceback's frames (file, line, function, source
    line) -- never the exception's message or locals, which may hold a key or a prompt;
  - counts it (`spotinference_internal_errors_total{where}`).
The connection is closed afterwards: after a bug, its parser or framing state cannot be trusted.
Everything else on the worker (other connections, streams, background services) carries on.
"""

from __future__ import annotations

import traceback

from proxy import errors
from proxy.accept.downstream import ClientGone, Downstream
from proxy.observe import logs

MAX_FRAMES = 40


def internal_error() -> errors.ApiError:
    return errors.ApiError(500, "The gateway failed while handling this request; it has been logged.",
                           "server_error", code="internal_error")


def frames(exc: BaseException) -> list[str]:
    """The traceback as 'file:line in function: source' lines, innermost last, without any message."""
    out = []
    for fs in traceback.extract_tb(exc.__traceback__)[-MAX_FRAMES:]:
        out.append(f"{fs.filename}:{fs.lineno} in {fs.name}: {(fs.line or '').strip()[:200]}")
    return out


def describe(exc: BaseException) -> dict:
    """Type and frames of `exc`; for an exception group, those of each of its leaves (up to 8)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = []
        stack = [exc]
        while stack and len(leaves) < 8:
            e = stack.pop()
            if isinstance(e, BaseExceptionGroup):
                stack.extend(reversed(e.exceptions))
            else:
                leaves.append({"exc_type": type(e).__name__, "traceback": frames(e)})
        return {"exc_type": type(exc).__name__, "traceback": frames(exc), "leaves": leaves}
    return {"exc_type": type(exc).__name__, "traceback": frames(exc)}


async def contain(gw, ds: Downstream, exc: BaseException, where: str, ex=None) -> None:
    """Answer, log and count an unexpected exception; the caller then closes the connection."""
    gw.metrics.internal_error(where)
    fields = describe(exc)
    if ex is not None:
        fields["request_id"] = ex.request_id.decode("latin-1")
        fields["endpoint"] = ex.endpoint
    logs.event("internal_error", level="error", where=where, client=ds.client, **fields)
    err = internal_error()
    ds.keep_alive = False
    if ex is not None:
        ex.fail(err)
    try:
        if not ds.started:
            await ds.send_error(err, ex.request_id if ex is not None else None)
        elif ex is not None and ex.stream and not ds.client_gone:
            await ds.send_raw(ds.frame(errors.inband_error(err.message, err.code, ds.dialect)))
    except ClientGone:
        pass
    except Exception:  # noqa: BLE001, S110 -- the socket itself may be what failed; the caller closes it
        pass
    ds.client_gone = ds.client_gone or ds.started  # a started body ends without its last chunk
