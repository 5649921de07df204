"""Alarms: a deadline per request without a cancel scope per request.

Strategy: a trio cancel scope with a deadline costs, entered and left, about as much CPU as the
parsing of a request head (each registration change goes through trio's deadline heap and a context
manager); the gateway set one per request for the upstream's first byte, nearly always to remove it
a millisecond later. An `Alarm` is a dict entry instead: `set` inserts it, `clear` deletes it, and one
system task per trio run sleeps until the oldest alarm's deadline and runs the `fire` callback of each
alarm that is due (a callback is synchronous and must not block: the first-byte alarm shuts the
upstream socket down, so the waiting read sees EOF at once and its owner reports the timeout).
Deadlines of one delay arrive in order, so the oldest alarm is the dict's first entry and a wake-up
touches only what is due; an alarm set earlier than the task's wake-up (a reload shortened the delay)
moves the wake-up and marks the set unordered, so the next wake-ups scan it all until it empties.
The task's deadline changes only then, or when the first alarm after an empty spell is earlier than the
stale wake-up left over (which is otherwise harmless: the task looks and sleeps again). Precision is
trio's own: the alarm fires when a cancel scope with the same deadline would have. Users: the
upstream's first byte (upstream/open.py) and a client connection's keep-alive idle and request head
phases (accept/downstream.py: the alarm cancels the connection's scope, as its deadline did).
"""

from __future__ import annotations

import math

import trio
from trio.lowlevel import RunVar, spawn_system_task

from proxy.observe import logs


class Alarm:
    __slots__ = ("arg", "deadline", "fire", "fired", "key", "owner")

    def __init__(self, deadline: float, fire, arg, key: int, owner: Alarms) -> None:
        self.owner = owner  # the Alarms it was set on (clear it there)
        self.deadline = deadline
        self.fire = fire  # fire(arg), called once at the deadline unless cleared first
        self.arg = arg
        self.fired = False
        self.key = key


class Alarms:
    def __init__(self) -> None:
        self._pending: dict[int, Alarm] = {}
        self._seq = 0
        self._last = -math.inf  # the latest deadline set: a smaller one breaks the order
        self._ordered = True
        self._sleep: trio.CancelScope | None = None  # the task's sleep, once started

    def set(self, delay_s: float, fire, arg=None) -> Alarm:
        """`fire(arg)` in `delay_s` seconds, unless `clear`ed first."""
        deadline = trio.current_time() + delay_s
        self._seq += 1
        alarm = Alarm(deadline, fire, arg, self._seq, self)
        self._pending[alarm.key] = alarm
        if deadline < self._last:
            self._ordered = False
        else:
            self._last = deadline
        sleep = self._sleep
        if sleep is None:
            self._sleep = trio.CancelScope(deadline=deadline)
            spawn_system_task(self._run, name="spotinference alarms")
        elif deadline < sleep.deadline:
            sleep.deadline = deadline
        return alarm

    def clear(self, alarm: Alarm) -> None:
        self._pending.pop(alarm.key, None)

    def _due(self, now: float) -> float:
        """Fire what is due; return when to look next."""
        pending = self._pending
        if self._ordered:
            while pending:
                alarm = next(iter(pending.values()))
                if alarm.deadline > now:
                    return alarm.deadline
                del pending[alarm.key]
                self._fire(alarm)
            return math.inf
        nxt = math.inf
        for alarm in [a for a in pending.values()]:
            if alarm.deadline <= now:
                del pending[alarm.key]
                self._fire(alarm)
            else:
                nxt = min(nxt, alarm.deadline)
        if not pending:
            self._ordered = True
            self._last = -math.inf
        return nxt

    @staticmethod
    def _fire(alarm: Alarm) -> None:
        alarm.fired = True
        try:
            alarm.fire(alarm.arg)
        except Exception as exc:  # noqa: BLE001 -- one alarm's bug must not stop the others (or the worker)
            logs.event("alarm_failed", level="error", error=f"{type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        sleep = self._sleep
        while True:
            with sleep:
                await trio.sleep_forever()
            sleep = self._sleep = trio.CancelScope(deadline=self._due(trio.current_time()))


_ALARMS: RunVar[dict[str, Alarms] | None] = RunVar("spotinference_alarms", default=None)


def alarms(kind: str = "first_byte") -> Alarms:
    """This trio run's alarms of one `kind` (made on first use). One kind per delay -- a connection's
    keep-alive idle, its request head, an upstream's first byte -- keeps each set in deadline order."""
    by_kind = _ALARMS.get()
    if by_kind is None:
        by_kind = {}
        _ALARMS.set(by_kind)
    a = by_kind.get(kind)
    if a is None:
        a = by_kind[kind] = Alarms()
    return a


def cancel_scope(scope: trio.CancelScope) -> None:
    """An alarm's callback: cancel `scope` (a phase timeout of a connection)."""
    scope.cancel()
