"""Secrets out of log lines: a database URL with its password masked, and an error message about it.

Strategy: parse with `urlsplit`; the password in the user-info part and a ``password=`` query parameter
(libpq accepts both) become ``***``; a URL that does not parse is replaced whole, since a half-parsed
one might still carry the secret. A driver's error message may quote part of the URL (libpq quotes a
bad percent-escape, which may be inside the password): `scrub` masks the password there too, as
written and as decoded.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str) -> str:
    """`url` without its secret: ``postgresql://app:***@db:5432/usage``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        userinfo, at, hostport = netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostport}"
        query = parts.query
        if "password" in query.lower():
            query = urlencode([(k, MASK if k.lower() == "password" else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return f"<unparsable URL, {len(url)} characters>"


def _passwords(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k.lower() == "password":
            found.append(v)
    return [p for raw in found for p in {raw, unquote(raw)} if p]


def scrub(text: str, url: str) -> str:
    """`text` (an error message about `url`) on one line, the URL's password masked wherever it shows."""
    text = " ".join(str(text).split())
    for secret in sorted(_passwords(url), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
