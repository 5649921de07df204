"""`spotinference keys add|list|revoke`: manage API keys in the keys file or the keys database.

Strategy: the secret is printed once on stdout by `add` and exists nowhere else; `list` shows names,
prefixes, limits and state (active, admin -- an active key that may read the operator's status
page, `add --admin` -- or revoked), never a secret (it has none to show). Every action takes exactly
one store:
`--keys-file FILE` (TOML, proxy/admit/keys.py; a running gateway picks changes up on SIGHUP,
`systemctl reload spotinference`) or `--database-url URL` (PostgreSQL, proxy/admit/keys_db.py; every
gateway host polls it and applies a change within a few seconds, no reload). Both print the same
output. Errors name the problem and exit 1; a password in the URL is never printed (PGPASSWORD or
~/.pgpass keep it out of the command line, too).
"""

from __future__ import annotations

import argparse
import sys

from proxy.admit import keys


def _store_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keys-file", help="the TOML keys file")
    g.add_argument("--database-url", help="the keys database, postgresql://USER@HOST:PORT/DB "
                   "(password: PGPASSWORD or ~/.pgpass)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotinference keys", description="Manage API keys.")
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="create a key and print its secret once")
    add.add_argument("name")
    _store_args(add)
    add.add_argument("--rpm", type=int, help="requests per minute")
    add.add_argument("--tpm", type=int, help="tokens per minute")
    add.add_argument("--tiers", help="comma-separated tiers the key may use (default: all)")
    add.add_argument("--admin", action="store_true",
                     help="an admin key: it may also read the operator's status page (/status)")
    ls = sub.add_parser("list", help="list keys (names, prefixes, limits; never secrets)")
    _store_args(ls)
    rv = sub.add_parser("revoke", help="revoke a key")
    rv.add_argument("name")
    _store_args(rv)
    return p


def _state(r: keys.KeyRecord) -> str:
    return "revoked" if r.revoked else "admin" if r.admin else "active"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    db = args.database_url is not None
    if db:
        from proxy.admit import keys_db as store

        target, where = args.database_url, f"the keys database at {store.where(args.database_url)}"
        applied = "every gateway host refuses it within a few seconds (no reload needed)"
    else:
        store, target, where = keys, args.keys_file, args.keys_file
        applied = "reload the gateway (SIGHUP) to apply"
    try:
        if args.action == "add":
            tiers = [t.strip() for t in args.tiers.split(",") if t.strip()] if args.tiers else []
            secret = store.add(target, args.name, rpm=args.rpm, tpm=args.tpm, tiers=tiers, admin=args.admin)
            print(secret)
            kind = "admin key" if args.admin else "key"
            sys.stderr.write(f"{kind} {args.name!r} added to {where}; the secret above is shown only once.\n")
        elif args.action == "list":
            records = store.records(target) if db else keys.read(target).keys
            print(f"{'NAME':<20} {'PREFIX':<12} {'RPM':>6} {'TPM':>9} {'TIERS':<20} {'STATE':<8} CREATED")
            for r in records:
                print(f"{r.name:<20} {r.prefix:<12} {r.rpm if r.rpm is not None else '-':>6} "
                      f"{r.tpm if r.tpm is not None else '-':>9} {','.join(r.tiers) or '*':<20} "
                      f"{_state(r):<8} {r.created}")
        elif args.action == "revoke":
            store.revoke(target, args.name)
            sys.stderr.write(f"key {args.name!r} revoked; {applied}.\n")
    except keys.KeysError as exc:
        sys.stderr.write(f"spotinference keys: {exc}\n")
        return 1
    return 0
