"""A local GPU fleet for tests and the demo: simulated vLLM hosts that follow EC2 state in an emulator,
and a tap on the emulator's wire that records (and can fault) API calls.

Strategy: nothing here knows about the waker. `FleetSimulator` watches DescribeInstances in the EC2
emulator (moto server) the way the real world works: when an instance turns `running`, its "host" boots
for `boot_delay_s` and then serves a SimServer (a simulated vLLM); when the instance leaves `running`
(stopped, terminated), the server is killed mid-flight, connections and all. Where a host listens:

- `reserve(instance_id)` gives an instance a fixed URL up front (the tier's configured upstream,
  instance_ids[i] <-> upstreams[i]). The port is held by a bound, NOT listening socket while the host is
  down, so connections are refused exactly as by a stopped host, and no one else can take the port.
- any other instance (fallback capacity, launch-template capacity) gets a free port when it boots, and
  the fleet writes `http://127.0.0.1:PORT` into the instance's `upstream_tag` tag, removing it when the
  host goes down -- a host registering itself, which the waker reads when `upstream_tag` is configured.

`hang(instance_id, mode)` makes a host that is up sick without EC2 noticing (a black hole or a stalled
engine: SimServer.set_fault) and `unhang` makes it well again -- what the gateway's health checks exist for.

`ApiTap` is a tiny HTTP proxy in front of the emulator: every EC2 query (`Action=...`) and SQS JSON
(`X-Amz-Target: AmazonSQS.<Action>`) call is recorded with the time it was seen; `fail()` answers the
next matching EC2 calls with EC2's XML error envelope (e.g. InsufficientInstanceCapacity) and
`rewrite()` edits responses (e.g. to show an instance `pending`). Faults are injected on the wire, so
the code under test runs its real boto3 path. Events and calls carry trio.current_time() stamps.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import h11
import httpx
import trio

from backends.sim.server import SimOptions, SimServer
from ops.ec2 import Ec2, Ec2Error

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetEvent:
    at: float
    instance_id: str
    what: str  # "running" (seen in EC2) | "up" (vLLM listening) | "down" (killed)
    #            | "black_hole" / "stall" (hung by `hang`) | "recovered" (`unhang`)
    url: str | None = None


@dataclass
class _Host:
    instance_id: str
    reserved: socket.socket | None = None
    port: int = 0
    url: str | None = None
    scope: trio.CancelScope | None = None
    server: SimServer | None = None
    tagged: bool = False


def _reserve_port(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock  # bound, never listening: connects are refused


class FleetSimulator:
    """Simulated vLLM hosts following EC2 instance state (see the module comment)."""

    def __init__(self, ec2: Ec2, options: SimOptions, *, boot_delay_s: float = 0.5, poll_s: float = 0.05,
                 upstream_tag: str | None = None) -> None:
        self._ec2 = ec2
        self.options = options
        self.boot_delay_s = boot_delay_s
        self.poll_s = poll_s
        self.upstream_tag = upstream_tag
        self._hosts: dict[str, _Host] = {}
        self.events: list[FleetEvent] = []
        self._limiter = trio.CapacityLimiter(1)

    def reserve(self, instance_id: str) -> str:
        """A fixed URL for this instance's host, refused while the instance is not running."""
        sock = _reserve_port()
        port = sock.getsockname()[1]
        self._hosts[instance_id] = _Host(instance_id, reserved=sock, port=port, url=f"http://127.0.0.1:{port}")
        return f"http://127.0.0.1:{port}"

    def server(self, instance_id: str) -> SimServer | None:
        """The SimServer currently serving for this instance, if its host is up."""
        host = self._hosts.get(instance_id)
        return host.server if host else None

    def url(self, instance_id: str) -> str | None:
        """Where this instance's host listens (or will, for a reserved one)."""
        host = self._hosts.get(instance_id)
        return host.url if host else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await self._reconcile(nursery)
                    await trio.sleep(self.poll_s)
        finally:
            for host in self._hosts.values():
                if host.reserved is not None:
                    host.reserved.close()

    def kill(self, instance_id: str) -> None:
        """The host dies now (a spot interruption reaching its deadline), whatever EC2 says next.
        The emulator changes state instantly, so a stop followed at once by a start can fall between
        two polls; a test that stops an instance calls this too, as the real host would go down.
        The next poll that sees the instance running boots a fresh host."""
        host = self._hosts.get(instance_id)
        if host is not None and host.scope is not None:
            host.scope.cancel()
            host.scope = None
            self.events.append(FleetEvent(trio.current_time(), instance_id, "down", host.url))

    def hang(self, instance_id: str, mode: str = "black_hole") -> None:
        """The host goes sick but stays up in EC2: "black_hole" (accepts, answers nothing, /health
        included) or "stall" (/health 200, generations frozen); see backends/sim/server.py."""
        server = self.server(instance_id)
        if server is None:
            raise LookupError(f"host of {instance_id} is not up")
        server.set_fault(mode)
        self.events.append(FleetEvent(trio.current_time(), instance_id, mode, self.url(instance_id)))

    def unhang(self, instance_id: str) -> None:
        """The sick host recovers: parked requests carry on, probes are answered again."""
        server = self.server(instance_id)
        if server is not None and server.fault is not None:
            server.set_fault(None)
            self.events.append(FleetEvent(trio.current_time(), instance_id, "recovered", self.url(instance_id)))

    async def _reconcile(self, nursery: trio.Nursery) -> None:
        try:
            instances = await trio.to_thread.run_sync(self._ec2.describe_all, limiter=self._limiter)
        except Ec2Error as exc:
            logger.warning("fleet: describe failed", extra={"code": exc.code})
            return
        for inst in instances:
            host = self._hosts.get(inst.id)
            if inst.state == "running" and (host is None or host.scope is None):
                host = host or self._hosts.setdefault(inst.id, _Host(inst.id))
                host.scope = trio.CancelScope()
                self.events.append(FleetEvent(trio.current_time(), inst.id, "running"))
                nursery.start_soon(self._serve, host)
            elif inst.state != "running" and host is not None and host.scope is not None:
                host.scope.cancel()
                host.scope = None
                self.events.append(FleetEvent(trio.current_time(), inst.id, "down", host.url))
                if host.tagged and self.upstream_tag:
                    host.tagged = False
                    await self._tag(inst.id, None)

    async def _serve(self, host: _Host) -> None:
        assert host.scope is not None
        with host.scope:
            await trio.sleep(self.boot_delay_s)
            if host.reserved is not None:
                host.reserved.close()  # hand the port to the server, which binds it at once
                host.reserved = None
            server = SimServer(self.options)
            try:
                async with trio.open_nursery() as nursery:
                    addr = await nursery.start(server.serve, "127.0.0.1", host.port)
                    host.port, host.server = addr[1], server
                    if host.url is None or not host.url.endswith(f":{addr[1]}"):
                        host.url = f"http://127.0.0.1:{addr[1]}"
                        if self.upstream_tag:
                            await self._tag(host.instance_id, host.url)
                            host.tagged = True
                    self.events.append(FleetEvent(trio.current_time(), host.instance_id, "up", host.url))
            finally:
                host.server = None
                if not host.tagged and host.url is not None and host.reserved is None:
                    host.reserved = _reserve_port(host.port)  # fixed URL: keep the port, refuse connects
                elif host.tagged:
                    host.url = None

    async def _tag(self, instance_id: str, value: str | None) -> None:
        assert self.upstream_tag is not None
        try:
            await trio.to_thread.run_sync(self._ec2.set_tag, instance_id, self.upstream_tag, value,
                                          limiter=self._limiter)
        except Ec2Error as exc:
            logger.warning("fleet: tagging failed", extra={"instance_id": instance_id, "code": exc.code})


# ---- the emulator tap ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApiCall:
    at: float
    action: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class _Fault:
    action: str
    code: str
    message: str
    status: int
    times: int
    match: Callable[[ApiCall], bool] | None


_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}


def ec2_error_body(code: str, message: str) -> bytes:
    """EC2's query-API error envelope (what botocore's ec2 parser reads)."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error></Errors><RequestID>spotinference-tap</RequestID>"
            "</Response>").encode()


class ApiTap:
    """Records and optionally faults AWS API calls on their way to an emulator."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.calls: list[ApiCall] = []
        self._faults: list[_Fault] = []
        self._rewrites: dict[str, Callable[[bytes], bytes]] = {}

    def count(self, action: str) -> int:
        return sum(1 for c in self.calls if c.action == action)

    def fail(self, action: str, code: str, *, message: str = "injected by the test tap", status: int = 500,
             times: int = 1, match: Callable[[ApiCall], bool] | None = None) -> None:
        """Answer the next `times` calls of `action` (that `match`) with an EC2 error."""
        self._faults.append(_Fault(action, code, message, status, times, match))

    def rewrite(self, action: str, fn: Callable[[bytes], bytes] | None) -> None:
        """Pass every `action` response body through `fn` (None removes the rewrite)."""
        if fn is None:
            self._rewrites.pop(action, None)
        else:
            self._rewrites[action] = fn

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED):
        async with httpx.AsyncClient(base_url=self.upstream_url, trust_env=False, timeout=30) as client:
            listeners = await trio.open_tcp_listeners(port, host=host)
            addr = listeners[0].socket.getsockname()
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, lambda s: self._connection(s, client), listeners)
                task_status.started((addr[0], addr[1]))

    def _classify(self, headers: dict[bytes, bytes], body: bytes) -> ApiCall:
        target = headers.get(b"x-amz-target", b"").decode()
        if target:
            return ApiCall(trio.current_time(), target.rpartition(".")[2])
        params = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        return ApiCall(trio.current_time(), params.get("Action", "?"), params)

    async def _connection(self, stream: trio.SocketStream, client: httpx.AsyncClient) -> None:
        try:
            await self._cycles(stream, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client hung up (a gateway being stopped, say): that connection is over

    async def _cycles(self, stream: trio.SocketStream, client: httpx.AsyncClient) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                request, body = None, bytearray()
                while True:
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError:
                        return
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data and request is None:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                status, headers, payload = await self._answer(request, bytes(body), client)
                out = conn.send(h11.Response(status_code=status,
                                             headers=[*headers, (b"content-length", str(len(payload)).encode())]))
                out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()

    async def _answer(self, request: h11.Request, body: bytes, client: httpx.AsyncClient):
        headers = {k.lower(): v for k, v in request.headers}
        call = self._classify(headers, body)
        self.calls.append(call)
        for fault in self._faults:
            if fault.times > 0 and fault.action == call.action and (fault.match is None or fault.match(call)):
                fault.times -= 1
                logger.info("tap: injected fault", extra={"action": call.action, "code": fault.code})
                return fault.status, [(b"content-type", b"text/xml")], ec2_error_body(fault.code, fault.message)
        fwd = [(k.decode(), v.decode()) for k, v in request.headers if k.lower() not in _HOP]
        try:
            resp = await client.request(request.method.decode(), request.target.decode(), headers=fwd,
                                        content=body)
        except httpx.HTTPError:
            return 502, [(b"content-type", b"text/plain")], b"emulator unreachable"
        payload = resp.content
        rewrite = self._rewrites.get(call.action)
        if rewrite is not None:
            payload = rewrite(payload)
        out = [(k.encode(), v.encode()) for k, v in resp.headers.items()
               if k.lower().encode() not in _HOP and k.lower() != "content-encoding"]
        return resp.status_code, out, payload
