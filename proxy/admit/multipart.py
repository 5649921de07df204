"""A strict, bounded multipart/form-data scanner for the audio routes (RFC 7578 on RFC 2046).

Strategy: the body is complete in memory (read under the audio limit, 25 MiB) and goes upstream as it
came, so this module only reads it, never copies the file part: the delimiters are found with
``bytes.find`` on ``CRLF--boundary`` (C speed, one pass over the body), each part's header block (at
most `MAX_HEADERS` bytes) is split and checked, and only the values of the wanted text fields (at most
`MAX_VALUE` bytes each) are sliced out and decoded. The whole structure is verified even though only
``model`` and ``stream`` are read, so vLLM's parser (Starlette on python-multipart) never sees a body
whose fields could be read two ways: anything malformed is an `ApiError` 400 (code
``invalid_multipart``) naming what is wrong, never another exception.

The grammar held to (RFC 2046 5.1.1, RFC 7578):

* ``boundary_of``: the media type is ``multipart/form-data``; its ``boundary`` parameter (a token or a
  quoted string, once) is 1-70 ``bchars``, the last not a space.
* The body: ``--boundary`` CRLF at its start (blank lines before it tolerated, as python-multipart skips
  them; any other preamble, which RFC 2046 allows, is refused: python-multipart refuses it, and werkzeug
  finds a delimiter in the middle of a preamble line); each part is a header block ending in an empty line, then its content, then CRLF
  ``--boundary``; the last delimiter is ``--boundary--``, then the end of the body or CRLF and an
  epilogue (ignored). A delimiter line followed by anything but CRLF or ``--`` (transport padding
  included, which python-multipart refuses too) is refused: RFC 2046 forbids the delimiter inside a part,
  and python-multipart would read such bytes as content where this scanner would not.
* Line ends are CRLF only. Bare LF is refused, not tolerated: python-multipart does not split on it
  either (a bare-LF delimiter is content to it), so tolerating it here would read fields it does not.
* Header fields: ``name: value``, names tokens and case-insensitive, no obs-fold, no control bytes but
  HTAB; every part has exactly one ``Content-Disposition: form-data; name=...`` (parameters tokens or
  quoted strings with backslash escapes, as python-multipart unquotes them; ``filename*=`` (RFC 5987
  ``charset'lang'%XX``) accepted as a filename too; a parameter twice is refused). At most `MAX_PARTS`
  parts.
* A wanted field is a text part (no filename), present once, UTF-8, at most `MAX_VALUE` bytes, with no
  ``Content-Transfer-Encoding`` other than 7bit / 8bit / binary (python-multipart decodes base64 and
  quoted-printable: the gateway would read another value than vLLM).

Measured (CPython 3.11 on the 2-core development machine, best of 10): a 25 MiB httpx-encoded
transcription body (file, model, stream, response_format) scans in about 5 ms, random audio bytes or
a file dense with CRLF and dashes alike, nearly all of it the one delimiter search; nothing of the
file is copied (the tests hold a 10 MB file part to under 100 KB allocated). The headers are walked
with regexes, never a Python step per byte: the worst case the bounds allow, 64 parts each with an
8 KiB Content-Disposition full of backslash escapes, takes about 30 ms (8 ms for plain 8 KiB headers).
"""

from __future__ import annotations

import re

from proxy import errors

MAX_BOUNDARY = 70
MAX_PARTS = 64
MAX_HEADERS = 8192  # one part's header block
MAX_VALUE = 4096  # one wanted text field's value
CODE = "invalid_multipart"

_DIGITS_ALPHA = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BCHARS = frozenset(_DIGITS_ALPHA + b"'()+_,-./:=? ")
_OWS = b" \t"
_IDENTITY = (b"7bit", b"8bit", b"binary")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# One parameter: OWS ; OWS name = (quoted-string | token); a quoted string's backslash escapes any byte.
_PARAM = re.compile(rb"[ \t]*;[ \t]*(" + _TOKEN + rb')=(?:"([^"\\]*(?:\\.[^"\\]*)*)"|(' + _TOKEN + rb"))",
                    re.DOTALL)
_NAME_EQ = re.compile(rb"(" + _TOKEN + rb")=")
_OWS_RUN = re.compile(rb"[ \t]*")
_UNESCAPE = re.compile(rb"\\(.)", re.DOTALL)
_HEADER_NAME = re.compile(_TOKEN)
_CTL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = frozenset(b"0123456789ABCDEFabcdef")


class Form:
    """What `parse_form` found: the wanted text fields, every file part's name and filename."""

    __slots__ = ("fields", "files", "parts")

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.files: dict[str, str] = {}  # part name -> filename (the first part of that name)
        self.parts = 0


def _bad(what: str, param: str | None = None) -> errors.ApiError:
    return errors.invalid_request(f"Invalid multipart/form-data body: {what}.", param, CODE)


# -- header parameters (Content-Type's boundary, Content-Disposition's name and filename) --------------

def _params(value: bytes, i: int, where: str) -> dict[bytes, bytes | tuple[bytes]]:
    """``; name=value`` parameters from value[i:]: lowercased name -> the value (a quoted string
    unquoted), or a 1-tuple holding a token value. Refuses bad syntax and a parameter given twice.
    Regexes do the walking (C speed: a header block is at most `MAX_HEADERS` bytes, but 64 of them)."""
    out: dict[bytes, bytes | tuple[bytes]] = {}
    n = len(value)
    while True:
        m = _PARAM.match(value, i)
        if m is None:
            i = _OWS_RUN.match(value, i).end()
            if i == n:
                return out
            if value[i] != 59:  # ';'
                raise _bad(f"unexpected {chr(value[i])!r} in the {where} header")
            i = _OWS_RUN.match(value, i + 1).end()
            if i == n:
                return out  # a trailing ';' (seen from real clients; harmless)
            eq = _NAME_EQ.match(value, i)
            if eq is None:
                raise _bad(f"a parameter of the {where} header is not name=value")
            if value.startswith(b'"', eq.end()):
                raise _bad(f"an unterminated quoted string in the {where} header")
            shown = eq.group(1).lower().decode("latin-1")
            raise _bad(f"the {where} parameter {shown!r} has no value")
        name = m.group(1).lower()
        quoted = m.group(2)
        got: bytes | tuple[bytes] = _unquote(quoted) if quoted is not None else (m.group(3),)
        if name in out:
            raise _bad(f"the {where} parameter {name.decode('latin-1')!r} is given twice")
        out[name] = got
        i = m.end()


def _unquote(q: bytes) -> bytes:
    """A quoted string's content with its backslash escapes undone (each backslash takes the next byte
    as itself), without a Python step per escape: backslash pairs become NUL (never in a header value,
    whose controls are refused), lone backslashes go, NUL becomes a backslash again."""
    if b"\\" not in q:
        return q
    if b"\x00" in q:
        return _UNESCAPE.sub(lambda m: m.group(1), q)
    return q.replace(b"\\\\", b"\x00").replace(b"\\", b"").replace(b"\x00", b"\\")


def _plain(v: bytes | tuple[bytes]) -> bytes:
    return v[0] if isinstance(v, tuple) else v


def boundary_of(content_type: bytes | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type value; `ApiError` 400 when the media type
    is another, or the boundary is missing or invalid (RFC 2046: 1-70 bchars, no trailing space)."""
    value = content_type or b""
    semi = value.find(b";")
    mime = (value if semi < 0 else value[:semi]).strip(_OWS).lower()
    if mime != b"multipart/form-data":
        raise _bad("the Content-Type is not multipart/form-data")
    if semi < 0:
        raise _bad("the Content-Type has no boundary parameter")
    params = _params(value, semi, "Content-Type")
    got = params.get(b"boundary")
    if got is None:
        raise _bad("the Content-Type has no boundary parameter")
    boundary = _plain(got)
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise _bad(f"the boundary must be 1 to {MAX_BOUNDARY} characters")
    if any(c not in _BCHARS for c in boundary) or boundary.endswith(b" "):
        raise _bad("the boundary holds a character RFC 2046 does not allow")
    return boundary


# -- the body -----------------------------------------------------------------------------------------

def _ext_value(v: bytes) -> str:
    """RFC 5987 ``charset'language'pct-encoded`` (``filename*``)."""
    charset, q1, rest = v.partition(b"'")
    _lang, q2, encoded = rest.partition(b"'")
    cs = charset.lower()
    if not q1 or not q2 or cs not in (b"utf-8", b"iso-8859-1"):
        raise _bad("filename* is not charset'language'value with UTF-8 or ISO-8859-1")
    out = bytearray()
    i = 0
    n = len(encoded)
    while i < n:
        c = encoded[i]
        if c == 37:  # '%'
            if i + 2 >= n or encoded[i + 1] not in _HEX or encoded[i + 2] not in _HEX:
                raise _bad("filename* has a bad percent escape")
            out.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(c)
        i += 1
    try:
        return bytes(out).decode("utf-8" if cs == b"utf-8" else "latin-1")
    except UnicodeDecodeError:
        raise _bad("filename* is not valid UTF-8") from None


def _headers(block: bytes, index: int) -> tuple[bytes, dict, bytes | None]:
    """(the part's name, its Content-Disposition parameters, its Content-Transfer-Encoding)."""
    disposition = None
    cte = None
    for line in block.split(b"\r\n"):
        if not line:
            raise _bad(f"part {index} has an empty header line")
        if line[0] in _OWS:
            raise _bad(f"part {index} has a folded header line")
        if b"\n" in line or b"\r" in line:
            raise _bad(f"part {index}'s headers have a bare LF or CR (line ends must be CRLF)")
        name, colon, value = line.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            raise _bad(f"part {index} has a malformed header line")
        if _CTL_RE.search(value) is not None:
            raise _bad(f"part {index} has a control character in a header")
        lname = name.lower()
        value = value.strip(_OWS)
        if lname == b"content-disposition":
            if disposition is not None:
                raise _bad(f"part {index} has two Content-Disposition headers")
            disposition = value
        elif lname == b"content-transfer-encoding":
            cte = value.lower()
    if disposition is None:
        raise _bad(f"part {index} has no Content-Disposition header")
    semi = disposition.find(b";")
    kind = (disposition if semi < 0 else disposition[:semi]).strip(_OWS).lower()
    if kind != b"form-data":
        raise _bad(f"part {index}'s Content-Disposition is not form-data")
    params = _params(disposition, semi, "Content-Disposition") if semi >= 0 else {}
    got = params.get(b"name")
    if got is None:
        raise _bad(f"part {index} has no name")
    return _plain(got), params, cte


def parse_form(body: bytes, boundary: bytes, wanted: frozenset[str]) -> Form:
    """Verify the whole body's structure and read the `wanted` text fields (see the module docstring).
    `ApiError` 400 on anything malformed."""
    delim = b"--" + boundary
    line = b"\r\n" + delim
    dl = len(delim)
    wanted_b = {w.encode(): w for w in wanted}
    form = Form()
    if body.startswith(delim):
        pos = 0
    else:
        k = body.find(line)
        if k < 0:
            if body.find(b"\n" + delim) >= 0:
                raise _bad("line ends must be CRLF")
            raise _bad("the boundary never appears in the body")
        if body[:k].strip(b"\r\n"):
            raise _bad("it has data before the first boundary (a preamble)")
        pos = k + 2  # body[:k] is blank lines
    n = len(body)
    while True:
        j = pos + dl  # body[pos:j] == delim
        if body.startswith(b"--", j):
            if not form.parts:
                raise _bad("it has no parts")
            j += 2
            if j != n and not body.startswith(b"\r\n", j):
                raise _bad("data follows the closing delimiter on its line")
            return form
        if not body.startswith(b"\r\n", j):
            if j >= n or (j + 1 == n and body[j] == 13):
                raise _bad("it ends without the closing delimiter")
            if body[j] == 10:
                raise _bad("line ends must be CRLF")
            raise _bad("a delimiter line holds more than the boundary")
        form.parts += 1
        index = form.parts
        if index > MAX_PARTS:
            raise _bad(f"it has more than {MAX_PARTS} parts")
        hstart = j + 2
        if body.startswith(b"\r\n", hstart):
            raise _bad(f"part {index} has no headers")
        hend = body.find(b"\r\n\r\n", hstart, hstart + MAX_HEADERS + 4)
        if hend < 0:
            if n - hstart > MAX_HEADERS:
                raise _bad(f"part {index}'s headers exceed {MAX_HEADERS} bytes")
            raise _bad("it ends inside a part's headers")
        name, params, cte = _headers(body[hstart:hend], index)
        cstart = hend + 4
        # From the blank line's own CRLF: a delimiter sharing it (``\r\n\r\n--boundary``, a part with
        # no body in RFC 2046's grammar) is refused, python-multipart reads that line as content.
        nxt = body.find(line, cstart - 2)
        if nxt < 0:
            raise _bad("it ends without the closing delimiter")
        if nxt < cstart:
            raise _bad(f"part {index}'s header block runs into the next delimiter")
        filename = params.get(b"filename")
        extended = params.get(b"filename*")
        key = wanted_b.get(name)
        if filename is not None or extended is not None:
            if key is not None:
                raise _bad(f"'{key}' must be a text field, not a file", key)
            shown = _ext_value(_plain(extended)) if extended is not None else \
                _plain(filename).decode("utf-8", "replace")
            form.files.setdefault(name.decode("utf-8", "replace"), shown)
        elif key is not None:
            if key in form.fields:
                raise _bad(f"'{key}' is given twice", key)
            if cte is not None and cte not in _IDENTITY:
                raise _bad(f"'{key}' has a Content-Transfer-Encoding other than 7bit, 8bit or binary", key)
            if nxt - cstart > MAX_VALUE:
                raise _bad(f"'{key}' is longer than {MAX_VALUE} bytes", key)
            try:
                form.fields[key] = body[cstart:nxt].decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(f"'{key}' is not valid UTF-8", key) from None
        pos = nxt + 2


def form_fields(body: bytes, boundary: bytes, wanted: frozenset[str], *,
                file_field: str | None = "file") -> dict[str, str]:
    """The `wanted` text fields of a verified multipart body (absent ones absent). With `file_field`
    (the default, ``file``), a file part of that name (with a filename) is required: 400 param
    ``file`` otherwise."""
    form = parse_form(body, boundary, wanted)
    if file_field is not None:
        require_file(form, file_field)
    return form.fields


def require_file(form: Form, name: str = "file") -> str:
    """The filename of the file part `name`; `ApiError` 400 (param `name`) when there is none."""
    found = form.files.get(name)
    if found is None:
        raise errors.invalid_request(f"Missing required parameter: '{name}' (a file part with a filename).",
                                     name, CODE)
    return found
