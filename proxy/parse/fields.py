"""Header fields of a complete HTTP/1.1 head, one rule for both directions (parse/request.py reads
clients' heads, parse/response.py upstreams').

Strategy: the block is checked as a whole before any line is looked at -- one `translate` proves it
holds no control byte but HTAB and exactly the CRLFs that split its lines (so no bare CR or LF, no NUL,
no obs-fold continuation can hide in a value), one regex proves every field line starts with a token
and a colon -- then a single pass splits the lines into (lowercased name, trimmed value) pairs and
keeps aside the few fields that decide framing, for the caller's own rules.
"""

from __future__ import annotations

import re

from proxy.parse.chunked import FIELD_OK

_BAD_FIELD_START = re.compile(rb"\r\n(?![-!#$%&'*+.^_`|~0-9A-Za-z]+:)")


class FieldError(ValueError):
    """A head whose field lines break the rules; the message says which, the caller says where."""


def split_fields(block: bytes, lines: list[bytes], framing_names: frozenset[bytes], where: str):
    """(headers, framing) of a head `block` already split into `lines` (the start line first):
    `headers` every field as (lowercased name, value without surrounding SP/HTAB), `framing` those whose
    name is in `framing_names`, or None when there are none. Raises FieldError (`where`: "request" or
    "response", for its message)."""
    n = len(lines) - 1
    if block.translate(None, FIELD_OK) != b"\r\n" * n:
        raise FieldError(f"control character or bare CR/LF in {where} head")
    if n and _BAD_FIELD_START.search(block) is not None:
        raise FieldError("malformed header line")
    headers = []
    append = headers.append
    framing = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.lower()
        value = value.strip()  # only SP/HTAB can be there (the block has no other whitespace)
        append((name, value))
        if name in framing_names:
            if framing is None:
                framing = [(name, value)]
            else:
                framing.append((name, value))
    return headers, framing
