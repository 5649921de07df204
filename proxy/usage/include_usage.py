"""Asking vLLM for a stream's token counts: `stream_options.include_usage` set in the request body.

Strategy: the only rewrite of a client's body the gateway makes, decided from the DECODED view
(admit/schemas.py), never from a byte search: a key can be spelled with escapes
(``"stream\\u005foptions"``), and a byte search that misses it would add a second member the upstream
then overrides. Duplicate keys: vLLM (Python's json) and msgspec both keep the LAST one, so the view's
``stream_options`` is what vLLM will act on.
* No ``stream_options`` (absent or null, in any spelling): the member is appended before the closing
  brace -- the last member, so it wins over any earlier duplicate -- and every other byte stays as sent.
  No decoding: the view already proved the body is one JSON object.
* A ``stream_options`` object without ``include_usage: true``: the top level is decoded with its values
  kept as raw bytes (``dict[str, Raw]``; duplicates collapse to the last, as vLLM reads them), only the
  small ``stream_options`` object is rewritten, and the top level re-encoded; every other value's bytes
  stay as sent. When the client did not ask for usage, ``continuous_usage_stats`` is turned off as well
  (with ``include_usage`` off vLLM would have sent no usage at all).
* ``include_usage: true``: the body goes as sent.
The tap (sse_tap.py) then removes the usage event again when the client did not ask for it
(`client_asked`), so the client sees the stream it asked for.
"""

from __future__ import annotations

from typing import Any

import msgspec

_MEMBER = b'"stream_options":{"include_usage":true}'
_WS = b" \t\r\n"
_members = msgspec.json.Decoder(dict[str, msgspec.Raw])
_object = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.encode


def client_asked(opts) -> bool:
    """Whether the client asked for usage: ``include_usage: true``, or ``continuous_usage_stats: true``
    without an ``include_usage`` (vLLM's own default for ``include_usage`` is true). `opts` is the view's
    decoded ``stream_options`` (None: absent or null)."""
    if opts is None:
        return False
    if opts.include_usage is None:
        return opts.continuous_usage_stats is True
    return opts.include_usage is True


def ask_for_usage(body: bytes, opts, asked: bool) -> bytes | None:
    """`body` rewritten so that vLLM reports usage (the last ``stream_options`` has ``include_usage:
    true``), or None when that is not possible (the body then goes as sent). `opts` is the view's decoded
    ``stream_options``, `asked` what `client_asked` said of it. The body must already be known to be a
    JSON object (the request schema decoded it): the append path does not validate it again."""
    if opts is None:
        end = len(body)
        while end and body[end - 1] in _WS:
            end -= 1
        if not end or body[end - 1] != 125:  # '}'
            return None
        k = end - 1
        while k and body[k - 1] in _WS:
            k -= 1
        if not k:
            return None
        sep = b"" if body[k - 1] == 123 else b","  # '{}' takes no comma
        return body[: end - 1] + sep + _MEMBER + body[end - 1 :]
    if opts.include_usage is True:
        return body
    try:
        members = _members.decode(body)
        raw = members.get("stream_options")
        so = _object.decode(raw) if raw is not None else None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(so, dict):
        return None
    so["include_usage"] = True
    if not asked and so.get("continuous_usage_stats") is True:
        so["continuous_usage_stats"] = False
    members["stream_options"] = msgspec.Raw(_encode(so))
    return _encode(members)
