"""routing/homes.py and shared_homes.py: response id -> (tier, upstream), bounded in entries and age,
in-process or shared by the supervisor's workers."""

from __future__ import annotations

import multiprocessing

import pytest

from proxy.routing.homes import ResponseHomes
from proxy.routing.shared_homes import (
    ENV,
    MAX_VALUE,
    WAYS,
    HomesTableError,
    SharedHomes,
    create_homes_table,
    open_homes,
)


def test_remember_and_home():
    homes = ResponseHomes()
    homes.remember("resp_1", "t", "127.0.0.1:1")
    assert homes.home("resp_1") == ("t", "127.0.0.1:1")
    assert homes.home("resp_2") is None


def test_the_oldest_goes_first_past_the_bound():
    homes = ResponseHomes(max_entries=3)
    for i in range(5):
        homes.remember(f"r{i}", "t", "h:1")
    assert len(homes) == 3
    assert [homes.home(f"r{i}") is not None for i in range(5)] == [False, False, True, True, True]


def test_entries_expire():
    now = [0.0]
    homes = ResponseHomes(max_age_s=10, clock=lambda: now[0])
    homes.remember("r", "t", "h:1")
    now[0] = 9.9
    assert homes.home("r") == ("t", "h:1")
    now[0] = 10.1
    assert homes.home("r") is None and len(homes) == 0


# -- the workers' shared table (routing/shared_homes.py) ----------------------------------------------


def _remember_in_child(path: str, rid: str) -> None:
    SharedHomes(path).remember(rid, "tier-b", "10.0.0.2:8000")


def test_shared_table_is_seen_by_another_process(tmp_path):
    path = create_homes_table(str(tmp_path / "homes.table"), slots=64)
    mine = SharedHomes(path)
    mine.remember("resp_a", "tier-a", "10.0.0.1:8000")
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_remember_in_child, args=(path, "resp_b"))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert mine.home("resp_a") == ("tier-a", "10.0.0.1:8000")
    assert mine.home("resp_b") == ("tier-b", "10.0.0.2:8000")
    assert mine.home("resp_c") is None


def test_shared_table_evicts_the_oldest_of_a_full_set(tmp_path):
    now = [0.0]
    path = create_homes_table(str(tmp_path / "t"), slots=WAYS)  # one set: every id shares it
    homes = SharedHomes(path, clock=lambda: now[0])
    for i in range(WAYS + 1):
        now[0] = float(i)
        homes.remember(f"r{i}", "t", f"h:{i}")
    assert homes.home("r0") is None
    assert [homes.home(f"r{i}") for i in range(1, WAYS + 1)] == [("t", f"h:{i}") for i in range(1, WAYS + 1)]
    homes.remember("r2", "t", "moved:1")  # the same id takes its own slot again
    assert homes.home("r2") == ("t", "moved:1") and homes.home("r1") == ("t", "h:1")


def test_shared_table_expires_and_refuses_long_values(tmp_path):
    now = [0.0]
    homes = SharedHomes(create_homes_table(str(tmp_path / "t"), slots=64), max_age_s=5, clock=lambda: now[0])
    homes.remember("r", "t", "h:1")
    now[0] = 6
    assert homes.home("r") is None
    homes.remember("long", "t" * MAX_VALUE, "h:1")
    assert homes.home("long") is None


def test_not_a_table_is_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"x" * 4096)
    with pytest.raises(HomesTableError):
        SharedHomes(str(bad))


def test_open_homes_picks_by_worker_count(tmp_path, monkeypatch):
    assert isinstance(open_homes(1), ResponseHomes)
    monkeypatch.delenv(ENV, raising=False)
    assert isinstance(open_homes(2), ResponseHomes)  # no table named: in-process, logged
    monkeypatch.setenv(ENV, create_homes_table(str(tmp_path / "t"), slots=64))
    assert isinstance(open_homes(2), SharedHomes)
