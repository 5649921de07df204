"""`python -m loadtest.floor`: the CPU floor of the gateway's design, next to the gateway, in one run.

Strategy: the gateway's request path on trio costs its own logic (parsing, admission, routing, the
record of the request) plus what any proxy built the same way pays: two readiness waits on trio (the
client's request, the upstream's answer), four socket calls, one cancel scope. `floor` is that second
part alone -- a trio proxy that reads a request up to its Content-Length, sends it upstream, waits for
the whole answer and sends it back, with nothing parsed but the two lengths -- so the difference
between the two columns is what the gateway's own code costs, and the floor column is what no change
to that code can remove. Both run against the same zero-latency `spotinference sim`, interleaved
(loadtest/overhead_load.py's `run_cell`), 64 connections back to back; CPU per request comes from
/proc as in `bench overhead`. Every process is started on a free loopback port and stopped at the end.

The floor proxy is this module too: `python -m loadtest.floor --serve PORT UPSTREAM_PORT`. It is a
measuring stick, not a product: it trusts its peers (the sim and the harness's own client).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import trio

from loadtest import procs
from loadtest.overhead_load import Shape, Target, requests_for, run_cell


async def _recv(sock: socket.socket) -> bytes:
    # As the gateway's sockio.recv: wait first, then one read (the harness imports nothing from proxy/).
    await trio.lowlevel.wait_readable(sock)
    try:
        return sock.recv(65536)
    except OSError:
        return b""


async def _send(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def _message(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """One HTTP message with a Content-Length from `sock` (after `buf`): (message, leftover); None: EOF."""
    while b"\r\n\r\n" not in buf:
        data = await _recv(sock)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    n = _length(head)
    while len(rest) < n:
        data = await _recv(sock)
        if not data:
            return None
        rest += data
    return head + b"\r\n\r\n" + rest[:n], rest[n:]


async def _proxy(stream: trio.SocketStream, upstream: tuple[str, int]) -> None:
    client = socket.socket(fileno=stream.socket.detach())
    client.setblocking(False)
    up = socket.create_connection(upstream)
    up.setblocking(False)
    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    try:
        while True:
            got = await _message(client, buf)
            if got is None:
                return
            request, buf = got
            with trio.CancelScope(deadline=trio.current_time() + 60):  # the gateway's first-byte scope
                await _send(up, request)
                answer = await _message(up, b"")
            if answer is None:
                return
            await _send(client, answer[0])
    except OSError:
        return
    finally:
        client.close()
        up.close()


async def serve(port: int, upstream_port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"floor listening on http://127.0.0.1:{port}", flush=True)
    await trio.serve_listeners(lambda s: _proxy(s, ("127.0.0.1", upstream_port)), listeners)


def measure(rounds: int, workdir: Path | None = None) -> dict[str, dict]:
    """Start a zero-latency sim, the floor proxy and a gateway in front of it; measure both."""
    with ExitStack() as stack:
        workdir = procs.work_dir(stack, workdir, "spotinference-floor-")
        sim = procs.launch("sim", procs.sim_argv(latency_ms=0.0, ttft_ms=0.0, tokens_per_s=0.0), workdir)
        stack.callback(sim.stop)
        procs.wait_ready(sim)
        port = procs.free_port()
        floor = procs.launch("floor", [sys.executable, "-m", "loadtest.floor", "--serve", str(port),
                                       str(sim.ports[0])], workdir)
        stack.callback(floor.stop)
        gw = procs.launch_gateway("gateway", [sim.url], workdir)
        stack.callback(gw.stop)
        procs.wait_ready(gw)
        deadline = time.monotonic() + 15
        while "floor listening" not in floor.log_tail():
            if floor.popen.poll() is not None or time.monotonic() > deadline:
                raise procs.StartError(f"the floor proxy did not start:\n{floor.log_tail()}")
            time.sleep(0.05)
        targets = [Target("floor", port, floor.pids()), Target("gateway", gw.ports[0], gw.pids())]
        shape = Shape("chat", concurrency=64, max_tokens=16)

        async def run() -> dict:
            try:
                return await run_cell(targets, shape, requests_for(targets, shape, None), rounds, 1.0)
            finally:
                for t in targets:
                    t.pool.close_all()

        stats = trio.run(run)
        return {name: s.summary() | {"errors": s.errors} for name, s in stats.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="1 s slices per target (default 5)")
    p.add_argument("--workdir", type=Path, help="keep the processes' logs here (default: a temp dir)")
    p.add_argument("--serve", nargs=2, type=int, metavar=("PORT", "UPSTREAM_PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        trio.run(serve, *args.serve)
        return 0
    results = measure(args.rounds, args.workdir)
    print("64 connections back to back, zero-latency sim (CPU of each proxy's own process):")
    for name, s in results.items():
        print(f"  {name:8} {s['cpu_us_per_req']:>7} us CPU per request   {s['rate_per_s']:>8,.0f} req/s   "
              f"errors {s['errors']}")
    floor, gw = results["floor"]["cpu_us_per_req"], results["gateway"]["cpu_us_per_req"]
    if floor and gw:
        print(f"  the gateway's own code: {gw - floor:.1f} us per request ({(gw - floor) / gw:.0%} of its CPU)")
    return 0 if all(s["errors"] == 0 for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
