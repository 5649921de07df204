"""API keys in PostgreSQL: the same records as the keys file, shared by every gateway host.

Strategy: table `api_keys` holds what the keys file holds (name, ``sha256:<hex>`` digest, prefix,
limits, tiers, created, revoked, admin) -- never a secret. Every add and revoke bumps the one row of
`api_keys_version` in the same transaction, so a gateway polls one tiny row (`version`) and reloads
the keys (`load`: the version and the rows read by ONE statement, hence one snapshot) only when it
moved (keys_refresh.py). The schema is created on first use by `connect`, under a transaction-scoped
advisory lock (`SCHEMA_LOCK`) so hosts starting together queue instead of failing; its version is the
row ('keys', N) of `spotinference_schema`, a table other components (usage) share: created IF NOT
EXISTS, only our row touched. Version 1 is `_SCHEMA`; each later version is one step of `_MIGRATIONS`
(2: the `admin` column), applied and recorded under the same lock, so an older database is brought up
to date by whoever connects first. Validation, secrets and messages come from keys.py (`new_key` and the
error helpers), so the file and the database behave alike. Everything here is synchronous (the
gateway calls it in threads). Errors are `keys.KeysError`; an unreachable database is the subclass
`Unreachable`, naming host:port/db and never the password.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from proxy.admit import keys
from proxy.admit.keys import KeyRecord, KeysError

try:
    import psycopg
    from psycopg import conninfo as _conninfo
except ImportError:  # the optional "cluster" extra
    psycopg = None

SCHEMA_VERSION = 2
# pg_advisory_xact_lock key of every spotinference schema migration ("spot_sch"): the same key as
# proxy/usage/pg_store.LOCK_KEY, so all components sharing `spotinference_schema` serialize.
SCHEMA_LOCK = 0x73706F745F736368
CONNECT_TIMEOUT_S = 5
# A dead peer (no RST: host down, network cut) fails a query in ~5 s instead of hanging for minutes.
_LINK = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
         "tcp_user_timeout": 5000}
_COLUMNS = "k.name, k.hash, k.prefix, k.rpm, k.tpm, k.tiers, k.created, k.revoked, k.admin"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spotinference_schema (component text PRIMARY KEY, version int NOT NULL)",
    """CREATE TABLE IF NOT EXISTS api_keys (
        name text PRIMARY KEY,
        hash text UNIQUE NOT NULL CHECK (hash ~ '^sha256:[0-9a-f]{64}$'),
        prefix text NOT NULL DEFAULT '',
        rpm bigint CHECK (rpm > 0),
        tpm bigint CHECK (tpm > 0),
        tiers text[] NOT NULL DEFAULT '{}',
        created text NOT NULL DEFAULT '',
        revoked bool NOT NULL DEFAULT false)""",
    """CREATE TABLE IF NOT EXISTS api_keys_version (
        one bool PRIMARY KEY DEFAULT true CHECK (one), version bigint NOT NULL)""",
    "INSERT INTO api_keys_version (one, version) VALUES (true, 0) ON CONFLICT DO NOTHING",
    "INSERT INTO spotinference_schema (component, version) VALUES ('keys', 1) ON CONFLICT DO NOTHING",
)
# version -> the statements that bring a database of the version before up to it
_MIGRATIONS = {
    2: ("ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS admin boolean NOT NULL DEFAULT false",),
}


class Unreachable(KeysError):
    """The keys database cannot be reached (refused, timed out, shut down, connection lost)."""


def where(url: str) -> str:
    """host:port/db of a URL, for messages (never the user's password)."""
    if psycopg is None:
        return "the keys database"
    try:
        info = _conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable database URL"
    return f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


def _where_conn(conn) -> str:
    try:
        return f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
    except psycopg.Error:
        return "the keys database"


def _reason(exc: BaseException, password: str | None) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace(password, "***") if password else text


@contextlib.contextmanager
def _errors(place: str, password: str | None = None) -> Iterator[None]:
    """psycopg errors -> KeysError (Unreachable for a lost or refused connection)."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise Unreachable(f"cannot reach the keys database at {place}: {_reason(exc, password)}") from None
    except psycopg.Error as exc:
        raise KeysError(f"keys database at {place}: {_reason(exc, password)}") from None


def connect(url: str, *, connect_timeout: float = CONNECT_TIMEOUT_S) -> psycopg.Connection:
    """An autocommit connection with the schema in place (created or checked here)."""
    if psycopg is None:
        raise KeysError("keys in PostgreSQL need psycopg: pip install 'spotinference[cluster]'")
    place = where(url)
    try:
        password = _conninfo.conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        raise KeysError("the keys database URL is not a valid postgresql:// URL") from None
    with _errors(place, password):
        conn = psycopg.connect(url, autocommit=True, connect_timeout=max(2, round(connect_timeout)), **_LINK)
    try:
        with _errors(place, password):
            _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: psycopg.Connection) -> None:
    for attempt in range(3):
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                have = conn.execute("SELECT to_regclass('spotinference_schema') IS NOT NULL").fetchone()[0]
                row = conn.execute("SELECT version FROM spotinference_schema WHERE component = 'keys'"
                                   ).fetchone() if have else None
                if row is None:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                found = 1 if row is None else row[0]
                if found > SCHEMA_VERSION:
                    raise KeysError(f"the keys database schema is version {found}, newer than this "
                                    f"spotinference understands ({SCHEMA_VERSION}): upgrade spotinference")
                for v in range(found + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[v]:
                        conn.execute(statement)
                if found < SCHEMA_VERSION:
                    conn.execute("UPDATE spotinference_schema SET version = %s WHERE component = 'keys'",
                                 (SCHEMA_VERSION,))
            return
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            # A component migrating under another lock created spotinference_schema at the same time.
            if attempt == 2:
                raise


@contextlib.contextmanager
def _session(url_or_conn: str | psycopg.Connection) -> Iterator[psycopg.Connection]:
    if isinstance(url_or_conn, str):
        conn = connect(url_or_conn)
        try:
            yield conn
        finally:
            conn.close()
    else:
        yield url_or_conn


def _bump(conn: psycopg.Connection) -> int:
    return conn.execute("UPDATE api_keys_version SET version = version + 1 RETURNING version").fetchone()[0]


def add(url: str, name: str, *, rpm: int | None = None, tpm: int | None = None,
        tiers: list[str] | None = None, admin: bool = False) -> str:
    """Create a key; returns the secret (only its digest is stored)."""
    secret, rec = keys.new_key(name, rpm=rpm, tpm=tpm, tiers=tiers, admin=admin)
    with _session(url) as conn, _errors(_where_conn(conn)), conn.transaction():
        cur = conn.execute(
            "INSERT INTO api_keys (name, hash, prefix, rpm, tpm, tiers, created, admin) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
            (rec.name, rec.hash, rec.prefix, rec.rpm, rec.tpm, rec.tiers, rec.created, rec.admin))
        if cur.rowcount == 0:
            raise keys.duplicate_name(name)
        _bump(conn)
    return secret


def revoke(url: str, name: str) -> None:
    """Mark a key revoked (the record stays, for audit)."""
    with _session(url) as conn, _errors(_where_conn(conn)), conn.transaction():
        row = conn.execute("SELECT revoked FROM api_keys WHERE name = %s FOR UPDATE", (name,)).fetchone()
        if row is None:
            raise keys.no_such_key(name)
        if row[0]:
            raise keys.already_revoked(name)
        conn.execute("UPDATE api_keys SET revoked = true WHERE name = %s", (name,))
        _bump(conn)


def _record(row) -> KeyRecord:
    name, hash_, prefix, rpm, tpm, tiers, created, revoked, admin = row
    return KeyRecord(name=name, hash=hash_, prefix=prefix, rpm=rpm, tpm=tpm, tiers=list(tiers),
                     created=created, revoked=revoked, admin=admin)


def records(url_or_conn: str | psycopg.Connection) -> list[KeyRecord]:
    """Every key, revoked ones included (for `keys list`), oldest first."""
    with _session(url_or_conn) as conn, _errors(_where_conn(conn)):
        rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys k ORDER BY k.created, k.name").fetchall()
    return [_record(r) for r in rows]


def version(url_or_conn: str | psycopg.Connection) -> int:
    """The change counter: one row, one index-free read."""
    with _session(url_or_conn) as conn, _errors(_where_conn(conn)):
        return conn.execute("SELECT version FROM api_keys_version").fetchone()[0]


def load(url_or_conn: str | psycopg.Connection) -> tuple[int, list[KeyRecord]]:
    """(version, every record) from one statement, so both come from the same snapshot."""
    with _session(url_or_conn) as conn, _errors(_where_conn(conn)):
        rows = conn.execute(
            f"SELECT v.version, {_COLUMNS} FROM api_keys_version v LEFT JOIN api_keys k ON true "
            "ORDER BY k.created, k.name").fetchall()
    return rows[0][0], [_record(r[1:]) for r in rows if r[1] is not None]
