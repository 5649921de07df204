"""The real `spotinference` command, as an operator runs it.

Long-running commands (`serve`, `sim`) run under tests/support/processes.py: stdout and stderr to files,
the URL from the `listening on` line, stopped (bounded, then killed) however the test ends.
"""

from __future__ import annotations

import subprocess

import openai
import pytest

from tests.support.processes import SPOT, start


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*SPOT, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_serve_embedded_default_answers_the_sdk(tmp_path):
    with start([*SPOT, "serve", "--listen", "127.0.0.1:0"], tmp_path, "serve") as served:
        c = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=10)
        resp = c.chat.completions.create(model="sim-chat", messages=[{"role": "user", "content": "Say hello."}])
        assert resp.choices[0].message.content
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="sim-chat", stream=True, messages=[{"role": "user", "content": "Say hello."}]) if ch.choices)
        assert text
        assert served.stop() == 0, served.logs()
    logs = served.stderr()
    assert "Say hello" not in logs  # never a prompt in the logs


def test_keys_cli_and_authenticated_serve(tmp_path):
    keys_file = tmp_path / "keys.toml"
    added = run("keys", "add", "alice", "--keys-file", str(keys_file), "--rpm", "100", "--tiers", "local")
    assert added.returncode == 0, added.stderr
    secret = added.stdout.strip()
    assert secret.startswith("sk-si-") and secret not in keys_file.read_text()
    listed = run("keys", "list", "--keys-file", str(keys_file))
    assert "alice" in listed.stdout and secret not in listed.stdout
    with start([*SPOT, "sim", "--listen", "127.0.0.1:0"], tmp_path, "sim") as sim:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'[server]\nlisten = "127.0.0.1:0"\n[auth]\nkeys_file = "keys.toml"\n'
                       f'[[tiers]]\nname = "local"\nupstreams = ["{sim.url}"]\nmodels = ["sim-chat"]\n')
        assert run("check-config", str(cfg)).returncode == 0
        with start([*SPOT, "serve", "--config", str(cfg)], tmp_path, "serve") as served:
            ok = openai.OpenAI(base_url=served.url + "/v1", api_key=secret, max_retries=0, timeout=10)
            assert ok.chat.completions.create(model="sim-chat", messages=[{"role": "user", "content": "x"}]).choices
            bad = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-si-nope", max_retries=0, timeout=10)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            assert served.stop() == 0, served.logs()
        logs = served.stderr()
        assert secret not in logs and "alice" in logs
    assert run("keys", "revoke", "alice", "--keys-file", str(keys_file)).returncode == 0
    assert "revoked" in run("keys", "list", "--keys-file", str(keys_file)).stdout


def test_check_config_names_the_bad_field(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[server]\nlisten = "127.0.0.1:8080"\nmax_body_byte = 5\n')
    result = run("check-config", str(cfg))
    assert result.returncode != 0 and "server.max_body_byte" in result.stderr


def test_open_gateway_refuses_non_loopback_bind(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[server]\nlisten = "0.0.0.0:0"\n[[tiers]]\nname = "t"\nupstreams = ["http://127.0.0.1:9"]\n'
                   'models = ["m"]\n')
    result = run("serve", "--config", str(cfg), timeout=20)
    assert result.returncode == 2 and "without API keys" in result.stderr
    result = run("serve", "--listen", "0.0.0.0:0", timeout=20)
    assert result.returncode == 2 and "without API keys" in result.stderr


def test_a_configured_keys_file_that_does_not_exist_is_an_error(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[server]\nlisten = "127.0.0.1:0"\n[auth]\nkeys_file = "missing.toml"\n'
                   '[[tiers]]\nname = "t"\nupstreams = ["http://127.0.0.1:9"]\nmodels = ["m"]\n')
    checked = run("check-config", str(cfg))
    assert checked.returncode != 0 and "does not exist" in checked.stderr
    served = run("serve", "--config", str(cfg), timeout=20)
    assert served.returncode == 2 and "does not exist" in served.stderr


@pytest.mark.parametrize("mode", ["embedded", "config", "workers"])
def test_a_busy_port_is_one_line_not_a_traceback(tmp_path, mode):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    listen = f"127.0.0.1:{busy.getsockname()[1]}"
    try:
        if mode == "embedded":
            args = ["serve", "--listen", listen]
        else:
            cfg = tmp_path / "gw.toml"
            cfg.write_text(f'[server]\nlisten = "{listen}"\n\n[[tiers]]\nname = "t"\n'
                           'upstreams = ["http://127.0.0.1:9"]\nmodels = ["m"]\n')
            args = ["serve", "--config", str(cfg)] + (["--workers", "2"] if mode == "workers" else [])
        r = run(*args)
    finally:
        busy.close()
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"spotinference: cannot listen on {listen}: Address already in use"
    assert "Traceback" not in r.stderr
