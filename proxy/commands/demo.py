"""`spotinference demo`: a sleeping GPU tier woken by one request, end to end, on this machine.

Strategy: everything real except the cloud and the GPUs. moto's server mode plays the EC2 API (in a
thread, on 127.0.0.1 with a free port), an ApiTap in front of it records each call on the wire, a
FleetSimulator plays the GPU host (a simulated vLLM that boots `--boot-delay-s` after EC2 says
`running`), and the real gateway (proxy.process.services.run_gateway) runs with the tier's `[tiers.wake]` pointed at
the tap. One chat completion goes in through plain HTTP; the demo then waits for the idle stop and
prints one timeline on one clock (trio's), from four independent witnesses: the client (request in,
first byte), the wire (StartInstances, StopInstances), the fleet (EC2 running, vLLM listening) and the
waker's own record (healthy; its times are relative to the request reaching it, anchored here on
"request in", within a millisecond). Credentials are fake and forced, so no real AWS account is touched.
Then the cost: the tier is priced from EC2's spot price history (moto's), two keys share it, and the
demo ends with the `spotinference usage --cost` table of its usage log (GPU time recorded each second
here, each minute by default): what the wake, the answers and the idle tail cost, per key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import trio

MODEL = "demo-chat"
TIER = "gpu"
TAG = "spotinference:upstream"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotinference demo",
                                description="Wake a sleeping simulated GPU tier with one request and print "
                                            "the timeline (EC2 emulated by moto, vLLM simulated).")
    p.add_argument("--boot-delay-s", type=float, default=3.0, help="simulated host boot + model load time")
    p.add_argument("--idle-s", type=float, default=3.0, help="idle time before the tier is stopped again")
    p.add_argument("--budget-s", type=float, default=30.0, help="wake budget")
    p.add_argument("--hard-cap-s", type=float, default=60.0, help="wake hard cap")
    p.add_argument("--verbose", action="store_true", help="show the gateway's JSON logs on stderr")
    return p


def _fake_aws_environment(workdir: str) -> None:
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_SESSION_TOKEN": "demo",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.path.join(workdir, "none"), "AWS_SHARED_CREDENTIALS_FILE": os.path.join(workdir, "none"),
    })
    os.environ.pop("AWS_PROFILE", None)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.boot_delay_s < 0 or args.idle_s <= 0 or args.budget_s <= 0 or args.hard_cap_s < args.budget_s:
        sys.stderr.write("spotinference demo: need boot delay >= 0, idle > 0, 0 < budget <= hard cap\n")
        return 2
    from moto.server import ThreadedMotoServer

    from proxy.observe import logs

    logs.configure("info" if args.verbose else "error", access=args.verbose)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="spotinference-demo-") as workdir:
        _fake_aws_environment(workdir)
        emulator = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        emulator.start()
        try:
            host, port = emulator.get_host_and_port()
            code = trio.run(_demo, args, f"http://{host}:{port}", workdir)
        finally:
            emulator.stop()
        if code == 0:
            from proxy.commands import usage

            print("\n  spotinference usage --cost   (GPU time x EC2's spot price, shared by tokens)")
            db = os.path.join(workdir, "usage.sqlite3")
            usage.main(["--db", db, "--cost"])
            print(_price_line(db))
        return code


def _price_line(db: str) -> str:
    """The hourly price the demo's GPU time was charged at, and why it is tiny."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        usd, seconds, source = conn.execute(
            "SELECT SUM(usd), SUM(seconds), MAX(price_source) FROM gpu_time").fetchone()
    if not seconds:
        return "  price: no GPU time recorded"
    return (f"  price: ${usd / seconds * 3600:.6g}/h ({source}): moto's spot price history answers every query with "
            "$0.00001/h, hence the tiny figures; against EC2 it is the zone's real spot price")


async def _demo(args: argparse.Namespace, aws_url: str, workdir: str) -> int:
    import httpx
    import msgspec

    from backends.fleet import ApiTap, FleetSimulator
    from backends.sim.server import SimOptions
    from ops.ec2 import Clients, Ec2
    from ops.pricing import CostConfig
    from ops.settings import WakeConfig
    from proxy.admit import keys
    from proxy.config import AuthConfig, Config, ServerConfig, TierConfig, UsageConfig, validate
    from proxy.gateway import Gateway, build_runtime
    from proxy.process.services import run_gateway

    clients = Clients("us-east-1", aws_url)
    ec2 = Ec2(clients)

    def sleeping_host() -> str:
        api = clients.get("ec2")
        iid = api.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1,
                                InstanceType="g5.12xlarge")["Instances"][0]["InstanceId"]
        api.stop_instances(InstanceIds=[iid])
        return iid

    with trio.fail_after(args.hard_cap_s + args.idle_s + 60):
        async with trio.open_nursery() as nursery:
            tap = ApiTap(aws_url)
            tap_host, tap_port = await nursery.start(tap.serve, "127.0.0.1", 0)
            iid = await trio.to_thread.run_sync(sleeping_host)
            fleet = FleetSimulator(ec2, SimOptions(models=(MODEL,), ttft_ms=40.0, tokens_per_s=200.0,
                                                       enable_auto_tool_choice=True, tool_call_parser="hermes"),
                                   boot_delay_s=args.boot_delay_s, poll_s=0.05, upstream_tag=TAG)
            upstream = fleet.reserve(iid)
            await nursery.start(fleet.run)
            wake = WakeConfig(region="us-east-1", endpoint_url=f"http://{tap_host}:{tap_port}", instance_ids=[iid],
                              budget_s=args.budget_s, hard_cap_s=args.hard_cap_s, idle_s=args.idle_s,
                              poll_s=0.1, probe_timeout_s=1.0, upstream_tag=TAG)
            keys_file = os.path.join(workdir, "keys.toml")
            secrets = {name: keys.add(keys_file, name) for name in ("alice", "bob")}
            cost = CostConfig(spot=True, instance_type="g5.12xlarge")
            config = validate(Config(
                server=ServerConfig(listen="127.0.0.1:0", workers=1), auth=AuthConfig(keys_file=keys_file),
                usage=UsageConfig(path=os.path.join(workdir, "usage.sqlite3"), flush_s=0.1, gpu_time_s=1),
                tiers=[TierConfig(name=TIER, upstreams=[upstream], models=[MODEL], wake=wake, cost=cost)]))
            gateway = Gateway(build_runtime(config))
            gw_host, gw_port = await nursery.start(lambda task_status: run_gateway(
                config, gateway=gateway, task_status=task_status))
            base = f"http://{gw_host}:{gw_port}"
            print(f"spotinference demo: tier '{TIER}' (one dual-GPU spot host, {iid}, asleep), model '{MODEL}'")
            print(f"  gateway {base}   EC2 emulator (moto) {aws_url}   host boot delay {args.boot_delay_s:g} s\n")
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Wake up and say hello."}],
                    "max_tokens": 12}
            async with httpx.AsyncClient(timeout=args.hard_cap_s + 5, trust_env=False) as http:
                t0 = trio.current_time()
                async with http.stream("POST", f"{base}/v1/chat/completions", json=body,
                                       headers={"authorization": f"Bearer {secrets['alice']}"}) as resp:
                    t_first = trio.current_time()
                    payload = await resp.aread()
                for name, max_tokens in (("bob", 24), ("alice", 12)):  # the tier is awake: no wait
                    await http.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": max_tokens},
                                    headers={"authorization": f"Bearer {secrets[name]}"})
            waker = gateway.runtime.router.tiers[TIER].waker
            print(f"  HTTP {resp.status_code}, x-spotinference-wake-ms: {resp.headers.get('x-spotinference-wake-ms')}")
            if resp.status_code == 200:
                answer = msgspec.json.decode(payload)["choices"][0]["message"]["content"]
                print(f"  answer: {answer!r}")
            # Watch the tier go back to sleep once vLLM's counters stop moving.
            while tap.count("StopInstances") == 0 or waker.statistics().state.value != "asleep":
                await trio.sleep(0.1)
            stats = waker.statistics()
            _print_timeline(t0, t_first, resp.status_code, tap, fleet, stats, args)
            await trio.sleep(1.5)  # the GPU time of the last second is recorded
            nursery.cancel_scope.cancel()
    return 0 if resp.status_code == 200 else 1


def _print_timeline(t0: float, t_first: float, status: int, tap, fleet, stats, args) -> None:
    def first(items, pred):
        return next((x for x in items if pred(x)), None)

    rows: list[tuple[float, str, str]] = [(t0, "request in", f"POST /v1/chat/completions  model={MODEL}")]
    start = first(tap.calls, lambda c: c.action == "StartInstances")
    if start:
        rows.append((start.at, "StartInstances", f"{start.params.get('InstanceId.1')}  (seen on the EC2 API wire)"))
    running = first(fleet.events, lambda e: e.what == "running")
    if running:
        rows.append((running.at, "running", "EC2 DescribeInstances says running; the host boots"))
    up = first(fleet.events, lambda e: e.what == "up")
    if up:
        rows.append((up.at, "vLLM listening", f"{up.url}  (simulated vLLM after {args.boot_delay_s:g} s boot)"))
    healthy = dict(stats.last_timeline).get("healthy")
    if healthy is not None:
        rows.append((t0 + healthy, "healthy", f"/health 200 and {MODEL} in /v1/models  (waker)"))
    rows.append((t_first, "first byte", f"HTTP {status} response head reaches the client"))
    stop = first(tap.calls, lambda c: c.action == "StopInstances")
    if stop:
        rows.append((stop.at, "StopInstances", f"idle {args.idle_s:g} s by vLLM's /metrics; tier asleep again"))
    print("\n  timeline (one clock):")
    for at, what, detail in sorted(rows, key=lambda r: r[0]):
        print(f"    t+{at - t0:8.3f} s  {what:<15} {detail}")
    last = "-" if stats.last_wake_s is None else f"{stats.last_wake_s:.3f}"
    print(f"\n  waker: wakes_total={stats.wakes_total} last_wake_s={last} "
          f"budget_s={args.budget_s:g} over_budget={stats.wake_budget_exceeded_total} stops_total={stats.stops_total}")
