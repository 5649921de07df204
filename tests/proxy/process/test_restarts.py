"""RestartPolicy (proxy/process/restarts.py): the supervisor's crash-loop back-off, on a fake clock."""

from __future__ import annotations

from proxy.process.restarts import BASE_S, MAX_S, WINDOW_S, RestartPolicy


def test_the_first_exits_in_a_window_restart_at_once_then_the_delay_doubles_up_to_the_cap():
    p = RestartPolicy()
    delays = []
    for k in range(10):
        now = float(k)
        delays.append(p.exited(0, now))
        assert p.due(now + delays[-1], running=1) == [0]
    assert delays[:2] == [0.0, 0.0]
    assert delays[2:6] == [BASE_S, 2 * BASE_S, 4 * BASE_S, 8 * BASE_S]
    assert max(delays) == MAX_S and delays[-1] == MAX_S
    assert p.restarts == 10


def test_a_slot_in_back_off_is_not_due_early_while_another_worker_runs():
    p = RestartPolicy()
    for t in (0.0, 1.0):
        p.exited(0, t)
        p.due(t, running=1)
    delay = p.exited(0, 2.0)
    assert delay == BASE_S
    assert p.due(2.0, running=1) == []
    assert p.due(2.0 + BASE_S - 0.01, running=1) == []
    assert p.due(2.0 + BASE_S, running=1) == [0]


def test_with_no_worker_running_the_soonest_slot_restarts_at_once():
    p = RestartPolicy()
    for t in range(6):  # both slots deep in back-off
        for slot in (0, 1):
            p.exited(slot, float(t))
        p.due(float(t) + MAX_S, running=2)
    p.exited(0, 10.0)
    p.exited(1, 10.5)
    assert p.pending[0] > 10.5 and p.pending[1] > p.pending[0]
    assert p.due(10.5, running=0) == [0]  # due soonest, restarted although its back-off has not run out
    assert p.due(10.6, running=1) == []  # the other waits for its back-off: one is serving


def test_exits_older_than_the_window_are_forgotten():
    p = RestartPolicy()
    for t in range(5):
        p.exited(0, float(t))
        p.due(float(t) + MAX_S, running=1)
    assert p.exited(0, 30.0) > 0  # six exits within the window
    p.due(1e9, running=1)
    assert p.exited(0, 30.0 + WINDOW_S + 1) == 0.0  # a quiet window later: at once again
