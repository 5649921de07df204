"""ops.budget: pure wake accounting, driven by plain floats (no event loop, no clock)."""

from __future__ import annotations

import pytest

from ops.budget import (
    FALLBACK,
    LAUNCHED,
    PRIMARY,
    TIER,
    IdleTracker,
    Inventory,
    Phase,
    Wake,
    expected_left_s,
    retry_after_s,
)


def test_wake_budget_and_hard_cap() -> None:
    w = Wake(requested_at=100.0, budget_s=8.0, hard_cap_s=10.0)
    assert not w.over_budget(107.9) and not w.at_hard_cap(107.9)
    assert w.over_budget(108.0) and not w.at_hard_cap(109.9)
    assert w.at_hard_cap(110.0)


def test_over_budget_is_reported_once() -> None:
    w = Wake(requested_at=0.0, budget_s=1.0, hard_cap_s=2.0)
    assert not w.take_over_budget(0.5)
    assert w.take_over_budget(1.2)
    assert not w.take_over_budget(1.5)


def test_timeline_keeps_first_mark_in_phase_order() -> None:
    w = Wake(requested_at=10.0, budget_s=5.0, hard_cap_s=6.0)
    assert w.mark(Phase.START_SENT, 10.25)
    assert not w.mark(Phase.START_SENT, 11.0)
    w.mark(Phase.HEALTHY, 13.0)
    w.mark(Phase.RUNNING, 11.5)
    assert not w.ready and w.duration_s() is None
    w.mark(Phase.READY, 13.5)
    assert w.ready and w.duration_s() == pytest.approx(3.5)
    assert w.timeline() == [("requested", 0.0), ("start_sent", 0.25), ("running", 1.5),
                            ("healthy", 3.0), ("ready", 3.5)]


def test_retry_after_uses_last_wake_and_clamps() -> None:
    w = Wake(requested_at=0.0, budget_s=480.0, hard_cap_s=600.0)
    assert retry_after_s(w, 10.0, budget_s=480, hard_cap_s=600, last_wake_s=90.0) == 80
    assert retry_after_s(w, 10.0, budget_s=480, hard_cap_s=600, last_wake_s=None) == 470
    assert retry_after_s(w, 200.0, budget_s=480, hard_cap_s=600, last_wake_s=90.0) == 1  # overdue
    assert retry_after_s(None, 0.0, budget_s=480, hard_cap_s=600, last_wake_s=None) == 480
    assert retry_after_s(None, 0.0, budget_s=900, hard_cap_s=600, last_wake_s=None) == 600
    assert expected_left_s(None, 5.0, budget_s=480, last_wake_s=None) == 0.0
    assert expected_left_s(w, 30.0, budget_s=480, last_wake_s=60.0) == 30.0


def test_idle_tracker_running_gauge_and_counter() -> None:
    idle = IdleTracker(idle_s=10.0, now=0.0)
    assert not idle.observe(1.0, [("a", 0.0, 5.0)])  # first sample of a counter is a baseline
    assert idle.is_idle(10.0)
    assert idle.observe(10.0, [("a", 1.0, 5.0)])  # a request running
    assert not idle.is_idle(19.0) and idle.is_idle(20.0)
    assert idle.observe(20.0, [("a", 0.0, 6.0)])  # a request finished since the last look
    assert idle.idle_for(25.0) == 5.0
    assert not idle.observe(26.0, [("a", 0.0, 6.0), ("b", 0.0, 0.0)])
    assert idle.is_idle(30.0)


def test_idle_tracker_counter_reset_counts_as_activity() -> None:
    idle = IdleTracker(idle_s=10.0, now=0.0)
    idle.observe(1.0, [("a", 0.0, 50.0)])
    assert idle.observe(9.0, [("a", 0.0, 0.0)])  # vLLM restarted
    assert not idle.is_idle(18.0)
    idle.touch(15.0)
    assert idle.idle_for(18.0) == 3.0


def _inventory(**kw) -> Inventory:
    args = {"instance_ids": ["i-a", "i-b"], "upstreams": ["http://a:8000", "http://b:8000"],
            "fallback_ids": ["i-f"], "launch_template": True, "fallback_tier": True,
            "health_failures": 2, "start_retry_s": 30.0}
    args.update(kw)
    return Inventory(**args)


def test_book_ladder_engages_one_step_or_all() -> None:
    book = _inventory()
    assert book.ladder == [PRIMARY, FALLBACK, LAUNCHED, TIER] and book.top() == PRIMARY
    assert book.escalate() == [FALLBACK] and book.top() == FALLBACK
    assert book.escalate(everything=True) == [LAUNCHED, TIER]
    assert book.escalate() == []
    book.reset()
    assert book.engaged == {PRIMARY}
    assert _inventory(fallback_ids=[], launch_template=False, fallback_tier=False).escalate() == []


def test_book_start_once_within_the_retry_window() -> None:
    book = _inventory()
    a, b = book.members[0], book.members[1]
    book.observe(a, "stopped", None, 0.0)
    book.observe(b, "running", None, 0.0)
    assert book.startable(PRIMARY, 0.0) == ["i-a"]
    book.note_start(["i-a"], 0.0, capacity=False)
    assert book.startable(PRIMARY, 10.0) == []  # EC2 may still say "stopped": do not send it again
    assert book.startable(PRIMARY, 30.0) == ["i-a"]
    book.observe(a, "pending", None, 31.0)
    book.observe(a, "stopped", None, 32.0)  # seen up, then stopped for real: start again at once
    assert book.startable(PRIMARY, 32.0) == ["i-a"]
    assert book.startable(FALLBACK, 32.0) == []  # not engaged


def test_book_wake_complete_skips_instances_without_capacity() -> None:
    book = _inventory()
    a, b = book.members[0], book.members[1]
    for m in (a, b):
        book.observe(m, "running", None, 0.0)
    book.note_health(a, True, strict=True)
    assert book.routable(1.0) == ["http://a:8000"]
    assert not book.wake_complete(1.0, over_budget=False)  # b is still awaited
    assert book.wake_complete(1.0, over_budget=True)  # past the budget, one will do
    book.note_start(["i-b"], 1.0, capacity=True)
    assert book.wake_complete(1.0, over_budget=False)


def test_book_health_holds_and_unreachable() -> None:
    book = _inventory()
    a = book.members[0]
    book.observe(a, "running", None, 0.0)
    book.note_health(a, True, strict=False)
    assert not book.note_health(a, False, strict=False)  # one failure is tolerated when ready
    assert book.note_health(a, False, strict=False) and book.routable(0.0) == []
    book.note_health(a, True, strict=False)
    a.hold_until = 100.0
    assert book.routable(50.0) == [] and book.held(50.0) and book.routable(100.0) == ["http://a:8000"]
    book.observe(a, "stopped", None, 60.0)  # the interruption happened
    assert a.hold_until is None and not a.healthy
    book.observe(a, "running", None, 61.0)
    book.note_health(a, True, strict=True)
    assert book.mark_down("http://a:8000") == 1 and book.routable(62.0) == []


def test_book_launched_capacity_comes_and_goes() -> None:
    book = _inventory()
    book.add_launched([("i-l1", "pending")])
    [launched] = [m for m in book.members if m.group == LAUNCHED]
    assert LAUNCHED in book.engaged and launched.url is None
    book.observe(launched, "running", "http://10.0.0.9:8000", 0.0)
    assert launched.url == "http://10.0.0.9:8000"
    book.observe(launched, "terminated", None, 1.0)
    assert all(m.group != LAUNCHED for m in book.members)
