"""Gateway configuration: TOML decoded by msgspec into frozen Structs.

Strategy: strict config, lax requests. Every Struct forbids unknown fields (a typo is an error, not a
silence) and gives every field a default except what only the operator can know (a tier's `name`,
`upstreams` and `models`), so old files keep loading when fields are added. Decoding
errors are turned into a `ConfigError` whose message names the field by its TOML path
(`tiers[0].wake.budget_s`). Cross-field rules that a type cannot express (a model served by two
tiers, a bad upstream URL, hard cap below the budget) are checked in `validate()` with the same
naming. Knobs that are durations end in `_s`; sizes end in `_bytes`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from backends.settings import BackendConfig
from ops.pricing import CostConfig
from ops.settings import WakeConfig

_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


ROUTING_POLICIES = ("prefix", "least_loaded", "round_robin")
_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the field."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    listen: str = "127.0.0.1:8080"
    # A count, or "auto": one worker per core this process may run on (resolved by `validate`, so
    # everything past loading sees an int).
    workers: int | str = 1
    max_body_bytes: int = 8 * 1024 * 1024
    max_head_bytes: int = 32 * 1024
    # Downstream per-phase timeouts.
    keepalive_idle_s: float = 75.0
    request_head_s: float = 10.0
    request_body_s: float = 60.0
    # A body must keep arriving at this rate once `body_grace_s` has passed (mod_reqtimeout's MinRate):
    # a trickle is cut with 408 long before `request_body_s`, a slow but real upload never is.
    body_grace_s: float = 10.0
    min_body_rate_bytes_s: int = 500
    write_s: float = 30.0
    drain_s: float = 30.0
    max_connections: int = 20000
    reuse_port: bool = True
    # Addresses (or CIDR networks) whose X-Forwarded-For / Forwarded headers are believed and appended
    # to; from anyone else those headers are dropped and replaced by the gateway's own.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # Browser apps: origins (scheme://host[:port], or "*") whose cross-origin requests are answered
    # with CORS headers, preflights included; none by default (admit/cors.py).
    cors_origins: list[str] = msgspec.field(default_factory=list)
    # /v1/audio/*: multipart uploads have their own limit (OpenAI's: 25 MiB), checked before reading.
    max_audio_bytes: int = 25 * 1024 * 1024


class UpstreamConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    connect_s: float = 5.0
    # A non-streaming answer arrives in one piece after generation: allow long generations.
    first_byte_s: float = 600.0
    between_chunks_s: float = 120.0
    max_idle_per_host: int = 256
    # uvicorn (vLLM) drops idle keep-alive connections after 5 s: stay below it.
    idle_keepalive_s: float = 4.0
    # Active health: every upstream of every tier is probed (GET /health); after `unhealthy_after`
    # failures in a row it is down (no new requests, those in flight end). Running requests with
    # vllm:generation_tokens_total frozen for `stall_s` mark it stalled.
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    unhealthy_after: int = 3
    stall_s: float = 30.0


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    keys_file: str | None = None
    # Several gateway hosts: keys in PostgreSQL instead of the file (proxy/admit/keys_db.py); every
    # host sees an added or revoked key within `refresh_s` (a poll of a change counter).
    database_url: str | None = None
    refresh_s: float = 1.0


class UsageConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    path: str | None = None
    # Several gateway hosts: one PostgreSQL table instead of a SQLite file per host (usage/pg_store.py).
    database_url: str | None = None
    # Where rows wait while PostgreSQL is down (`<spill_dir>/usage.spill*.jsonl`); default: the
    # service's state folder beside the config (see docs/SCALING.md).
    spill_dir: str | None = None
    retry_s: float = 2.0  # while the database is down: how often the writer tries again
    queue_max: int = 10000
    batch_max: int = 500
    flush_s: float = 0.5
    # GPU time of tiers with [tiers.cost] is recorded per interval of this many seconds, aligned to the
    # unix epoch (proxy/usage/gpu_time.py); every host writing one database must use the same value.
    gpu_time_s: int = 60


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """[cluster]: state shared by several gateway hosts through one Redis (docs/SCALING.md)."""

    redis_url: str | None = None
    # Redis unreachable: "local" keeps serving with this host's own limits (logged, counted);
    # "closed" answers a limited key's request with 503 until Redis is back.
    on_redis_failure: str = "local"
    timeout_s: float = 0.25  # one Redis round trip longer than this counts as Redis down
    retry_s: float = 1.0  # while down: how often a PING checks whether it is back
    lease_s: float = 15.0  # a tier's wake lease lives this long unless its holder renews it
    homes_ttl_s: float = 86400.0  # a stored Responses id's upstream is remembered this long


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    level: str = "info"
    access: bool = True


class TierConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    upstreams: list[str]
    models: list[str]
    # Sent to vLLM as `Authorization: Bearer ...` when vLLM runs with --api-key.
    upstream_api_key: str | None = None
    wake: WakeConfig | None = None
    backend: BackendConfig | None = None
    # What a host-hour of this tier costs (ops/pricing.py): `spotinference usage --cost`, docs/WAKE.md "Cost".
    cost: CostConfig | None = None
    # How a request picks one of several upstreams (routing/policy.py): "prefix" (where its leading
    # prompt blocks were last served, under a load bound), "least_loaded", "round_robin". None: "prefix"
    # for a tier with several upstreams.
    routing: str | None = None
    # prefix: the preferred host is given up when its load exceeds the least loaded one's by more than this
    # (requests in flight, counting vLLM's running + waiting when its /metrics are fresh).
    load_bound: int = 4


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    auth: AuthConfig = AuthConfig()
    usage: UsageConfig = UsageConfig()
    cluster: ClusterConfig = ClusterConfig()
    log: LogConfig = LogConfig()
    tiers: list[TierConfig] = msgspec.field(default_factory=list)


def _toml_path(msgspec_path: str) -> str:
    # msgspec says "`$.tiers[0].wake`"; operators read "tiers[0].wake".
    p = msgspec_path.strip("`")
    if p.startswith("$."):
        p = p[2:]
    elif p == "$":
        p = ""
    return p


def _field_error(exc: msgspec.ValidationError) -> str:
    msg = str(exc)
    # "Object contains unknown field `lisen` - at `$.server`"
    if " - at " in msg:
        what, _, where = msg.rpartition(" - at ")
        where = _toml_path(where)
        if what.startswith("Object contains unknown field "):
            name = what.removeprefix("Object contains unknown field ").strip("`")
            full = f"{where}.{name}" if where else name
            return f"unknown field '{full}'"
        if what.startswith("Object missing required field "):
            name = what.removeprefix("Object missing required field ").strip("`")
            full = f"{where}.{name}" if where else name
            return f"missing required field '{full}'"
        return f"field '{where}': {what}"
    return msg


def parse_listen(value: str, field: str = "server.listen") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"field '{field}': expected HOST:PORT, got {value!r}")
    n = int(port)
    if not 0 <= n <= 65535:
        raise ConfigError(f"field '{field}': port {n} out of range")
    return host.strip("[]"), n


def parse_upstream(url: str, field: str) -> tuple[str, int]:
    """``http://host:port`` -> (host, port). Only plain HTTP: vLLM hosts sit on the private network."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"field '{field}': expected http://HOST:PORT, got {url!r}")
    if parts.path not in ("", "/"):
        raise ConfigError(f"field '{field}': upstream URL must not have a path (the gateway adds /v1/...)")
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(f"field '{field}': bad port in {url!r}") from None
    return parts.hostname, port


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a cgroup or `taskset` narrows it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _resolve_workers(cfg: Config) -> Config:
    workers = cfg.server.workers
    if isinstance(workers, str):
        if workers != "auto":
            raise ConfigError(f"field 'server.workers': expected a number or \"auto\", got {workers!r}")
        return msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, workers=usable_cores()))
    return cfg


def validate(cfg: Config) -> Config:
    """Cross-field checks; raises ConfigError naming the field. `server.workers = "auto"` becomes a count."""
    cfg = _resolve_workers(cfg)
    parse_listen(cfg.server.listen)
    positive = {
        "server.workers": cfg.server.workers,
        "server.max_body_bytes": cfg.server.max_body_bytes,
        "server.max_head_bytes": cfg.server.max_head_bytes,
        "server.keepalive_idle_s": cfg.server.keepalive_idle_s,
        "server.request_head_s": cfg.server.request_head_s,
        "server.request_body_s": cfg.server.request_body_s,
        "server.write_s": cfg.server.write_s,
        "upstream.connect_s": cfg.upstream.connect_s,
        "upstream.first_byte_s": cfg.upstream.first_byte_s,
        "upstream.between_chunks_s": cfg.upstream.between_chunks_s,
        "server.body_grace_s": cfg.server.body_grace_s,
        "upstream.health_interval_s": cfg.upstream.health_interval_s,
        "upstream.health_timeout_s": cfg.upstream.health_timeout_s,
        "upstream.unhealthy_after": cfg.upstream.unhealthy_after,
        "upstream.stall_s": cfg.upstream.stall_s,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"field '{name}': must be > 0, got {value}")
    if cfg.server.min_body_rate_bytes_s < 0:
        raise ConfigError(f"field 'server.min_body_rate_bytes_s': must be >= 0 (0: no minimum), "
                          f"got {cfg.server.min_body_rate_bytes_s}")
    if cfg.server.max_audio_bytes <= 0:
        raise ConfigError(f"field 'server.max_audio_bytes': must be > 0, got {cfg.server.max_audio_bytes}")
    _validate_stores(cfg)
    for i, origin in enumerate(cfg.server.cors_origins):
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"field 'server.cors_origins[{i}]': expected an origin like "
                              f"'https://app.example.com' (scheme://host[:port], no path) or '*', got {origin!r}")
    for i, net in enumerate(cfg.server.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"field 'server.trusted_proxies[{i}]': expected an IP address or CIDR "
                              f"network, got {net!r}") from None
    seen_tiers: set[str] = set()
    seen_models: dict[str, str] = {}
    for i, tier in enumerate(cfg.tiers):
        where = f"tiers[{i}]"
        if not tier.name or tier.name in seen_tiers:
            raise ConfigError(f"field '{where}.name': empty or duplicate tier name {tier.name!r}")
        seen_tiers.add(tier.name)
        if not tier.upstreams:
            raise ConfigError(f"field '{where}.upstreams': a tier needs at least one upstream")
        for j, url in enumerate(tier.upstreams):
            parse_upstream(url, f"{where}.upstreams[{j}]")
        if not tier.models:
            raise ConfigError(f"field '{where}.models': a tier needs at least one model")
        if tier.routing is not None and tier.routing not in ROUTING_POLICIES:
            raise ConfigError(f"field '{where}.routing': expected one of {', '.join(ROUTING_POLICIES)}, "
                              f"got {tier.routing!r}")
        if tier.load_bound < 0:
            raise ConfigError(f"field '{where}.load_bound': must be >= 0, got {tier.load_bound}")
        for j, model in enumerate(tier.models):
            if model in seen_models:
                raise ConfigError(
                    f"field '{where}.models[{j}]': model {model!r} is already served by tier {seen_models[model]!r}"
                )
            seen_models[model] = tier.name
        if tier.wake is not None:
            w = tier.wake
            if w.provider != "ec2":
                raise ConfigError(f"field '{where}.wake.provider': only 'ec2' is supported, got {w.provider!r}")
            if not w.instance_ids:
                raise ConfigError(f"field '{where}.wake.instance_ids': at least one instance id is required")
            if w.budget_s <= 0 or w.hard_cap_s <= 0:
                raise ConfigError(f"field '{where}.wake.budget_s': budget_s and hard_cap_s must be > 0")
            if len(w.instance_ids) != len(tier.upstreams):
                raise ConfigError(
                    f"field '{where}.wake.instance_ids': {len(w.instance_ids)} instance id(s) for "
                    f"{len(tier.upstreams)} upstream(s); instance_ids[i] is the host of upstreams[i]")
            if w.hard_cap_s < w.budget_s:
                raise ConfigError(f"field '{where}.wake.hard_cap_s': must be >= budget_s ({w.budget_s})")
        if tier.cost is not None:
            _validate_cost(tier, f"{where}.cost")
    for i, tier in enumerate(cfg.tiers):
        if tier.wake is not None and tier.wake.fallback_tier is not None and tier.wake.fallback_tier not in seen_tiers:
            raise ConfigError(f"field 'tiers[{i}].wake.fallback_tier': no tier named {tier.wake.fallback_tier!r}")
    return cfg


def _validate_cost(tier: TierConfig, where: str) -> None:
    """[tiers.cost]: exactly one of hourly_usd or spot = true; a spot price needs its instance type, and
    a zone when no waker can tell it."""
    c = tier.cost
    assert c is not None
    if c.hourly_usd is not None and c.spot:
        raise ConfigError(f"field '{where}.hourly_usd': set either hourly_usd or spot = true, not both")
    if c.hourly_usd is None and not c.spot:
        raise ConfigError(f"field '{where}': set hourly_usd = PRICE (USD per host-hour) or spot = true")
    if c.hourly_usd is not None and not (math.isfinite(c.hourly_usd) and c.hourly_usd >= 0):
        raise ConfigError(f"field '{where}.hourly_usd': must be a price >= 0, got {c.hourly_usd}")
    if not c.refresh_s > 0:
        raise ConfigError(f"field '{where}.refresh_s': must be > 0, got {c.refresh_s}")
    if not c.spot:
        return
    if not c.instance_type or not _INSTANCE_TYPE.fullmatch(c.instance_type):
        raise ConfigError(f"field '{where}.instance_type': spot = true needs the EC2 instance type, "
                          f"like \"p5.48xlarge\", got {c.instance_type!r}")
    if not c.product:
        raise ConfigError(f"field '{where}.product': must not be empty (EC2's product, e.g. \"Linux/UNIX\")")
    region = c.region or (tier.wake.region if tier.wake is not None else "us-east-1")
    if c.availability_zone is None:
        if tier.wake is None:
            raise ConfigError(f"field '{where}.availability_zone': spot = true on a tier without "
                              "[tiers.wake] needs the hosts' zone, like \"us-east-1a\"")
    elif not c.availability_zone.startswith(region) or len(c.availability_zone) <= len(region):
        raise ConfigError(f"field '{where}.availability_zone': {c.availability_zone!r} is not a zone of "
                          f"region {region!r}")


def _validate_stores(cfg: Config) -> None:
    """[cluster], [usage] and [auth]: one store each, URLs with the right scheme."""
    c = cfg.cluster
    if c.redis_url is not None:
        parts = urlsplit(c.redis_url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ConfigError(f"field 'cluster.redis_url': expected redis://HOST:PORT[/DB], got {c.redis_url!r}")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ConfigError(f"field 'cluster.redis_url': the database must be a number, got {db!r}")
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(f"field 'cluster.redis_url': bad port in {c.redis_url!r}") from None
    if c.on_redis_failure not in ("local", "closed"):
        raise ConfigError(f"field 'cluster.on_redis_failure': expected \"local\" or \"closed\", "
                          f"got {c.on_redis_failure!r}")
    for name in ("timeout_s", "retry_s", "lease_s", "homes_ttl_s"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"field 'cluster.{name}': must be > 0, got {getattr(c, name)}")
    for section, file_field in (("usage", "path"), ("auth", "keys_file")):
        sub = getattr(cfg, section)
        url = sub.database_url
        if url is None:
            continue
        if urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"field '{section}.database_url': expected postgresql://..., got a "
                              f"{urlsplit(url).scheme or 'schemeless'} URL")
        if getattr(sub, file_field) is not None:
            raise ConfigError(f"field '{section}.database_url': set either '{section}.{file_field}' or "
                              f"'{section}.database_url', not both")
    if cfg.auth.refresh_s <= 0:
        raise ConfigError(f"field 'auth.refresh_s': must be > 0, got {cfg.auth.refresh_s}")
    if cfg.usage.retry_s <= 0:
        raise ConfigError(f"field 'usage.retry_s': must be > 0, got {cfg.usage.retry_s}")
    if cfg.usage.gpu_time_s < 1:
        raise ConfigError(f"field 'usage.gpu_time_s': must be >= 1, got {cfg.usage.gpu_time_s}")


def loads(text: str) -> Config:
    """Decode and validate TOML text."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_field_error(exc)) from None
    return validate(cfg)


def load(path: str | Path) -> Config:
    """Read, decode and validate a config file. Relative paths inside it resolve against its folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    cfg = loads(text)
    base = p.resolve().parent

    def rel(v: str | None) -> str | None:
        return None if v is None else str(base / v)

    return msgspec.structs.replace(
        cfg,
        auth=msgspec.structs.replace(cfg.auth, keys_file=rel(cfg.auth.keys_file)),
        usage=msgspec.structs.replace(cfg.usage, path=rel(cfg.usage.path), spill_dir=rel(
            cfg.usage.spill_dir or ("." if cfg.usage.database_url else None))),
    )


def embedded_default(upstream: str, listen: str = "127.0.0.1:8080") -> Config:
    """The no-argument `serve`: one simulated tier `local` serving `sim-chat` (and an embedding model)."""
    return validate(
        Config(
            server=ServerConfig(listen=listen),
            tiers=[TierConfig(name="local", upstreams=[upstream], models=["sim-chat", "sim-embed"])],
        )
    )
