"""SIGHUP: re-read the config file and the keys file, and swap the new runtime record in whole.

Strategy: build the whole new `Runtime` first; only if the config and the keys file both load is it
swapped in (one assignment), so new keys, revoked keys and tier changes apply to the next request
while open connections carry on. A config that does not load is refused with a log line and the old
one stays. Wakers of tiers whose wake settings and upstreams did not change are carried over (a wake
in progress is not restarted); new or changed ones are started, and every old waker not carried over
is stopped -- one controller per tier, always (the new one describes the instances as it starts, so
nothing of the old one's state is lost). Requests waiting on a stopped waker move to the tier's new
waker (routing/wake_wait.py looks the tier up again at every poll). A revoked key's rate-limit buckets
are dropped. `listen` and `workers` changes need a restart (logged).
"""

from __future__ import annotations

from proxy.admit.keys import KeysError
from proxy.config import ConfigError, load
from proxy.gateway import Gateway, build_runtime
from proxy.observe import logs


def reload(gw: Gateway, config_path: str | None) -> bool:
    """Swap in the config at `config_path` (and its keys file); False (old kept) if it is invalid."""
    if config_path is None:
        logs.event("reload_ignored", level="warning", reason="no config file (embedded default)")
        return False
    old = gw.runtime
    try:
        config = load(config_path)
        runtime = build_runtime(config, created=old.router.model_created)
    except (ConfigError, KeysError) as exc:
        logs.event("reload_rejected", level="error", error=str(exc))
        return False
    if config.server.listen != old.config.server.listen or config.server.workers != old.config.server.workers:
        logs.event("reload_partial", level="warning",
                   reason="server.listen and server.workers change only on restart")
    if config.cluster != old.config.cluster:
        logs.event("reload_partial", level="warning", reason="[cluster] changes only on restart")
    if config.auth.database_url:
        if config.auth.database_url != old.config.auth.database_url:
            logs.event("reload_partial", level="warning", reason="auth.database_url changes only on restart")
        runtime = runtime._replace(keys=old.keys)  # the keys database's poller keeps them current
    for name, tier in runtime.router.tiers.items():
        prev = old.router.tiers.get(name)
        if prev is not None and prev.waker is not None and prev.config.wake == tier.config.wake \
                and prev.urls == tier.urls:
            tier.waker = prev.waker
    gw.runtime = runtime
    kept = {id(t.waker) for t in runtime.router.tiers.values() if t.waker is not None}
    for tier in old.router.tiers.values():
        if tier.waker is not None and id(tier.waker) not in kept:
            gw.stop_waker(tier.waker)
            logs.event("waker_stopped", tier=tier.name, reason="its [tiers.wake] changed or was removed")
    for name in old.keys.names() - runtime.keys.names():
        gw.limiter.forget(name)  # a revoked (or removed) key's buckets go with it
    gw.start_wakers()
    logs.event("reloaded", tiers=list(runtime.router.tiers), keys=len(runtime.keys))
    return True
