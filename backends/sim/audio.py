"""Speech to text for the simulated vLLM: POST /v1/audio/transcriptions and /v1/audio/translations.

Strategy: parse multipart/form-data strictly (`parse_form`: boundary from the content type, CRLF
framing, a Content-Disposition name per part, the closing delimiter; anything else is vLLM's 400 for
an unparsable body, never a crash), validate the fields as vLLM's `TranscriptionRequest` /
`TranslationRequest` do, measure the audio (a RIFF/WAVE file by its `fmt `/`data` chunks; any other
bytes as compressed audio at 16,000 bytes a second) and plan a deterministic transcript of
ceil(2.5 words per second) synthetic words, one token each, cut at `max_completion_tokens` (else
max_model_len, vLLM's default for speech). The plan has the generation surface the server drives,
so pacing, disconnects, faults and the books are those of chat. Prompt tokens: 4 (the decoder's task
prompt) + ceil(len(prompt)/4).

Shapes, from vLLM's `vllm/entrypoints/openai/speech_to_text/` (speech_to_text.py @024e0772,
protocol.py @0cca7f62, api_router.py @029329a8):
- json and text both answer JSON (`JSONResponse(model_dump())`): transcription {"text", "usage":
  {"type": "duration", "seconds": ceil(duration)}}, translation {"text"} (no usage); verbose_json
  {"duration": str(seconds), "language", "text", "segments": [...], "words": null};
- srt/vtt -> 400 "Currently only support response_format: `text`, `json` or `verbose_json`";
  verbose_json with stream -> 400; files over 25 MB (VLLM_MAX_AUDIO_CLIP_FILESIZE_MB) -> 400
  "Maximum file size exceeded (parameter=audio_filesize_mb, value=...)"; unreadable audio -> 400
  "Invalid or unsupported audio file."; a `file` field that is not a file -> 422;
- a stream is `data: ` + `model_dump_json(exclude_unset=True)` per token: {"id": "transcribe-<hex>"
  (or "translate-"), "object": "transcription.chunk" (or "translation.chunk"), "created", "model"
  (the request's model, null when none was named), "choices": [{"delta": {"content"}}]} with
  "finish_reason"/"stop_reason" on the last; "usage" {prompt_tokens, total_tokens,
  completion_tokens} per chunk with stream_continuous_usage_stats, a final usage chunk with
  stream_include_usage; then `data: [DONE]`.
"""

from __future__ import annotations

import math
import struct
import time
import uuid
import zlib
from typing import Any

import msgspec

from backends.sim.planning import Planner, text_tokens
from backends.sim.responses import (
    GENERATION_ERROR_BODY,
    INBAND_ERROR,
    Choice,
    OneChoice,
    SimError,
    bad_request,
    error,
    invalid_body,
)

MAX_AUDIO_MB = 25  # VLLM_MAX_AUDIO_CLIP_FILESIZE_MB
WORDS_PER_S = 2.5
COMPRESSED_BYTES_PER_S = 16_000  # any non-WAV file: 128 kbit/s
_enc = msgspec.json.Encoder()
_DONE = b"data: [DONE]\n\n"
FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def unparsable() -> SimError:
    """FastAPI's HTTPException for a body it cannot parse, through vLLM's HTTPException handler."""
    return error(400, "There was an error parsing the body", "Bad Request")


def parse_form(content_type: bytes, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {name: (filename or None, value)}; SimError(400) for malformed input.
    Another content type gives an empty form (Starlette's), so required fields are then missing."""
    content_type, body = bytes(content_type), bytes(body)  # h11 may hand over bytearrays
    media, _, params = content_type.partition(b";")
    if media.strip().lower() != b"multipart/form-data":
        return {}
    boundary = b""
    for param in params.split(b";"):
        key, _, value = param.strip().partition(b"=")
        if key.strip().lower() == b"boundary":
            boundary = value.strip().strip(b'"')
    if not boundary or len(boundary) > 200:
        raise unparsable()
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        raise unparsable()
    fields: dict[str, tuple[str | None, bytes]] = {}
    pos = len(delimiter)
    while True:
        if body.startswith(b"--", pos):  # the closing delimiter
            return fields
        if not body.startswith(b"\r\n", pos):
            raise unparsable()
        head_end = body.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            raise unparsable()
        name, filename = _disposition(body[pos + 2:head_end])
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            raise unparsable()
        fields[name] = (filename, body[head_end + 4:end])
        pos = end + 2 + len(delimiter)


def _disposition(head: bytes) -> tuple[str, str | None]:
    for line in head.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if not sep:
            raise unparsable()
        if key.strip().lower() != b"content-disposition":
            continue
        kind, *params = value.split(b";")
        if kind.strip().lower() != b"form-data":
            raise unparsable()
        found: dict[bytes, str] = {}
        for p in params:
            k, _, v = p.strip().partition(b"=")
            found[k.lower()] = v.strip().strip(b'"').decode("utf-8", "replace")
        if not found.get(b"name"):
            raise unparsable()
        return found[b"name"], found.get(b"filename")
    raise unparsable()


def duration_of(data: bytes) -> float:
    """Seconds of audio: a WAV's data chunk over its byte rate; other bytes as compressed audio."""
    if not data:
        raise bad_request("Invalid or unsupported audio file.")
    if not data.startswith(b"RIFF"):
        return len(data) / COMPRESSED_BYTES_PER_S
    if len(data) < 12 or data[8:12] != b"WAVE":
        raise bad_request("Invalid or unsupported audio file.")
    pos, rate, size = 12, 0, None
    while pos + 8 <= len(data):
        chunk, length = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"fmt " and length >= 16 and pos + 24 <= len(data):
            rate = struct.unpack_from("<I", data, pos + 16)[0]  # byte rate
        elif chunk == b"data":
            size = min(length, len(data) - pos - 8)
            break
        pos += 8 + length + (length & 1)
    if rate <= 0 or size is None:
        raise bad_request("Invalid or unsupported audio file.")
    return size / rate


def _bool(name: str, raw: bytes | None, default: bool) -> bool:
    if raw is None:
        return default
    value = raw.decode("utf-8", "replace").strip().lower()
    if value in ("true", "1", "yes", "on", "t", "y"):
        return True
    if value in ("false", "0", "no", "off", "f", "n"):
        return False
    raise invalid_body("Input should be a valid boolean, unable to interpret input", ("body", name), "bool_parsing")


def _number(name: str, raw: bytes | None, kind: type) -> Any:
    if raw is None:
        return None
    try:
        return kind(raw.decode("utf-8", "replace").strip())
    except ValueError:
        what = "integer, unable to parse string as an integer" if kind is int else \
            "number, unable to parse string as a number"
        raise invalid_body(f"Input should be a valid {what}", ("body", name),
                           "int_parsing" if kind is int else "float_parsing") from None


class AudioPlan(OneChoice):
    """A transcription or translation and its transcript (the generation surface of `Plan`)."""

    overhead = 0

    def __init__(self, task: str, model: str, named: str | None, prompt: int, choice: Choice, seconds: float,
                 fmt: str, language: str, temperature: float, stream: bool, include_usage: bool,
                 continuous: bool, rid: str) -> None:
        self.task = task  # "transcribe" | "translate"
        self.model = model
        self.named = named  # the request's model field (what a stream chunk reports)
        self.prompt_tokens = prompt
        self.choice = choice
        self.seconds = seconds
        self.format = fmt
        self.language = language
        self.temperature = temperature
        self.stream = stream
        self.include_usage = include_usage
        self.continuous = continuous
        self.rid = rid
        self.created = int(time.time())

    def streamed_tokens(self, events: int) -> int:
        return max(0, min(self.completion_tokens, events)) if self.stream else 0

    def inband_error(self) -> bytes | None:
        return INBAND_ERROR

    def error_body(self) -> tuple[int, bytes]:
        return 500, GENERATION_ERROR_BODY

    def body(self) -> bytes:
        text = self.choice.text()
        if self.format == "verbose_json":
            raw = text.encode()
            segment = {"id": 0, "avg_logprob": -0.25, "compression_ratio": len(raw) / len(zlib.compress(raw)),
                       "end": self.seconds, "no_speech_prob": None, "seek": 0, "start": 0.0,
                       "temperature": self.temperature, "text": text,
                       "tokens": [(7919 * i + 50365) % 51865 for i in range(self.choice.tokens)]}
            return _enc.encode({"duration": str(self.seconds), "language": self.language, "text": text,
                                "segments": [segment] if text else [], "words": None})
        if self.task == "translate":
            return _enc.encode({"text": text})
        return _enc.encode({"text": text, "usage": {"type": "duration", "seconds": math.ceil(self.seconds)}})

    def events(self):
        obj = "transcription.chunk" if self.task == "transcribe" else "translation.chunk"
        head = {"id": self.rid, "object": obj, "created": self.created, "model": self.named}
        pieces = self.choice.pieces
        p = self.prompt_tokens
        for k, piece in enumerate(pieces):
            choice: dict[str, Any] = {"delta": {"content": piece}}
            if k == len(pieces) - 1:
                choice["finish_reason"] = self.choice.finish
                choice["stop_reason"] = None
            chunk = {**head, "choices": [choice]}
            if self.continuous:
                chunk["usage"] = {"prompt_tokens": p, "total_tokens": p + k + 1, "completion_tokens": k + 1}
            yield k, b"data: " + _enc.encode(chunk) + b"\n\n"
        last = max(len(pieces) - 1, 0)
        if self.include_usage:
            n = len(pieces)
            usage = {"prompt_tokens": p, "total_tokens": p + n, "completion_tokens": n}
            tail = {k: v for k, v in head.items() if v is not None}  # exclude_none: a null model goes
            yield last, b"data: " + _enc.encode({**tail, "choices": [], "usage": usage}) + b"\n\n"
        yield last, _DONE


def plan(planner: Planner, task: str, content_type: bytes, body: bytes, request_id: str | None = None) -> AudioPlan:
    """POST /v1/audio/{transcriptions,translations} -> AudioPlan (raises SimError), in vLLM's order:
    form parsing, field validation, model, response format, file size, audio decoding."""
    form = parse_form(content_type, body)

    def text(name: str) -> str | None:
        item = form.get(name)
        return None if item is None else item[1].decode("utf-8", "replace")

    upload = form.get("file")
    if upload is None:
        raise invalid_body("Field required", ("body", "file"), "missing")
    if upload[0] is None:
        raise error(422, "Expected 'file' to be a file-like object, not 'str'.", "Unprocessable Entity")
    fmt = text("response_format") or "json"
    if fmt not in FORMATS:
        raise invalid_body("Input should be 'json', 'text', 'srt', 'verbose_json' or 'vtt'",
                           ("body", "response_format"), "literal_error")
    stream = _bool("stream", form.get("stream", (None, None))[1], False)
    include = _bool("stream_include_usage", form.get("stream_include_usage", (None, None))[1], False)
    continuous = _bool("stream_continuous_usage_stats", form.get("stream_continuous_usage_stats", (None, None))[1],
                       False)
    temperature = _number("temperature", form.get("temperature", (None, None))[1], float)
    limit_field = _number("max_completion_tokens", form.get("max_completion_tokens", (None, None))[1], int)
    if (include or continuous) and not stream:
        which = "stream_include_usage" if include else "stream_continuous_usage_stats"
        raise invalid_body(f"Value error, Stream options can only be defined when `stream=True`. "
                           f"(parameter={which})")
    named = text("model")
    model = planner.model(named, "Transcriptions" if task == "transcribe" else "Translations")
    if fmt not in ("text", "json", "verbose_json"):
        raise bad_request("Currently only support response_format: `text`, `json` or `verbose_json`")
    if fmt == "verbose_json" and stream:
        raise bad_request("verbose_json format doesn't support streaming case")
    data = upload[1]
    size_mb = len(data) / 1024 ** 2
    if size_mb > MAX_AUDIO_MB:
        raise bad_request(f"Maximum file size exceeded (parameter=audio_filesize_mb, value={size_mb})",
                          "audio_filesize_mb")
    seconds = duration_of(data)
    prompt = 4 + text_tokens(text("prompt") or "")
    words = max(1, math.ceil(seconds * WORDS_PER_S))
    limit = limit_field if limit_field is not None else planner.options.max_model_len
    if limit < 1:
        raise bad_request(f"max_tokens must be at least 1, got {limit}.", "max_tokens")
    choice = Choice(0, [], prompt)
    natural = planner.words(zlib.crc32(data), words)
    choice.pieces, choice.finish = (natural, "stop") if len(natural) <= limit else (natural[:limit], "length")
    return AudioPlan(task, model, named, prompt, choice, seconds, fmt, text("language") or "en",
                     0.0 if temperature is None else temperature, stream, include, continuous,
                     f"{task}-{request_id or uuid.uuid4().hex}")


__all__ = ["AudioPlan", "duration_of", "parse_form", "plan"]
