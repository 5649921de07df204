"""Config decoding: strict, every bad field named by its TOML path."""

from __future__ import annotations

import os

import pytest

from proxy.config import ConfigError, load, loads

GOOD = """
[server]
listen = "127.0.0.1:8080"
workers = 1
max_body_bytes = 8388608
[auth]
keys_file = "keys.toml"
[usage]
path = "usage.sqlite3"
[[tiers]]
name = "h100x2"
upstreams = ["http://10.0.1.5:8000"]
models = ["qwen3-coder"]
[tiers.wake]
provider = "ec2"
region = "us-east-1"
instance_ids = ["i-0123456789abcdef0"]
endpoint_url = "http://127.0.0.1:5000"
budget_s = 480
hard_cap_s = 600
idle_s = 900
"""


def test_design_example_loads():
    cfg = loads(GOOD)
    assert cfg.tiers[0].wake.budget_s == 480
    assert cfg.server.max_body_bytes == 8388608


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    p = tmp_path / "gw.toml"
    p.write_text(GOOD)
    cfg = load(p)
    assert cfg.auth.keys_file == str(tmp_path / "keys.toml")
    assert cfg.usage.path == str(tmp_path / "usage.sqlite3")


@pytest.mark.parametrize("text, field", [
    ("[server]\nlisen = '127.0.0.1:1'\n", "server.lisen"),
    ("[server]\nworkers = 'two'\n", "server.workers"),
    ("[server]\nlisten = 'nohost'\n", "server.listen"),
    ("[[tiers]]\nname='a'\nupstreams=['http://h:1']\nmodels=['m']\ncolour='red'\n", "tiers[0].colour"),
    ("[[tiers]]\nname='a'\nupstreams=['ftp://h:1']\nmodels=['m']\n", "tiers[0].upstreams[0]"),
    ("[[tiers]]\nname='a'\nupstreams=[]\nmodels=['m']\n", "tiers[0].upstreams"),
    (("[[tiers]]\nname='a'\nupstreams=['http://h:1']\nmodels=['m']\n"
     "[[tiers]]\nname='b'\nupstreams=['http://h:2']\nmodels=['m']\n"), "tiers[1].models[0]"),
    (("[[tiers]]\nname='a'\nupstreams=['http://h:1']\nmodels=['m']\n[tiers.wake]\ninstance_ids=['i-1']\n"
     "budget_s=600\nhard_cap_s=60\n"), "tiers[0].wake.hard_cap_s"),
    ("[[tiers]]\nname='a'\nupstreams=['http://h:1']\nmodels=['m']\n[tiers.wake]\ninstance_id=['i-1']\n",
     "tiers[0].wake.instance_id"),
    ("[[tiers]]\nupstreams=['http://h:1']\nmodels=['m']\n", "tiers[0].name"),
])
def test_bad_field_is_named(text, field):
    with pytest.raises(ConfigError) as e:
        loads(text)
    assert f"'{field}'" in str(e.value)


def test_workers_auto_is_one_per_usable_core():
    assert loads("[server]\nworkers = 'auto'\n").server.workers == len(os.sched_getaffinity(0))
    assert loads("[server]\nworkers = 3\n").server.workers == 3
    with pytest.raises(ConfigError, match="'server.workers': expected a number or \"auto\""):
        loads("[server]\nworkers = 'all'\n")


def test_not_toml():
    with pytest.raises(ConfigError, match="not valid TOML"):
        loads("[server\n")
