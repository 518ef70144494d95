"""Mount health: `mount_health` over hand-made states, `kitfs status --check` against a mount
whose registry went away, and the daemon's re-check that brings health back."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from crafted import build_tar, craft_layer, publish_kit
from faultproxy import Corrupt, FaultProxy

from helpers import kitfs, make_project, ok
from kitfs.daemon import recheck_registries
from kitfs.health import STALE_AFTER_S, mount_health
from kitfs.mounts import MountState, process_start_time
from kitfs.oci.client import ClientOptions, RegistryClient
from mounting import mounted
from registry import REGISTRY_BINARY, RegistryServer, _wait_ready, start_registry

NOW = 1_800_000_000.0


def state(engine: dict[str, Any] | None = None, *, updated: float = NOW - 1) -> MountState:
    s = MountState(pid=os.getpid(), start_time=process_start_time(os.getpid()),
                   reference="r:5000/x:v1", digest="sha256:" + "0" * 64, mountpoint="/mnt/m",
                   cache_dir="/c", log=None, started=NOW - 60, updated=updated)
    s.status = {"fs": {}, "engine": engine or {}}
    return s


def registry_entry(outcome: str | None, error: str | None = None) -> dict[str, Any]:
    return {"registry": "r:5000", "requests": {}, "bytes_received": 0,
            "last_success": NOW - 100, "last_failure": NOW - 5 if outcome != "ok" else None,
            "last_outcome": outcome, "last_error": error,
            "answering": None if outcome is None else outcome in ("ok", "client_error")}


def test_a_fresh_live_mount_is_healthy() -> None:
    health = mount_health(state({"registry": [registry_entry("ok")],
                                 "layers": [{"digest": "sha256:aa", "state": "verified"}]}), NOW)
    assert health.healthy and health.problems == []
    assert mount_health(state({"registry": [registry_entry(None)]}), NOW).healthy  # no request
    # A 404 or a refusal is an answer: the registry is there (the reader hears the rest).
    assert mount_health(state({"registry": [registry_entry("client_error")]}), NOW).healthy


def test_a_dead_daemon_is_unhealthy() -> None:
    dead = state()
    dead.pid, dead.start_time = 1, -1  # pid 1 started at another time: not our daemon
    health = mount_health(dead, NOW)
    assert not health.healthy
    assert health.problems == ["daemon (pid 1) is not running; `kitfs umount /mnt/m` cleans up"]


def test_a_stale_state_is_unhealthy() -> None:
    health = mount_health(state(updated=NOW - STALE_AFTER_S - 5), NOW)
    assert not health.healthy and "not refreshed for 15s" in health.problems[0]
    assert mount_health(state(updated=NOW - STALE_AFTER_S + 1), NOW).healthy


def test_a_poisoned_layer_is_unhealthy() -> None:
    layers = [{"digest": "sha256:aa", "path": "./model", "state": "poisoned",
               "reason": "chunk 3 does not match its digest"},
              {"digest": "sha256:bb", "path": "./data", "state": "unverified"}]
    health = mount_health(state({"layers": layers}), NOW)
    assert not health.healthy
    assert health.problems == [
        "layer sha256:aa (./model) is poisoned: chunk 3 does not match its digest"]


@pytest.mark.parametrize(("outcome", "verdict"), [
    ("connection_error", "unreachable"), ("timeout", "not answering"),
    ("server_error", "failing")])
def test_a_failing_registry_is_unhealthy(outcome: str, verdict: str) -> None:
    health = mount_health(state({"registry": [registry_entry(outcome, "boom")]}), NOW)
    assert not health.healthy
    assert health.problems[0].startswith(f"registry r:5000 {verdict} (last request failed at ")
    assert health.problems[0].endswith("none answered since): boom")


def restart(server: RegistryServer) -> None:
    """Start a stopped registry again on its own port, with its own storage."""
    assert REGISTRY_BINARY is not None
    with server.log.open("ab") as out:
        server.process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(server.root / "config.yml")],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OTEL_TRACES_EXPORTER="none"))
    _wait_ready(server.url, server.process, server.log)


@pytest.fixture
def private_registry(tmp_path: Path) -> Any:
    server = start_registry(tmp_path / "registry")
    try:
        yield server
    finally:
        server.stop()


def until(check: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def test_status_check_names_the_registry_a_mount_cannot_reach(
        private_registry: RegistryServer, tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", weight_bytes=1 << 20)
    ref = f"{private_registry.host}/health/tiny:v1"
    ok(kitfs("pack", str(project), "-t", ref, home=tmp_path / "home"))
    mp = tmp_path / "mnt"
    with mounted(ref, mp, tmp_path / "cache", "--prefetch", "none", "--timeout", "5"):
        check = kitfs("status", str(mp), "--check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert " ok " in check.stdout.splitlines()[1]

        private_registry.stop()
        with pytest.raises(OSError):  # EIO: the file was never fetched
            (mp / "model" / "model.safetensors").read_bytes()
        until(lambda: kitfs("status", str(mp), "--check").returncode == 1, "unhealthy")
        check = kitfs("status", str(mp), "--check")
        assert check.returncode == 1
        assert "unhealthy" in check.stdout.splitlines()[1]
        assert f"unhealthy: registry {private_registry.host} unreachable" in check.stdout
        assert "Connection refused" in check.stdout
        doc = json.loads(kitfs("status", str(mp), "--json", "--check").stdout)[0]
        assert doc["healthy"] is False
        assert doc["problems"][0].startswith(f"registry {private_registry.host} unreachable")
        assert doc["status"]["engine"]["registry"][0]["requests"]["connection_error"] >= 1
        # Without --check, the same report exits 0.
        assert kitfs("status", str(mp)).returncode == 0


async def test_a_failing_registry_is_asked_again_until_it_answers(
        private_registry: RegistryServer) -> None:
    async with RegistryClient(private_registry.host, ClientOptions(
            connect_retry=0.1, retry_budget=1.0)) as client:
        await client.ping()
        assert not client.stats.failing
        private_registry.stop()
        with pytest.raises(Exception, match="cannot connect"):
            await client.ping()
        assert client.stats.failing
        assert client.stats.last_outcome == "connection_error"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(recheck_registries, [client], 0.05)
            await trio.sleep(0.5)  # asked again meanwhile, still down
            assert client.stats.requests["connection_error"] >= 2
            await trio.to_thread.run_sync(restart, private_registry)
            with trio.fail_after(20):
                while client.stats.failing:
                    await trio.sleep(0.05)
            asked = sum(client.stats.requests.values())
            await trio.sleep(0.3)  # a registry that answers is left alone
            assert sum(client.stats.requests.values()) == asked
            nursery.cancel_scope.cancel()


async def test_status_check_names_a_poisoned_layer(registry: RegistryServer,
                                                   tmp_path: Path) -> None:
    """A proxy flips a byte of a layer `kit` wrote (no chunk digests): prefetching it all,
    the background hash poisons the layer with no reader at all."""
    tar = build_tar([("model/w.bin", os.urandom(1 << 20)), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar)
    ref = await publish_kit(registry.host, "health/poisoned", "v1", [layer], toc=None)
    with FaultProxy(registry.host) as proxy:
        proxy.add(Corrupt([100_000]), path=layer.digest)
        via = ref.replace(registry.host, proxy.host)
        with mounted(via, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "all") as mp:
            until(lambda: kitfs("status", str(mp), "--check").returncode == 1, "unhealthy")
            check = kitfs("status", str(mp), "--check")
            assert f"unhealthy: layer {layer.digest} (./model) is poisoned" in check.stdout, \
                check.stdout
            assert "registry" not in "".join(
                line for line in check.stdout.splitlines() if "unhealthy:" in line)


def test_outcomes_and_answering() -> None:
    """What each failure counts as, and which ones say the registry is not answering."""
    import httpx

    from kitfs.errors import AuthError, NotFoundError, RegistryError, UnreachableError
    from kitfs.oci.stats import RequestStats, outcome_of

    def chained(error: Exception, cause: Exception) -> Exception:
        error.__cause__ = cause
        return error

    assert outcome_of(chained(UnreachableError("x"), httpx.ReadTimeout("t")), 200) == "timeout"
    assert outcome_of(chained(UnreachableError("x"), httpx.ConnectError("c")), None) \
        == "connection_error"
    assert outcome_of(UnreachableError("truncated"), 206) == "connection_error"
    assert outcome_of(RegistryError("HTTP 503"), 503) == "server_error"
    assert outcome_of(NotFoundError("404"), 404) == "client_error"
    assert outcome_of(AuthError("denied"), 401) == "client_error"
    stats = RequestStats("r:5000")
    assert not stats.failing and stats.answering is None
    stats.failed("timeout", "slow")
    assert stats.failing
    stats.failed("client_error", "not found")  # an answer, whatever it said
    assert not stats.failing
    stats.failed("server_error", "503")
    assert stats.failing and stats.last_error == "503"
    stats.succeeded()
    assert not stats.failing and stats.requests == {
        "ok": 1, "client_error": 1, "server_error": 1, "timeout": 1, "connection_error": 0}
