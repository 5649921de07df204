"""multipart.py against bodies real clients produce (httpx's encoder, the openai SDK's transcription
request) and against every way to break them: each failure an ApiError 400 naming the problem."""

from __future__ import annotations

import json
import tracemalloc

import httpx
import pytest

from proxy.admit.multipart import (
    MAX_HEADERS,
    MAX_PARTS,
    MAX_VALUE,
    boundary_of,
    form_fields,
    parse_form,
    require_file,
)
from proxy.errors import ApiError

WANTED = frozenset({"model", "stream"})
AUDIO = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 8 + b"\r\n--\r\n-- not a delimiter"


def encoded(files=None, data=None) -> tuple[bytes, bytes]:
    """(Content-Type, body) as httpx's multipart encoder sends them."""
    req = httpx.Request("POST", "http://gw/v1/audio/transcriptions", files=files, data=data)
    return req.headers["content-type"].encode(), req.read()


def bad(fn, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kw)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    return err


def fields_of(content_type: bytes, body: bytes) -> dict[str, str]:
    return form_fields(body, boundary_of(content_type), WANTED)


# -- boundary_of ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "want"), [
    (b"multipart/form-data; boundary=abc", b"abc"),
    (b'multipart/form-data; boundary="abc def"', b"abc def"),
    (b'Multipart/Form-Data;BOUNDARY="a\\"b"', None),  # a quote is no bchar
    (b"multipart/form-data; charset=utf-8; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW", b"----WebKitFormBoundary7MA4YWxkTrZu0gW"),
    (b"multipart/form-data; boundary=" + b"x" * 70, b"x" * 70),
    (b"multipart/form-data ; boundary=\"a'()+_,-./:=?\";", b"a'()+_,-./:=?"),  # tspecials need quotes
    (b"multipart/form-data; boundary=a'+_-.", b"a'+_-."),
])
def test_boundary_of(value: bytes, want: bytes | None) -> None:
    if want is None:
        assert "boundary" in bad(boundary_of, value).message
    else:
        assert boundary_of(value) == want


@pytest.mark.parametrize("value", [
    None, b"", b"multipart/form-data", b"multipart/form-data;", b"multipart/form-data; charset=utf-8",
    b"multipart/mixed; boundary=abc", b"application/json", b"multipart/form-data; boundary=",
    b'multipart/form-data; boundary=""', b"multipart/form-data; boundary=" + b"x" * 71,
    b'multipart/form-data; boundary="abc "', b"multipart/form-data; boundary=a@b",
    b'multipart/form-data; boundary="abc', b"multipart/form-data; boundary=a; boundary=b",
    b"multipart/form-data; boundary=a b", b"multipart/form-data; =a", b"multipart/form-data; boundary",
    b'multipart/form-data; boundary="\xff"',
])
def test_boundary_of_refuses(value) -> None:
    err = bad(boundary_of, value)
    assert err.code == "invalid_multipart"


# -- real clients ---------------------------------------------------------------------------------------

def test_an_httpx_encoded_transcription_request() -> None:
    ct, body = encoded(files={"file": ("speech é\".wav", AUDIO, "audio/wav")},
                       data={"model": "whisper-large-v3", "stream": "true", "response_format": "verbose_json",
                             "timestamp_granularities[]": ["word", "segment"], "temperature": "0.2"})
    form = parse_form(body, boundary_of(ct), WANTED)
    assert form.fields == {"model": "whisper-large-v3", "stream": "true"}
    assert form.files == {"file": "speech é%22.wav"}  # httpx percent-encodes the quote (HTML5)
    assert form.parts == 7
    assert require_file(form) == "speech é%22.wav"
    assert fields_of(ct, body) == {"model": "whisper-large-v3", "stream": "true"}


def test_the_openai_sdk_transcription_body() -> None:
    openai = pytest.importorskip("openai")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"text": "hello"})

    client = openai.OpenAI(api_key="sk-test", base_url="http://gw/v1",
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    out = client.audio.transcriptions.create(model="whisper-1", file=("clip.mp3", AUDIO), language="en",
                                             prompt="names: Zoë", temperature=0)
    assert out.text == "hello"
    req = seen[0]
    body = req.read()
    fields = form_fields(body, boundary_of(req.headers["content-type"].encode()),
                         frozenset({"model", "stream", "language", "prompt"}))
    assert fields == {"model": "whisper-1", "language": "en", "prompt": "names: Zoë"}


def test_a_browser_shaped_body_with_blank_lines_an_epilogue_and_odd_headers() -> None:
    b = b"----WebKitFormBoundaryx"
    body = (b"\r\n\r\n--" + b + b"\r\n"
            b'CONTENT-DISPOSITION: Form-Data; NAME="model"\r\ncontent-type: text/plain; charset=utf-8\r\n\r\n'
            b"m\xc3\xa9\r\n--" + b + b"\r\n"
            b'Content-Disposition: form-data; name="na\\"me"; filename*=UTF-8\'\'r%C3%A9sum%C3%A9.wav\r\n\r\n'
            b"\r\n--" + b + b"\r\n"  # an empty file
            b"Content-Disposition: form-data; name=file; filename=a.wav\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n" + AUDIO + b"\r\n--" + b + b"--\r\nepilogue\r\n--" + b + b"--")
    form = parse_form(body, b, WANTED)
    assert form.fields == {"model": "mé"}
    assert form.files == {'na"me': "résumé.wav", "file": "a.wav"}
    # The closing delimiter may end the body, or be followed by CRLF and anything.
    for end in (b"", b"\r\n", b"\r\n\r\n--x"):
        ct, body = encoded(files={"file": ("a", b"x")}, data={"model": "m"})
        assert fields_of(ct, body.rstrip(b"\r\n") + end) == {"model": "m"}


def test_the_file_part_is_required_and_never_copied() -> None:
    ct, body = encoded(files={"model": (None, b"m"), "stream": (None, b"false")})  # text parts only
    err = bad(fields_of, ct, body)
    assert err.param == "file"
    assert form_fields(body, boundary_of(ct), WANTED, file_field=None) == {"model": "m", "stream": "false"}
    ct, body = encoded(files={"file": (None, b"not a file")}, data={"model": "m"})  # a text part named file
    assert bad(fields_of, ct, body).param == "file"
    ct, body = encoded(files={"file": ("a.wav", b"\x00" * 10_000_000)}, data={"model": "m"})
    tracemalloc.start()
    try:
        assert fields_of(ct, body) == {"model": "m"}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, peak


# -- every way to break it --------------------------------------------------------------------------------

CT, BODY = encoded(files={"file": ("a.wav", AUDIO, "audio/wav")}, data={"model": "whisper-1", "stream": "true"})
BOUNDARY = boundary_of(CT)
FULL = {"model": "whisper-1", "stream": "true"}


def test_truncated_at_every_offset() -> None:
    ok = 0
    for k in range(len(BODY) + 1):
        try:
            got = form_fields(BODY[:k], BOUNDARY, WANTED)
        except ApiError as err:
            assert err.status == 400 and err.code == "invalid_multipart", k
            continue
        assert got == FULL, k
        ok += 1
    assert ok == 2  # the whole body, and the body without the CRLF after the closing delimiter


def test_bytes_inserted_or_removed_anywhere_are_an_api_error_or_the_same_fields() -> None:
    for k in range(0, len(BODY), 3):
        for body in (BODY[:k] + BODY[k + 1:], BODY[:k] + b"\n" + BODY[k:], BODY[:k] + b"\r\n--" + BOUNDARY + BODY[k:]):
            try:
                got = form_fields(body, BOUNDARY, WANTED)
            except ApiError as err:
                assert err.status == 400
                continue
            assert set(got) <= set(FULL)


def part(name: bytes, value: bytes, extra: bytes = b"") -> bytes:
    return b"--B\r\nContent-Disposition: form-data; name=" + name + extra + b"\r\n\r\n" + value + b"\r\n"


FILE = part(b'"file"', b"\x00\x01", b'; filename="a.wav"')
END = b"--B--\r\n"


@pytest.mark.parametrize(("body", "says"), [
    (b"", "boundary never appears"),
    (b"preamble\r\n" + FILE + END, "preamble"),
    (b"\x00" + FILE + END, "preamble"),  # --B mid-line is no delimiter: all of it up to the last one
    (b"--C\r\n" + FILE[3:], "boundary never appears"),
    (FILE, "without the closing delimiter"),
    (FILE + b"--B", "without the closing delimiter"),
    (FILE + b"--B\r", "without the closing delimiter"),
    (END, "no parts"),
    (FILE + b"--B-- \r\n", "follows the closing delimiter"),
    (FILE + b"--B--x", "follows the closing delimiter"),
    (FILE.replace(b"\r\n", b"\n") + b"--B--\n", "CRLF"),
    (FILE[:-2] + b"\n--B--\r\n", "without the closing delimiter"),
    (FILE + b"--B \r\n" + FILE[5:] + END, "more than the boundary"),
    (FILE + b"--BB\r\n" + FILE[5:] + END, "more than the boundary"),
    (FILE + b"--B\n" + FILE[5:] + END, "CRLF"),
    (b"--B\r\n\r\nvalue\r\n" + END, "no headers"),
    (b"--B\r\nContent-Type: text/plain\r\n\r\nv\r\n" + END, "no Content-Disposition"),
    (b"--B\r\nContent-Disposition: form-data; name=model\r\n\r\n--B--\r\n", "runs into the next delimiter"),
    (b"--B\r\nContent-Disposition: attachment; name=model\r\n\r\nv\r\n" + END, "not form-data"),
    (b"--B\r\nContent-Disposition: form-data\r\n\r\nv\r\n" + END, "has no name"),
    (b"--B\r\nContent-Disposition: form-data; filename=a\r\n\r\nv\r\n" + END, "has no name"),
    (b"--B\r\nContent-Disposition: form-data; name=a; name=b\r\n\r\nv\r\n" + END, "given twice"),
    (b'--B\r\nContent-Disposition: form-data; name="a\r\n\r\nv\r\n' + END, "unterminated quoted string"),
    (b"--B\r\nContent-Disposition: form-data; name=\r\n\r\nv\r\n" + END, "has no value"),
    (b"--B\r\nContent-Disposition: form-data; name=a b\r\n\r\nv\r\n" + END, "unexpected"),
    (b"--B\r\nContent-Disposition: form-data; name=a\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n"
     + END, "two Content-Disposition"),
    (b"--B\r\nContent-Disposition: form-data;\r\n name=a\r\n\r\nv\r\n" + END, "folded"),
    (b"--B\r\nContent-Disposition form-data; name=a\r\n\r\nv\r\n" + END, "malformed header line"),
    (b"--B\r\nBad Name: x\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n" + END, "malformed header line"),
    (b"--B\r\nX: a\x00b\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n" + END, "control character"),
    (b"--B\r\nX: a\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n" + END, "bare LF"),
    (b"--B\r\nX: " + b"x" * MAX_HEADERS + b"\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n" + END,
     "headers exceed"),
    (b"--B\r\nX: " + b"x" * 100, "inside a part's headers"),
    (FILE * (MAX_PARTS + 1) + END, f"more than {MAX_PARTS} parts"),
    (part(b"model", b"a") + part(b"model", b"b") + FILE + END, "'model' is given twice"),
    (part(b"model", b"a", b"; filename=m.txt") + FILE + END, "'model' must be a text field"),
    (part(b"model", b"x" * (MAX_VALUE + 1)) + FILE + END, "longer than"),
    (part(b"model", b"\xff\xfe") + FILE + END, "not valid UTF-8"),
    (b"--B\r\nContent-Disposition: form-data; name=model\r\nContent-Transfer-Encoding: base64\r\n\r\nbQ==\r\n"
     + FILE + END, "Content-Transfer-Encoding"),
    (part(b"file", b"x", b"; filename*=utf-8''%zz") + END, "percent escape"),
    (part(b"file", b"x", b"; filename*=utf-8''%c3") + END, "not valid UTF-8"),
    (part(b"file", b"x", b"; filename*=koi8-r''a") + END, "filename*"),
])
def test_malformed_bodies(body: bytes, says: str) -> None:
    err = bad(form_fields, body, b"B", WANTED)
    assert says in err.message, err.message
    assert err.code == "invalid_multipart"
    if "'model'" in says:
        assert err.param == "model"


def test_limits_are_exact() -> None:
    assert form_fields(FILE * MAX_PARTS + END, b"B", WANTED) == {}
    assert form_fields(part(b"model", b"x" * MAX_VALUE) + FILE + END, b"B", WANTED) == {"model": "x" * MAX_VALUE}
    pad = MAX_HEADERS - len(b"Content-Disposition: form-data; name=a\r\nX: ")
    body = b"--B\r\nContent-Disposition: form-data; name=a\r\nX: " + b"x" * pad + b"\r\n\r\nv\r\n" + FILE + END
    assert form_fields(body, b"B", WANTED) == {}
    body = body.replace(b"X: x", b"X: xx", 1)
    assert "headers exceed" in bad(form_fields, body, b"B", WANTED).message


def test_the_error_envelope() -> None:
    err = bad(form_fields, b"junk", b"B", WANTED)
    envelope = json.loads(err.body())["error"]
    assert envelope["code"] == "invalid_multipart" and envelope["type"] == "invalid_request_error"
    assert "multipart/form-data" in envelope["message"]
