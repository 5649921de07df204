"""admit/auth.py: `authenticate` against a real `KeyStore` built from a keys file in tmp_path.

Header lists come from the real request parser (lower-cased names, stripped values), so what is
checked here is what a request on the wire gets. Every refusal is checked for its exact status, type,
code and message.
"""

from __future__ import annotations

import pytest

from proxy.admit import keys
from proxy.admit.auth import authenticate
from proxy.parse.request import RequestReader

MISSING = "Missing API key. Pass it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')."
WRONG = "Incorrect API key provided."


def headers(*lines: bytes) -> list[tuple[bytes, bytes]]:
    reader = RequestReader()
    reader.feed(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n")
    return reader.next_head().headers


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "keys.toml"
    alice = keys.add(path, "alice", rpm=5, tiers=["local"])
    bob = keys.add(path, "bob")
    return keys.KeyStore.from_file(path), alice, bob, path


def assert_401(err, message: str) -> None:
    assert err is not None
    assert (err.status, err.type, err.code, err.param, err.message) == (
        401, "invalid_request_error", "invalid_api_key", None, message)


def test_open_store_admits_without_a_key():
    open_store = keys.KeyStore(None, open=True)
    assert authenticate(open_store, headers()) == (None, None)
    # Even a wrong key is not looked at: there is nothing to check it against.
    assert authenticate(open_store, headers(b"Authorization: Bearer sk-si-whatever")) == (None, None)


def test_a_valid_key_returns_its_record(store):
    ks, alice, bob, _ = store
    rec, err = authenticate(ks, headers(b"Authorization: Bearer " + alice.encode()))
    assert err is None
    assert (rec.name, rec.rpm, rec.tiers) == ("alice", 5, ["local"])
    rec, err = authenticate(ks, headers(b"Authorization: Bearer " + bob.encode()))
    assert err is None and rec.name == "bob"


def test_missing_header_is_401(store):
    ks, *_ = store
    rec, err = authenticate(ks, headers(b"X-Other: nope"))
    assert rec is None
    assert_401(err, MISSING)


def test_x_api_key_is_the_anthropic_sdks_header(store):
    ks, alice, bob, _ = store
    rec, err = authenticate(ks, headers(b"X-Api-Key: " + alice.encode()))
    assert err is None and rec.name == "alice"
    rec, err = authenticate(ks, headers(b"X-Api-Key: nope"))
    assert rec is None
    assert_401(err, "Incorrect API key provided.")
    # A non-bearer Authorization (a proxy's Basic) does not hide a usable x-api-key.
    rec, err = authenticate(ks, headers(b"Authorization: Basic eDp5", b"X-Api-Key: " + bob.encode()))
    assert err is None and rec.name == "bob"
    rec, err = authenticate(ks, headers(b"X-Api-Key: ", b"Authorization: Bearer " + bob.encode()))
    assert err is None and rec.name == "bob"


@pytest.mark.parametrize("value", [
    b"Basic YWxpY2U6c2VjcmV0",
    b"Token sk-si-abc",
    b"Bearer",           # no token at all
    b"Bearer ",          # an empty one (the parser strips the trailing space)
    b"Bearer    ",
])
def test_no_bearer_token_is_401_missing(store, value):
    ks, *_ = store
    rec, err = authenticate(ks, headers(b"Authorization: " + value))
    assert rec is None
    assert_401(err, MISSING)


def test_the_secret_without_the_bearer_scheme_is_refused(store):
    ks, alice, _, _ = store
    rec, err = authenticate(ks, headers(b"Authorization: " + alice.encode()))
    assert rec is None
    assert_401(err, MISSING)


@pytest.mark.parametrize("token", [b"sk-si-wrong", b"sk-si-", b"x"])
def test_wrong_key_is_401_incorrect(store, token):
    ks, *_ = store
    rec, err = authenticate(ks, headers(b"Authorization: Bearer " + token))
    assert rec is None
    assert_401(err, WRONG)


def test_a_near_miss_of_a_real_key_is_refused(store):
    ks, alice, _, _ = store
    for token in (alice[:-1], alice + "x", alice.upper()):
        rec, err = authenticate(ks, headers(b"Authorization: Bearer " + token.encode()))
        assert rec is None
        assert_401(err, WRONG)


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER", b"bEaReR"])
def test_bearer_is_case_insensitive(store, scheme):
    ks, alice, _, _ = store
    rec, err = authenticate(ks, headers(b"Authorization: " + scheme + b" " + alice.encode()))
    assert err is None and rec.name == "alice"


def test_extra_spaces_around_the_token_are_ignored(store):
    ks, alice, _, _ = store
    rec, err = authenticate(ks, headers(b"Authorization: Bearer    " + alice.encode() + b"   "))
    assert err is None and rec.name == "alice"


def test_header_name_case_does_not_matter(store):
    ks, alice, _, _ = store
    rec, err = authenticate(ks, headers(b"AUTHORIZATION: Bearer " + alice.encode()))
    assert err is None and rec.name == "alice"


def test_only_the_first_authorization_header_counts(store):
    ks, alice, _, _ = store
    rec, err = authenticate(ks, headers(b"Authorization: Bearer sk-si-wrong",
                                        b"Authorization: Bearer " + alice.encode()))
    assert rec is None
    assert_401(err, WRONG)


def test_a_revoked_key_is_refused(store):
    _, alice, bob, path = store
    keys.revoke(path, "alice")
    ks = keys.KeyStore.from_file(path)
    rec, err = authenticate(ks, headers(b"Authorization: Bearer " + alice.encode()))
    assert rec is None
    assert_401(err, WRONG)
    rec, err = authenticate(ks, headers(b"Authorization: Bearer " + bob.encode()))
    assert err is None and rec.name == "bob"


def test_a_store_with_no_live_keys_refuses_everyone(tmp_path):
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice")
    keys.revoke(path, "alice")
    ks = keys.KeyStore.from_file(path)
    assert not ks.open and len(ks) == 0
    rec, err = authenticate(ks, headers(b"Authorization: Bearer " + secret.encode()))
    assert rec is None
    assert_401(err, WRONG)
    assert_401(authenticate(ks, headers())[1], MISSING)
