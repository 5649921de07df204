"""Shared test helpers: start a simulated vLLM and the gateway in-process on port 0, talk raw HTTP.

Everything binds 127.0.0.1, every wait is bounded by the caller's `trio.fail_after`, and everything
started here lives in the caller's nursery, so it stops when the test ends.
"""

from __future__ import annotations

import msgspec
import trio

from backends.sim.server import SimOptions, SimServer
from proxy.config import AuthConfig, Config, ServerConfig, TierConfig, UpstreamConfig, validate
from proxy.gateway import Gateway, build_runtime
from proxy.process.services import run_gateway


async def start_sim(nursery: trio.Nursery, **options) -> tuple[SimServer, str]:
    server = SimServer(SimOptions(**options))
    host, port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, f"http://{host}:{port}"


def make_config(upstreams: list[str], *, models=("sim-chat", "sim-embed"), keys_file: str | None = None,
                server: dict | None = None, upstream: dict | None = None, tiers: list[TierConfig] | None = None,
                **tier_kw) -> Config:
    tier_list = tiers if tiers is not None else [
        TierConfig(name="local", upstreams=list(upstreams), models=list(models), **tier_kw)
    ]
    return validate(Config(
        server=ServerConfig(listen="127.0.0.1:0", **(server or {})),
        upstream=UpstreamConfig(**(upstream or {})),
        auth=AuthConfig(keys_file=keys_file),
        tiers=tier_list,
    ))


class GatewayHandle:
    def __init__(self, host: str, port: int, gw: Gateway) -> None:
        self.host = host
        self.port = port
        self.gw = gw
        self.url = f"http://{host}:{port}"
        self.api = f"{self.url}/v1"


async def start_gateway(nursery: trio.Nursery, config: Config) -> GatewayHandle:
    gw = Gateway(build_runtime(config))

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await run_gateway(config, gateway=gw, task_status=task_status)

    host, port = await nursery.start(run)
    return GatewayHandle(host, port, gw)


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send `data`, read until the server closes (or `read_timeout` of silence); return all bytes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        chunks = []
        with trio.move_on_after(read_timeout):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def error_of(body: bytes) -> dict:
    return msgspec.json.decode(body)["error"]
