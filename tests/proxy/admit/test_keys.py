"""The keys file: hashes only, atomic rewrite, lookup by digest."""

from __future__ import annotations

import os
import stat

import pytest

from proxy.admit import keys


def test_add_stores_only_the_hash(tmp_path):
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice", rpm=3, tpm=1000, tiers=["h100x2"])
    text = path.read_text()
    assert secret.startswith("sk-si-") and secret not in text
    assert keys.digest(secret) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    rec = keys.read(path).keys[0]
    assert (rec.name, rec.rpm, rec.tpm, rec.tiers) == ("alice", 3, 1000, ["h100x2"])


def test_lookup_and_revoke(tmp_path):
    path = tmp_path / "keys.toml"
    a = keys.add(path, "alice")
    b = keys.add(path, "bob")
    store = keys.KeyStore.from_file(path)
    assert store.lookup(a.encode()).name == "alice"
    assert store.lookup(b"sk-si-nope") is None
    keys.revoke(path, "alice")
    store = keys.KeyStore.from_file(path)
    assert store.lookup(a.encode()) is None and store.lookup(b.encode()).name == "bob"
    assert keys.read(path).keys[0].revoked


@pytest.mark.parametrize("call, message", [
    (lambda p: (keys.add(p, "x"), keys.add(p, "x")), "already exists"),
    (lambda p: keys.add(p, "bad name!"), "invalid key name"),
    (lambda p: keys.add(p, "x", rpm=0), "--rpm"),
    (lambda p: keys.revoke(p, "ghost"), "no key named"),
])
def test_errors(tmp_path, call, message):
    with pytest.raises(keys.KeysError, match=message):
        call(tmp_path / "keys.toml")


def test_unknown_field_in_keys_file_is_an_error(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "a"\nhash = "sha256:' + "0" * 64 + '"\nrole = "admin"\n')
    with pytest.raises(keys.KeysError, match="role"):
        keys.read(path)
