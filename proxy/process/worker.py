"""The entry point of one worker process under the supervisor: `python -m proxy _worker ...`.

Strategy: the supervisor (supervisor.py) binds the listening socket once and passes its descriptor;
the worker wraps it, asks the kernel to SIGTERM it should the supervisor die (even by SIGKILL: no
orphans keep serving a port nobody manages), and runs the same `serve_process` as a single-process
gateway, with its own usage spill file (`<usage path>.spill.w<index>.jsonl`; PostgreSQL:
`<spill_dir>/usage.spill.w<index>.jsonl`).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket

import trio

from proxy.config import load
from proxy.observe import logs
from proxy.process.serve import serve_process
from proxy.usage.log import worker_spill_path


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker (it drains) if the supervisor dies, even by SIGKILL; no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    """Entry of one worker process (`python -m proxy _worker ...`)."""

    p = argparse.ArgumentParser(prog="spotinference _worker")
    p.add_argument("--config", required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--restarted", action="store_true", help="a replacement for a worker that exited")
    args = p.parse_args(argv)
    _die_with_parent()
    config = load(args.config)
    logs.configure(config.log.level, config.log.access)
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(False)
    spill = worker_spill_path(config.usage, args.index)
    trio.run(functools.partial(serve_process, config, args.config, sock=sock, workers=args.workers,
                               spill_path=spill, announce=False,
                               restarted=str(args.index) if args.restarted else None))
    return 0
