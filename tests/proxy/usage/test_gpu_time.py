"""GPU time end to end through the real pieces: [tiers.cost] validation, the recorder
(proxy/usage/gpu_time.py) on a fake clock over a wake-serve-sleep cycle, the real UsageLog and stores
(SQLite and PostgreSQL), deduplication of a minute two workers record, the schema migration, and
`spotinference usage --cost` run as a subprocess; then a real in-process gateway recording its tier
every second.

A "waker" here is a stand-in holding a real `ops.meter.GpuMeter` on the test's clock (the recorder only
reads `tier.waker.gpu_meter`); the meter is fed exactly what the waker's `_refresh_ec2` would feed it.
Spot prices come from moto's server (0.00001 USD per hour in every zone, see tests/ops/test_pricing.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import psycopg
import pytest
import trio

from ops.meter import GpuMeter
from ops.pricing import CostConfig
from ops.settings import WakeConfig
from proxy.admit import keys
from proxy.config import Config, ConfigError, TierConfig, UsageConfig, loads, validate
from proxy.gateway import Gateway, build_runtime
from proxy.usage import pg_store
from proxy.usage.gpu_time import GpuTimeRecorder
from proxy.usage.log import UsageLog, UsageRow, connect, insert_rows
from proxy.usage.pg_store import PgStore
from proxy.usage.sqlite_store import _MIGRATIONS as SQLITE_MIGRATIONS
from proxy.usage.store import GpuTimeRow, encode_spill, gpu_time_uid, read_spill
from tests.support.aws import AMI, client
from tests.support.gateway import make_config, one_response, post, split_response, start_gateway, start_sim

ROOT = Path(__file__).resolve().parents[3]
HOURLY = 36.0  # USD per host-hour: one cent per host-second, so the numbers read easily
MOTO_PRICE = 0.00001


# -- configuration --------------------------------------------------------------------------------------

TIER = '[[tiers]]\nname = "gpu"\nupstreams = ["http://10.0.0.5:8000"]\nmodels = ["m"]\n'
WAKE = '[tiers.wake]\ninstance_ids = ["i-0123456789abcdef0"]\n'


@pytest.mark.parametrize(("cost", "wake", "error"), [
    ("", "", "field 'tiers[0].cost': set hourly_usd = PRICE (USD per host-hour) or spot = true"),
    ("hourly_usd = 9.5\nspot = true\ninstance_type = \"p5.48xlarge\"\n", WAKE,
     "field 'tiers[0].cost.hourly_usd': set either hourly_usd or spot = true, not both"),
    ("hourly_usd = -1.0\n", "", "field 'tiers[0].cost.hourly_usd': must be a price >= 0"),
    ("hourly_usd = nan\n", "", "field 'tiers[0].cost.hourly_usd': must be a price >= 0"),
    ("spot = true\n", WAKE, "field 'tiers[0].cost.instance_type': spot = true needs the EC2 instance type"),
    ("spot = true\ninstance_type = \"p5\"\n", WAKE, "field 'tiers[0].cost.instance_type'"),
    ("spot = true\ninstance_type = \"p5.48xlarge\"\n", "",
     "field 'tiers[0].cost.availability_zone': spot = true on a tier without [tiers.wake] needs"),
    ("spot = true\ninstance_type = \"p5.48xlarge\"\navailability_zone = \"eu-west-1a\"\n", WAKE,
     "field 'tiers[0].cost.availability_zone': 'eu-west-1a' is not a zone of region 'us-east-1'"),
    ("hourly_usd = 1.0\nrefresh_s = 0\n", "", "field 'tiers[0].cost.refresh_s': must be > 0"),
    ("hourly_usd = 1.0\nprice = 2\n", "", "unknown field 'tiers[0].cost.price'"),
    ("hourly_usd = \"ten\"\n", "", "field 'tiers[0].cost.hourly_usd'"),
])
def test_bad_cost_tables_name_the_field(cost: str, wake: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(TIER + wake + "[tiers.cost]\n" + cost)
    assert str(info.value).startswith(error), str(info.value)


def test_good_cost_tables_and_the_interval() -> None:
    cfg = loads(TIER + "[tiers.cost]\nhourly_usd = 98.32\n")
    assert cfg.tiers[0].cost == CostConfig(hourly_usd=98.32) and cfg.usage.gpu_time_s == 60
    cfg = loads(TIER + WAKE + '[tiers.cost]\nspot = true\ninstance_type = "p5.48xlarge"\n')
    assert cfg.tiers[0].cost.spot and cfg.tiers[0].cost.product == "Linux/UNIX"
    cfg = loads(TIER + '[tiers.cost]\nspot = true\ninstance_type = "p5.48xlarge"\nregion = "eu-west-1"\n'
                'availability_zone = "eu-west-1b"\n')
    assert cfg.tiers[0].cost.availability_zone == "eu-west-1b"
    with pytest.raises(ConfigError, match="field 'usage.gpu_time_s': must be >= 1"):
        loads("[usage]\ngpu_time_s = 0\n")


# -- the store ------------------------------------------------------------------------------------------

def gpu_row(ts: float, host: str = "i-1", seconds: float = 60.0, tier: str = "gpu") -> GpuTimeRow:
    return GpuTimeRow(ts=ts, tier=tier, host=host, seconds=seconds, usd=seconds * HOURLY / 3600,
                      price_source="fixed")


def gpu_rows(db: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT ts, tier, host, seconds, usd, price_source, uid FROM gpu_time "
                         "ORDER BY ts, host").fetchall()


def test_spill_lines_round_trip_both_kinds(tmp_path) -> None:
    usage = UsageRow(ts=1.0, request_id="r", key_name="alice", tier="gpu", total_tokens=5)
    gpu = gpu_row(6000.0)
    path = tmp_path / "s.jsonl"
    path.write_bytes(encode_spill([("u1", usage), (gpu_time_uid(gpu), gpu)]))
    assert path.read_bytes().splitlines()[0].startswith(b'{"uid":"u1","row":{')  # the old format, unchanged
    assert list(read_spill(str(path))) == [[("u1", usage), ("gpu|i-1|6000", gpu)]]


def test_a_version_1_sqlite_file_is_migrated_keeping_its_rows(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    with sqlite3.connect(db) as c:
        for stmt in SQLITE_MIGRATIONS[1]:
            c.execute(stmt)
        c.execute("INSERT INTO usage (ts, request_id, endpoint, stream, status, estimated, uid) "
                  "VALUES (1, 'old', 'chat', 0, 200, 0, 'x')")
        c.execute("PRAGMA user_version = 1")
    conn = connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT request_id FROM usage").fetchall() == [("old",)]
    assert conn.execute("SELECT count(*) FROM gpu_time").fetchone() == (0,)
    conn.close()


async def test_gpu_rows_share_the_queue_and_the_spill_file_and_a_minute_is_one_row(tmp_path) -> None:
    """Two workers' logs on one file record the same minutes; a full queue spills gpu rows too."""
    db = str(tmp_path / "usage.sqlite3")
    a = UsageLog(db, spill_path=str(tmp_path / "a.spill.jsonl"), flush_s=0.01)
    b = UsageLog(db, spill_path=str(tmp_path / "b.spill.jsonl"), flush_s=0.01, queue_max=0)  # spills all
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            for log in (a, b):
                log.record(UsageRow(ts=6001.0, request_id=f"r-{id(log)}", tier="gpu", total_tokens=10))
                log.record_gpu_time(gpu_row(6000.0))
                log.record_gpu_time(gpu_row(6060.0, seconds=12.5))
            await a.wait_flushed()
            assert b.statistics().spilled_total == 3
            await nursery.start(b.run)  # imports its spill file at start
            nursery.cancel_scope.cancel()
    assert gpu_rows(db) == [(6000.0, "gpu", "i-1", 60.0, 0.6, "fixed", "gpu|i-1|6000"),
                            (6060.0, "gpu", "i-1", 12.5, 0.125, "fixed", "gpu|i-1|6060")]
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM usage").fetchone() == (2,)


# -- the recorder on a fake clock ------------------------------------------------------------------------

class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class StandInWaker:
    """What the recorder reads of a waker: its meter."""

    def __init__(self, meter: GpuMeter) -> None:
        self.gpu_meter = meter


def cost_config(db: str, *, spot_url: str | None = None, instance: str = "i-0123456789abcdef0") -> Config:
    spot = CostConfig(spot=True, instance_type="p5.48xlarge")
    gpu_cost = spot if spot_url else CostConfig(hourly_usd=HOURLY)
    wake = WakeConfig(instance_ids=[instance], endpoint_url=spot_url)
    tiers = [TierConfig(name="gpu", upstreams=["http://10.0.0.5:8000"], models=["m"], wake=wake,
                        cost=gpu_cost),
             TierConfig(name="spare", upstreams=["http://10.0.0.6:8000"], models=["s"],
                        cost=CostConfig(hourly_usd=HOURLY)),
             TierConfig(name="free", upstreams=["http://10.0.0.7:8000"], models=["f"])]
    return validate(Config(tiers=tiers, usage=UsageConfig(path=db, flush_s=0.01)))


def gateway_for(config: Config, meter: GpuMeter) -> Gateway:
    gw = Gateway(build_runtime(config))
    gw.runtime.router.tiers["gpu"].waker = StandInWaker(meter)
    return gw


def usage_rows_of_a_day(t0: float) -> list[UsageRow]:
    """alice 3000 tokens and bob 1000 on tier gpu while it served; carol 500 on the free tier; nobody on
    spare."""
    rows = [UsageRow(ts=t0 + 60 + i, request_id=f"a{i}", key_name="alice", model="m", tier="gpu", status=200,
                     prompt_tokens=200, completion_tokens=100, total_tokens=300, latency_ms=50.0)
            for i in range(10)]
    rows += [UsageRow(ts=t0 + 90 + i, request_id=f"b{i}", key_name="bob", model="m", tier="gpu", status=200,
                      prompt_tokens=None, completion_tokens=None, total_tokens=250, latency_ms=40.0)
             for i in range(4)]
    rows += [UsageRow(ts=t0 + 100, request_id="c0", key_name="carol", model="f", tier="free", status=200,
                      prompt_tokens=400, completion_tokens=100, total_tokens=500, latency_ms=10.0)]
    return rows


def wake_serve_sleep(clock: Clock, meter: GpuMeter, recorder: GpuTimeRecorder, host: str) -> None:
    """The waker's observations, minute by minute, with the recorder's turns in between: StartInstances at
    t0+10, pending seen at t0+12, running at t0+40, idle StopInstances at t0+200, stopped seen at t0+230."""
    t0 = clock.t
    steps = [(0, "stopped", None), (12, "pending", 2.0), (40, "running", None), (200, "stopping", None),
             (230, "stopped", None)]
    for at, state, ago in steps:
        while recorder.next_start + recorder.interval_s + recorder.lag_s <= t0 + at:
            clock.t = recorder.next_start + recorder.interval_s + recorder.lag_s
            recorder.record_due()
        clock.t = t0 + at
        meter.observe(host, state, started_ago_s=ago)
    clock.t = t0 + 425.0
    recorder.record_due()


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "usage", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, "COLUMNS": "200"})


def cost_json(*where: str) -> dict:
    done = cli(*where, "--cost", "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check_attribution(doc: dict, tier_usd: float, idle_usd: float) -> None:
    groups = {g["key"]: g for g in doc["groups"]}
    alice, bob, carol, idle = groups["alice"], groups["bob"], groups["carol"], groups["(idle)"]
    assert doc["cost"]["tiers"]["gpu"]["usd"] == pytest.approx(tier_usd, rel=1e-6)
    assert alice["usd"] + bob["usd"] == pytest.approx(tier_usd, rel=0.01)  # the per-key shares add up
    assert alice["usd"] == pytest.approx(tier_usd * 3000 / 4000, rel=1e-6)
    assert alice["usd_per_mtok"] == pytest.approx(tier_usd / 4000 * 1e6, rel=1e-6)
    assert bob["usd_per_mtok"] == pytest.approx(alice["usd_per_mtok"], rel=1e-6)
    assert carol["usd"] == 0 and carol["usd_per_mtok"] is None  # a tier without [tiers.cost]
    assert idle["requests"] == 0 and idle["usd"] == pytest.approx(idle_usd, rel=1e-6)
    assert doc["cost"]["tiers"]["spare"]["idle"] and not doc["cost"]["tiers"]["gpu"]["idle"]
    assert sum(g["usd"] for g in doc["groups"]) == pytest.approx(doc["cost"]["usd"], rel=0.01)


async def run_recorded_day(tmp_path: Path, config: Config, log: UsageLog, *, spot: bool, host: str,
                           t0: float) -> GpuTimeRecorder:
    clock = Clock(t0)
    meter = GpuMeter(clock)
    gw = gateway_for(config, meter)
    gw.usage = log
    recorder = GpuTimeRecorder(gw, clock=clock)
    recorder.observe()  # the gateway's start: the tier without a waker is up from here
    meter.observe(host, "stopped")  # the waker's first look (it describes before the recorder starts)
    if spot:
        with trio.fail_after(30):
            await recorder.refresh_prices()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            wake_serve_sleep(clock, meter, recorder, host)
            for row in usage_rows_of_a_day(t0):
                log.record(row)
            await log.wait_flushed()
            nursery.cancel_scope.cancel()
    return recorder


def minute_ago(hours: float) -> float:
    return float(int((time.time() - hours * 3600) // 60) * 60)


async def test_fixed_price_over_a_wake_serve_sleep_cycle(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    t0 = minute_ago(1)
    recorder = await run_recorded_day(tmp_path, cost_config(db), UsageLog(db), spot=False,
                                      host="i-0123456789abcdef0", t0=t0)
    rows = gpu_rows(db)
    gpu = [r for r in rows if r[1] == "gpu"]
    # paid from the StartInstances (t0+10) to stopped seen (t0+230), cut into the minutes it spans
    assert [(r[0] - t0, r[3]) for r in gpu] == [(0, 50.0), (60, 60.0), (120, 60.0), (180, 50.0)]
    assert {r[5] for r in rows} == {"fixed"} and {r[6] for r in gpu} == {
        f"gpu|i-0123456789abcdef0|{int(t0 + 60 * i)}" for i in range(4)}
    spare_rows = [r for r in rows if r[1] == "spare"]  # no waker: up all the time the gateway ran (7 min)
    assert [r[3] for r in spare_rows] == [60.0] * 7 and {r[2] for r in spare_rows} == {"http://10.0.0.6:8000"}
    assert recorder.tier_cost("gpu") == pytest.approx((220.0, 2.2))
    assert recorder.tier_cost("free") == (0.0, 0.0) and recorder.cost_view("free") is None
    assert recorder.cost_view("gpu") == {"gpu_seconds": pytest.approx(220.0), "usd": pytest.approx(2.2),
                                         "since": t0, "hosts_up": 0, "usd_per_hour": 0, "price_sources": []}
    spare = recorder.cost_view("spare")  # up now: 7 whole minutes recorded, 5 s of the eighth so far
    assert spare["hosts_up"] == 1 and spare["usd_per_hour"] == HOURLY and spare["price_sources"] == ["fixed"]
    assert spare["gpu_seconds"] == pytest.approx(425.0)
    check_attribution(cost_json("--db", db), tier_usd=2.2, idle_usd=4.2)
    since = cost_json("--db", db, "--since", "2h")  # the period: all of it is within the last two hours
    assert since["cost"]["usd"] == pytest.approx(6.4)
    by_tier = {g["tier"]: g for g in cost_json("--db", db, "--by", "tier")["groups"]}
    assert by_tier["spare"]["requests"] == 0 and by_tier["spare"]["usd"] == pytest.approx(4.2)
    assert by_tier["gpu"]["usd_per_mtok"] == pytest.approx(2.2 / 4000 * 1e6)
    table = cli("--db", db, "--cost")
    assert table.returncode == 0, table.stderr
    assert "(idle)" in table.stdout and "usd/Mtok" in table.stdout
    assert "cost: tier gpu: 0.061 GPU host-hours, $2.2000, 4000 tokens" in table.stdout
    assert "cost without tokens" in table.stdout
    csv_out = cli("--db", db, "--cost", "--by", "model", "--format", "csv").stdout.splitlines()
    assert csv_out[0].endswith(",usd,usd_per_mtok") and any(line.startswith("(idle),0,") for line in csv_out)


async def test_spot_price_history_from_moto(aws_url: str, tmp_path) -> None:
    (inst,) = client(aws_url).run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="p5.48xlarge",
                                            Placement={"AvailabilityZone": "us-east-1a"})["Instances"]
    host = inst["InstanceId"]
    db = str(tmp_path / "usage.sqlite3")
    t0 = minute_ago(1)
    config = cost_config(db, spot_url=aws_url, instance=host)
    await run_recorded_day(tmp_path, config, UsageLog(db), spot=True, host=host, t0=t0)
    gpu = [r for r in gpu_rows(db) if r[1] == "gpu"]
    assert {r[5] for r in gpu} == {"spot:us-east-1a"} and sum(r[3] for r in gpu) == 220.0
    tier_usd = 220.0 * MOTO_PRICE / 3600
    assert sum(r[4] for r in gpu) == pytest.approx(tier_usd)
    check_attribution(cost_json("--db", db), tier_usd=tier_usd, idle_usd=4.2)


async def test_two_workers_recording_the_same_minutes_write_each_once(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    t0 = minute_ago(1)
    config = cost_config(db)
    clock = Clock(t0 + 7)  # both started mid-minute
    logs = [UsageLog(db, spill_path=str(tmp_path / f"w{i}.spill.jsonl"), flush_s=0.01) for i in range(2)]
    recorders = []
    for log in logs:
        gw = gateway_for(config, GpuMeter(clock))
        gw.usage, gw.workers = log, 2
        recorders.append(GpuTimeRecorder(gw, clock=clock))
        recorders[-1].observe()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for log in logs:
                await nursery.start(log.run)
            clock.t = t0 + 185.0
            assert [r.record_due() for r in recorders] == [3, 3]  # each records the spare tier's 3 minutes
            for log in logs:
                await log.wait_flushed()
            nursery.cancel_scope.cancel()
    rows = gpu_rows(db)
    assert [(r[0] - t0, r[1], r[3]) for r in rows] == [(0, "spare", 60.0), (60, "spare", 60.0),
                                                       (120, "spare", 60.0)]


# -- PostgreSQL -------------------------------------------------------------------------------------------

def pg_sql(url: str, statement: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as c:
        cur = c.execute(statement)
        return cur.fetchall() if cur.description else []


def test_a_version_1_postgres_database_is_migrated(pg_url) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(pg_store._SCHEMA_TABLE)
        for stmt in pg_store._MIGRATIONS[1]:
            c.execute(stmt)
        c.execute("INSERT INTO spotinference_schema VALUES ('usage', 1)")
        c.execute("INSERT INTO usage (ts, request_id, endpoint, stream, status, estimated, uid) "
                  "VALUES (1, 'old', 'chat', false, 200, false, 'x')")
    pg_store.connect(pg_url).close()
    assert pg_sql(pg_url, "SELECT component, version FROM spotinference_schema") == [("usage", 2)]
    assert pg_sql(pg_url, "SELECT request_id FROM usage") == [("old",)]
    assert pg_sql(pg_url, "SELECT count(*) FROM gpu_time") == [(0,)]
    indexes = " ".join(d for (d,) in pg_sql(pg_url, "SELECT indexdef FROM pg_indexes "
                                                    "WHERE tablename = 'gpu_time'"))
    assert "UNIQUE" in indexes and "(uid)" in indexes and "(ts)" in indexes


async def test_postgres_cost_report_and_one_row_per_minute(pg_url, tmp_path) -> None:
    t0 = minute_ago(1)
    config = cost_config(str(tmp_path / "unused.sqlite3"))
    log = UsageLog(PgStore(pg_url), spill_path=str(tmp_path / "pg.spill.jsonl"), flush_s=0.01)
    await run_recorded_day(tmp_path, config, log, spot=False, host="i-0123456789abcdef0", t0=t0)
    # a second worker's log records a minute already there, plus an old spill line of it: still one row
    again = UsageLog(PgStore(pg_url), spill_path=str(tmp_path / "pg2.spill.jsonl"), flush_s=0.01)
    (tmp_path / "pg2.spill.jsonl").write_bytes(encode_spill([(gpu_time_uid(r), r) for r in [
        GpuTimeRow(ts=t0, tier="gpu", host="i-0123456789abcdef0", seconds=49.0, usd=0.49,
                   price_source="fixed")]]))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(again.run)
            again.record_gpu_time(GpuTimeRow(ts=t0 + 60, tier="gpu", host="i-0123456789abcdef0", seconds=59.5,
                                             usd=0.595, price_source="fixed"))
            await again.wait_flushed()
            nursery.cancel_scope.cancel()
    rows = pg_sql(pg_url, "SELECT ts, seconds FROM gpu_time WHERE tier = 'gpu' ORDER BY ts")
    assert [(ts - t0, s) for ts, s in rows] == [(0, 50.0), (60, 60.0), (120, 60.0), (180, 50.0)]  # first wins
    doc = cost_json("--database-url", pg_url)
    check_attribution(doc, tier_usd=2.2, idle_usd=4.2)
    db = str(tmp_path / "same.sqlite3")  # the same rows in SQLite report the same
    lite = connect(db)
    insert_rows(lite, usage_rows_of_a_day(t0))
    lite.executemany("INSERT INTO gpu_time (ts, tier, host, seconds, usd, price_source, uid) "
                     "VALUES (?,?,?,?,?,?,?)",
                     pg_sql(pg_url, "SELECT ts, tier, host, seconds, usd, price_source, uid FROM gpu_time"))
    lite.commit()
    lite.close()
    assert cost_json("--db", db) == doc


def test_a_database_without_gpu_time_reports_no_cost(tmp_path) -> None:
    db = str(tmp_path / "v1.sqlite3")
    with sqlite3.connect(db) as c:
        for stmt in SQLITE_MIGRATIONS[1]:
            c.execute(stmt)
        c.execute("PRAGMA user_version = 1")
    doc = cost_json("--db", db)
    assert doc["cost"] == {"tiers": {}, "usd": 0, "recorded": False}
    assert "no gpu_time table yet" in cli("--db", db, "--cost").stdout


# -- a real gateway ------------------------------------------------------------------------------------------

async def test_a_running_gateway_records_its_tier_every_interval(tmp_path) -> None:
    """The sim tier (no waker: always up) at 36 USD an hour, recorded every second; alice and bob send
    requests; the report shares the recorded cost between them; the metrics counted the same."""
    db = str(tmp_path / "usage.sqlite3")
    keys_file = str(tmp_path / "keys.toml")
    secrets = {name: keys.add(keys_file, name) for name in ("alice", "bob")}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, sim_url = await start_sim(nursery, ttft_ms=0, tokens_per_s=0)
            base = make_config([sim_url], keys_file=keys_file, cost=CostConfig(hourly_usd=HOURLY))
            usage = UsageConfig(path=db, gpu_time_s=1, flush_s=0.01)
            config = validate(msgspec.structs.replace(base, usage=usage))
            gw = await start_gateway(nursery, config)
            for name, n in (("alice", 3), ("bob", 1)):
                for _ in range(n):
                    auth = f"Authorization: Bearer {secrets[name]}\r\n".encode()
                    status, _, _ = split_response(await one_response(gw.port, post(
                        b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":8}',
                        extra=auth)))
                    assert status == 200
            while len(gpu_rows(db)) < 3:  # three whole seconds recorded
                await gw.gw.usage.wait_flushed()
                await trio.sleep(0.1)
            recorder = gw.gw.gpu_time
            seconds, usd = recorder.tier_cost("local")
            assert seconds >= 3.0 and usd == pytest.approx(seconds / 100)
            metrics = gw.gw.metrics.render()[1].decode()  # (no await: nothing is recorded in between)
            upto = recorder.next_start
            counted = next(float(line.split()[-1]) for line in metrics.splitlines()
                           if line.startswith('spotinference_tier_cost_usd_total{tier="local"}'))
            await gw.gw.usage.wait_flushed()
            recorded = sum(r[4] for r in gpu_rows(db) if r[0] < upto)
            assert counted == pytest.approx(recorded)  # one worker: its share is all of it
            assert 'spotinference_tier_gpu_seconds_total{tier="local"}' in metrics
            nursery.cancel_scope.cancel()
    rows = gpu_rows(db)
    starts = [r[0] for r in rows]
    assert starts == sorted(set(starts)) and all(r[2] == sim_url for r in rows)  # one row a second, one host
    assert all(r[3] == pytest.approx(1.0) for r in rows)  # whole seconds (the first: backdated, whole too)
    doc = cost_json("--db", db)
    groups = {g["key"]: g for g in doc["groups"]}
    total = doc["cost"]["tiers"]["local"]["usd"]
    assert total == pytest.approx(sum(r[4] for r in rows))
    assert groups["alice"]["usd"] + groups["bob"]["usd"] == pytest.approx(total, rel=0.01)
    assert groups["alice"]["usd"] == pytest.approx(3 * groups["bob"]["usd"], rel=0.01)  # same tokens each


async def test_a_gpu_row_after_the_writer_ended_is_spilled_not_lost(tmp_path) -> None:
    """After shutdown a late GPU row goes to the spill file like a usage row; the next start imports it."""
    db = str(tmp_path / "usage.sqlite3")
    log = UsageLog(db)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            nursery.cancel_scope.cancel()
    log.record_gpu_time(gpu_row(6000.0))
    assert log.statistics().spilled_total == 1
    assert [row for chunk in read_spill(log.spill_path) for _, row in chunk] == [gpu_row(6000.0)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(UsageLog(db).run)
            nursery.cancel_scope.cancel()
    assert [r[6] for r in gpu_rows(db)] == ["gpu|i-1|6000"] and not os.path.exists(log.spill_path)
