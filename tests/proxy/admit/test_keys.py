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


def test_admin_keys_round_trip_and_files_without_the_field_still_load(tmp_path):
    path = tmp_path / "keys.toml"
    admin = keys.add(path, "ops", admin=True)
    user = keys.add(path, "alice")
    text = path.read_text()
    assert text.count("admin = true") == 1 and "admin = false" not in text  # written only when true
    by_name = {r.name: r for r in keys.read(path).keys}
    assert by_name["ops"].admin and not by_name["alice"].admin
    store = keys.KeyStore.from_file(path)
    assert store.lookup(admin.encode()).admin and not store.lookup(user.encode()).admin
    keys.revoke(path, "ops")
    assert keys.read(path).keys[0].admin and keys.read(path).keys[0].revoked  # the record stays whole
    old = tmp_path / "old.toml"  # a file written before admin keys existed
    old.write_text('[[keys]]\nname = "a"\nhash = "sha256:' + "0" * 64 + '"\nprefix = ""\ntiers = []\n'
                   'created = ""\nrevoked = false\n')
    assert keys.read(old).keys[0].admin is False


def test_cli_add_admin_and_list_shows_it(tmp_path, capsys):
    from proxy.commands.keys import main

    path = str(tmp_path / "keys.toml")
    assert main(["add", "ops", "--keys-file", path, "--admin"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().startswith("sk-si-") and "admin key 'ops' added" in out.err
    assert main(["add", "alice", "--keys-file", path]) == 0
    capsys.readouterr()
    assert main(["list", "--keys-file", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["ops", "alice"]
    assert [line.split()[5] for line in lines[1:]] == ["admin", "active"]
    assert main(["revoke", "ops", "--keys-file", path]) == 0 and main(["list", "--keys-file", path]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[5] == "revoked"
