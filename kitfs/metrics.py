"""Prometheus metrics of kitfs mounts, built from their MountStates alone.

Every number a mount daemon knows is already in its state (the one it writes
to its state file every second), so one collector serves both exporters: a
mount daemon's `--metrics-addr` over its own live state, and the CSI driver
over every state file on the node (`kitfs.mounts.all_states`). Nothing is
registered globally; each server has its own registry, so two of them in one
process (tests) never clash. This is the only module that imports
prometheus_client.

Series are labelled by `mountpoint`; registry series also by `registry`.
A lookup goes to the memory tier first, then the disk cache, then the
registry, so a memory miss is a disk hit or a disk miss.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from kitfs.engine.layerstate import State
from kitfs.errors import KitfsError, UsageError
from kitfs.health import mount_health
from kitfs.mounts import MountState
from kitfs.oci.stats import OUTCOMES

log = logging.getLogger(__name__)

States = Callable[[], Iterable[MountState]]


class MetricsError(KitfsError):
    """The metrics endpoint could not be served (its port is taken, say)."""


def parse_addr(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` for IPv6; `:PORT` for every address) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics-addr {text}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"--metrics-addr {text}: write an IPv6 address in brackets, "
                         "e.g. [::1]:9100")
    return host or "0.0.0.0", int(port)


class MountCollector(Collector):
    """Metric families over whatever MountStates `states` returns at scrape time."""

    def __init__(self, states: States, now: Callable[[], float] = time.time) -> None:
        self._states = states
        self._now = now

    def collect(self) -> Iterator[Metric]:
        states = list(self._states())
        now = self._now()
        f = _families()
        alive_count = 0
        for state in states:
            alive = state.alive
            alive_count += alive
            _one_mount(f, state, alive, now)
        yield GaugeMetricFamily("kitfs_mounts_alive", "Mounts whose daemon is running.",
                                value=alive_count)
        yield from f.values()


_MIRROR_EVENTS = ("fallback", "full_answer", "bad_blob")
"""RequestStats' mirror_<event>s counters (oci/stats.py)."""


def _families() -> dict[str, Any]:
    m = ["mountpoint"]
    return {
        "info": GaugeMetricFamily(
            "kitfs_mount_info", "A mount and what it serves (always 1).",
            labels=[*m, "reference", "digest"]),
        "healthy": GaugeMetricFamily(
            "kitfs_mount_healthy",
            "1 when the mount is healthy (daemon alive, state fresh, no poisoned layer, "
            "its registry reachable), else 0; `kitfs status` says why.", labels=m),
        "requests": CounterMetricFamily(
            "kitfs_registry_requests",
            "Registry requests by final outcome: ok, client_error (4xx), server_error (5xx), "
            "timeout, connection_error.", labels=[*m, "registry", "outcome"]),
        "registry_bytes": CounterMetricFamily(
            "kitfs_registry_bytes", "Bytes received from the registry (bodies).",
            labels=[*m, "registry"], unit="bytes"),
        "mirror": CounterMetricFamily(
            "kitfs_registry_mirror_events",
            "hosts.toml mirrors: fallback (a read the next host served), full_answer (a "
            "range answered with the whole blob, body not read), bad_blob (a blob that "
            "did not match its digest).", labels=[*m, "registry", "event"]),
        "last_success": GaugeMetricFamily(
            "kitfs_registry_last_success_timestamp_seconds",
            "Unix time of the last successful registry request.", labels=[*m, "registry"]),
        "last_failure": GaugeMetricFamily(
            "kitfs_registry_last_failure_timestamp_seconds",
            "Unix time of the last failed registry request.", labels=[*m, "registry"]),
        "lookups": CounterMetricFamily(
            "kitfs_cache_lookups", "Chunk lookups by cache tier (memory, disk) and result.",
            labels=[*m, "tier", "result"]),
        "fetched": CounterMetricFamily(
            "kitfs_fetched_bytes",
            "Chunk bytes fetched from the source (registry or kit's local storage).",
            labels=m, unit="bytes"),
        "read_seconds": HistogramMetricFamily(
            "kitfs_read_seconds", "Time to answer a FUSE read.", labels=m, unit="seconds"),
        "read_bytes": CounterMetricFamily(
            "kitfs_read_bytes", "Bytes returned to FUSE reads.", labels=m, unit="bytes"),
        "errors": CounterMetricFamily(
            "kitfs_read_errors",
            "FUSE requests answered EIO, by cause: timeout (past the request bound) or eio "
            "(any other failure: registry, integrity).", labels=[*m, "kind"]),
        "open_files": GaugeMetricFamily(
            "kitfs_open_files", "Files open on the mount.", labels=m),
        "prefetch": GaugeMetricFamily(
            "kitfs_prefetch_bytes", "Prefetch progress: bytes planned (total) and brought (done).",
            labels=[*m, "state"], unit="bytes"),
        "layers": GaugeMetricFamily(
            "kitfs_layers", "Layers by verification state.", labels=[*m, "state"]),
    }


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _one_mount(f: dict[str, Any], state: MountState, alive: bool, now: float) -> None:
    mp = state.mountpoint
    f["info"].add_metric([mp, state.reference, state.digest], 1)
    f["healthy"].add_metric([mp], 1 if mount_health(state, now, alive=alive).healthy else 0)
    status = _dict(state.status)
    fs, engine = _dict(status.get("fs")), _dict(status.get("engine"))
    for name, registry in _by_registry(engine.get("registry")).items():
        for outcome in OUTCOMES:
            f["requests"].add_metric([mp, name, outcome], registry.get(outcome, 0.0))
        f["registry_bytes"].add_metric([mp, name], registry["bytes_received"])
        for event in _MIRROR_EVENTS:
            f["mirror"].add_metric([mp, name, event], registry.get(f"mirror_{event}", 0.0))
        for key in ("last_success", "last_failure"):
            if key in registry:
                f[key].add_metric([mp, name], registry[key])
    memory, disk, misses = (_number(engine.get(k)) for k in ("memory_hits", "disk_hits", "misses"))
    for tier, result, value in (("memory", "hit", memory), ("memory", "miss", disk + misses),
                                ("disk", "hit", disk), ("disk", "miss", misses)):
        f["lookups"].add_metric([mp, tier, result], value)
    f["fetched"].add_metric([mp], _number(engine.get("bytes_fetched")))
    _histogram(f, mp, _dict(fs.get("readSeconds")))
    f["read_bytes"].add_metric([mp], _number(fs.get("readBytes")))
    timeouts = _number(fs.get("timeouts"))
    f["errors"].add_metric([mp, "timeout"], timeouts)
    f["errors"].add_metric([mp, "eio"], max(0.0, _number(fs.get("errors")) - timeouts))
    f["open_files"].add_metric([mp], _number(fs.get("openFiles")))
    prefetch = _dict(engine.get("prefetch"))
    f["prefetch"].add_metric([mp, "total"], _number(prefetch.get("total_bytes")))
    f["prefetch"].add_metric([mp, "done"], _number(prefetch.get("done_bytes")))
    counts = dict.fromkeys((s.value for s in State), 0)
    for layer in engine.get("layers") or []:
        layer_state = _dict(layer).get("state")
        if isinstance(layer_state, str):
            counts[layer_state] = counts.get(layer_state, 0) + 1
    for name, n in counts.items():
        f["layers"].add_metric([mp, name], n)


def _by_registry(entries: object) -> dict[str, dict[str, float]]:
    """The engine's per-client entries summed per registry: a parent ModelKit in another
    repository of the same registry has a client of its own, and a series may appear once."""
    merged: dict[str, dict[str, float]] = {}
    for entry in entries if isinstance(entries, list) else []:
        entry = _dict(entry)
        into = merged.setdefault(str(entry.get("registry", "")), {"bytes_received": 0.0})
        for outcome, n in _dict(entry.get("requests")).items():
            into[outcome] = into.get(outcome, 0.0) + _number(n)
        into["bytes_received"] += _number(entry.get("bytes_received"))
        for event in _MIRROR_EVENTS:
            key = f"mirror_{event}"
            into[key] = into.get(key, 0.0) + _number(entry.get(key + "s"))
        for key in ("last_success", "last_failure"):
            if entry.get(key) is not None:
                into[key] = max(into.get(key, 0.0), _number(entry.get(key)))
    return merged


def _histogram(f: dict[str, Any], mountpoint: str, hist: dict[str, Any]) -> None:
    buckets = [(_le(bound), _number(count)) for bound, count in hist.get("buckets") or []]
    count = _number(hist.get("count"))
    f["read_seconds"].add_metric([mountpoint], [*buckets, ("+Inf", count)],
                                 sum_value=_number(hist.get("sum")))


def _le(bound: object) -> str:
    return repr(float(_number(bound)))


# -- serving ------------------------------------------------------------------------


class MetricsServer:
    """prometheus_client's HTTP server (a thread) over one MountCollector."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, addr: str) -> None:
        self._server = server
        self._thread = thread
        self.addr = addr

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop answering and free the port (blocks for up to half a second)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        log.info("stopped serving metrics on %s", self.addr)


def start_metrics_server(addr: str, states: States) -> MetricsServer:
    """Serve the metrics of `states()` on `addr` (HOST:PORT) until `stop()`.

    For threaded programs (the CSI driver); a trio program uses `serving_metrics`.
    """
    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MountCollector(states))
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise MetricsError(
            f"cannot serve metrics on {addr}: {exc.strerror or exc}") from None
    log.info("serving metrics on http://%s/metrics", addr)
    return MetricsServer(server, thread, addr)


@contextlib.asynccontextmanager
async def serving_metrics(addr: str, states: States) -> AsyncIterator[MetricsServer]:
    """Serve metrics for as long as the block runs (a mount daemon's lifetime)."""
    server = start_metrics_server(addr, states)
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.stop)
