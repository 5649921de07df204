"""SharedRateLimiter: the shared mmap'd bucket table, with a fake clock, and two real processes on it."""

from __future__ import annotations

import math
import os
import random
import struct
import subprocess
import sys
import textwrap

import pytest

from proxy.limits import shared_table as rs
from proxy.limits.buckets import RateLimiter
from proxy.limits.shared_table import SharedRateLimiter, TableError, create_table, open_limiter


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def hdr(adm) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in adm.headers}


@pytest.fixture
def table(tmp_path):
    return create_table(str(tmp_path / "rl.table"), slots=64)


def test_two_workers_share_one_key_exactly(table) -> None:
    clock = FakeClock()
    a, b = SharedRateLimiter(table, clock, workers=2), SharedRateLimiter(table, clock, workers=2)
    try:
        assert a.admit("alice", 3, None, 0).allowed
        assert hdr(b.admit("alice", 3, None, 0))["x-ratelimit-remaining-requests"] == "1"
        third = a.admit("alice", 3, None, 0)
        assert third.allowed and hdr(third)["x-ratelimit-remaining-requests"] == "0"
        fourth = b.admit("alice", 3, None, 0)
        assert not fourth.allowed and fourth.exceeded == "requests"
        assert fourth.retry_after_s == pytest.approx(20.0)
        h = hdr(fourth)
        assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-reset-requests"] == "1m0s"
        assert b.admit("bob", 3, None, 0).allowed  # another key, its own slot
        clock.advance(20.0)
        assert b.admit("alice", 3, None, 0).allowed
        assert not a.admit("alice", 3, None, 0).allowed
    finally:
        a.close()
        b.close()


def test_tokens_charge_and_reconcile_across_workers(table) -> None:
    clock = FakeClock()
    a, b = SharedRateLimiter(table, clock), SharedRateLimiter(table, clock)
    try:
        assert a.admit("k", None, 1000, 900).allowed
        refused = b.admit("k", None, 1000, 500)
        assert not refused.allowed and refused.exceeded == "tokens"
        a.reconcile("k", charged=900, actual=150)  # refunded in the table, seen by the other worker
        adm = b.admit("k", None, 1000, 500)
        assert adm.allowed and hdr(adm)["x-ratelimit-remaining-tokens"] == "350"
        b.reconcile("nobody", 10, 5)  # no slot: no-op, and claims nothing
        assert b._slot("nobody", claim=False) is None
    finally:
        a.close()
        b.close()


def test_same_decisions_as_the_in_process_limiter(table) -> None:
    """The bucket math is shared: a random workload gives identical admissions, headers included."""
    rng = random.Random(4)
    clock = FakeClock()
    local = RateLimiter(clock)
    shared = [SharedRateLimiter(table, clock) for _ in range(3)]
    try:
        names = ["k0", "k1", "k2", "k3"]
        limits = {n: (rng.choice([None, 3, 10, 60.5]), rng.choice([None, 100, 1000])) for n in names}
        for step in range(2000):
            name = rng.choice(names)
            lim = shared[step % 3]
            op = rng.random()
            if op < 0.05:
                limits[name] = (rng.choice([None, 2, 10, 30]), rng.choice([None, 50, 1000]))
            elif op < 0.25:
                clock.advance(rng.choice([0.001, 0.5, 3.0, 20.0]))
            elif op < 0.35:
                charged, actual = rng.randrange(0, 300), rng.randrange(0, 600)
                local.reconcile(name, charged, actual)
                lim.reconcile(name, charged, actual)
            else:
                rpm, tpm = limits[name]
                est = rng.randrange(0, 400)
                assert lim.admit(name, rpm, tpm, est) == local.admit(name, rpm, tpm, est), step
    finally:
        for lim in shared:
            lim.close()


def test_colliding_keys_probe_and_a_full_table_falls_back_per_worker(tmp_path) -> None:
    path = create_table(str(tmp_path / "tiny.table"), slots=2)
    clock = FakeClock()
    a, b = SharedRateLimiter(path, clock, workers=2), SharedRateLimiter(path, clock, workers=2)
    try:
        # Two slots, three keys: two keys get slots (colliding or not), the third overflows.
        for name in ("x", "y"):
            assert a.admit(name, 2, None, 0).allowed
            assert b.admit(name, 2, None, 0).allowed
            assert not a.admit(name, 2, None, 0).allowed  # exact: 2 across both workers
        over = a.admit("z", 2, None, 0)
        assert over.allowed and hdr(over)["x-ratelimit-limit-requests"] == "1"  # 2 / 2 workers, in-process
        assert not a.admit("z", 2, None, 0).allowed
        assert b.admit("z", 2, None, 0).allowed  # the other worker's own share
    finally:
        a.close()
        b.close()


def test_probing_finds_a_claimed_slot_in_a_fresh_process(table) -> None:
    clock = FakeClock()
    names = [f"key-{i}" for i in range(40)]  # 40 keys in 64 slots: collisions certain
    a = SharedRateLimiter(table, clock)
    for n in names:
        assert a.admit(n, 1, None, 0).allowed
    a.close()
    b = SharedRateLimiter(table, clock)  # no cached offsets
    try:
        for n in names:
            assert not b.admit(n, 1, None, 0).allowed, n
        assert len({b._slot(n) for n in names}) == len(names)
    finally:
        b.close()


def test_torn_slot_resets_to_a_full_bucket_and_forget(table) -> None:
    clock = FakeClock()
    lim = SharedRateLimiter(table, clock)
    try:
        for _ in range(3):
            lim.admit("k", 3, None, 0)
        assert not lim.admit("k", 3, None, 0).allowed
        off = lim._slot("k")
        struct.pack_into("<d", lim._map, off + 16, math.nan)  # request level: garbage
        assert hdr(lim.admit("k", 3, None, 0))["x-ratelimit-remaining-requests"] == "2"
        lim.forget("k")
        assert hdr(lim.admit("k", 3, None, 0))["x-ratelimit-remaining-requests"] == "2"
        assert lim.admit("free", None, None, 10**6).headers == ()
    finally:
        lim.close()


def test_bad_files_are_refused(tmp_path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 4096)
    with pytest.raises(TableError):
        SharedRateLimiter(str(junk), FakeClock())
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(TableError):
        SharedRateLimiter(str(empty), FakeClock())


def test_open_limiter_choices(table, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(rs.ENV, table)
    lim, div = open_limiter(1, FakeClock())
    assert isinstance(lim, RateLimiter) and div == 1  # one process: nothing to share
    lim, div = open_limiter(2, FakeClock())
    assert isinstance(lim, SharedRateLimiter) and div == 1
    lim.close()
    monkeypatch.setenv(rs.ENV, str(tmp_path / "missing"))
    lim, div = open_limiter(2, FakeClock())
    assert isinstance(lim, RateLimiter) and div == 2
    monkeypatch.delenv(rs.ENV)
    lim, div = open_limiter(3, FakeClock())
    assert isinstance(lim, RateLimiter) and div == 3


_HAMMER = textwrap.dedent("""
    import os, sys, time
    from proxy.limits.shared_table import SharedRateLimiter
    path, go, attempts = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lim = SharedRateLimiter(path, lambda: 1000.0, workers=2)  # a frozen clock: nothing refills
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.001)
    req = tok = 0
    for i in range(attempts):
        req += lim.admit("hot", 20000, None, 0).allowed
        tok += lim.admit("tok", None, 5000, 7).allowed
    print(req, tok, flush=True)
""")


def test_two_processes_hammering_one_key_never_exceed_the_limit(table, tmp_path) -> None:
    go = str(tmp_path / "go")
    attempts = 15000  # 30,000 request attempts for a limit of 20,000; 30,000 token attempts for 714
    procs = [subprocess.Popen([sys.executable, "-c", _HAMMER, table, go, str(attempts)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        with open(go, "w"):
            pass
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0
            results.append(tuple(int(x) for x in out.split()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=5)
    assert sum(r[0] for r in results) == 20000
    assert sum(r[1] for r in results) == 5000 // 7  # 714 charges of 7 fit; the 715th finds 2 left
    lim = SharedRateLimiter(table, lambda: 1000.0)
    try:
        assert hdr(lim.admit("hot", 20000, None, 0))["x-ratelimit-remaining-requests"] == "0"
    finally:
        lim.close()
