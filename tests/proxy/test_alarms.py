"""Alarms (proxy/alarms.py): deadlines as dict entries and one task, exact on trio's clock.

Strategy: on the autojump clock, alarms set in order and out of order (a shorter delay after a longer
one, as after a reload) fire exactly at their deadlines and in deadline order; a cleared alarm never
fires; an alarm set after an empty spell is not delayed by the stale wake-up; a callback that raises
does not stop the others. Through the gateway, the first-byte timeout these alarms enforce is
tests/proxy/upstream's (test_open.py: 504 at exactly first_byte_s, not retried).
"""

from __future__ import annotations

import pytest
import trio

from proxy.alarms import alarms


async def test_alarms_fire_at_their_deadlines_in_order_even_when_set_out_of_order(autojump_clock):
    a = alarms()
    fired: list[tuple[str, float]] = []
    start = trio.current_time()

    def note(name):
        fired.append((name, trio.current_time() - start))

    a.set(10, note, "ten")
    a.set(30, note, "thirty")
    a.set(5, note, "five")  # shorter than what is already set: moves the wake-up, breaks the order
    cleared = a.set(20, note, "never")
    a.clear(cleared)
    await trio.sleep(40)
    assert fired == [("five", pytest.approx(5)), ("ten", pytest.approx(10)), ("thirty", pytest.approx(30))]
    assert not cleared.fired


async def test_an_alarm_after_an_empty_spell_is_not_late(autojump_clock):
    a = alarms()
    fired: list[float] = []
    first = a.set(100, fired.append, "x")
    a.clear(first)  # the task still wakes at 100 s: harmless
    await trio.sleep(1)
    start = trio.current_time()
    a.set(3, lambda _: fired.append(trio.current_time() - start))
    await trio.sleep(10)
    assert fired == [pytest.approx(3)]


async def test_a_callback_that_raises_does_not_stop_the_others(autojump_clock):
    a = alarms()
    fired = []

    def boom(_):
        raise RuntimeError("bug")

    a.set(1, boom)
    late = a.set(1, fired.append, "after")
    await trio.sleep(2)
    assert fired == ["after"] and late.fired
    a.set(1, fired.append, "still running")
    await trio.sleep(2)
    assert fired == ["after", "still running"]


async def test_many_alarms_cleared_leave_nothing_behind(autojump_clock):
    a = alarms()
    for _ in range(1000):
        a.clear(a.set(600, lambda _: None))
    assert a._pending == {}
