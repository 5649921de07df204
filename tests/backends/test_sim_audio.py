"""The simulated vLLM's speech-to-text endpoints through real sockets: the openai SDK uploading a tiny
generated WAV, raw multipart bodies for the strict parser (every malformed body is vLLM's 400, never a
crash), the JSON/verbose/stream shapes of vLLM's speech_to_text serving, and the books.

Every test binds 127.0.0.1 port 0, runs under `trio.fail_after`, and stops the server it started.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from backends.sim.audio import duration_of, parse_form
from backends.sim.responses import SimError
from tests.support.sim_client import off_loop as call
from tests.support.sim_client import openai_client as sdk
from tests.support.sim_client import running, wav

PARSE_ERROR = {"error": {"message": "There was an error parsing the body", "type": "Bad Request", "param": None,
                         "code": 400}}





def multipart(*parts: bytes, boundary: bytes = b"XyZ") -> tuple[bytes, dict[str, str]]:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def field(name: str, value: bytes, filename: str | None = None) -> bytes:
    extra = f'; filename="{filename}"' if filename else ""
    return f'Content-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + value


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK deprecates audio.translations
async def test_sdk_transcription_and_translation_of_a_wav() -> None:
    with trio.fail_after(15):
        async with running() as (server, port, c):
            audio = wav(2.0)
            assert duration_of(audio) == 2.0
            t = await call(lambda: sdk(port).audio.transcriptions.create(model="sim-chat", file=("a.wav", audio)))
            assert len(t.text.split()) == 5  # ceil(2.5 words a second * 2 s)
            r = await c.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)},
                             data={"model": "sim-chat", "prompt": "Names: Ada."})
            assert r.status_code == 200 and r.json() == {"text": t.text, "usage": {"type": "duration", "seconds": 2}}
            tr = await call(lambda: sdk(port).audio.translations.create(model="sim-chat", file=("a.wav", audio)))
            assert tr.text == t.text
            r = await c.post("/v1/audio/translations", files={"file": ("a.wav", audio)})
            assert r.json() == {"text": t.text}  # no usage for translations, as vLLM
            # response_format text is answered as JSON too (vLLM's JSONResponse)
            r = await c.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)},
                             data={"response_format": "text"})
            assert r.headers["content-type"] == "application/json" and r.json()["text"] == t.text
            r = await c.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)},
                             data={"response_format": "verbose_json", "language": "de", "temperature": "0.2"})
            verbose = r.json()
            assert list(verbose) == ["duration", "language", "text", "segments", "words"]
            assert verbose["duration"] == "2.0" and verbose["language"] == "de" and verbose["words"] is None
            assert list(verbose["segments"][0]) == ["id", "avg_logprob", "compression_ratio", "end", "no_speech_prob",
                                                   "seek", "start", "temperature", "text", "tokens"]
            assert verbose["segments"][0]["temperature"] == 0.2 and verbose["segments"][0]["end"] == 2.0
            stats = server.statistics()
            assert stats.finished_stop == 6 and stats.generation_tokens_total == 6 * 5
            assert stats.prompt_tokens_total == 6 * 4 + 3  # the task prompt, plus ceil(11/4) for the prompt


async def test_stream_chunks_usage_and_done() -> None:
    with trio.fail_after(15):
        async with running() as (server, _port, c):
            r = await c.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav(1.0))},
                             data={"stream": "true", "stream_include_usage": "true",
                                   "stream_continuous_usage_stats": "true"}, headers={"x-request-id": "rid"})
            assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
            frames = r.text.split("\n\n")[:-1]
            assert frames[-1] == "data: [DONE]"
            chunks = [json.loads(f[6:]) for f in frames[:-1]]
            assert len(chunks) == 3 + 1  # ceil(2.5) words, then the usage chunk
            first = chunks[0]
            assert list(first) == ["id", "object", "created", "model", "choices", "usage"]
            assert first["id"] == "transcribe-rid" and first["object"] == "transcription.chunk"
            assert first["model"] is None  # the request named no model: vLLM echoes request.model
            assert first["choices"] == [{"delta": {"content": first["choices"][0]["delta"]["content"]}}]
            assert chunks[2]["choices"][0]["finish_reason"] == "stop" and chunks[2]["choices"][0]["stop_reason"] is None
            assert chunks[1]["usage"] == {"prompt_tokens": 4, "total_tokens": 6, "completion_tokens": 2}
            assert "model" not in chunks[-1]  # exclude_none drops the null model of the usage chunk
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
            r = await c.post("/v1/audio/translations", files={"file": ("a.wav", wav(0.4))},
                             data={"stream": "true", "model": "sim-chat"})
            chunk = json.loads(r.text.split("\n\n")[0][6:])
            assert chunk["object"] == "translation.chunk" and chunk["id"].startswith("translate-")
            assert chunk["model"] == "sim-chat" and "usage" not in chunk
            assert server.statistics().generation_tokens_total == 3 + 1


@pytest.mark.parametrize("body, headers", [
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc",
     {"content-type": "multipart/form-data; boundary=XyZ"}),  # no closing delimiter
    (b"nonsense", {"content-type": "multipart/form-data; boundary=XyZ"}),
    (b"--XyZ\r\nX-Other: 1\r\n\r\nabc\r\n--XyZ--\r\n", {"content-type": "multipart/form-data; boundary=XyZ"}),
    (b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--XyZ--\r\n",
     {"content-type": "multipart/form-data; boundary=XyZ"}),  # no name
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\nabc\r\n--XyZ--\r\n",
     {"content-type": "multipart/form-data; boundary=XyZ"}),  # no blank line after the headers
    (b"--XyZ--\r\n", {"content-type": "multipart/form-data"}),  # no boundary parameter
    (b"--XyZ\r\nbroken header line\r\n\r\nv\r\n--XyZ--\r\n", {"content-type": "multipart/form-data; boundary=XyZ"}),
])
async def test_malformed_multipart_is_a_400(body: bytes, headers: dict[str, str]) -> None:
    with trio.fail_after(15):
        async with running() as (server, _port, c):
            r = await c.post("/v1/audio/transcriptions", content=body, headers=headers)
            assert r.status_code == 400 and r.json() == PARSE_ERROR
            assert (await c.get("/health")).status_code == 200 and server.statistics().errors_total == 1


async def test_field_and_audio_errors() -> None:
    with trio.fail_after(30):
        async with running(max_model_len=64) as (_server, _port, c):
            async def post(*parts: bytes) -> httpx.Response:
                body, headers = multipart(*parts)
                return await c.post("/v1/audio/transcriptions", content=body, headers=headers)
            audio = field("file", wav(1.0), "a.wav")
            r = await c.post("/v1/audio/transcriptions", json={"model": "sim-chat"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "Bad Request"
            assert "Field required" in r.json()["error"]["message"]
            r = await post(field("file", b"not a file"))
            assert r.status_code == 422 and r.json()["error"]["message"] == \
                "Expected 'file' to be a file-like object, not 'str'."
            r = await post(audio, field("response_format", b"srt"))
            assert r.status_code == 400 and r.json()["error"]["message"] == \
                "Currently only support response_format: `text`, `json` or `verbose_json`"
            r = await post(audio, field("response_format", b"xml"))
            assert r.status_code == 400 and r.json()["error"]["type"] == "Bad Request"
            r = await post(audio, field("response_format", b"verbose_json"), field("stream", b"true"))
            assert r.json()["error"]["message"] == "verbose_json format doesn't support streaming case"
            r = await post(audio, field("stream_include_usage", b"true"))
            assert "Stream options can only be defined when `stream=True`." in r.json()["error"]["message"]
            r = await post(audio, field("temperature", b"warm"))
            assert r.status_code == 400 and "valid number" in r.json()["error"]["message"]
            r = await post(audio, field("model", b"nope"))
            assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
            for bad in (b"", b"RIFF\x00\x00\x00\x00WAVEjunk", b"RIFF\x10\x00\x00\x00AVI "):
                r = await post(field("file", bad, "a.wav"))
                assert r.status_code == 400 and r.json()["error"] == {
                    "message": "Invalid or unsupported audio file.", "type": "BadRequestError", "param": None,
                    "code": 400}
            r = await post(field("file", b"\0" * (26 * 1024 * 1024), "big.mp3"))
            assert r.status_code == 400 and r.json()["error"]["param"] == "audio_filesize_mb"
            assert r.json()["error"]["message"].startswith("Maximum file size exceeded (parameter=audio_filesize_mb")
            r = await post(field("file", wav(10.0), "a.wav"), field("max_completion_tokens", b"3"))
            assert r.status_code == 200 and len(r.json()["text"].split()) == 3


def test_parse_form_fields() -> None:
    body, headers = multipart(field("model", b"m"), field("file", b"\r\n--Xy\r\n", "a.bin"))
    form = parse_form(headers["content-type"].encode(), body)
    assert form == {"model": (None, b"m"), "file": ("a.bin", b"\r\n--Xy\r\n")}
    assert parse_form(b"application/json", b"{}") == {}
    with pytest.raises(SimError):
        parse_form(b"multipart/form-data; boundary=XyZ", body.replace(b"--XyZ--", b"--XyZ"))
