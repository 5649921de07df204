"""A small, strict Redis client for trio: commands, pipelines and Lua scripts over a pool of connections.

Strategy: redis-py's asyncio client does not run on trio, and the gateway needs little of Redis -- a
command, a pipeline, EVALSHA -- so this is a thin layer over resp.py (the sans-I/O codec) and
trio.SocketStream. Every call is one round trip on one connection it owns for that time: the encoded
command(s) go out in one write, then the replies are read (`receive_some(65536)` into the connection's
one Reader) until all have arrived.

Pool: idle connections on a stack (LIFO, at most `max_idle`); a call takes the most recent one or
connects (`trio.open_tcp_stream`, bounded by `timeout_s`). A new connection's first write carries
``AUTH`` (when the URL has a password) and ``SELECT db`` before the call's own command(s), pipelined;
an error reply to one of those closes the connection and raises that ReplyError (WRONGPASS, NOAUTH,
an invalid db index -- which a misconfigured URL hits on its first call, the command having then run
on db 0). A connection idle for more than STALE_CHECK_AFTER_S is polled first (no wait, one syscall):
readable while idle means the server hung up (a restart, its ``timeout``) and it is closed, not used.

Failure: every round trip (the write and the read of all its replies) must finish within `timeout_s`
(a cancel scope). Past it, or on OSError / BrokenResourceError / EOF / a ProtocolError, the connection
is closed -- never pooled: replies may be unread -- and `RedisUnavailable` is raised, naming host:port
and the cause, never the password. The other idle connections are closed too: they lead to the same
server and most often share its fate (one stale connection per pooled one would otherwise fail one later
call each). Nothing is retried silently: a command that was written may have run, and INCR or an EVAL
must not run twice; the next call connects anew (cluster/link.py then decides what "down" means). A
call cancelled from outside mid-round-trip closes its connection the same way (it has unread replies).

Scripts: `eval` sends EVALSHA and, on NOSCRIPT (a restarted or flushed Redis), EVAL with the source,
which loads it again; it remembers nothing else. `pipeline` does the same for the EVALSHA commands
inside it (those `evalsha()` built; the client keeps their sha -> source): the ones answered NOSCRIPT
are sent again as EVAL in one more round trip, only when that happens. They then run after the
pipeline's other commands, not in their first place: fine for independent keys (the rate limiter's
settles), not for a pipeline that depends on its own order.

Error replies are values: `execute` and `eval` raise them (resp.ReplyError, with `.code`), a pipeline
returns them in its list in place.
"""

from __future__ import annotations

import hashlib
import os
import select
from typing import Self
from urllib.parse import unquote, urlsplit

import msgspec
import trio

from proxy.cluster.resp import NEED_DATA, Arg, ProtocolError, Reader, ReplyError, encode

DEFAULT_PORT = 6379
READ_SIZE = 65536
# A connection used moments ago is very unlikely to have been hung up; polling it costs a syscall.
STALE_CHECK_AFTER_S = 0.5
MAX_SCRIPTS = 1024  # sha -> source kept for pipeline()'s NOSCRIPT fallback (scripts are code, not data)

_BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError)


class RedisUnavailable(Exception):
    """Redis is down: refused, reset, closed, past the timeout, or not speaking RESP."""


class Script:
    """A Lua script, sent by its SHA1 (EVALSHA) and by its source only when Redis does not have it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script(sha={self.sha})"


class RedisStatistics(msgspec.Struct, frozen=True):
    connects_total: int  # connections opened
    errors_total: int  # calls that raised RedisUnavailable
    idle: int  # connections in the pool now


class _Eof(Exception):
    """The server closed the connection."""


class RedisTarget(msgspec.Struct, frozen=True):
    """What a redis:// URL names."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    def __repr__(self) -> str:
        return f"RedisTarget(host={self.host!r}, port={self.port}, db={self.db}, username={self.username!r})"


def parse_url(url: str) -> RedisTarget:
    """``redis://[[user]:password@]host[:port][/db]`` (ValueError if it is not one)."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("expected redis://[[user]:password@]HOST[:PORT][/DB]")
    if parts.query or parts.fragment:
        raise ValueError("a Redis URL takes no query or fragment")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(f"the database must be a number, got {db_text!r}")
    port = parts.port if parts.port is not None else DEFAULT_PORT  # ValueError for a bad port
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if username is not None and password is None:
        raise ValueError("a Redis URL with a user name needs its password (redis://user:password@host)")
    return RedisTarget(parts.hostname, port, int(db_text), username, password)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # trio's wrapper of the reset / broken pipe
    if isinstance(exc, _Eof):
        return "connection closed by the server"
    if isinstance(exc, ProtocolError):
        return f"protocol error: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _connect_cause(exc: OSError) -> str:
    """Why a connect failed: trio's "all attempts to connect ... failed" hides it in its cause."""
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup) and group.exceptions:
        exc = group.exceptions[0]
    code = getattr(exc, "errno", None)
    return os.strerror(code) if isinstance(code, int) and code > 0 else _describe(exc)  # gaierror: < 0


def _command_name(command: tuple) -> str:
    name = command[0] if command else ""
    return (name.decode("latin-1") if isinstance(name, bytes) else str(name)).upper()


class _Connection:
    """One TCP connection and its Reader; `fresh` until its AUTH / SELECT replies have been read."""

    __slots__ = ("fresh", "idle_since", "poller", "reader", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = Reader()
        self.fresh = True  # AUTH / SELECT still to send
        self.idle_since = 0.0
        self.poller: select.poll | None = None

    def hung_up(self) -> bool:
        """Readable while idle: EOF, a reset or unsolicited bytes -- unusable either way."""
        if self.poller is None:
            self.poller = select.poll()
            self.poller.register(self.stream.socket.fileno(), select.POLLIN)
        return bool(self.poller.poll(0))

    def close(self) -> None:
        """Close now, synchronously (trio's socket close notifies any waiter first)."""
        self.stream.socket.close()


async def _read_reply(conn: _Connection) -> object:
    reader = conn.reader
    reply = reader.next()
    while reply is NEED_DATA:
        data = await conn.stream.receive_some(READ_SIZE)
        if not data:
            raise _Eof
        reader.feed(data)
        reply = reader.next()
    return reply


async def _read_replies(conn: _Connection, count: int) -> list:
    return [await _read_reply(conn) for _ in range(count)]


class RedisClient:
    """Commands to one Redis (`url`: redis://[[user]:password@]host[:port][/db]) over pooled connections."""

    def __init__(self, url: str, *, timeout_s: float = 0.25, max_idle: int = 16) -> None:
        target = parse_url(url)
        self.host = target.host
        self.port = target.port
        self.db = target.db
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self.where = f"{target.host}:{target.port}"
        prelude = [encode("SELECT", target.db)]
        if target.password is not None:
            auth = ("AUTH", target.username, target.password) if target.username else ("AUTH", target.password)
            prelude.insert(0, encode(*auth))
        self._prelude = b"".join(prelude)
        self._prelude_replies = len(prelude)
        self._idle: list[_Connection] = []
        self._scripts: dict[str, str] = {}
        self._connects = 0
        self._errors = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisClient(redis://{self.where}/{self.db})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the calls --------------------------------------------------------------------------------

    async def execute(self, *args: Arg) -> object:
        """One command's reply; raises its ReplyError for an error reply, RedisUnavailable when down."""
        reply = await self._round_trip(encode(*args), 0)
        if type(reply) is ReplyError:
            raise reply
        return reply

    async def pipeline(self, commands: list[tuple]) -> list:
        """The replies of `commands`, sent in one write; error replies are ReplyError values in place."""
        if not commands:
            return []
        replies = await self._round_trip(b"".join([encode(*command) for command in commands]), len(commands))
        retry = [i for i, reply in enumerate(replies) if type(reply) is ReplyError and reply.code == "NOSCRIPT"]
        if retry:
            await self._reload(commands, replies, retry)
        return replies

    def evalsha(self, script: Script, keys: list, args: list) -> tuple:
        """The EVALSHA command tuple for `pipeline()` (which falls back to EVAL on NOSCRIPT)."""
        if script.sha not in self._scripts and len(self._scripts) < MAX_SCRIPTS:
            self._scripts[script.sha] = script.source
        return ("EVALSHA", script.sha, len(keys), *keys, *args)

    async def eval(self, script: Script, keys: list, args: list) -> object:
        """The script's reply: EVALSHA, then EVAL with the source if Redis answers NOSCRIPT."""
        reply = await self._round_trip(encode("EVALSHA", script.sha, len(keys), *keys, *args), 0)
        if type(reply) is ReplyError and reply.code == "NOSCRIPT":
            reply = await self._round_trip(encode("EVAL", script.source, len(keys), *keys, *args), 0)
        if type(reply) is ReplyError:
            raise reply
        return reply

    async def aclose(self) -> None:
        """Close the idle connections; calls from now on raise RedisUnavailable."""
        self._closed = True
        self._close_idle()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> RedisStatistics:
        return RedisStatistics(connects_total=self._connects, errors_total=self._errors, idle=len(self._idle))

    # -- round trips ------------------------------------------------------------------------------

    async def _reload(self, commands: list[tuple], replies: list, retry: list[int]) -> None:
        """Send the NOSCRIPT-answered EVALSHA commands again as EVAL; their replies replace the errors."""
        again = []
        for i in retry:
            command = commands[i]
            sha = command[1] if len(command) > 1 else ""
            source = self._scripts.get(sha.decode("latin-1") if isinstance(sha, bytes) else str(sha))
            if source is not None and _command_name(command) == "EVALSHA":
                again.append((i, ("EVAL", source, *command[2:])))
        if again:
            payload = b"".join([encode(*command) for _, command in again])
            for (i, _), reply in zip(again, await self._round_trip(payload, len(again)), strict=True):
                replies[i] = reply

    async def _round_trip(self, payload: bytes, count: int) -> object:
        """Write `payload`, read `count` replies (a list), or one reply (bare) when `count` is 0."""
        conn = self._take_idle() or await self._connect()
        done = False
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.timeout_s):
                if conn.fresh:
                    await conn.stream.send_all(self._prelude + payload)
                    await self._check_prelude(conn)
                else:
                    await conn.stream.send_all(payload)
                result = await (_read_replies(conn, count) if count else _read_reply(conn))
                done = True
        except (*_BROKEN, _Eof) as exc:
            raise self._failed(_describe(exc)) from exc
        finally:
            if not done:
                conn.close()
        if not done:
            raise self._failed(f"no reply within {self.timeout_s:g} s")
        self._release(conn)
        return result

    async def _check_prelude(self, conn: _Connection) -> None:
        """The replies to AUTH / SELECT: an error one is raised (the caller then closes the connection)."""
        for reply in await _read_replies(conn, self._prelude_replies):
            if type(reply) is ReplyError:
                raise reply
        conn.fresh = False

    def _take_idle(self) -> _Connection | None:
        """The most recently pooled connection that still looks usable, or None."""
        if self._closed:
            self._errors += 1
            raise RedisUnavailable(f"Redis at {self.where}: the client is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if trio.current_time() - conn.idle_since > STALE_CHECK_AFTER_S and conn.hung_up():
                conn.close()
                continue
            return conn
        return None

    async def _connect(self) -> _Connection:
        with trio.move_on_after(self.timeout_s):
            try:
                stream = await trio.open_tcp_stream(self.host, self.port)
            except OSError as exc:
                raise self._failed(f"cannot connect: {_connect_cause(exc)}") from exc
            self._connects += 1
            return _Connection(stream)
        raise self._failed(f"no connection within {self.timeout_s:g} s")

    def _release(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = trio.current_time()
        self._idle.append(conn)

    def _failed(self, cause: str) -> RedisUnavailable:
        """Count a failure, drop the idle connections (same server, likely the same fate), name it."""
        self._errors += 1
        self._close_idle()
        return RedisUnavailable(f"Redis at {self.where}: {cause}")

    def _close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
