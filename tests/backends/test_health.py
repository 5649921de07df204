"""backends.health: the per-upstream verdict (pure, clock injected as plain floats) and the book.

The prober itself is exercised through real sockets in tests/proxy/routing/test_health_routing.py.
"""

from __future__ import annotations

from backends import probe
from backends.health import HealthBook, Progress, UpstreamHealth, Verdict, progress_of


class Watch:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def test_down_after_unhealthy_after_failures_in_a_row_and_up_at_the_first_success() -> None:
    rec = UpstreamHealth("http://a", unhealthy_after=3)
    assert rec.up and rec.verdict is Verdict.UP
    assert rec.failed(0.0, silent=True) is False and rec.failed(2.0, silent=True) is False and rec.up
    assert rec.succeeded(4.0) is False  # the streak is broken
    assert not rec.failed(6.0, silent=True) and not rec.failed(8.0, silent=True)
    assert rec.failed(10.0, silent=True) is True
    assert (rec.up, rec.verdict, rec.changed_at, rec.down_total, rec.reason) == (False, Verdict.DOWN, 10.0, 1, "timeout")
    assert rec.failed(12.0, silent=True) is False  # still down: no second transition
    assert rec.succeeded(14.0) is True and rec.up and rec.failures == 0


def test_silence_ends_requests_in_flight_a_refusal_does_not() -> None:
    rec = UpstreamHealth("http://a", unhealthy_after=2)
    a, b = Watch(), Watch()
    rec.enter(a)
    rec.enter(b)
    rec.leave(b)
    rec.failed(0.0, silent=False, reason="ConnectError")
    rec.failed(1.0, silent=False, reason="health 503")
    assert not rec.up and not rec.doomed and a.cancelled == 0  # a draining host: let them finish
    rec.failed(2.0, silent=True)  # ... then it went silent
    assert rec.doomed and (a.cancelled, b.cancelled) == (1, 0) and not rec.inflight
    late = Watch()
    rec.enter(late)  # an exchange that picked it just before the verdict: cut at once
    assert late.cancelled == 1 and not rec.inflight
    rec.succeeded(3.0)
    rec.enter(late)
    assert late.cancelled == 1 and rec.inflight == {late}


def test_stalled_when_tokens_freeze_with_requests_running_for_stall_s() -> None:
    rec = UpstreamHealth("http://a", stall_s=30.0)
    w = Watch()
    rec.enter(w)
    assert not rec.succeeded(0.0, Progress(running=2, tokens=100))
    assert not rec.succeeded(10.0, Progress(running=2, tokens=150))  # moving
    assert not rec.succeeded(39.0, Progress(running=2, tokens=150)) and rec.up  # frozen 29 s
    assert rec.succeeded(40.0, Progress(running=2, tokens=150))  # frozen 30 s
    assert (rec.verdict, rec.up, rec.doomed, w.cancelled, rec.stalled_total) == (Verdict.STALLED, False, True, 1, 1)
    assert rec.reason == "no progress"
    assert not rec.succeeded(42.0, Progress(running=1, tokens=150))
    assert rec.succeeded(44.0, Progress(running=1, tokens=151)) and rec.up  # tokens moved again


def test_nothing_running_or_no_metrics_never_stalls() -> None:
    rec = UpstreamHealth("http://a", stall_s=5.0)
    for t in range(0, 100, 2):
        rec.succeeded(float(t), Progress(running=0, tokens=7))
    assert rec.up
    rec.succeeded(100.0, Progress(running=3, tokens=7))  # the stall clock starts with the first running sample
    assert rec.up
    rec.succeeded(106.0, None)  # metrics unreadable: we do not act on what we cannot see
    rec.succeeded(112.0, Progress(running=3, tokens=7))
    assert rec.up
    rec.succeeded(117.0, Progress(running=3, tokens=7))
    assert rec.verdict is Verdict.STALLED
    rec.succeeded(118.0, Progress(running=0, tokens=7))  # everything finished (or was aborted)
    assert rec.up


def test_a_counter_reset_is_progress_and_a_host_back_from_down_restarts_the_stall_clock() -> None:
    rec = UpstreamHealth("http://a", unhealthy_after=1, stall_s=5.0)
    rec.succeeded(0.0, Progress(running=1, tokens=500))
    rec.succeeded(4.0, Progress(running=1, tokens=3))  # vLLM restarted: a smaller counter is movement
    rec.succeeded(8.0, Progress(running=1, tokens=3))
    assert rec.up
    rec.failed(9.0, silent=True)
    assert rec.verdict is Verdict.DOWN
    rec.succeeded(20.0, Progress(running=1, tokens=3))  # same tokens as before the outage: not stalled yet
    assert rec.up
    rec.succeeded(25.0, Progress(running=1, tokens=3))
    assert rec.verdict is Verdict.STALLED


def test_the_book_counts_verdict_changes_and_adopts_records() -> None:
    book = HealthBook(unhealthy_after=2, stall_s=9.0)
    a = book.record("http://a")
    assert book.record("http://a") is a and book.get("http://b") is None
    assert (a.unhealthy_after, a.stall_s) == (2, 9.0)
    assert book.record("http://a", unhealthy_after=5).unhealthy_after == 5
    v = book.version
    a.failed(0.0, silent=True)
    assert book.version == v  # no verdict change
    for t in range(4):
        a.failed(float(t), silent=True)
    assert book.version == v + 1
    a.succeeded(9.0)
    assert book.version == v + 2

    own = HealthBook()
    b = own.record("http://b")
    b.failed(0.0, silent=False)
    b.failed(1.0, silent=False)
    b.failed(2.0, silent=False)
    assert book.adopt(b) is b and book.get("http://b") is b and b.stall_s == 9.0
    assert book.adopt(UpstreamHealth("http://a")) is a  # the book's own record wins
    v = book.version
    b.succeeded(3.0)
    assert book.version == v + 1  # an adopted record reports to its new book
    stats = book.statistics()
    assert stats["http://a"].up == 1.0 and stats["http://b"].state is Verdict.UP
    assert stats["http://b"].down_total == 1


def test_progress_comes_from_the_running_gauge_and_the_generation_counter() -> None:
    text = ('vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
            'vllm:generation_tokens_total{engine="0",model_name="m"} 40.0\n'
            'vllm:generation_tokens_total{engine="0",model_name="n"} 2.0\n')
    activity = probe.parse_activity(text)
    assert activity.generation_tokens == 42.0
    assert progress_of(activity) == Progress(running=2.0, tokens=42.0)
    assert progress_of(probe.parse_activity("vllm:num_requests_running 1\n")) is None  # no counter: unknown
    assert progress_of(None) is None
