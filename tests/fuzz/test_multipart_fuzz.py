"""Fuzz: proxy/admit/multipart.py on generated multipart/form-data bodies, valid and hostile.

Bodies are built from RFC 7578 pieces: a boundary of random bchars, 0-7 parts (the wanted fields
``model`` / ``stream``, a ``file`` part, others) with names quoted or bare, escaped quotes, ``filename``
and ``filename*``, header names in any case, extra headers, values holding CRLF, dashes and fragments
of the delimiter; blank lines or a preamble before the first delimiter, an epilogue. Then, at this example's hostility rate: the
shared single-byte mutations (tests/fuzz/_common.py), a cut at a random offset, a delimiter pasted
into a value, bare LF line ends.

Asserts, for every body:
- the scanner returns or raises `ApiError` 400 (code ``invalid_multipart``, or param ``file`` for a
  missing file part) -- never any other exception;
- an untouched body whose parts are all valid (wanted fields text, once, UTF-8, within the limits) is
  accepted with exactly the intended fields;
- whenever it accepts, werkzeug's multipart parser (an independent implementation, in the dev
  environment through moto[server] and flask) reads the same wanted text fields and finds a file part
  under every name this scanner reported as a file -- except where werkzeug's own leniency (a
  delimiter after a bare LF or CR, content to RFC 2046 and python-multipart) makes it read another
  structure.
Example count: 400 by default; SPOTINFERENCE_FUZZ_EXAMPLES=N for more.
"""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.admit.multipart import MAX_VALUE, form_fields, parse_form
from proxy.errors import ApiError
from tests.fuzz._common import fuzz_settings, mutated

werkzeug_formparser = pytest.importorskip("werkzeug.formparser")

WANTED = frozenset({"model", "stream"})
BCHARS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? "
NAMES = ["model", "stream", "file", "language", "response_format", 'na"me', "é", "x y", "timestamp_granularities[]"]


@st.composite
def boundaries(draw) -> bytes:
    raw = draw(st.binary(min_size=1, max_size=70))
    b = bytes(BCHARS[x % len(BCHARS)] for x in raw)
    return b.rstrip(b" ") or b"x"


def quote_name(name: str, draw) -> bytes:
    raw = name.encode()
    if draw(st.booleans()) and all(c in b"0123456789abcdefghijklmnopqrstuvwxyz_-." for c in raw) and raw:
        return raw  # a bare token
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@st.composite
def values(draw, boundary: bytes) -> bytes:
    pieces = draw(st.lists(st.sampled_from([
        b"whisper-1", b"true", b"false", b"\r\n", b"--", b"-", b"\r", b"\n", b"\r\n-", b"\x00", b"\xff",
        b"caf\xc3\xa9", b" ", b"--" + boundary[:-1], boundary, b"\r\n--" + boundary[:-1]]), max_size=6))
    return b"".join(pieces)


@st.composite
def bodies(draw):
    boundary = draw(boundaries())
    hostile = draw(st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.5]))
    parts = []
    intended: dict[str, str] = {}
    valid = True
    seen_wanted: set[str] = set()
    for _ in range(draw(st.integers(0, 7))):
        name = draw(st.sampled_from(NAMES))
        is_file = draw(st.booleans()) if name not in WANTED else draw(st.integers(0, 9)) == 0
        value = draw(values(boundary)) if draw(st.booleans()) else draw(st.binary(max_size=40))
        disp = draw(st.sampled_from([b"Content-Disposition", b"content-disposition", b"CONTENT-DISPOSITION"]))
        header = disp + b": form-data; name=" + quote_name(name, draw)
        if is_file:
            fname = draw(st.sampled_from(['a.wav', 'speech "1".mp3', "é.ogg", ""]))
            if draw(st.booleans()):
                header += b"; filename=" + quote_name(fname, draw)
            else:
                header += b"; filename*=UTF-8''" + "".join(f"%{c:02X}" for c in fname.encode()).encode()
        headers = [header]
        if draw(st.booleans()):
            headers.append(draw(st.sampled_from([b"Content-Type: audio/wav", b"content-type: text/plain; charset=utf-8",
                                                 b"X-Extra: 1", b"Content-Transfer-Encoding: 8bit"])))
        if draw(st.booleans()):
            headers.reverse()
        parts.append(b"\r\n".join(headers) + b"\r\n\r\n" + value)
        if name in WANTED:
            if is_file or name in seen_wanted or len(value) > MAX_VALUE:
                valid = False
            else:
                try:
                    intended[name] = value.decode("utf-8")
                except UnicodeDecodeError:
                    valid = False
            seen_wanted.add(name)
        if b"\r\n--" + boundary in b"\r\n" + value or value.startswith(b"--" + boundary):
            valid = False  # the delimiter inside a part (or right after the blank line)
    delim = b"--" + boundary
    preamble = draw(st.sampled_from([b"", b"", b"\r\n", b"preamble\r\n"]))
    if preamble == b"preamble\r\n":
        valid = False  # refused: python-multipart, vLLM's parser, does not take a preamble
    body = preamble + delim + b"\r\n"
    body += (b"\r\n" + delim + b"\r\n").join(parts) + b"\r\n" + delim + b"--"
    if not parts:
        body = delim + b"--"
        valid = False
    body += draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue", b"\r\n\r\n--" + boundary + b"--"]))
    touched = False
    if hostile:
        if draw(st.floats(0, 1)) < hostile:
            cut = draw(st.integers(0, len(body)))
            touched = touched or cut != len(body)
            body = body[:cut]
        if draw(st.floats(0, 1)) < hostile:
            body = body.replace(b"\r\n", b"\n")
            touched = True
        new = draw(mutated(body, hostile))
        touched = touched or new != body
        body = new
    return boundary, body, intended, valid and not touched


def werkzeug_parse(body: bytes, boundary: bytes):
    parser = werkzeug_formparser.MultiPartParser()
    return parser.parse(io.BytesIO(body), boundary, len(body))


@given(bodies())
@fuzz_settings(400)
def test_multipart_scanner(case) -> None:
    boundary, body, intended, valid = case
    try:
        form = parse_form(body, boundary, WANTED)
    except ApiError as err:
        assert err.status == 400 and err.code == "invalid_multipart", err
        assert not valid, (err.message, body)
        event("refused")
        return
    event("accepted")
    if valid:
        assert form.fields == intended
    if re.search(rb"(?:(?<!\r)\n|\r(?!\n))--" + re.escape(boundary), body):
        # werkzeug also splits on a bare-LF or bare-CR delimiter, where RFC 2046 and python-multipart
        # (vLLM's parser) see content: no oracle for this one.
        event("bare line end before a delimiter")
        return
    try:
        wform, wfiles = werkzeug_parse(body, boundary)
    except ValueError as err:  # werkzeug refuses it: we must not have accepted something it cannot read
        raise AssertionError(f"accepted, werkzeug refuses: {err}: {body!r}") from None
    for name in WANTED:
        ours = form.fields.get(name)
        theirs = wform.getlist(name)
        assert (theirs == [ours]) if ours is not None else (theirs == [] and name not in wfiles), (name, body)
    for name in form.files:
        assert name in wfiles, (name, body)
    # form_fields on top: the file part required, param "file".
    try:
        form_fields(body, boundary, WANTED)
    except ApiError as err:
        assert err.status == 400 and err.param == "file" and "file" not in form.files
