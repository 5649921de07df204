"""Prometheus metrics for `GET /metrics`, one scrape covering every worker.

Strategy: prometheus-client does the exposition. With several workers it runs in its multiprocess mode:
the supervisor calls `prepare_multiproc_dir` (an emptied directory, exported as
``PROMETHEUS_MULTIPROC_DIR``) before any worker imports prometheus_client -- the library picks its value
backend at import time -- and `worker_exited(pid)` when a worker ends (``mark_process_dead``: drops that
worker's live gauges; its counters stay, so totals never go backwards). Each worker's metric values live
in mmap'd files there, and whichever worker answers a scrape merges all of them (``MultiProcessCollector``).
Without the variable it falls back to a plain in-process registry. One `Metrics` per process.

The hot path calls small methods (`request_done`, `connection_opened`, ...). `request_done` caches the
labelled children per label tuple, so a call is a dict lookup plus a few increments: about 3 us
in-process and 7 us in multiprocess mode (mmap writes), measured with timeit, never asserted in tests.

Objects with ``statistics()`` (upstream pools, tier wakers, the usage log) are registered with
`register_stats_source`; every ``statistics()`` returns a frozen msgspec Struct (a dict also works). Custom collectors do not survive multiprocess mode, so their records are mirrored
into ordinary metrics by `refresh` -- at every scrape for the scraping worker, and every few seconds in
each worker by `run`. Field mapping, per record field:
``*_total`` numbers -> counter (advanced by the delta since the last refresh); other ints and bools ->
gauge summed over live workers; floats -> gauge, max over live workers; strings (a state) -> gauge
``{<field>="<value>"} 1`` for the current value and 0 for values seen before (summed: the number of
workers that see that state); None and anything else -> skipped.

Label values must be bounded: the caller passes a configured model name (or "-"), never raw input.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client import multiprocess as _mp

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
NAMESPACE = "spotinference"

# Time the gateway itself adds: from 50 us (the target is well under 1 ms P95) up to seconds.
GATEWAY_BUCKETS = (
    0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003,
    0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
# Time to first byte includes vLLM's prefill and any wake wait (up to the 10-minute hard cap).
TTFB_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0, 480.0, 600.0,
)
WAKE_BUCKETS = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0)

_CHILD_CACHE_MAX = 4096
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def prepare_multiproc_dir(path: str) -> dict[str, str]:
    """Supervisor, before starting workers: empty/create `path` and return the env to give workers.

    Also sets it in ``os.environ`` so that children inherit it; the supervisor must not have imported
    prometheus_client's metrics in a way that records values itself.
    """
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ[ENV] = path
    return {ENV: path}


def worker_exited(pid: int, path: str | None = None) -> None:
    """Supervisor, when a worker process ends: drop its live gauges (its counters stay)."""
    path = path or os.environ.get(ENV)
    if path:
        _mp.mark_process_dead(pid, path)


def multiprocess_active() -> bool:
    """True when metric values go to the shared directory (env set before prometheus_client import)."""
    return bool(os.environ.get(ENV)) and bool(getattr(values.ValueClass, "_multiprocess", False))


def render_directory(path: str) -> tuple[bytes, bytes]:
    """Exposition of every process's metrics found in a multiprocess directory."""
    registry = CollectorRegistry(auto_describe=False)
    _mp.MultiProcessCollector(registry, path=path)
    return CONTENT_TYPE_LATEST.encode(), generate_latest(registry)


class _Source:
    __slots__ = ("fn", "label", "last", "name")

    def __init__(self, name: str, fn: Callable[[], Any], label: str | None) -> None:
        self.name = name
        self.fn = fn
        self.label = label
        self.last: dict[tuple[str, str], float] = {}  # (label value, field) -> last *_total seen


class Metrics:
    """All of the gateway's metrics for one process."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_active()
        if os.environ.get(ENV) and not self.multiprocess:
            log.warning("metrics: %s is set but prometheus_client was imported before it; "
                        "this worker's metrics stay in-process", ENV)
        self._dir = os.environ.get(ENV) if self.multiprocess else None
        self._registry = CollectorRegistry(auto_describe=False)
        reg = self._registry
        ns = NAMESPACE
        self.requests = Counter("requests", "Requests answered, by status, model, tier and endpoint.",
                                ("status", "model", "tier", "endpoint"), namespace=ns, registry=reg)
        self.gateway_latency = Histogram(
            "gateway_latency_seconds", "Time spent in the gateway itself, upstream waits excluded.",
            ("endpoint",), namespace=ns, registry=reg, buckets=GATEWAY_BUCKETS)
        self.ttfb = Histogram("ttfb_seconds", "Time from request head to first response byte sent.",
                              ("tier",), namespace=ns, registry=reg, buckets=TTFB_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens, as reported by vLLM.",
                                     ("model", "tier"), namespace=ns, registry=reg)
        self.completion_tokens = Counter("completion_tokens", "Completion tokens, as reported by vLLM.",
                                         ("model", "tier"), namespace=ns, registry=reg)
        self.open_connections = Gauge("open_connections", "Client connections open.", namespace=ns,
                                      registry=reg, multiprocess_mode="livesum")
        self.open_streams = Gauge("open_streams", "Streamed responses in progress.", namespace=ns,
                                  registry=reg, multiprocess_mode="livesum")
        # Fed by each waker when a wake reaches ready; wakes over budget are counted by the waker itself
        # (spotinference_tier_wake_budget_exceeded_total, mirrored from its statistics()).
        self.wake_duration = Histogram("wake_duration_seconds", "Tier wake time, request to ready.",
                                       ("tier",), namespace=ns, registry=reg, buckets=WAKE_BUCKETS)
        self.internal_errors = Counter(
            "internal_errors", "Unexpected exceptions contained by the crash barrier (the worker carried on).",
            ("where",), namespace=ns, registry=reg)
        self.worker_restarts = Counter(
            "worker_restarts", "Workers the supervisor started to replace one that exited, by slot.",
            ("index",), namespace=ns, registry=reg)
        # GPU time of tiers with [tiers.cost], as recorded each interval (proxy/usage/gpu_time.py). Every
        # worker records its tier's whole interval and adds 1/workers of it: the sum over workers is the
        # tier's once. Several gateway hosts each count the whole tier: take max over hosts, not sum.
        self.tier_gpu_seconds = Counter("tier_gpu_seconds",
                                        "Paid GPU host-seconds of the tier (wake time included).",
                                        ("tier",), namespace=ns, registry=reg)
        self.tier_cost_usd = Counter("tier_cost_usd", "What the tier's GPU time cost, in USD.", ("tier",),
                                     namespace=ns, registry=reg)
        self._children: dict[tuple, tuple] = {}
        self._sources: dict[str, _Source] = {}
        self._mirrors: dict[str, tuple[Any, type, tuple]] = {}
        self._states: dict[tuple[str, str, str], set[str]] = {}
        self._open_conn = self.open_connections
        self._open_streams = self.open_streams

    # -- the hot path ------------------------------------------------------------------------------------

    def request_done(
        self,
        status: int,
        model: str,
        tier: str,
        endpoint: str,
        gateway_s: float,
        ttfb_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """One finished request (any status). Times in seconds; tokens from vLLM's usage, if known."""
        key = (status, model, tier, endpoint)
        c = self._children.get(key)
        if c is None:
            c = self._child(key)
        c[0].inc()
        c[1].observe(gateway_s)
        if ttfb_s is not None:
            c[2].observe(ttfb_s)
        if prompt_tokens:
            c[3].inc(prompt_tokens)
        if completion_tokens:
            c[4].inc(completion_tokens)

    def _child(self, key: tuple) -> tuple:
        status, model, tier, endpoint = key
        c = (
            self.requests.labels(str(status), model, tier, endpoint),
            self.gateway_latency.labels(endpoint),
            self.ttfb.labels(tier),
            self.prompt_tokens.labels(model, tier),
            self.completion_tokens.labels(model, tier),
        )
        if len(self._children) < _CHILD_CACHE_MAX:
            self._children[key] = c
        return c

    def connection_opened(self) -> None:
        self._open_conn.inc()

    def connection_closed(self) -> None:
        self._open_conn.dec()

    def stream_opened(self) -> None:
        self._open_streams.inc()

    def stream_closed(self) -> None:
        self._open_streams.dec()

    def internal_error(self, where: str) -> None:
        """An unexpected exception was contained at `where` ("request" or "connection")."""
        self.internal_errors.labels(where).inc()

    def worker_restarted(self, index: str) -> None:
        self.worker_restarts.labels(index).inc()

    def gpu_time(self, tier: str, seconds: float, usd: float, share: float = 1.0) -> None:
        """One recorded interval of a tier: `share` of its host-seconds and cost (1/workers). Zeros create the
        tier's series, so dashboards and alerts see them before the first interval ends."""
        gpu, usd_total = self.tier_gpu_seconds.labels(tier), self.tier_cost_usd.labels(tier)
        if seconds > 0:
            gpu.inc(seconds * share)
        if usd > 0:
            usd_total.inc(usd * share)

    def wake_ready(self, tier: str, duration_s: float) -> None:
        """A tier's wake reached ready `duration_s` after it was requested (the waker calls it)."""
        self.wake_duration.labels(tier).observe(duration_s)

    # -- statistics() records ------------------------------------------------------------------------------

    def register_stats_source(self, name: str, fn: Callable[[], Any], *, label: str | None = None) -> None:
        """Mirror ``fn()`` into metrics named ``spotinference_<name>_<field>`` at every refresh.

        ``fn()`` returns a record (msgspec Struct, dataclass, NamedTuple, attrs class, mapping or plain
        object); with `label`, it returns a mapping from label value to record (e.g. ``label="tier"``).
        Registering a name again replaces the function (a reload).
        """
        old = self._sources.get(name)
        src = _Source(_NAME_BAD.sub("_", name), fn, label)
        if old is not None:
            src.last = old.last
        self._sources[name] = src

    def refresh(self) -> None:
        """Call every stats source now and update the mirrored metrics. On the event loop."""
        for src in list(self._sources.values()):
            try:
                result = src.fn()
            except Exception:  # a sync call: trio.Cancelled (a BaseException) cannot come from it
                log.exception("metrics: stats source %r failed", src.name)
                continue
            if src.label is None:
                self._mirror(src, "", _fields(result))
            elif isinstance(result, Mapping):
                for lv, rec in result.items():
                    self._mirror(src, str(lv), _fields(rec))

    def _mirror(self, src: _Source, lv: str, fields: dict[str, Any]) -> None:
        labelnames = (src.label,) if src.label else ()
        labelvalues = (lv,) if src.label else ()
        for field, value in fields.items():
            if isinstance(value, enum.Enum):
                value = value.name.lower()
            if value is None:
                continue
            fname = _NAME_BAD.sub("_", field)
            name = f"{NAMESPACE}_{src.name}_{fname}"
            if isinstance(value, str):
                self._set_state(name, src, fname, labelnames, labelvalues, value)
                continue
            if not isinstance(value, (int, float)):
                continue
            if fname.endswith("_total") and not isinstance(value, bool):
                metric = self._mirror_metric(name, Counter, labelnames)
                if metric is None:
                    continue
                prev = src.last.get((lv, fname), 0.0)
                delta = value - prev if value >= prev else value  # a smaller value: the source was replaced
                src.last[(lv, fname)] = value
                child = metric.labels(*labelvalues) if labelvalues else metric  # exists from 0 on
                if delta > 0:
                    child.inc(delta)
                continue
            mode = "livemax" if isinstance(value, float) else "livesum"
            metric = self._mirror_metric(name, Gauge, labelnames, mode)
            if metric is not None:
                (metric.labels(*labelvalues) if labelvalues else metric).set(float(value))

    def _set_state(self, name: str, src: _Source, field: str, labelnames: tuple, labelvalues: tuple,
                   value: str) -> None:
        if field in labelnames:
            return
        metric = self._mirror_metric(name, Gauge, (*labelnames, field), "livesum")
        if metric is None:
            return
        seen = self._states.setdefault((name, *labelvalues), set())
        seen.add(value)
        for v in seen:
            metric.labels(*labelvalues, v).set(1.0 if v == value else 0.0)

    def _mirror_metric(self, name: str, kind: type, labelnames: tuple, mode: str = "") -> Any:
        entry = self._mirrors.get(name)
        if entry is None:
            doc = f"Mirrored from a statistics() record ({name})."
            try:
                if kind is Gauge:
                    metric = Gauge(name, doc, labelnames, registry=self._registry, multiprocess_mode=mode)
                else:
                    metric = Counter(name, doc, labelnames, registry=self._registry)
            except ValueError:  # a name clash with another metric
                log.warning("metrics: cannot mirror %s (name clash)", name)
                return None
            entry = self._mirrors[name] = (metric, kind, labelnames)
        metric, k, names = entry
        if k is not kind or names != labelnames:
            return None  # the field changed type or labels between refreshes: leave it alone
        return metric

    # -- exposition ----------------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, bytes]:
        """(content type, body) for ``GET /metrics``; refreshes the stats sources first.

        Reads every worker's files in multiprocess mode (blocking file I/O): prefer `scrape` on the loop.
        """
        self.refresh()
        return self._render()

    async def scrape(self) -> tuple[bytes, bytes]:
        """`render` for the event loop: stats refreshed on the loop, files read in a thread."""
        self.refresh()
        return await trio.to_thread.run_sync(self._render)

    def _render(self) -> tuple[bytes, bytes]:
        if self._dir is not None:
            return render_directory(self._dir)
        return CONTENT_TYPE_LATEST.encode(), generate_latest(self._registry)

    async def run(self, *, interval_s: float = 5.0,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this worker's mirrored statistics fresh for scrapes answered by other workers."""
        task_status.started()
        while True:
            self.refresh()
            await trio.sleep(interval_s)


def _fields(record: Any) -> dict[str, Any]:
    """A statistics record's fields: every `statistics()` returns a msgspec Struct (or a plain dict)."""
    if isinstance(record, Mapping):
        return dict(record)
    return msgspec.structs.asdict(record)
