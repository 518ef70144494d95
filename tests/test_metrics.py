"""`kitfs mount --metrics-addr`: a real mount's Prometheus endpoint, scraped and parsed with
prometheus_client's own parser, moving as files are read cold and then warm."""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import kitfs, make_project, ok, one_line_error
from kitfs.metrics import start_metrics_server
from kitfs.mounts import MountState, find_mount, process_start_time
from mounting import mounted
from registry import RegistryServer, free_port
from scraping import scrape, value


def until(check: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def fs_status(mountpoint: Path) -> dict[str, object]:
    doc = json.loads(ok(kitfs("status", str(mountpoint), "--json")))[0]
    fs: dict[str, object] = doc["status"]["fs"]
    return fs


@pytest.fixture(scope="module")
def packed(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("metrics")
    project = make_project(root / "proj", weight_bytes=2 << 20)
    ref = f"{registry.host}/metrics/tiny:v1"
    ok(kitfs("pack", str(project), "-t", ref, home=root / "home"))
    return ref, project


def test_metrics_follow_cold_then_warm_reads(packed: tuple[str, Path], tmp_path: Path,
                                             registry: RegistryServer) -> None:
    ref, project = packed
    weights = (project / "model" / "model.safetensors").read_bytes()
    cache = tmp_path / "cache"
    port = free_port()
    mp = tmp_path / "cold"
    with mounted(ref, mp, cache, "--prefetch", "none", "--metrics-addr", f"127.0.0.1:{port}"):
        labels = {"mountpoint": str(mp)}
        before, types = scrape(port)
        assert types["kitfs_registry_requests"] == "counter"
        assert types["kitfs_read_seconds"] == "histogram"
        assert types["kitfs_mounts_alive"] == "gauge"
        assert value(before, "kitfs_mounts_alive") == 1
        assert value(before, "kitfs_mount_healthy", **labels) == 1
        assert value(before, "kitfs_mount_info", **labels, reference=ref) == 1
        assert value(before, "kitfs_read_seconds_count", **labels) == 0
        # Resolving the manifest and reading the metadata were registry requests already.
        assert value(before, "kitfs_registry_requests_total", **labels, outcome="ok") > 0

        assert (mp / "model" / "model.safetensors").read_bytes() == weights
        until(lambda: fs_status(mp)["readBytes"] == len(weights), "the state counts the read")
        after, _ = scrape(port)
        registry_labels = {**labels, "registry": registry.host}
        fetched = value(after, "kitfs_registry_bytes_total", **registry_labels)
        assert fetched - value(before, "kitfs_registry_bytes_total", **registry_labels) \
            >= len(weights)
        for outcome in ("client_error", "server_error", "timeout", "connection_error"):
            assert value(after, "kitfs_registry_requests_total", **labels,
                         outcome=outcome) == 0, outcome
        assert value(after, "kitfs_registry_requests_total", **labels, outcome="ok") > \
            value(before, "kitfs_registry_requests_total", **labels, outcome="ok")
        assert value(after, "kitfs_registry_last_success_timestamp_seconds",
                     **registry_labels) > time.time() - 120
        assert value(after, "kitfs_cache_lookups_total", **labels, tier="disk",
                     result="miss") > 0
        assert value(after, "kitfs_cache_lookups_total", **labels, tier="disk",
                     result="hit") == 0
        assert value(after, "kitfs_read_bytes_total", **labels) == len(weights)
        # The histogram counts every read FUSE answered, in cumulative buckets.
        reads = fs_status(mp)["reads"]
        count = value(after, "kitfs_read_seconds_count", **labels)
        assert count == reads and count > 0
        assert value(after, "kitfs_read_seconds_bucket", **labels, le="+Inf") == count
        buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in after.items()
                         if n == "kitfs_read_seconds_bucket" and dict(ls)["le"] != "+Inf")
        assert len(buckets) > 5
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
        assert value(after, "kitfs_read_seconds_sum", **labels) > 0
        assert value(after, "kitfs_read_errors_total", **labels, kind="eio") == 0
        assert value(after, "kitfs_read_errors_total", **labels, kind="timeout") == 0
        # A layer read whole is verified end to end, in the background.
        until(lambda: value(scrape(port)[0], "kitfs_layers", **labels, state="verified") >= 1,
              "a layer verified")
        final, _ = scrape(port)
        assert value(final, "kitfs_layers", **labels, state="poisoned") == 0
        assert value(final, "kitfs_prefetch_bytes", **labels, state="done") >= 0

    # A new mount of the same ModelKit on the same cache: the re-read is served from disk.
    # Same port: the first daemon freed it when it unmounted.
    mp = tmp_path / "warm"
    with mounted(ref, mp, cache, "--prefetch", "none", "--metrics-addr", f"127.0.0.1:{port}"):
        labels = {"mountpoint": str(mp)}
        assert (mp / "model" / "model.safetensors").read_bytes() == weights
        until(lambda: fs_status(mp)["readBytes"] == len(weights), "the state counts the read")
        warm, _ = scrape(port)
        assert value(warm, "kitfs_cache_lookups_total", **labels, tier="disk", result="hit") > 0
        assert value(warm, "kitfs_cache_lookups_total", **labels, tier="disk",
                     result="miss") == 0
        assert value(warm, "kitfs_registry_bytes_total", **labels,
                     registry=registry.host) < len(weights) // 4
        assert value(warm, "kitfs_read_seconds_count", **labels) == fs_status(mp)["reads"]


def test_a_metrics_port_in_use_fails_the_mount_in_one_line(
        packed: tuple[str, Path], tmp_path: Path) -> None:
    ref, _ = packed
    mp = tmp_path / "mnt"
    mp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = kitfs("mount", ref, str(mp), "--cache-dir", str(tmp_path / "c"),
                     "--metrics-addr", f"127.0.0.1:{port}")
    line = one_line_error(proc)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in line and "in use" in line, line
    assert find_mount(mp) is None
    assert "no kitfs mount" in one_line_error(kitfs("status", str(mp)))


@pytest.mark.parametrize("addr", ["9100", "localhost:", "host:99999", "::1:9100"])
def test_a_bad_metrics_addr_is_a_usage_error(packed: tuple[str, Path], tmp_path: Path,
                                            addr: str) -> None:
    ref, _ = packed
    (tmp_path / "mnt").mkdir()
    proc = kitfs("mount", ref, str(tmp_path / "mnt"), "--metrics-addr", addr)
    assert "--metrics-addr" in one_line_error(proc, 2)


def test_the_collector_reads_any_states(tmp_path: Path) -> None:
    """The CSI driver's shape: one server over many state files, dead mounts included."""
    def state(mp: str, pid: int, start_time: int | None) -> MountState:
        s = MountState(pid=pid, start_time=start_time, reference="r/x:v1",
                       digest="sha256:" + "1" * 64, mountpoint=mp, cache_dir="/c", log=None,
                       started=1.0, updated=time.time())
        s.status = {"fs": {"reads": 2, "readBytes": 10, "errors": 3, "timeouts": 1},
                    "engine": {"layers": [{"digest": "sha256:aa", "state": "poisoned"}],
                               # a parent ModelKit's own client, same registry: one series
                               "registry": [{"registry": "r:5000", "requests": {"ok": 4},
                                             "bytes_received": 99, "last_success": 7.0},
                                            {"registry": "r:5000", "requests": {"ok": 1},
                                             "bytes_received": 1, "last_success": 9.0}]}}
        return s

    states = [state("/a", os.getpid(), process_start_time(os.getpid())), state("/b", 1, -5)]
    port = free_port()
    server = start_metrics_server(f"127.0.0.1:{port}", lambda: states)
    try:
        samples, _ = scrape(port)
    finally:
        server.stop()
    assert value(samples, "kitfs_mounts_alive") == 1
    assert value(samples, "kitfs_mount_healthy", mountpoint="/a") == 0  # poisoned
    assert value(samples, "kitfs_mount_healthy", mountpoint="/b") == 0  # dead
    assert value(samples, "kitfs_layers", mountpoint="/a", state="poisoned") == 1
    assert value(samples, "kitfs_layers", mountpoint="/a", state="verified") == 0
    assert value(samples, "kitfs_registry_requests_total", mountpoint="/b", outcome="ok") == 5
    assert value(samples, "kitfs_registry_bytes_total", mountpoint="/a") == 100
    assert value(samples, "kitfs_registry_last_success_timestamp_seconds", mountpoint="/a") == 9
    assert value(samples, "kitfs_read_errors_total", mountpoint="/a", kind="eio") == 2
    assert value(samples, "kitfs_read_errors_total", mountpoint="/a", kind="timeout") == 1
    # Stopped: the port is free again (a restarted driver binds it at once).
    start_metrics_server(f"127.0.0.1:{port}", lambda: []).stop()
