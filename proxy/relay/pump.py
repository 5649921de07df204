"""The pump: one task per worker moves every relayed stream's bytes, many streams per wake-up.

Strategy: a relay that waited on its own upstream socket paid, for every SSE event, one `epoll_ctl`
(trio's registrations are one-shot), one reschedule and a task step through five await frames --
about as much Python as the relaying itself. A relay whose next move is "wait for the upstream, then
pass on what came" parks here instead (`Pump.park`): its upstream socket is registered once,
edge-triggered, in the pump's own epoll set, which the pump task waits on through trio like any other
fd, and when it wakes it runs the ready streams' `step`s inline, one after another. A step is
synchronous and never blocks (relay/response.py's: read until the kernel buffer is empty, decode,
tap, frame, one non-blocking send); it returns None to stay parked, or a value that wakes its relay
task with it: the response is complete, or a write would block (the task then waits for the client
under its own `write_s` and parks again). An exception in a step wakes the task with it: whatever a
stream does reaches only its own relay, never the pump or another stream. A step that read a full
buffer four times runs again after a checkpoint rather than waiting for an edge that may not come.

Edge-triggered rules: `park` registers the socket (ADD) the first time and re-arms it (MOD) after;
both report data that is already there, so nothing that came while the task was away is missed.
`release` unregisters it (DEL) when the relay ends, before its connection is pooled or closed. A
parked task that is cancelled (drain, shutdown, its silence deadline) is simply no longer parked.
The pump and its epoll set belong to one trio run (a RunVar); the task is a system task, started on
the first park. Without epoll (not Linux) `park` returns AGAIN at once and the relay waits on its
socket itself, as before.
"""

from __future__ import annotations

import select

import outcome
import trio
from trio.lowlevel import (
    Abort,
    RunVar,
    current_task,
    reschedule,
    spawn_system_task,
    wait_readable,
    wait_task_rescheduled,
)

AGAIN = object()  # a step's "more may be buffered: run me again soon"; park's "no pump: wait yourself"
HAS_EPOLL = hasattr(select, "epoll")
_EVENTS = (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET) if HAS_EPOLL else 0


class Parking:
    """One relay's place in the pump, from its first park to `release`."""

    __slots__ = ("fd", "last", "registered", "step", "task")

    def __init__(self, fd: int, step, now: float) -> None:
        self.fd = fd
        self.step = step  # () -> None (stay parked) | AGAIN | a value for the relay task
        self.task = None  # the relay task while it is parked
        self.registered = False
        self.last = now  # when the pump last ran this step (the relay's silence clock)


class Pump:
    def __init__(self) -> None:
        self._ep: select.epoll | None = None  # made with the task, on the first park; closed with it
        self._by_fd: dict[int, Parking] = {}
        self._again: list[Parking] = []

    def parking(self, fd: int, step) -> Parking:
        return Parking(fd, step, trio.current_time())

    async def park(self, p: Parking):
        """Wait until `p.step` returns something other than None (or raises: re-raised here)."""
        if self._ep is None:
            self._ep = select.epoll()
            spawn_system_task(self._run, name="spotinference relay pump")
        if p.registered:
            self._ep.modify(p.fd, _EVENTS)
        else:
            self._ep.register(p.fd, _EVENTS)
            p.registered = True
            self._by_fd[p.fd] = p
        p.task = current_task()

        def abort(_raise_cancel) -> Abort:
            p.task = None
            return Abort.SUCCEEDED

        return await wait_task_rescheduled(abort)

    def release(self, p: Parking) -> None:
        """The relay is over: forget the socket (call before it is pooled or closed)."""
        p.task = None
        if p.registered:
            p.registered = False
            if self._by_fd.get(p.fd) is p:
                del self._by_fd[p.fd]
            try:
                self._ep.unregister(p.fd)
            except (OSError, ValueError):  # the file is closed (the kernel dropped it), or the pump is
                pass

    def _run_step(self, p: Parking, now: float) -> None:
        p.last = now
        try:
            result = p.step()
        except Exception as exc:  # noqa: BLE001 -- the stream's own failure: its relay task handles it
            task, p.task = p.task, None
            reschedule(task, outcome.Error(exc))
            return
        if result is None:
            return
        if result is AGAIN:
            self._again.append(p)
            return
        task, p.task = p.task, None
        reschedule(task, outcome.Value(result))

    async def _run(self) -> None:
        ep = self._ep
        by_fd = self._by_fd
        epfd = ep.fileno()
        try:
            while True:
                if self._again:
                    await trio.lowlevel.checkpoint()
                else:
                    await wait_readable(epfd)
                now = trio.current_time()
                again, self._again = self._again, []
                for p in again:
                    if p.task is not None:
                        self._run_step(p, now)
                for fd, _mask in ep.poll(0):
                    p = by_fd.get(fd)
                    if p is not None and p.task is not None:
                        self._run_step(p, now)
        finally:  # the run is ending (system tasks are cancelled last)
            by_fd.clear()
            ep.close()


_PUMP: RunVar[Pump | None] = RunVar("spotinference_pump", default=None)


def pump() -> Pump | None:
    """This trio run's pump (made on first use); None where there is no epoll."""
    if not HAS_EPOLL:
        return None
    p = _PUMP.get()
    if p is None:
        p = Pump()
        _PUMP.set(p)
    return p
