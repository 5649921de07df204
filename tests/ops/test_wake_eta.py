"""Wake ETAs (ops/budget.py WakeHistory, proxy/routing/wake_wait.py waking_comment): learned phase by
phase from the tier's last wakes, the budget before any, never negative; the comment's stable form."""

from __future__ import annotations

import re

from ops.budget import STAGES, Phase, Wake, WakeHistory
from proxy.routing.wake_wait import WAKING_COMMENT, waking_comment


def finished(start: float, sent: float, running: float, healthy: float, ready: float) -> Wake:
    w = Wake(start, budget_s=480.0, hard_cap_s=600.0)
    for phase, dt in ((Phase.START_SENT, sent), (Phase.RUNNING, running), (Phase.HEALTHY, healthy),
                      (Phase.READY, ready)):
        w.mark(phase, start + dt)
    return w


def test_before_any_wake_the_budget_is_the_estimate():
    w = Wake(100.0, budget_s=480.0, hard_cap_s=600.0)
    assert WakeHistory().progress(w, 130.0, 480.0) == ("starting", 30.0, 450.0)


def test_the_estimate_is_the_median_rest_from_the_phase_reached():
    h = WakeHistory()
    for ready in (100.0, 120.0, 400.0):  # one slow outlier: the median ignores it
        h.add(finished(0.0, 1.0, 40.0, ready - 2, ready))
    w = Wake(1000.0, budget_s=480.0, hard_cap_s=600.0)
    w.mark(Phase.START_SENT, 1001.0)
    assert h.progress(w, 1011.0, 480.0) == ("booting", 11.0, 119.0 - 10.0)  # 99/119/399 s from start_sent
    w.mark(Phase.RUNNING, 1090.0)  # this wake was slow to get its instance running ...
    stage, elapsed, eta = h.progress(w, 1100.0, 480.0)
    assert (stage, elapsed) == ("loading", 100.0)
    assert eta == 80.0 - 10.0  # ... but loads at the usual pace: 60/80/360 s from running -> 80
    assert h.progress(w, 1500.0, 480.0)[2] == 0.0  # overdue: 0, never negative


def test_unfinished_wakes_teach_nothing_and_the_history_is_bounded():
    h = WakeHistory(keep=3)
    h.add(Wake(0.0, budget_s=480.0, hard_cap_s=600.0))  # abandoned: never ready
    assert len(h) == 0
    for i in range(5):
        h.add(finished(0.0, 1.0, 2.0, 3.0, 10.0 + i))
    assert len(h) == 3


class FakeWaker:
    def __init__(self, progress):
        self.progress = progress

    def wake_progress(self):
        return self.progress


def test_the_comment_has_a_stable_form():
    assert waking_comment(FakeWaker(None)) == WAKING_COMMENT == b": waking\n\n"
    line = waking_comment(FakeWaker(("booting", 41.4, 95.6)))
    assert line == b": waking phase=booting elapsed_s=41 eta_s=96\n\n"
    assert re.fullmatch(rb": waking phase=[a-z]+ elapsed_s=\d+ eta_s=\d+\n\n", line)
    assert set(STAGES.values()) == {"starting", "booting", "loading", "finishing"}
