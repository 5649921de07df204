"""proxy/cluster/redis.py against a real redis-server (tests/support/servers.py), and against fake servers
that never answer or answer garbage (trio listeners on 127.0.0.1:0 in the test).

Every test body runs under `trio.fail_after(10)`: a hang is a failure, not a stuck suite.
"""

from __future__ import annotations

import pytest
import trio

from proxy.cluster import redis as redis_mod
from proxy.cluster.redis import RedisClient, RedisTarget, RedisUnavailable, Script, parse_url
from proxy.cluster.resp import ProtocolError, ReplyError, encode
from tests.support.servers import free_port

BOUND_S = 10


async def _serve(nursery: trio.Nursery, handler) -> int:
    """A TCP server on 127.0.0.1:<free port> running `handler(stream)` per connection; its port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return listeners[0].socket.getsockname()[1]


async def _silent(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


async def _garbage(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep_forever()


async def _hang_up(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(65536)


# -- commands and replies -------------------------------------------------------------------------

async def test_strings_counters_expiry_and_delete(redis_url):
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client:
            assert await client.execute("SET", "k", "v") == b"OK"
            assert await client.execute("GET", "k") == b"v"
            assert await client.execute("GET", "missing") is None
            assert await client.execute("INCR", "n") == 1
            assert await client.execute("INCRBY", "n", 41) == 42
            assert await client.execute("INCRBYFLOAT", "f", 0.5) == b"0.5"
            assert await client.execute("TTL", "k") == -1
            assert await client.execute("EXPIRE", "k", 100) == 1
            assert 0 < await client.execute("TTL", "k") <= 100
            assert await client.execute("TTL", "missing") == -2
            assert await client.execute("DEL", "k", "n", "missing") == 2
            assert await client.execute("EXISTS", "k") == 0


async def test_reply_types_arrays_nulls_and_binary_values(redis_url):
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client:
            assert await client.execute("PING") == b"PONG"
            assert await client.execute("RPUSH", "l", "a", b"b", 3) == 3
            assert await client.execute("LRANGE", "l", 0, -1) == [b"a", b"b", b"3"]
            assert await client.execute("LRANGE", "missing", 0, -1) == []
            await client.execute("SET", "x", "1")
            assert await client.execute("MGET", "x", "missing", "x") == [b"1", None, b"1"]
            assert await client.execute("BLPOP", "empty", 0.01) is None  # a null array in RESP2
            nested = Script("return {1, {2, 'two', {}}, -3}")
            assert await client.eval(nested, [], []) == [1, [2, b"two", []], -3]
            binary = bytes(range(256)) + b"\r\n$5\r\n*1\r\n"
            await client.execute("SET", b"bin\r\nkey", binary)
            assert await client.execute("GET", b"bin\r\nkey") == binary
            big = b"x" * (1 << 20)  # several reads of 64 KiB, one round trip
            async with RedisClient(redis_url, timeout_s=5.0) as slow_ok:
                await slow_ok.execute("SET", "big", big)
                assert await slow_ok.execute("GET", "big") == big
            assert await client.execute("SET", "u", "é") == b"OK"
            assert await client.execute("STRLEN", "u") == 2


async def test_an_error_reply_is_raised_and_the_connection_kept(redis_url):
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client:
            await client.execute("SET", "s", "v")
            with pytest.raises(ReplyError) as info:
                await client.execute("LPUSH", "s", "x")
            assert info.value.code == "WRONGTYPE"
            assert info.value.message.startswith("WRONGTYPE ")
            with pytest.raises(ReplyError) as info:
                await client.execute("NOSUCHCOMMAND")
            assert info.value.code == "ERR"
            assert await client.execute("GET", "s") == b"v"
            stats = client.statistics()
            assert (stats.connects_total, stats.errors_total, stats.idle) == (1, 0, 1)


def test_encode_and_argument_types():
    assert encode("SET", b"k", 7, 1.5) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n$3\r\n1.5\r\n"
    assert encode("é") == b"*1\r\n$2\r\n\xc3\xa9\r\n"
    assert encode() == b"*0\r\n"
    for bad in (None, True, [1], {"a": 1}, bytearray(b"x"), object()):
        with pytest.raises(TypeError):
            encode("SET", bad)


def test_urls():
    assert parse_url("redis://h") == RedisTarget("h", 6379, 0, None, None)
    assert parse_url("redis://:p%40ss@h:7000/3") == RedisTarget("h", 7000, 3, None, "p@ss")
    assert parse_url("redis://u:p@h/1") == RedisTarget("h", 6379, 1, "u", "p")
    for bad in ("http://h", "redis://", "redis://h/x", "redis://h:99999", "redis://u@h", "redis://h/?db=1"):
        with pytest.raises(ValueError):
            parse_url(bad)
    assert "secret" not in repr(RedisClient("redis://:secret@127.0.0.1:1/2"))


# -- pipelines and scripts ------------------------------------------------------------------------

async def test_a_pipeline_of_100_commands_is_one_call(redis_url):
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client:
            commands = [("INCR", "counter") for _ in range(50)] + [("GET", f"k{i}") for i in range(50)]
            replies = await client.pipeline(commands)
            assert replies == list(range(1, 51)) + [None] * 50
            assert client.statistics().connects_total == 1
            assert await client.pipeline([]) == []


async def test_an_error_in_the_middle_of_a_pipeline_is_returned_in_place(redis_url):
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client:
            replies = await client.pipeline([("SET", "a", "1"), ("LPUSH", "a", "x"), ("INCR", "a"), ("GET", "a")])
            assert replies[0] == b"OK"
            assert isinstance(replies[1], ReplyError) and replies[1].code == "WRONGTYPE"
            assert replies[2:] == [2, b"2"]
            assert client.statistics().idle == 1  # an error reply is not a broken connection


async def test_eval_falls_back_to_eval_on_noscript(redis_url):
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client:
            assert await client.execute("SCRIPT", "FLUSH") == b"OK"
            assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
            assert await client.eval(script, ["n"], [5]) == 5  # NOSCRIPT, then EVAL
            assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]  # loaded by that EVAL
            assert await client.eval(script, ["n"], [2]) == 7  # EVALSHA alone
            failing = Script("return redis.call('INCR', KEYS[1])")
            await client.execute("SET", "s", "text")
            with pytest.raises(ReplyError) as info:
                await client.eval(failing, ["s"], [])
            assert "not an integer" in info.value.message


async def test_pipeline_sends_noscript_evalshas_again_as_eval(redis_url):
    incr = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    fails = Script("return redis.call('LPUSH', KEYS[1], 'x')")
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client:
            await client.execute("SET", "text", "t")
            await client.execute("SCRIPT", "FLUSH")
            replies = await client.pipeline([client.evalsha(incr, ["a"], [2]), ("SET", "b", "1"),
                                             client.evalsha(fails, ["text"], []), client.evalsha(incr, ["a"], [3]),
                                             ("EVALSHA", "0" * 40, 0)])
            assert replies[0] in (2, 5) and replies[3] in (2, 5) and replies[0] + replies[3] == 7
            assert replies[1] == b"OK"
            assert isinstance(replies[2], ReplyError) and replies[2].code == "WRONGTYPE"
            assert isinstance(replies[4], ReplyError) and replies[4].code == "NOSCRIPT"  # unknown sha: kept
            assert await client.execute("GET", "a") == b"5"
            # loaded now: the next pipeline is one round trip of EVALSHAs
            assert await client.pipeline([client.evalsha(incr, ["a"], [1])]) == [6]


# -- databases and the pool -----------------------------------------------------------------------

async def test_database_selection_isolates(fresh_redis):
    with trio.fail_after(BOUND_S):
        async with RedisClient(fresh_redis.url(3)) as a, RedisClient(fresh_redis.url(4)) as b:
            await a.execute("SET", "shared-name", "in 3")
            assert await b.execute("GET", "shared-name") is None
            await b.execute("SET", "shared-name", "in 4")
            assert await a.execute("GET", "shared-name") == b"in 3"
            async with RedisClient(fresh_redis.url(0)) as zero:
                assert await zero.execute("DBSIZE") == 0


async def test_the_pool_reuses_one_connection_for_sequential_calls(redis_url):
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client:
            for i in range(50):
                await client.execute("SET", f"k{i}", i)
                await client.pipeline([("GET", f"k{i}")])
            stats = client.statistics()
            assert (stats.connects_total, stats.idle, stats.errors_total) == (1, 1, 0)


async def test_concurrent_calls_open_their_own_connections(redis_url):
    with trio.fail_after(BOUND_S):
        for max_idle, kept in ((16, 4), (2, 2)):
            async with RedisClient(redis_url, max_idle=max_idle) as client:
                got = {}

                async def call(i: int, client=client, got=got) -> None:
                    got[i] = await client.execute("ECHO", f"m{i}")

                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        nursery.start_soon(call, i)
                assert got == {i: f"m{i}".encode() for i in range(4)}
                assert client.statistics().connects_total == 4
                assert client.statistics().idle == kept
            assert client.statistics().idle == 0  # aclose() closed them


async def test_a_connection_the_server_closed_while_idle_is_not_used(redis_url):
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url) as client, RedisClient(redis_url) as killer:
            conn_id = await client.execute("CLIENT", "ID")
            assert await killer.execute("CLIENT", "KILL", "ID", conn_id) == 1
            await trio.sleep(redis_mod.STALE_CHECK_AFTER_S + 0.1)
            assert await client.execute("PING") == b"PONG"  # polled, found hung up, replaced
            stats = client.statistics()
            assert (stats.connects_total, stats.errors_total) == (2, 0)


async def test_after_aclose_calls_raise_unavailable(redis_url):
    with trio.fail_after(BOUND_S):
        client = RedisClient(redis_url)
        await client.execute("PING")
        await client.aclose()
        assert client.statistics().idle == 0
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")


# -- outages, hostile servers, cancellation -------------------------------------------------------

async def test_a_stopped_server_is_unavailable_quickly_and_a_restarted_one_serves(fresh_redis):
    with trio.fail_after(BOUND_S):
        async with RedisClient(fresh_redis.url(1)) as client:
            assert await client.execute("SET", "k", "before") == b"OK"
            fresh_redis.stop()
            for _ in range(2):  # the pooled (now dead) connection, then a refused connect
                with trio.fail_after(2), pytest.raises(RedisUnavailable) as info:
                    await client.execute("INCR", "n")
                assert f"127.0.0.1:{fresh_redis.port}" in str(info.value)
            assert client.statistics().idle == 0
            assert client.statistics().errors_total == 2
            fresh_redis.start()
            # no silent retry happened; the next call connects anew and succeeds
            assert await client.execute("INCR", "n") == 1
            assert await client.execute("GET", "k") is None  # no persistence: a new, empty server
            assert client.statistics().idle == 1


async def test_a_restarted_server_after_a_quiet_spell_costs_no_failed_call(fresh_redis):
    with trio.fail_after(BOUND_S):
        async with RedisClient(fresh_redis.url(0)) as client:
            await client.execute("PING")
            fresh_redis.stop()
            fresh_redis.start()
            await trio.sleep(redis_mod.STALE_CHECK_AFTER_S + 0.1)
            assert await client.execute("PING") == b"PONG"
            assert client.statistics().errors_total == 0


async def test_a_server_that_never_answers_times_out(nursery):
    with trio.fail_after(BOUND_S):
        port = await _serve(nursery, _silent)
        async with RedisClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.2) as client:
            for _ in range(2):
                start = trio.current_time()
                with pytest.raises(RedisUnavailable) as info:
                    await client.execute("GET", "k")
                elapsed = trio.current_time() - start
                assert 0.15 < elapsed < 1.0, elapsed
                assert "no reply within 0.2 s" in str(info.value)
            stats = client.statistics()
            assert (stats.connects_total, stats.errors_total, stats.idle) == (2, 2, 0)


async def test_a_server_that_answers_garbage_is_unavailable(nursery):
    with trio.fail_after(BOUND_S):
        port = await _serve(nursery, _garbage)
        async with RedisClient(f"redis://127.0.0.1:{port}/0") as client:
            with pytest.raises(RedisUnavailable) as info:
                await client.execute("GET", "k")
            assert isinstance(info.value.__cause__, ProtocolError)
            assert "protocol error" in str(info.value)
            assert client.statistics().idle == 0


async def test_a_server_that_hangs_up_is_unavailable(nursery):
    with trio.fail_after(BOUND_S):
        port = await _serve(nursery, _hang_up)
        async with RedisClient(f"redis://127.0.0.1:{port}/0") as client:
            with pytest.raises(RedisUnavailable) as info:
                await client.pipeline([("GET", "k")])
            assert "closed by the server" in str(info.value)


async def test_a_refused_connect_is_unavailable_and_never_names_the_password():
    with trio.fail_after(BOUND_S):
        port = free_port()
        async with RedisClient(f"redis://user:hunter2-secret@127.0.0.1:{port}/0") as client:
            with trio.fail_after(2), pytest.raises(RedisUnavailable) as info:
                await client.execute("PING")
            message = str(info.value)
            assert f"127.0.0.1:{port}" in message and "refused" in message.lower()
            assert "hunter2" not in message and "hunter2" not in repr(info.value.__cause__)


async def test_a_cancelled_call_leaves_no_connection_with_unread_replies(redis_url):
    with trio.fail_after(BOUND_S):
        async with RedisClient(redis_url, timeout_s=2.0) as client:
            await client.execute("SET", "k", "v")
            with trio.move_on_after(0.1) as scope:
                await client.execute("BLPOP", "empty", 0.5)  # its nil reply would come 0.5 s later
            assert scope.cancelled_caught
            assert client.statistics().idle == 0  # closed, not pooled with a reply in flight
            await trio.sleep(0.5)
            assert await client.execute("GET", "k") == b"v"
            assert await client.pipeline([("GET", "k"), ("ECHO", "x")]) == [b"v", b"x"]
            stats = client.statistics()
            assert (stats.connects_total, stats.errors_total) == (2, 0)


async def test_a_call_cancelled_against_a_silent_server_closes_its_connection(nursery):
    with trio.fail_after(BOUND_S):
        port = await _serve(nursery, _silent)
        async with RedisClient(f"redis://127.0.0.1:{port}/0", timeout_s=5.0) as client:
            with trio.move_on_after(0.05):
                await client.execute("GET", "k")
            assert client.statistics().idle == 0


# -- AUTH -----------------------------------------------------------------------------------------

async def test_auth_with_a_password(fresh_redis):
    with trio.fail_after(BOUND_S):
        async with RedisClient(fresh_redis.url(2)) as admin:
            assert await admin.execute("CONFIG", "SET", "requirepass", "x") == b"OK"
        base = f"127.0.0.1:{fresh_redis.port}"
        async with RedisClient(f"redis://:x@{base}/2") as client:
            assert await client.execute("SET", "k", "v") == b"OK"
            assert await client.pipeline([("GET", "k"), ("PING",)]) == [b"v", b"PONG"]
        async with RedisClient(f"redis://default:x@{base}/2") as client:  # user:password -> AUTH user pw
            assert await client.execute("GET", "k") == b"v"
        async with RedisClient(f"redis://{base}/2") as client:
            with pytest.raises(ReplyError) as info:
                await client.execute("GET", "k")
            assert info.value.code == "NOAUTH"
            assert client.statistics().idle == 0  # an unauthenticated connection is not kept
        async with RedisClient(f"redis://:wrong@{base}/2") as client:
            with pytest.raises(ReplyError) as info:
                await client.execute("GET", "k")
            assert info.value.code == "WRONGPASS"
            assert client.statistics().idle == 0
