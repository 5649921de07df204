"""Authentication: the request's key -- `Authorization: Bearer <key>` (OpenAI's SDKs, Claude Code's
auth token) or `x-api-key: <key>` (Anthropic's SDKs) -- looked up in the key store.

Strategy: one scan of the header list for either header (the first usable one wins), a constant-cost digest lookup in the
`KeyStore` (keys.py stores only digests), and an OpenAI-shaped 401 naming what was wrong. A gateway
running without a keys file (`open`) admits everyone and records no key.
"""

from __future__ import annotations

from proxy import errors
from proxy.admit.keys import KeyRecord, KeyStore

_BEARER = b"bearer "


def authenticate(keys: KeyStore, headers) -> tuple[KeyRecord | None, errors.ApiError | None]:
    """(key record, or None when running open; error, or None)."""
    if keys.open:
        return None, None
    token = None
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() == _BEARER:
                token = value[7:].strip()
                if token:
                    break
        elif name == b"x-api-key":
            token = value.strip()
            if token:
                break
    if not token:
        return None, errors.invalid_api_key("Missing API key. Pass it as 'Authorization: Bearer <key>' "
                                            "(or 'x-api-key: <key>').")
    record = keys.lookup(token)
    if record is None:
        return None, errors.invalid_api_key("Incorrect API key provided.")
    return record, None
