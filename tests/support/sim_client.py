"""The simulated vLLM running for one test, with clients of it: an httpx client on its port, the
official SDKs pointed at it, a way to run a blocking SDK call off the loop that serves it, and a
generated WAV to upload."""

from __future__ import annotations

import contextlib
import io
import wave
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import trio

from backends.sim import SimOptions, SimServer


@contextlib.asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[SimServer, int, httpx.AsyncClient]]:
    """A sim with `options` on 127.0.0.1 port 0: (server, port, an httpx client of it); stopped after."""
    server = SimServer(SimOptions(**options))
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as c:
            yield server, port, c
        nursery.cancel_scope.cancel()


def openai_client(port: int):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=10)


def anthropic_client(port: int):
    import anthropic

    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="unused", max_retries=0, timeout=10)


async def off_loop(fn: Callable[[], Any]) -> Any:
    """Run a blocking client call in a thread, so the trio loop keeps serving it."""
    return await trio.to_thread.run_sync(fn)


def wav(seconds: float, rate: int = 16_000, frame: bytes = b"\0\0") -> bytes:
    """A mono 16-bit WAV file of `seconds` (the sim's transcript length follows its duration)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frame * int(seconds * rate))
    return out.getvalue()
