"""Failing a stream whose 200 head is already out: an in-band error event, then an abort.

Strategy: once the head is sent the status can no longer change, so the failure travels in the body,
in the shape the stream's API uses (errors.inband_error: chat's `data: {"error": {...}}`, the
Responses API's and Anthropic's `event: error`).
Then the connection is closed WITHOUT the terminating chunk, so even a client that ignores error
events sees a truncated stream -- never an invented `data: [DONE]`.
"""

from __future__ import annotations

from proxy.accept.downstream import ClientGone, Downstream
from proxy.errors import inband_error

__all__ = ["end_stream_with_error", "inband_error"]


async def end_stream_with_error(ds: Downstream, err) -> None:
    """A stream whose 200 head is already out fails: in-band error event, then abort (no last chunk)."""
    try:
        await ds.send_raw(ds.frame(inband_error(err.message, err.code or err.type, ds.dialect)))
    except ClientGone:
        pass
    ds.client_gone = True
