"""API keys: the keys file (TOML, hashes only) and the in-memory lookup used on every request.

Strategy: a secret is shown once, at `keys add`, and never stored: the file holds
``sha256:<hex>`` of it plus the key's name, limits, allowed tiers and whether it is an admin key
(`admin`: it may read the operator's status page, proxy/admit/status.py; written only when true, so
older files load unchanged). Requests are authenticated by
hashing the presented bearer token and looking the digest up in a dict (`KeyStore`), so no secret
comparison happens in Python. The file is strict (unknown fields are errors) and rewritten
atomically (temp file + rename, mode 0600), so a crash never leaves it half-written. Revoking keeps
the record (audit) with `revoked = true`; a revoked key no longer authenticates.
The same records can live in PostgreSQL instead (keys_db.py); both stores validate and build a new
key with `new_key` and word their errors with the helpers below.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import secrets
import tempfile
import tomllib
from pathlib import Path

import msgspec

SECRET_PREFIX = "sk-si-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TIER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeysError(ValueError):
    """A keys file or a keys command that cannot be used; the message says why."""


class KeyRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: str
    hash: str
    prefix: str = ""
    rpm: int | None = None
    tpm: int | None = None
    tiers: list[str] = msgspec.field(default_factory=list)  # empty: every tier
    created: str = ""
    revoked: bool = False
    admin: bool = False  # may read the operator's status page (/status.json)

    def allows_tier(self, tier: str) -> bool:
        return not self.tiers or tier in self.tiers


class KeysFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keys: list[KeyRecord] = msgspec.field(default_factory=list)


def digest(secret: str | bytes) -> str:
    raw = secret.encode() if isinstance(secret, str) else secret
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def read(path: str | Path) -> KeysFile:
    p = Path(path)
    if not p.exists():
        return KeysFile()
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise KeysError(f"{p}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise KeysError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        kf = msgspec.convert(raw, KeysFile)
    except msgspec.ValidationError as exc:
        raise KeysError(f"{p}: {exc}") from None
    names = set()
    for rec in kf.keys:
        if rec.name in names:
            raise KeysError(f"{p}: duplicate key name {rec.name!r}")
        names.add(rec.name)
        if not rec.hash.startswith("sha256:") or len(rec.hash) != 71:
            raise KeysError(f"{p}: key {rec.name!r}: field 'hash' must be 'sha256:<64 hex>'")
    return kf


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render(kf: KeysFile) -> str:
    out = ["# spotinference API keys: sha256 digests only; manage with `spotinference keys`.\n"]
    for rec in kf.keys:
        out.append("\n[[keys]]\n")
        out.append(f"name = {_toml_str(rec.name)}\n")
        out.append(f"hash = {_toml_str(rec.hash)}\n")
        out.append(f"prefix = {_toml_str(rec.prefix)}\n")
        if rec.rpm is not None:
            out.append(f"rpm = {rec.rpm}\n")
        if rec.tpm is not None:
            out.append(f"tpm = {rec.tpm}\n")
        out.append("tiers = [" + ", ".join(_toml_str(t) for t in rec.tiers) + "]\n")
        out.append(f"created = {_toml_str(rec.created)}\n")
        out.append(f"revoked = {'true' if rec.revoked else 'false'}\n")
        if rec.admin:
            out.append("admin = true\n")
    return "".join(out)


def write(path: str | Path, kf: KeysFile) -> None:
    """Atomic rewrite with mode 0600."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_render(kf))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def duplicate_name(name: str) -> KeysError:
    return KeysError(f"a key named {name!r} already exists (revoke it or pick another name)")


def no_such_key(name: str) -> KeysError:
    return KeysError(f"no key named {name!r}")


def already_revoked(name: str) -> KeysError:
    return KeysError(f"key {name!r} is already revoked")


def new_key(name: str, *, rpm: int | None = None, tpm: int | None = None,
            tiers: list[str] | None = None, admin: bool = False) -> tuple[str, KeyRecord]:
    """Validate a new key's fields; returns (secret, record holding only its digest). Shared by the
    keys file (`add`) and the keys database (keys_db.add)."""
    if not _NAME_RE.match(name):
        raise KeysError(f"invalid key name {name!r}: letters, digits and _.@- (max 64)")
    for value, field in ((rpm, "rpm"), (tpm, "tpm")):
        if value is not None and value < 1:
            raise KeysError(f"--{field} must be a positive integer, got {value}")
    tiers = list(tiers or [])
    for t in tiers:
        if not _TIER_RE.match(t):
            raise KeysError(f"invalid tier name {t!r} in --tiers")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return secret, KeyRecord(name=name, hash=digest(secret), prefix=secret[:10], rpm=rpm, tpm=tpm,
                             tiers=tiers, created=now, admin=admin)


def add(path: str | Path, name: str, *, rpm: int | None = None, tpm: int | None = None,
        tiers: list[str] | None = None, admin: bool = False) -> str:
    """Create a key; returns the secret (the only time it exists outside the client)."""
    secret, record = new_key(name, rpm=rpm, tpm=tpm, tiers=tiers, admin=admin)
    kf = read(path)
    if any(r.name == name for r in kf.keys):
        raise duplicate_name(name)
    kf.keys.append(record)
    write(path, kf)
    return secret


def revoke(path: str | Path, name: str) -> None:
    kf = read(path)
    for i, rec in enumerate(kf.keys):
        if rec.name == name:
            if rec.revoked:
                raise already_revoked(name)
            kf.keys[i] = msgspec.structs.replace(rec, revoked=True)
            write(path, kf)
            return
    raise no_such_key(name)


class KeyStore:
    """Digest -> record for live keys; built once per (re)load."""

    __slots__ = ("_by_digest", "open")

    def __init__(self, records: list[KeyRecord] | None, *, open: bool = False) -> None:
        self.open = open
        self._by_digest = {
            bytes.fromhex(r.hash[7:]): r for r in (records or []) if not r.revoked
        }

    @classmethod
    def from_file(cls, path: str | Path) -> KeyStore:
        return cls(read(path).keys)

    def lookup(self, bearer: bytes) -> KeyRecord | None:
        return self._by_digest.get(hashlib.sha256(bearer).digest())

    def __len__(self) -> int:
        return len(self._by_digest)

    def names(self) -> set[str]:
        """The names of the keys that authenticate (revoked ones excluded)."""
        return {r.name for r in self._by_digest.values()}
