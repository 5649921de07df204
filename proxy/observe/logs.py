"""Structured logs: one JSON object per line on stderr (journald keeps them as they are).

Strategy: two kinds of line, `{"ts", "level", "event", ...}` events and `{"event": "access", ...}`
lines, both encoded by msgspec (a few µs, no logging-module machinery on the hot path). Callers pass
only safe fields: key NAMES, never secrets; model, tier, status, timings; never prompt or completion
text (the gateway never decodes it into a string in the first place). The `logging` module's records
(from libraries, or `logging.getLogger("spotinference...")`) are routed through the same encoder.
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec

_encode = msgspec.json.Encoder().encode
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_state = {"level": 20, "access": True, "stream": None}


def configure(level: str = "info", access: bool = True, stream=None) -> None:
    _state["level"] = _LEVELS.get(level, 20)
    _state["access"] = access
    _state["stream"] = stream
    root = logging.getLogger()
    root.handlers[:] = [_JsonHandler()]
    root.setLevel(_state["level"])
    # httpx logs every request at INFO: the wakers' health probes would flood the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _write(line: bytes) -> None:
    if _pending and line is not None:
        pending = b"\n".join(_pending)
        _pending.clear()
        line = pending + b"\n" + line
    stream = _state["stream"] or sys.stderr.buffer
    try:
        stream.write(line + b"\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def event(name: str, level: str = "info", **fields) -> None:
    if _LEVELS.get(level, 20) < _state["level"]:
        return
    fields["ts"] = round(time.time(), 3)
    fields["level"] = level
    fields["event"] = name
    _write(_encode(fields))


_pending: list[bytes] = []
ACCESS_BATCH = 64


def access(fields: dict) -> None:
    """Access lines are batched (a write per line would be a syscall per request): written when 64
    are pending, by `run_flusher` every 0.2 s, before any event line, and at exit (`flush`)."""
    if _state["access"]:
        _pending.append(_encode(fields))
        if len(_pending) >= ACCESS_BATCH:
            flush()


def flush() -> None:
    if _pending:
        lines = b"\n".join(_pending)
        _pending.clear()
        _write(lines)


async def run_flusher(interval_s: float = 0.2) -> None:
    import trio

    try:
        while True:
            await trio.sleep(interval_s)
            flush()
    finally:
        flush()


_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class _JsonHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        fields = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage(),
                  "logger": record.name}
        for k, v in record.__dict__.items():  # `extra={...}` fields
            if k not in _STANDARD:
                fields[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info and record.exc_info[0] is not None:
            fields["exc_type"] = record.exc_info[0].__name__
        _write(_encode(fields))
