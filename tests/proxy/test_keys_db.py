"""API keys in PostgreSQL: the CLI, the schema, the change counter and the gateway's refresher, all
against a real server (tests/support/servers.py)."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading

import psycopg
import pytest
import trio

from proxy.admit import keys, keys_db
from proxy.admit.keys_refresh import KeysRefresher, run_refresher
from tests.support.servers import free_port

WAIT_S = 5.0  # the promise: every host sees a change within 5 s


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "keys", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def rows(url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.execute(sql, params).fetchall()


# -- the CLI ------------------------------------------------------------------------------------

def test_cli_add_list_revoke(pg_url):
    r = cli("add", "alice", "--database-url", pg_url, "--rpm", "3", "--tpm", "1000", "--tiers", "a, b")
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip()
    assert secret.startswith("sk-si-") and r.stdout.count("\n") == 1
    assert "shown only once" in r.stderr and secret not in r.stderr
    assert "the keys database at 127.0.0.1:" in r.stderr
    (row,) = rows(pg_url, "SELECT name, hash, prefix, rpm, tpm, tiers, revoked FROM api_keys")
    assert row == ("alice", keys.digest(secret), secret[:10], 3, 1000, ["a", "b"], False)
    assert secret not in repr(rows(pg_url, "SELECT t::text FROM api_keys t"))

    r = cli("list", "--database-url", pg_url)
    assert r.returncode == 0, r.stderr
    header, line = r.stdout.splitlines()
    assert header.split() == ["NAME", "PREFIX", "RPM", "TPM", "TIERS", "STATE", "CREATED"]
    assert line.split()[:6] == ["alice", secret[:10], "3", "1000", "a,b", "active"]
    assert secret not in r.stdout

    r = cli("revoke", "alice", "--database-url", pg_url)
    assert r.returncode == 0, r.stderr
    assert "every gateway host refuses it within a few seconds (no reload needed)" in r.stderr
    assert cli("list", "--database-url", pg_url).stdout.splitlines()[1].split()[5] == "revoked"
    assert rows(pg_url, "SELECT revoked FROM api_keys") == [(True,)]


def test_cli_output_has_the_file_variants_shape(pg_url, tmp_path):
    keys_file = str(tmp_path / "keys.toml")
    for store in (("--keys-file", keys_file), ("--database-url", pg_url)):
        assert cli("add", "alice", *store, "--rpm", "5").returncode == 0
        assert cli("add", "bob", *store, "--tiers", "t1").returncode == 0
        assert cli("revoke", "bob", *store).returncode == 0

    def shape(out: str) -> list[list[str]]:  # the prefix and created columns differ by nature
        return [[w for i, w in enumerate(line.split()) if i not in (1, 6)] for line in out.splitlines()]

    from_file = cli("list", "--keys-file", keys_file).stdout
    from_db = cli("list", "--database-url", pg_url).stdout
    assert shape(from_file) == shape(from_db) and len(from_db.splitlines()) == 3
    assert [len(line) for line in from_file.splitlines()] == [len(line) for line in from_db.splitlines()]


@pytest.mark.parametrize("argv, message", [
    (["add", "alice", "--rpm", "3"], "already exists"),
    (["revoke", "ghost"], "no key named 'ghost'"),
    (["add", "bad name!"], "invalid key name"),
    (["add", "x", "--tpm", "0"], "--tpm must be a positive integer"),
])
def test_cli_errors_exit_1_with_the_message(pg_url, argv, message):
    assert cli("add", "alice", "--database-url", pg_url).returncode == 0
    r = cli(*argv, "--database-url", pg_url)
    assert r.returncode == 1 and message in r.stderr and r.stdout == ""
    assert rows(pg_url, "SELECT version FROM api_keys_version") == [(1,)]  # nothing changed


def test_cli_revoking_twice_is_an_error(pg_url):
    assert cli("add", "alice", "--database-url", pg_url).returncode == 0
    assert cli("revoke", "alice", "--database-url", pg_url).returncode == 0
    r = cli("revoke", "alice", "--database-url", pg_url)
    assert r.returncode == 1 and "already revoked" in r.stderr


@pytest.mark.parametrize("action", [["add", "alice"], ["list"], ["revoke", "alice"]])
def test_cli_needs_exactly_one_store(tmp_path, action):
    neither = cli(*action)
    assert neither.returncode == 2
    assert "one of the arguments --keys-file --database-url is required" in neither.stderr
    both = cli(*action, "--keys-file", str(tmp_path / "k.toml"), "--database-url", "postgresql://h/db")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert not (tmp_path / "k.toml").exists()


def test_cli_unreachable_database_names_it_without_the_password():
    port = free_port()
    r = cli("list", "--database-url", f"postgresql://admin:hunter2pw@127.0.0.1:{port}/keysdb")
    assert r.returncode == 1
    assert f"cannot reach the keys database at 127.0.0.1:{port}/keysdb: " in r.stderr
    assert "hunter2pw" not in r.stderr + r.stdout


# -- the schema and the change counter ----------------------------------------------------------

def test_version_bumps_with_every_change_and_load_is_one_snapshot(pg_url):
    assert keys_db.version(pg_url) == 0
    assert keys_db.load(pg_url) == (0, [])
    a = keys_db.add(pg_url, "alice", tiers=["t1"])
    assert keys_db.version(pg_url) == 1
    keys_db.add(pg_url, "bob", rpm=7)
    with pytest.raises(keys.KeysError, match="already exists"):
        keys_db.add(pg_url, "bob")
    keys_db.revoke(pg_url, "alice")
    with pytest.raises(keys.KeysError, match="already revoked"):
        keys_db.revoke(pg_url, "alice")
    with pytest.raises(keys.KeysError, match="no key named"):
        keys_db.revoke(pg_url, "carol")
    version, records = keys_db.load(pg_url)
    assert version == keys_db.version(pg_url) == 3
    assert [(r.name, r.rpm, r.tiers, r.revoked) for r in records] == [
        ("alice", None, ["t1"], True), ("bob", 7, [], False)]
    assert records == keys_db.records(pg_url)
    assert keys.KeyStore(records).lookup(a.encode()) is None


def test_schema_created_by_concurrent_first_users(pg_url):
    n = 6
    barrier = threading.Barrier(n, timeout=30)
    results: list = []

    def first_use():
        barrier.wait()
        try:
            with keys_db.connect(pg_url) as conn:
                results.append(keys_db.version(conn))
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            results.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [0] * n
    assert rows(pg_url, "SELECT component, version FROM spotinference_schema") == [
        ("keys", keys_db.SCHEMA_VERSION)]


def test_schema_table_is_shared_and_only_our_row_touched(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE spotinference_schema (component text PRIMARY KEY, version int NOT NULL)")
        conn.execute("INSERT INTO spotinference_schema VALUES ('usage', 1)")
    keys_db.add(pg_url, "alice")
    assert sorted(rows(pg_url, "SELECT component, version FROM spotinference_schema")) == [
        ("keys", keys_db.SCHEMA_VERSION), ("usage", 1)]


def test_a_newer_schema_is_refused(pg_url):
    keys_db.version(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE spotinference_schema SET version = %s WHERE component = 'keys'",
                     (keys_db.SCHEMA_VERSION + 1,))
    with pytest.raises(keys.KeysError, match=f"schema is version {keys_db.SCHEMA_VERSION + 1}, newer"):
        keys_db.version(pg_url)


def test_cli_admin_key_in_the_database(pg_url):
    r = cli("add", "ops", "--database-url", pg_url, "--admin")
    assert r.returncode == 0 and "admin key 'ops' added" in r.stderr, r.stderr
    admin = r.stdout.strip()
    assert cli("add", "alice", "--database-url", pg_url).returncode == 0
    assert rows(pg_url, "SELECT name, admin FROM api_keys ORDER BY name") == [("alice", False), ("ops", True)]
    listed = cli("list", "--database-url", pg_url).stdout.splitlines()
    assert {line.split()[0]: line.split()[5] for line in listed[1:]} == {"ops": "admin", "alice": "active"}
    _, records = keys_db.load(pg_url)
    assert keys.KeyStore(records).lookup(admin.encode()).admin
    assert keys_db.SCHEMA_VERSION == 2


def test_a_version_1_database_gets_the_admin_column(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the schema as version 1 left it, one key in it
        for statement in keys_db._SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT INTO api_keys (name, hash) VALUES ('old', %s)", (keys.digest("sk-si-old"),))
    assert rows(pg_url, "SELECT version FROM spotinference_schema WHERE component = 'keys'") == [(1,)]
    (old,) = keys_db.records(pg_url)  # connecting migrates, under the schema lock
    assert old.name == "old" and old.admin is False
    assert rows(pg_url, "SELECT version FROM spotinference_schema WHERE component = 'keys'") == [(2,)]
    keys_db.add(pg_url, "ops", admin=True)
    assert [(r.name, r.admin) for r in keys_db.records(pg_url)] == [("old", False), ("ops", True)]
    keys_db.version(pg_url)  # a second connect finds it current and changes nothing
    assert rows(pg_url, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'api_keys' "
                "AND column_name = 'admin'") == [(1,)]


# -- the refresher ------------------------------------------------------------------------------

class Deliveries:
    """on_change's stores, and a bounded wait for one that passes a check."""

    def __init__(self) -> None:
        self.stores: list[keys.KeyStore] = []

    def __call__(self, store: keys.KeyStore) -> None:
        self.stores.append(store)

    async def until(self, check, timeout: float = WAIT_S) -> keys.KeyStore:
        with trio.fail_after(timeout):
            while not (self.stores and check(self.stores[-1])):
                await trio.sleep(0.02)
        return self.stores[-1]


async def wait_for(predicate, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def test_refresher_sees_an_added_and_a_revoked_key_within_5_s(pg_url, capfd):
    old = await trio.to_thread.run_sync(keys_db.add, pg_url, "old")
    got = Deliveries()
    async with trio.open_nursery() as nursery:
        store = await nursery.start(run_refresher, pg_url, 0.2, got)
        assert store.lookup(old.encode()).name == "old" and len(store) == 1
        secret = await trio.to_thread.run_sync(lambda: keys_db.add(pg_url, "alice", tpm=50))
        store = await got.until(lambda s: s.lookup(secret.encode()) is not None)
        assert store.lookup(secret.encode()).tpm == 50 and store.lookup(old.encode()) is not None
        await trio.to_thread.run_sync(keys_db.revoke, pg_url, "alice")
        store = await got.until(lambda s: s.lookup(secret.encode()) is None)
        assert store.names() == {"old"}
        nursery.cancel_scope.cancel()
    assert len(got.stores) == 2  # one per change, none for the unchanged polls in between
    err = capfd.readouterr().err
    assert '"keys_refreshed"' in err and secret not in err and old not in err


async def test_refresher_keeps_the_last_store_through_an_outage(fresh_postgres, capfd):
    url = fresh_postgres.url()
    first = await trio.to_thread.run_sync(keys_db.add, url, "first")
    got = Deliveries()
    refresher = KeysRefresher(url, 0.2, got)
    async with trio.open_nursery() as nursery:
        store = await nursery.start(refresher.run)
        assert store.lookup(first.encode()) is not None

        await trio.to_thread.run_sync(fresh_postgres.stop)
        await wait_for(lambda: not refresher.up, 10)
        polls = refresher.poll_failures
        await wait_for(lambda: refresher.poll_failures >= polls + 3, 10)  # still polling, still down
        stats = refresher.statistics()
        assert (stats.up, stats.outages_total, stats.keys, stats.version) == (False, 1, 1, 1)
        assert got.stores == []  # the last store stays in force
        with pytest.raises(keys_db.Unreachable, match="cannot reach the keys database"):
            await trio.to_thread.run_sync(keys_db.add, url, "while-down")

        await trio.to_thread.run_sync(fresh_postgres.start)
        await wait_for(lambda: refresher.up, 10)
        later = await trio.to_thread.run_sync(keys_db.add, url, "later")
        store = await got.until(lambda s: s.lookup(later.encode()) is not None)
        assert store.lookup(first.encode()) is not None
        stats = refresher.statistics()
        assert stats.up and stats.reconnects_total >= 1 and stats.changes_total == 1
        assert stats.outages_total == 1 and stats.version == 2 and stats.keys == 2
        nursery.cancel_scope.cancel()
    err = capfd.readouterr().err
    assert err.count('"keys_db_down"') == 1 and err.count('"keys_db_up"') == 1
    assert first not in err and later not in err


async def test_refresher_unreachable_at_start_raises_a_clear_keys_error():
    port = free_port()
    url = f"postgresql://admin:hunter2pw@127.0.0.1:{port}/keysdb"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            with pytest.raises(keys.KeysError) as info:
                await nursery.start(functools.partial(run_refresher, url, 0.2, lambda s: None,
                                                      start_timeout_s=1.5))
    message = str(info.value)
    assert f"cannot reach the keys database at 127.0.0.1:{port}/keysdb" in message
    assert "still unreachable after 1.5 s" in message and "hunter2pw" not in message
