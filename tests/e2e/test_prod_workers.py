"""Through real processes: metrics over two workers, reload on SIGHUP, a SIGKILLed worker replaced.

Strategy: the real supervisor (`serve --workers 2`) and the OpenAI SDK, as in test_production.py (the
helpers are tests/support/production.py's). Which worker answered is read from the request id's
per-process prefix; worker pids are the supervisor's children in /proc. Readiness is the workers' own
`gateway_listening` log events (each worker installs its signal handlers before it listens), never a
sleep. Counts are exact: the scrape's own request is counted only after it has been rendered, so a
scrape shows every earlier request, scrapes included, and nothing else.
"""

from __future__ import annotations

import os
import signal
import threading

import openai
import pytest

from proxy.process.restarts import BASE_S
from tests.support.production import (
    ASK,
    add_key,
    by_label,
    children,
    client,
    gateway,
    revoke_key,
    run_threads,
    scrape,
    sim,
    wait_for,
    worker_of,
    write_config,
)


def ready(gw, workers: int) -> None:
    wait_for(lambda: len(gw.events("gateway_listening")) >= workers, f"{workers} workers listening", timeout=30)


# -- 4. one scrape covers both workers -----------------------------------------------------------------

def test_one_scrape_counts_every_request_of_both_workers(tmp_path):
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url)
        with gateway(cfg, "--workers", "2") as gw:
            ready(gw, 2)
            sent = {"200": 0, "404": 0}
            prompt = completion = 0
            served_by: dict[str, int] = {}
            # Fresh connections until both workers have answered (bounded), at least four of them.
            clients = []
            for _ in range(40):
                c = client(gw)
                raw = c.chat.completions.with_raw_response.create(model="sim-chat", messages=ASK, max_tokens=3)
                u = raw.parse().usage
                w = worker_of(raw.headers["x-request-id"])
                served_by[w] = served_by.get(w, 0) + 1
                sent["200"] += 1
                prompt, completion = prompt + u.prompt_tokens, completion + u.completion_tokens
                clients.append(c)
                if len(served_by) == 2 and len(clients) >= 4:
                    break
            assert len(served_by) == 2, "connections never reached the second worker"

            lock = threading.Lock()

            def traffic(c: openai.OpenAI):
                def run() -> None:
                    nonlocal prompt, completion
                    for i in range(3):  # a plain call, a stream with usage, a 404 -- on this connection
                        r = c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=2 + i)
                        chunks = list(c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=4,
                                                                stream=True, stream_options={"include_usage": True}))
                        with pytest.raises(openai.NotFoundError):
                            c.chat.completions.create(model="nope", messages=ASK)
                        with lock:
                            sent["200"] += 2
                            sent["404"] += 1
                            prompt += r.usage.prompt_tokens + chunks[-1].usage.prompt_tokens
                            completion += r.usage.completion_tokens + chunks[-1].usage.completion_tokens
                return run

            run_threads([traffic(c) for c in clients])
            n = sent["200"] + sent["404"]

            # The client has every response; a worker books a request just after its last byte, so a
            # scrape that races that instant is repeated (bounded) -- each repeat is itself counted.
            scrapes = 0
            for _ in range(20):
                m = scrape(gw.url)
                requests = m.get("spotinference_requests_total", {})
                endpoints = by_label(requests, "endpoint")
                assert endpoints.get("metrics", 0) == scrapes  # the earlier scrapes, not this one
                scrapes += 1
                assert endpoints.get("chat", 0) <= n
                if endpoints.get("chat", 0) == n:
                    break
            assert sum(requests.values()) == n + scrapes - 1
            assert set(endpoints) <= {"chat", "metrics"}
            chat = {k: v for k, v in requests.items() if dict(k)["endpoint"] == "chat"}
            assert by_label(chat, "status") == {"200": sent["200"], "404": sent["404"]}
            assert sum(m["spotinference_prompt_tokens_total"].values()) == prompt
            assert sum(m["spotinference_completion_tokens_total"].values()) == completion
            assert gw.stop() == 0


# -- 5. SIGHUP: keys added and revoked without a restart; a broken config refused ------------------------

def _port(raw) -> int:
    return raw.http_response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_keys_and_refuses_a_broken_config(tmp_path, workers):
    keys_file = tmp_path / "keys.toml"
    alice = add_key(keys_file, "alice")
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url, keys_file=keys_file)
        good_config = cfg.read_text()
        with gateway(cfg, "--workers", str(workers)) as gw:
            ready(gw, workers)
            a = client(gw, alice)

            def alice_works() -> None:  # on alice's one keep-alive connection, throughout
                raw = a.chat.completions.with_raw_response.create(model="sim-chat", messages=ASK, max_tokens=2)
                assert raw.parse().choices and _port(raw) == port

            raw = a.chat.completions.with_raw_response.create(model="sim-chat", messages=ASK, max_tokens=2)
            port = _port(raw)

            def fresh_calls(secret: str, k: int = 4) -> list[str]:
                """`k` requests on fresh connections (both workers, likely): outcome names."""
                out = []
                for _ in range(k):
                    try:
                        client(gw, secret).models.list()
                        out.append("ok")
                    except openai.AuthenticationError:
                        out.append("401")
                return out

            bob = add_key(keys_file, "bob")
            assert fresh_calls(bob, 2) == ["401"] * 2  # not before the reload
            gw.send(signal.SIGHUP)
            wait_for(lambda: len(gw.events("reloaded")) == workers, "every worker reloaded")
            assert fresh_calls(bob) == ["ok"] * 4
            alice_works()

            revoke_key(keys_file, "bob")
            gw.send(signal.SIGHUP)
            wait_for(lambda: len(gw.events("reloaded")) == 2 * workers, "every worker reloaded again")
            assert fresh_calls(bob) == ["401"] * 4
            alice_works()

            # A config with a typo: refused with a log line naming the field (by the supervisor, before
            # any worker sees it, or by the single process); the old config keeps serving.
            cfg.write_text(good_config.replace("[server]\n", "[server]\nbogus = 1\n"))
            gw.send(signal.SIGHUP)
            rejected = wait_for(lambda: gw.events("reload_rejected"), "the reload to be refused")
            assert len(rejected) == 1 and "server.bogus" in rejected[0]["error"]
            alice_works()
            assert fresh_calls(bob, 2) == ["401"] * 2 and fresh_calls(alice, 2) == ["ok"] * 2

            # A broken keys file: the config parses, so each worker refuses it itself.
            cfg.write_text(good_config)
            keys_file.write_text(keys_file.read_text() + "\n[[keys]]\nname = 'x'\nsurprise = true\n")
            gw.send(signal.SIGHUP)
            wait_for(lambda: len(gw.events("reload_rejected")) == 1 + workers, "every worker to refuse the keys")
            alice_works()
            assert fresh_calls(alice, 2) == ["ok"] * 2
            assert len(gw.events("reloaded")) == 2 * workers
            assert alice not in gw.stderr() and bob not in gw.stderr()
            assert gw.stop() == 0


# -- 6. a worker killed with SIGKILL is replaced; the port keeps serving ------------------------------------

def test_sigkilled_worker_is_replaced_and_the_port_keeps_serving(tmp_path):
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url)
        with gateway(cfg, "--workers", "2") as gw:
            ready(gw, 2)
            pids = children(gw.pid)
            assert len(pids) == 2
            before: set[str] = set()
            keep = []  # keep-alive SDK clients, one per worker
            for _ in range(40):
                c = client(gw)
                w = worker_of(c.chat.completions.with_raw_response.create(
                    model="sim-chat", messages=ASK, max_tokens=1).headers["x-request-id"])
                if w not in before:
                    before.add(w)
                    keep.append(c)
                if len(before) == 2:
                    break
            assert len(before) == 2

            # Sequential load, a fresh connection per request, through the kill and the restart.
            results: list[tuple[str, str]] = []
            stop = threading.Event()

            def load() -> None:
                for _ in range(3000):
                    if stop.is_set():
                        return
                    with client(gw) as c:
                        try:
                            raw = c.chat.completions.with_raw_response.create(model="sim-chat", messages=ASK,
                                                                              max_tokens=1)
                            results.append(("ok", worker_of(raw.headers["x-request-id"])))
                        except openai.APIConnectionError as exc:
                            results.append(("failed", repr(exc)))

            def conductor() -> None:
                try:
                    wait_for(lambda: len(results) >= 10, "load before the kill")
                    victim = min(pids)
                    os.kill(victim, signal.SIGKILL)
                    new = wait_for(lambda: (children(gw.pid) - pids) if len(children(gw.pid)) == 2 else None,
                                   "a replacement worker", timeout=30)
                    assert victim not in children(gw.pid) and len(new) == 1
                    wait_for(lambda: len(gw.events("gateway_listening")) == 3, "the replacement listening", timeout=30)
                    # The replacement answers too (its own request-id prefix), the load still going.
                    wait_for(lambda: any(r[0] == "ok" and r[1] not in before for r in results),
                             "a request answered by the replacement", timeout=30)
                    mark = len(results)
                    wait_for(lambda: len(results) >= mark + 10, "load after the restart")
                    kills.append(victim)
                finally:
                    stop.set()

            kills: list[int] = []
            run_threads([load, conductor], timeout=120)
            assert kills, "the conductor did not finish"
            failed = [r for r in results if r[0] == "failed"]
            # At most the one request that was inside the killed worker fails; everything else is served.
            assert len(failed) <= 1, failed
            assert len(results) >= 30
            exited = gw.events("worker_exited")
            assert [(e["pid"], e["code"]) for e in exited] == [(kills[0], -signal.SIGKILL)]
            for c in keep:  # both keep-alive clients still get answers (one reconnects transparently)
                assert c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=1).choices
            assert gw.stop() == 0


def test_one_worker_stopped_gracefully_leaves_the_port_serving(tmp_path):
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url)
        with gateway(cfg, "--workers", "2") as gw:
            ready(gw, 2)
            victim = min(children(gw.pid))
            os.kill(victim, signal.SIGTERM)  # e.g. an operator's `kill <pid>`: that worker drains and exits 0
            wait_for(lambda: any(e["pid"] == victim for e in gw.events("worker_exited")), "the worker to exit")
            wait_for(lambda: len(gw.events("gateway_listening")) >= 3, "its replacement", timeout=30)
            outcomes = []
            for _ in range(10):
                try:
                    client(gw).chat.completions.create(model="sim-chat", messages=ASK, max_tokens=1)
                    outcomes.append("ok")
                except openai.APIConnectionError:
                    outcomes.append("failed")
            assert outcomes == ["ok"] * 10
            assert [(e["pid"], e["code"]) for e in gw.events("worker_exited")] == [(victim, 0)]
            assert gw.stop() == 0


# -- 7. a crash loop backs off, is counted, and never takes the port out ---------------------------------

def test_a_crash_loop_backs_off_counts_restarts_and_the_port_keeps_serving(tmp_path):
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url)
        with gateway(cfg, "--workers", "2") as gw:
            ready(gw, 2)
            victim = gw.events("supervisor_started")[0]["pids"][0]
            for kills in range(1, 5):  # slot 0 crashes four times within a minute
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda v=victim: [e for e in gw.events("worker_exited") if e["pid"] == v],
                         "the kill seen", timeout=30)
                # While the slot backs off, the other worker serves every request.
                for _ in range(3):
                    assert client(gw).chat.completions.create(model="sim-chat", messages=ASK, max_tokens=1).choices
                wait_for(lambda k=kills: len(gw.events("worker_restarted")) >= k, "the restart", timeout=30)
                victim = gw.events("worker_restarted")[-1]["pid"]
                wait_for(lambda k=kills: len(gw.events("gateway_listening")) >= 2 + k, "it listening", timeout=30)
            delays = [e["restart_in_s"] for e in gw.events("worker_exited")]
            restarted = gw.events("worker_restarted")
            assert [e["restarts"] for e in restarted] == [1, 2, 3, 4]
            assert [e["index"] for e in restarted] == [0, 0, 0, 0]
            assert delays == [0, 0, BASE_S, 2 * BASE_S]  # two free restarts a minute, then a back-off
            samples = scrape(gw.url)["spotinference_worker_restarts_total"]
            assert sum(samples.values()) == 4
            assert gw.stop() == 0


# -- stored Responses API responses: a retrieve finds its upstream whichever worker takes it -----------

def test_a_response_made_on_one_worker_is_retrieved_through_the_other(tmp_path):
    with sim(tmp_path) as a, sim(tmp_path) as b:
        cfg = tmp_path / "gw.toml"
        cfg.write_text('[server]\nlisten = "127.0.0.1:0"\n[[tiers]]\nname = "local"\n'
                       f'upstreams = ["{a.url}", "{b.url}"]\nmodels = ["sim-chat"]\n')
        with gateway(cfg, "--workers", "2") as gw:
            ready(gw, 2)
            made: list[tuple[str, str]] = []  # (response id, worker that relayed the create)
            for _ in range(40):  # fresh connections until both workers made some (bounded)
                raw = client(gw).responses.with_raw_response.create(model="sim-chat", input="hi", max_output_tokens=2)
                made.append((raw.parse().id, worker_of(raw.headers["x-request-id"])))
                if len(made) >= 6 and len({w for _, w in made}) == 2:
                    break
            assert len({w for _, w in made}) == 2, "SO_REUSEPORT never spread the connections"
            crossed = 0
            for rid_, creator in made:
                for _ in range(8):  # fresh connections: some land on the other worker
                    raw = client(gw).responses.with_raw_response.retrieve(rid_)
                    assert raw.parse().id == rid_  # never a 404, whichever worker answered
                    crossed += worker_of(raw.headers["x-request-id"]) != creator
            assert crossed > 0


# -- workers = "auto": one worker per core the process may run on ------------------------------------

@pytest.mark.parametrize("cpus", [[0], [0, 1]])
def test_workers_auto_starts_one_worker_per_usable_core(tmp_path, cpus):
    if not set(cpus) <= os.sched_getaffinity(0):
        pytest.skip(f"needs CPUs {cpus}")
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url, workers='"auto"')
        # taskset narrows the gateway's affinity as a cgroup or systemd's CPUAffinity= would.
        with gateway(cfg, cpus=cpus) as gw:
            ready(gw, len(cpus))
            r = client(gw).chat.completions.with_raw_response.create(model="sim-chat", messages=ASK, max_tokens=2)
            assert r.status_code == 200
            started = gw.events("supervisor_started")
            if len(cpus) == 1:
                assert started == []  # one core: the single-process gateway, no supervisor
            else:
                assert started[0]["workers"] == len(cpus)
                assert len(children(gw.pid)) == len(cpus)
