"""ops.meter.GpuMeter on a fake clock: what a wake, serving and a sleep cost in host-seconds, a restart
mid-run, tiers without a waker, windows recorded one after the other."""

from __future__ import annotations

import pytest

from ops.meter import GpuMeter


class Clock:
    def __init__(self, t: float = 6000.0) -> None:  # 6000: a whole minute of the epoch
        self.t = t

    def __call__(self) -> float:
        return self.t

    def to(self, t: float) -> None:
        self.t = t


def minutes(meter: GpuMeter, start: float, end: float, size: float = 60.0) -> dict[float, dict[str, float]]:
    """The meter's answer for every window of `size` seconds between start and end, as the gateway asks."""
    out = {}
    t = start
    while t < end:
        out[t] = meter.seconds(t, t + size)
        t += size
    return out


def test_wake_serve_sleep_is_paid_from_the_start_sent_to_stopped_seen() -> None:
    clock = Clock(6000.0)
    meter = GpuMeter(clock)
    meter.observe("i-1", "stopped")  # asleep: the waker's first look
    clock.to(6010.0)
    meter.observe("i-1", "stopped", started_ago_s=0.5)  # start sent, EC2 not caught up: nothing yet
    clock.to(6012.0)
    meter.observe("i-1", "pending", started_ago_s=2.0)  # start sent at 6010: paid from then
    clock.to(6040.0)
    meter.observe("i-1", "running")
    clock.to(6100.0)
    assert meter.up() == ["i-1"]
    meter.observe("i-1", "stopping")  # idle: StopInstances; still paid until stopped is seen
    clock.to(6130.0)
    meter.observe("i-1", "stopped")
    clock.to(6300.0)
    assert meter.up() == []
    assert minutes(meter, 6000.0, 6300.0) == {6000.0: {"i-1": 50.0}, 6060.0: {"i-1": 60.0},
                                              6120.0: {"i-1": 10.0}, 6180.0: {}, 6240.0: {}}
    assert meter.seconds(0.0, 10_000.0) == {"i-1": 120.0}


def test_pending_seen_without_a_start_of_ours_counts_from_when_it_is_seen() -> None:
    clock = Clock()
    meter = GpuMeter(clock)
    meter.observe("i-1", "stopped")
    clock.to(6020.0)
    meter.observe("i-1", "pending")  # another gateway host started it
    clock.to(6050.0)
    meter.observe("i-1", "terminated")
    assert meter.seconds(6000.0, 6060.0) == {"i-1": 30.0}


def test_an_open_span_runs_to_now_and_is_asked_about_window_by_window() -> None:
    clock = Clock()
    meter = GpuMeter(clock)
    meter.observe("i-1", "stopped")
    clock.to(6030.0)
    meter.observe("i-1", "running", started_ago_s=0.0)
    clock.to(6075.0)
    assert meter.seconds(6000.0, 6060.0) == {"i-1": 30.0}
    assert meter.seconds(6060.0, 6120.0) == {"i-1": 15.0}  # the window so far (a status page)
    clock.to(6200.0)
    assert meter.seconds(6060.0, 6120.0) == {"i-1": 60.0}


def test_a_restart_mid_run_loses_nothing_and_counts_nothing_twice() -> None:
    """Old process: wakes the host at 6010 and records whole minutes; it stops at 6100 (the minute
    6060 unrecorded). The new process starts at 6101, sees the host running, and counts the minute it
    starts in whole -- the row the old one would have written -- then the host sleeps at 6200."""
    clock = Clock()
    old = GpuMeter(clock)
    old.observe("i-1", "stopped")
    clock.to(6012.0)
    old.observe("i-1", "pending", started_ago_s=2.0)
    clock.to(6065.0)
    rows = {(6000.0, h): s for h, s in old.seconds(6000.0, 6060.0).items()}  # recorded at 6065
    old.prune(6060.0)
    clock.to(6100.0)  # the old process ends here: its partial minute is not recorded
    clock.to(6101.0)
    new = GpuMeter(clock)
    new.observe("i-1", "running")  # recovery: already up before this process looked
    clock.to(6185.0)
    for start in (6060.0, 6120.0):
        for host, s in new.seconds(start, start + 60).items():
            rows.setdefault((start, host), s)  # the store keeps the first row of each uid
    new.observe("i-1", "stopped")
    clock.to(6200.0)  # (stopped seen at 6185)
    for host, s in new.seconds(6180.0, 6240.0).items():
        rows.setdefault((6180.0, host), s)
    assert rows == {(6000.0, "i-1"): 50.0, (6060.0, "i-1"): 60.0, (6120.0, "i-1"): 60.0, (6180.0, "i-1"): 5.0}
    assert sum(rows.values()) == 6185.0 - 6010.0


def test_two_workers_see_the_same_minute_one_wins_and_each_is_whole() -> None:
    clock = Clock()
    a, b = GpuMeter(clock), GpuMeter(clock)
    for m in (a, b):
        m.observe("i-1", "stopped")
    clock.to(6010.0)
    a.observe("i-1", "pending", started_ago_s=0.0)  # worker a holds the lease and started it
    clock.to(6011.0)
    b.observe("i-1", "pending")  # worker b sees it a poll later
    clock.to(6070.0)
    assert a.seconds(6000.0, 6060.0) == {"i-1": 50.0}
    assert b.seconds(6000.0, 6060.0) == {"i-1": 49.0}  # close; the first inserted row stands


def test_a_tier_without_a_waker_is_up_while_the_gateway_runs() -> None:
    clock = Clock(6030.0)
    meter = GpuMeter(clock)
    meter.running(["http://a:8000", "http://b:8000"])  # the gateway starts mid-minute
    clock.to(6090.0)
    meter.running(["http://a:8000"])  # a reload took b away
    clock.to(6150.0)
    assert meter.seconds(6000.0, 6060.0) == {"http://a:8000": 60.0, "http://b:8000": 60.0}
    assert meter.seconds(6060.0, 6120.0) == {"http://a:8000": 60.0, "http://b:8000": 30.0}
    assert sorted(meter.up()) == ["http://a:8000"]


def test_a_host_up_at_the_first_look_is_backdated_only_in_the_window_it_was_seen_in() -> None:
    clock = Clock(6090.0)
    meter = GpuMeter(clock)
    meter.observe("i-1", "running")
    clock.to(6200.0)
    assert meter.seconds(6000.0, 6060.0) == {}  # before the first look: nothing
    assert meter.seconds(6060.0, 6120.0) == {"i-1": 60.0}
    # ... and a host seen again after being stopped is a new start, not a first look
    meter.observe("i-1", "stopped")
    clock.to(6250.0)
    meter.observe("i-1", "running")
    clock.to(6300.0)
    assert meter.seconds(6240.0, 6300.0) == {"i-1": 50.0}


@pytest.mark.parametrize("window", [1.0, 10.0, 60.0])
def test_windows_of_any_size_add_up(window: float) -> None:
    clock = Clock()
    meter = GpuMeter(clock)
    meter.observe("i-1", "stopped")
    clock.to(6003.5)
    meter.observe("i-1", "pending", started_ago_s=0.5)
    clock.to(6101.25)
    meter.observe("i-1", "stopped")
    clock.to(6200.0)
    total = sum(s for w in minutes(meter, 6000.0, 6200.0, window).values() for s in w.values())
    assert total == pytest.approx(6101.25 - 6003.0)


def test_prune_forgets_recorded_spans_and_terminated_hosts() -> None:
    clock = Clock()
    meter = GpuMeter(clock)
    meter.observe("i-1", "stopped")
    meter.observe("i-2", "stopped")
    clock.to(6010.0)
    meter.observe("i-1", "pending", started_ago_s=0.0)
    meter.observe("i-2", "pending", started_ago_s=0.0)
    clock.to(6020.0)
    meter.observe("i-1", "stopped")
    meter.observe("i-2", "terminated")  # launch-template capacity: gone for good
    meter.prune(6060.0)
    assert meter.hosts() == ["i-1"]  # kept: seen up again, it is a start, not a first look
    assert meter.seconds(6000.0, 6060.0) == {}
