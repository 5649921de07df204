"""Self-benchmark of the simulated vLLM server: how much traffic one server process sustains.

Strategy: start `spotinference sim` (`backends.sim.cli`) as a child process, drive it from this
process with a minimal epoll keep-alive client (pre-built request bytes, no JSON parsing, so the
client stays cheaper than the server), and report throughput together with the server's own CPU
time from /proc. "Per server CPU-second" is the figure that says whether the simulator can ever be
a gateway benchmark's bottleneck: it is what one core of simulator delivers, whatever else shares
the machine. Linux only (epoll, /proc). Never run by the unit tests.

    python -m backends.sim.bench --mode plain --seconds 5 --connections 32
    python -m backends.sim.bench --mode stream --max-tokens 256 --connections 32
    python -m backends.sim.bench --mode stream --max-tokens 64 --connections 200 --tokens-per-s 200
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import time


def _request(mode: str, max_tokens: int) -> bytes:
    stream = "true" if mode == "stream" else "false"
    body = ('{"model":"sim-chat","messages":[{"role":"user","content":"Say hello."}],'
            f'"max_tokens":{max_tokens},"stream":{stream}}}').encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def _complete(buf: bytes, stream: bool) -> bool:
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    if stream:
        return buf.endswith(b"\r\n0\r\n\r\n")
    start = buf.find(b"content-length: ", 0, head_end) + 16
    return len(buf) - head_end - 4 >= int(buf[start:buf.find(b"\r\n", start)])


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def drive(port: int, mode: str, seconds: float, connections: int, max_tokens: int) -> tuple[int, int]:
    """Run the load for `seconds`; returns (responses completed, SSE events received)."""
    request = _request(mode, max_tokens)
    stream = mode == "stream"
    poller = select.epoll()
    socks: dict[int, tuple[socket.socket, bytearray]] = {}
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks[s.fileno()] = (s, bytearray())
        poller.register(s.fileno(), select.EPOLLIN)
        s.send(request)
    done = events = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for fd, _ in poller.poll(0.5):
            s, buf = socks[fd]
            data = s.recv(262144)
            if not data:
                raise RuntimeError("server closed a keep-alive connection")
            buf += data
            if _complete(buf, stream):
                done += 1
                if stream:
                    events += buf.count(b"data: ")
                buf.clear()
                s.send(request)
    for s, _ in socks.values():
        s.close()
    return done, events


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.sim.bench")
    p.add_argument("--mode", choices=("plain", "stream"), default="plain")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--tokens-per-s", type=float, default=0.0, help="server decode pacing per stream")
    p.add_argument("--latency-ms", type=float, default=0.0, help="server service time (non-streaming)")
    args = p.parse_args(argv)
    child = subprocess.Popen([sys.executable, "-m", "backends.sim.cli", "--listen", "127.0.0.1:0",
                              "--tokens-per-s", str(args.tokens_per_s), "--latency-ms", str(args.latency_ms)],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline() if child.stdout else ""
        port = int(line.rsplit(":", 1)[1])
        drive(port, args.mode, 0.5, args.connections, args.max_tokens)  # warm-up
        (user0, sys0), t0 = _cpu_seconds(child.pid), time.monotonic()
        done, events = drive(port, args.mode, args.seconds, args.connections, args.max_tokens)
        user1, sys1 = _cpu_seconds(child.pid)
        wall, user, system = time.monotonic() - t0, user1 - user0, sys1 - sys0
        cpu = user + system
    finally:
        child.terminate()
        child.wait(10)
    print(f"mode={args.mode} connections={args.connections} max_tokens={args.max_tokens} "
          f"tokens_per_s={args.tokens_per_s} latency_ms={args.latency_ms} "
          f"wall={wall:.2f}s server_cpu={cpu:.2f}s (user {user:.2f}s, system {system:.2f}s; "
          f"{100 * cpu / wall:.0f}% of one core)")
    print(f"responses: {done / wall:,.0f}/s wall, {done / cpu:,.0f} per server CPU-second")
    if args.mode == "stream":
        print(f"SSE events: {events / wall:,.0f}/s wall, {events / cpu:,.0f} per server CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
