"""Asking vLLM for a stream's token counts: `stream_options.include_usage` set in the request body.

Strategy: the only rewrite of a client's body the gateway makes, and the smallest one that works:
when the body does not mention ``stream_options`` the member is inserted after the opening brace and
every other byte stays as sent; otherwise decode, set, re-encode (key order kept). When that is not
safe (not an object, ``stream_options`` of another type) the original body goes upstream unchanged.
The tap (sse_tap.py) then removes the usage event again, so the client sees the stream it asked for.
"""

from __future__ import annotations

import msgspec

_INSERT = b'"stream_options":{"include_usage":true}'
_WS = b" \t\r\n"


def inject_include_usage(body: bytes) -> bytes | None:
    """Return `body` with ``stream_options.include_usage = true`` set, or None if that is not safe.

    For a streaming request whose client did not ask for usage. When ``"stream_options"`` does not occur
    in the body, the member is inserted right after the opening brace and every other byte stays as sent.
    Otherwise the body is decoded, the option set, and re-encoded (key order kept). None when the body is
    not a JSON object or ``stream_options`` is neither an object nor null: the caller then forwards the
    original body, and vLLM answers it as it would have. A body that already asks for usage is returned
    as is. The body must already be known to be JSON (the request schema decoded it): the fast path
    does not validate it again.
    """
    if b'"stream_options"' not in body:
        i = 0
        n = len(body)
        while i < n and body[i] in _WS:
            i += 1
        if i >= n or body[i] != 123:  # '{'
            return None
        j = i + 1
        while j < n and body[j] in _WS:
            j += 1
        if j >= n:
            return None
        sep = b"" if body[j] == 125 else b","  # '{}' takes no comma
        return body[: i + 1] + _INSERT + sep + body[i + 1 :]
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    opts = obj.get("stream_options")
    if opts is None:
        obj["stream_options"] = {"include_usage": True}
    elif isinstance(opts, dict):
        if opts.get("include_usage") is True:
            return body
        opts["include_usage"] = True
    else:
        return None
    return msgspec.json.encode(obj)
