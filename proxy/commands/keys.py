"""`spotinference keys add|list|revoke`: manage the keys file (hashes only).

Strategy: the secret is printed once on stdout by `add` and exists nowhere else; `list` shows names,
prefixes, limits and state, never a secret (it has none to show). Errors name the problem and exit 1.
A running gateway picks changes up on SIGHUP (`systemctl reload spotinference`).
"""

from __future__ import annotations

import argparse
import sys

from proxy.admit import keys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotinference keys", description="Manage API keys.")
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="create a key and print its secret once")
    add.add_argument("name")
    add.add_argument("--keys-file", required=True)
    add.add_argument("--rpm", type=int, help="requests per minute")
    add.add_argument("--tpm", type=int, help="tokens per minute")
    add.add_argument("--tiers", help="comma-separated tiers the key may use (default: all)")
    ls = sub.add_parser("list", help="list keys (names, prefixes, limits; never secrets)")
    ls.add_argument("--keys-file", required=True)
    rv = sub.add_parser("revoke", help="revoke a key")
    rv.add_argument("name")
    rv.add_argument("--keys-file", required=True)
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "add":
            tiers = [t.strip() for t in args.tiers.split(",") if t.strip()] if args.tiers else []
            secret = keys.add(args.keys_file, args.name, rpm=args.rpm, tpm=args.tpm, tiers=tiers)
            print(secret)
            sys.stderr.write(f"key {args.name!r} added to {args.keys_file}; the secret above is shown only once.\n")
        elif args.action == "list":
            records = keys.read(args.keys_file).keys
            print(f"{'NAME':<20} {'PREFIX':<12} {'RPM':>6} {'TPM':>9} {'TIERS':<20} {'STATE':<8} CREATED")
            for r in records:
                print(f"{r.name:<20} {r.prefix:<12} {r.rpm if r.rpm is not None else '-':>6} "
                      f"{r.tpm if r.tpm is not None else '-':>9} {','.join(r.tiers) or '*':<20} "
                      f"{'revoked' if r.revoked else 'active':<8} {r.created}")
        elif args.action == "revoke":
            keys.revoke(args.keys_file, args.name)
            sys.stderr.write(f"key {args.name!r} revoked; reload the gateway (SIGHUP) to apply.\n")
    except keys.KeysError as exc:
        sys.stderr.write(f"spotinference keys: {exc}\n")
        return 1
    return 0
