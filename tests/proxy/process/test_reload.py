"""process/reload.py: `reload` re-reads the config and keys files and swaps the runtime record whole.

Real config files (TOML) and keys files (written with keys.add / keys.revoke) in tmp_path, loaded
with `proxy.config.load`; a real `Gateway`, and for "the next request" a real listener on 127.0.0.1
(`start_gateway`) answering raw HTTP. The rate limiter is a real `RateLimiter` on a fake clock that
records `forget`, so a bucket that survived a reload would show as a refusal.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import trio

from proxy.admit import keys
from proxy.config import load
from proxy.gateway import Gateway, build_runtime
from proxy.limits.buckets import RateLimiter
from proxy.observe import logs
from proxy.process.reload import reload
from tests.support.gateway import raw_request, split_response, start_gateway

WAKE_TIER = """
[[tiers]]
name = "spot"
upstreams = ["http://127.0.0.1:10"]
models = ["big-chat"]

[tiers.wake]
instance_ids = ["i-0123456789abcdef0"]
budget_s = {budget}
"""


def write_config(path: Path, *, keys_file: str | None = "keys.toml", listen: str = "127.0.0.1:0",
                 wake_budget: float | None = None, extra: str = "") -> str:
    text = f'[server]\nlisten = "{listen}"\n'
    if keys_file is not None:
        text += f'\n[auth]\nkeys_file = "{keys_file}"\n'
    text += '\n[[tiers]]\nname = "local"\nupstreams = ["http://127.0.0.1:9"]\nmodels = ["sim-chat"]\n'
    if wake_budget is not None:
        text += WAKE_TIER.format(budget=wake_budget)
    path.write_text(text + extra)
    return str(path)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class RecordingLimiter(RateLimiter):
    def __init__(self) -> None:
        super().__init__(FakeClock())
        self.forgotten: list[str] = []

    def forget(self, key_name: str) -> None:
        self.forgotten.append(key_name)
        super().forget(key_name)


@pytest.fixture
def events(monkeypatch) -> io.BytesIO:
    """The event lines logged during the test (whatever another test configured before)."""
    out = io.BytesIO()
    monkeypatch.setitem(logs._state, "stream", out)
    monkeypatch.setitem(logs._state, "level", 20)
    return out


def gateway(config_path: str) -> Gateway:
    gw = Gateway(build_runtime(load(config_path)))
    gw.limiter = RecordingLimiter()
    return gw


async def models(port: int, secret: str) -> int:
    req = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
           + secret.encode() + b"\r\n\r\n")
    with trio.fail_after(5):
        return split_response(await raw_request(port, req))[0]


async def test_a_new_keys_file_applies_to_the_next_request(nursery, tmp_path):
    keys_path = tmp_path / "keys.toml"
    alice = keys.add(keys_path, "alice")
    config_path = write_config(tmp_path / "gateway.toml")
    handle = await start_gateway(nursery, load(config_path))
    bob = keys.add(keys_path, "bob")
    keys.revoke(keys_path, "alice")
    # The files changed, the running gateway did not.
    assert (await models(handle.port, alice), await models(handle.port, bob)) == (200, 401)
    assert reload(handle.gw, config_path) is True
    assert (await models(handle.port, alice), await models(handle.port, bob)) == (401, 200)
    assert handle.gw.runtime.keys.names() == {"bob"}


def test_the_runtime_is_replaced_whole_and_keeps_created(tmp_path):
    keys.add(tmp_path / "keys.toml", "alice")
    config_path = write_config(tmp_path / "gateway.toml")
    gw = gateway(config_path)
    old = gw.runtime
    write_config(tmp_path / "gateway.toml", extra='\n[[tiers]]\nname = "big"\nupstreams = ["http://127.0.0.1:11"]\n'
                                                  'models = ["big-chat"]\n')
    assert reload(gw, config_path) is True
    new = gw.runtime
    assert new is not old and new.router is not old.router and new.keys is not old.keys
    assert list(new.router.tiers) == ["local", "big"] and list(old.router.tiers) == ["local"]
    assert new.router.tier_for("big-chat").name == "big"
    assert new.router.model_created == old.router.model_created  # /v1/models does not change its times


def test_a_revoked_keys_bucket_is_forgotten(tmp_path):
    keys_path = tmp_path / "keys.toml"
    keys.add(keys_path, "alice", rpm=1)
    keys.add(keys_path, "bob", rpm=1)
    config_path = write_config(tmp_path / "gateway.toml")
    gw = gateway(config_path)
    for name in ("alice", "bob"):
        assert gw.limiter.admit(name, 1, None, 0).allowed
        assert not gw.limiter.admit(name, 1, None, 0).allowed  # the bucket is empty; the clock stands still
    keys.revoke(keys_path, "alice")
    assert reload(gw, config_path) is True
    assert gw.limiter.forgotten == ["alice"]
    assert gw.limiter.admit("alice", 1, None, 0).allowed  # a full bucket again
    assert not gw.limiter.admit("bob", 1, None, 0).allowed  # a live key keeps what it used


def test_a_removed_and_re_added_key_starts_from_a_full_bucket(tmp_path):
    keys_path = tmp_path / "keys.toml"
    keys.add(keys_path, "alice", rpm=1)
    config_path = write_config(tmp_path / "gateway.toml")
    gw = gateway(config_path)
    assert gw.limiter.admit("alice", 1, None, 0).allowed
    keys.write(keys_path, keys.KeysFile())  # alice removed from the file altogether
    assert reload(gw, config_path) is True
    assert gw.limiter.forgotten == ["alice"]
    secret = keys.add(keys_path, "alice", rpm=1)
    assert reload(gw, config_path) is True
    assert gw.runtime.keys.lookup(secret.encode()).name == "alice"
    assert gw.limiter.forgotten == ["alice"]  # nothing to forget the second time
    assert gw.limiter.admit("alice", 1, None, 0).allowed


def test_unchanged_keys_forget_nothing(tmp_path):
    keys.add(tmp_path / "keys.toml", "alice", rpm=1)
    config_path = write_config(tmp_path / "gateway.toml")
    gw = gateway(config_path)
    assert gw.limiter.admit("alice", 1, None, 0).allowed
    assert reload(gw, config_path) is True
    assert gw.limiter.forgotten == []
    assert not gw.limiter.admit("alice", 1, None, 0).allowed


@pytest.mark.parametrize("bad, message", [
    ('[server]\nlisen = "127.0.0.1:0"\n', "unknown field 'server.lisen'"),
    ("[server\n", "not valid TOML"),
    ('[[tiers]]\nname = "local"\nupstreams = []\nmodels = ["m"]\n', "tiers[0].upstreams"),
    (('[auth]\nkeys_file = "missing.toml"\n[[tiers]]\nname = "a"\nupstreams = ["http://127.0.0.1:9"]\n'
     'models = ["m"]\n'), "does not exist"),
])
def test_an_invalid_config_is_refused_and_the_old_runtime_kept(tmp_path, events, bad, message):
    keys.add(tmp_path / "keys.toml", "alice")
    config_path = write_config(tmp_path / "gateway.toml")
    gw = gateway(config_path)
    old = gw.runtime
    Path(config_path).write_text(bad)
    assert reload(gw, config_path) is False
    assert gw.runtime is old
    err = events.getvalue().decode()
    assert '"event":"reload_rejected"' in err and message in err


def test_an_invalid_keys_file_is_refused(tmp_path):
    keys_path = tmp_path / "keys.toml"
    secret = keys.add(keys_path, "alice")
    config_path = write_config(tmp_path / "gateway.toml")
    gw = gateway(config_path)
    old = gw.runtime
    keys_path.write_text(keys_path.read_text() + 'role = "admin"\n')
    assert reload(gw, config_path) is False
    assert gw.runtime is old
    assert gw.runtime.keys.lookup(secret.encode()).name == "alice"


def test_a_missing_config_file_is_refused(tmp_path):
    keys.add(tmp_path / "keys.toml", "alice")
    config_path = write_config(tmp_path / "gateway.toml")
    gw = gateway(config_path)
    old = gw.runtime
    Path(config_path).unlink()
    assert reload(gw, config_path) is False
    assert gw.runtime is old


def test_no_config_path_is_ignored(tmp_path, events):
    config_path = write_config(tmp_path / "gateway.toml", keys_file=None)
    gw = gateway(config_path)
    old = gw.runtime
    assert reload(gw, None) is False
    assert gw.runtime is old
    assert b'"event":"reload_ignored"' in events.getvalue()


def test_a_listen_change_is_applied_otherwise(tmp_path, events):
    config_path = write_config(tmp_path / "gateway.toml", keys_file=None)
    gw = gateway(config_path)
    write_config(tmp_path / "gateway.toml", keys_file=None, listen="127.0.0.1:1")
    assert reload(gw, config_path) is True
    assert gw.runtime.config.server.listen == "127.0.0.1:1"
    assert b'"event":"reload_partial"' in events.getvalue()


def test_an_open_gateway_gets_keys_on_reload(tmp_path):
    config_path = write_config(tmp_path / "gateway.toml", keys_file=None)
    gw = gateway(config_path)
    assert gw.runtime.keys.open
    secret = keys.add(tmp_path / "keys.toml", "alice")
    write_config(tmp_path / "gateway.toml")
    assert reload(gw, config_path) is True
    assert not gw.runtime.keys.open
    assert gw.runtime.keys.lookup(secret.encode()).name == "alice"


# -- wakers -------------------------------------------------------------------------------------------


def test_unchanged_wakers_are_carried_over(tmp_path):
    config_path = write_config(tmp_path / "gateway.toml", keys_file=None, wake_budget=300)
    gw = gateway(config_path)
    [waker] = gw.start_wakers()  # not serving: created, not started
    assert gw.runtime.router.tiers["spot"].waker is waker
    assert gw.runtime.router.tiers["local"].waker is None
    assert reload(gw, config_path) is True
    assert gw.runtime.router.tiers["spot"].waker is waker
    assert gw.runtime.router.tiers["local"].waker is None


def test_changed_wake_settings_get_a_new_waker(tmp_path):
    config_path = write_config(tmp_path / "gateway.toml", keys_file=None, wake_budget=300)
    gw = gateway(config_path)
    [waker] = gw.start_wakers()
    write_config(tmp_path / "gateway.toml", keys_file=None, wake_budget=400)
    assert reload(gw, config_path) is True
    new = gw.runtime.router.tiers["spot"].waker
    assert new is not None and new is not waker
    assert new.settings.budget_s == 400 and waker.settings.budget_s == 300


def test_changed_upstreams_get_a_new_waker(tmp_path):
    config_path = write_config(tmp_path / "gateway.toml", keys_file=None, wake_budget=300)
    gw = gateway(config_path)
    [waker] = gw.start_wakers()
    Path(config_path).write_text(Path(config_path).read_text().replace("127.0.0.1:10", "127.0.0.1:12"))
    assert reload(gw, config_path) is True
    new = gw.runtime.router.tiers["spot"].waker
    assert new is not None and new is not waker
    assert gw.runtime.router.tiers["spot"].urls == ["http://127.0.0.1:12"]


def test_a_tier_that_gains_wake_settings_gets_a_waker(tmp_path):
    config_path = write_config(tmp_path / "gateway.toml", keys_file=None)
    gw = gateway(config_path)
    assert gw.start_wakers() == []
    write_config(tmp_path / "gateway.toml", keys_file=None, wake_budget=300)
    assert reload(gw, config_path) is True
    assert gw.runtime.router.tiers["spot"].waker is not None
