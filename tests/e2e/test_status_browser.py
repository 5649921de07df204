"""The operator's status page in a real browser: Debian's headless Chromium against a real gateway.

Strategy: the product as an operator runs it (tests/support/production.py): `spotinference sim` as the
upstream, `spotinference keys add ... --admin` for the keys, `spotinference serve --config FILE` as
the gateway, a few chat completions through the OpenAI SDK. Then headless Chromium loads
``/status#key=<admin key>`` -- the key in the fragment, which the browser never sends -- and the page
fetches /status.json with it: `--dump-dom` gives the DOM after the fetch (virtual time lets the
fetch finish before the dump), `--screenshot` a picture, at desktop and phone sizes. Each Chromium
run is bounded and its process group killed (tests/support/processes.py). The checks read the
rendered DOM: the tier's name and state badge, the upstream URL, the key in top keys today, no error
banner; a non-admin key shows the 403 message instead, no key the 401 and the key form. A second test puts a sleeping tier (moto's EC2
and the fleet simulator, tests/support/cloud.py) behind an open gateway -- the page then needs no key
from loopback -- and renders it while a request wakes the tier (the waking badge, its phase, the
hosts offline) and after (ready, the wake's timeline bar); the moto tap is served by the test's event
loop, so Chromium and the SDK run in threads there. Without Chromium the tests skip with the command
that installs it (`.ci/run` installs it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.support import aws
from tests.support.cloud import MODELS, TAG, Cloud, cloud
from tests.support.processes import SPOT, run_to_end, started
from tests.support.production import ASK, add_key, client, gateway, sim, write_config

moto_url, aws_url = aws.moto_url, aws.aws_url  # fixtures

INSTALL = "apt-get install -y chromium"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_COPY = Path("/tmp/status-screenshot.png")

pytestmark = pytest.mark.skipif(BROWSER is None, reason=f"needs Debian's Chromium: {INSTALL}")


def banner(dom: str) -> str:
    """The error banner's element as rendered (hidden and empty when all is well)."""
    found = re.search(r'<div id="banner"[^>]*>.*?</div>', dom, re.DOTALL)
    assert found, dom[-3000:]
    return found.group(0)


def chromium(tmp_path: Path, url: str, *, size: str = "1200,900", screenshot: Path | None = None) -> str:
    """One headless Chromium run on `url`: the DOM after scripts ran (or, with `screenshot`, a PNG there)."""
    profile = tmp_path / f"chromium-profile-{size.replace(',', 'x')}-{'png' if screenshot else 'dom'}"
    argv = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={size}",
            "--virtual-time-budget=4000"]
    argv += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = run_to_end([*argv, url], tmp_path, "chromium", timeout=90)
    assert proc.returncode == 0, proc.logs()
    if screenshot:
        assert screenshot.is_file() and screenshot.stat().st_size > 1000, proc.logs()
        return ""
    return proc.stdout()


def test_status_page_renders_tiers_upstreams_and_top_keys(tmp_path):
    keys_file = tmp_path / "keys.toml"
    admin = add_key(keys_file, "ops", "--admin")
    user = add_key(keys_file, "alice")
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url, keys_file=keys_file)
        with gateway(cfg) as gw:
            c = client(gw, user)
            for _ in range(3):
                assert c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=5).choices
            page = f"{gw.url}/status#key={admin}"

            dom = chromium(tmp_path, page)
            assert 'data-loaded="1"' in dom, dom[-3000:]
            assert 'data-tier="local"' in dom and ">local<" in dom
            assert 'class="badge s-always_on"' in dom and ">always_on<" in dom
            assert f">{up.url}<" in dom and 'class="badge v-healthy"' in dom
            assert ">alice<" in dom  # top keys today
            assert banner(dom) == '<div id="banner" class="banner" role="alert" hidden=""></div>'
            assert admin not in dom

            phone_dom = chromium(tmp_path, page, size="390,844")
            assert 'data-loaded="1"' in phone_dom and ">alice<" in phone_dom
            assert 'class="banner error"' not in banner(phone_dom)

            desktop, phone = tmp_path / "status-desktop.png", tmp_path / "status-phone.png"
            chromium(tmp_path, page, screenshot=desktop)
            chromium(tmp_path, page, size="390,844", screenshot=phone)
            shutil.copyfile(desktop, SCREENSHOT_COPY)
            shutil.copyfile(phone, SCREENSHOT_COPY.with_name("status-screenshot-phone.png"))

            refused = chromium(tmp_path, f"{gw.url}/status#key={user}")
            shown = banner(refused)
            assert 'class="banner error"' in shown and "403" in shown and "not an admin key" in shown
            assert 'data-loaded="1"' not in refused
            nokey = chromium(tmp_path, f"{gw.url}/status")  # asks for the key
            assert "401" in banner(nokey) and re.search(r'<form id="keyform">', nokey)
        logs = gw.stderr()
    assert admin not in logs and user not in logs


# -- a sleeping tier ------------------------------------------------------------------------------

BOOT_S = 8.0  # long enough for Chromium to load the page while the wake is under way


def wake_config(c: Cloud, path: Path) -> Path:
    settings = {"region": "us-east-1", "endpoint_url": c.tap_url, "instance_ids": c.primary, "budget_s": 20.0,
                "hard_cap_s": 40.0, "idle_s": 300.0, "poll_s": 0.05, "probe_timeout_s": 0.5,
                "interruption_wait_s": 0, "upstream_tag": TAG, "start_retry_s": 10.0}
    lines = ["[server]", 'listen = "127.0.0.1:0"', "drain_s = 2.0", "[[tiers]]", 'name = "gpu"',
             f"upstreams = {json.dumps(c.upstreams)}", f"models = {json.dumps(MODELS)}", "[tiers.wake]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[tiers.cost]", "hourly_usd = 36.0", "[usage]", "gpu_time_s = 1"]  # the page shows the cost
    path.write_text("\n".join(lines) + "\n")
    return path


def wake_request(url: str) -> None:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)
    assert c.chat.completions.create(model=MODELS[0], messages=ASK, max_tokens=4).choices


def tier_state(url: str) -> str:
    r = httpx.get(f"{url}/status.json", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["tiers"][0]["state"]


async def test_status_page_shows_a_wake_under_way_then_its_timeline(aws_url, tmp_path):
    with trio.fail_after(180):
        async with cloud(aws_url, boot_delay_s=BOOT_S) as c, started(
                [*SPOT, "serve", "--config", str(wake_config(c, tmp_path / "gw.toml"))],
                tmp_path, "gateway") as gw:
            assert await trio.to_thread.run_sync(tier_state, gw.url) == "asleep"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, wake_request, gw.url)
                while await trio.to_thread.run_sync(tier_state, gw.url) != "waking":
                    await trio.sleep(0.05)
                waking = await trio.to_thread.run_sync(chromium, tmp_path, f"{gw.url}/status")
                during = tmp_path / "status-waking.png"  # a picture only: the wake may be over by then
                await trio.to_thread.run_sync(lambda: chromium(tmp_path, f"{gw.url}/status", screenshot=during))
            assert 'data-loaded="1"' in waking and 'class="badge s-waking"' in waking, waking[-3000:]
            assert "phase " in waking and "elapsed " in waking and 'class="badge v-offline"' in waking
            assert 'class="banner error"' not in banner(waking)

            ready = await trio.to_thread.run_sync(chromium, tmp_path, f"{gw.url}/status")
            assert 'class="badge s-ready"' in ready and 'class="badge v-healthy"' in ready
            assert ">Last wakes<" in ready and 'class="wake"' in ready and "budget 20 s" in ready
            assert 'class="cost"' in ready and "$36.00/h now" in ready and "per million tokens" in ready
            shot = tmp_path / "status-wake.png"
            await trio.to_thread.run_sync(lambda: chromium(tmp_path, f"{gw.url}/status", screenshot=shot))
            shutil.copyfile(shot, SCREENSHOT_COPY.with_name("status-screenshot-wake.png"))
            shutil.copyfile(during, SCREENSHOT_COPY.with_name("status-screenshot-waking.png"))
