"""ops.budget: pure wake accounting, driven by plain floats (no event loop, no clock)."""

from __future__ import annotations

import pytest

from ops.budget import IdleTracker, Phase, Wake, remaining_s, retry_after_s


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
    assert remaining_s(None, 5.0, budget_s=480, last_wake_s=None) == 0.0
    assert remaining_s(w, 30.0, budget_s=480, last_wake_s=60.0) == 30.0


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
