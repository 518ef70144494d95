"""The CSI driver's node side against bad records, stuck daemons and bad requests.

Unit level, with real files (and, where it matters, real mounts), where a full
gRPC round trip would add nothing: the Records and the Node, the supervisor's
and the mount helper's pieces. tests/test_csi.py drives the whole driver.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from helpers import kitfs, make_project
from kitfs.csi.codes import status_of
from kitfs.csi.node import DriverConfig, Node, _resolve
from kitfs.csi.volumes import (
    Attributes,
    Busy,
    DaemonRecord,
    Records,
    VolumeRecord,
    daemon_key,
)
from kitfs.errors import KitfsError
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import parse_reference

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="needs root and mount(8) for a bind mount")

ATTRS = Attributes("127.0.0.1:5000/org/model:v1", "model", "lazy", "model")
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def records(tmp_path: Path) -> Records:
    return Records(tmp_path / "state", tmp_path / "staging")


def daemon_record(records: Records, key: str | None = None) -> DaemonRecord:
    key = key or daemon_key(DIGEST, ATTRS)
    return DaemonRecord(key, ATTRS.reference, DIGEST, ATTRS, str(records.mountpoint(key)),
                        None)


def test_a_record_key_is_never_a_path(records: Records, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    good = daemon_record(records)
    records.save_daemon(good)
    forged = dict(good.to_json(), key="../../victim")
    (records.root / "daemons" / f"{good.key}.json").write_text(json.dumps(forged))
    (records.root / "daemons" / "..%2f..%2fvictim.json").write_text(json.dumps(forged))

    assert records.daemons() == []  # both skipped: key not the file's stem, not a key
    for daemon in records.daemons():
        records.drop_daemon(daemon.key)
    with pytest.raises(ValueError):
        records.drop_daemon("../../victim")
    assert (victim / "precious").read_text() == "keep me"


def test_stored_paths_must_be_the_derived_ones(records: Records, tmp_path: Path) -> None:
    good = daemon_record(records)
    records.save_daemon(good)
    assert records.daemons() == [good]
    path = records.root / "daemons" / f"{good.key}.json"
    for field, value in (("mountpoint", str(tmp_path)), ("home", str(tmp_path / "x"))):
        path.write_text(json.dumps(dict(good.to_json(), **{field: value})))
        assert records.daemon(good.key) is None
    with_home = DaemonRecord(good.key, good.reference, DIGEST, ATTRS, good.mountpoint,
                             str(records.home(good.key)))
    records.save_daemon(with_home)
    assert records.daemon(good.key) == with_home


@pytest.mark.parametrize("target", ["relative/mount", "/pods/x/../../etc/mount",
                                    "/pods/x/./mount", "/pods/x//mount", "/pods/x/mount/"])
def test_volume_targets_must_be_canonical(records: Records, target: str) -> None:
    key = daemon_key(DIGEST, ATTRS)
    good = VolumeRecord("vol", "/pods/x/mount", key, ATTRS, "default/x")
    records.save_volume(good)
    assert records.volumes() == [good]
    # A record naming another target than its file is named for, or a bad one.
    bad = VolumeRecord("vol", target, key, ATTRS, "default/x")
    records._volume_path(good.target).write_text(json.dumps(bad.to_json()))
    assert records.volumes() == [] and records.volume(good.target) is None
    records.save_volume(bad)  # a file named for it: still not canonical
    assert records.volume(target) is None and records.volumes() == []


def test_a_volume_record_key_is_a_key(records: Records) -> None:
    records.save_volume(VolumeRecord("vol", "/pods/x/mount", "../x", ATTRS, ""))
    assert records.volumes() == []


def make_node(tmp_path: Path) -> Node:
    return Node(DriverConfig(node_id="n", state_dir=tmp_path / "state",
                             staging_dir=tmp_path / "staging", cache_dir=tmp_path / "cache",
                             client=ClientOptions(), daemon_env={}))


def test_the_cache_is_per_repository_unless_the_operator_says_node(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    a, b = parse_reference("r.example/team/a:v1"), parse_reference("r.example/team/b:v1")
    assert node.cache_dir(a) != node.cache_dir(b)
    assert node.cache_dir(a) == node.cache_dir(parse_reference("R.example/team/a:v2"))
    assert node.cache_dir(a).parent == tmp_path / "cache" / "repos"
    shared = Node(replace(node.config, cache_scope="node"))
    assert shared.cache_dir(a) == shared.cache_dir(b) == tmp_path / "cache"


@contextlib.contextmanager
def foreign_mount(at: Path, source: Path) -> Iterator[None]:
    """A bind mount that is not kitfs's, where a daemon record says kitfs mounted."""
    at.mkdir(parents=True, exist_ok=True)
    source.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(at)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


@needs_root
def test_a_daemon_that_will_not_stop_does_not_stop_adoption(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    stuck, gone = daemon_record(node.records), daemon_record(
        node.records, daemon_key(DIGEST, Attributes(ATTRS.reference, "docs", "lazy", "none")))
    node.records.save_daemon(stuck)
    node.records.save_daemon(gone)
    with foreign_mount(Path(stuck.mountpoint), tmp_path / "elsewhere"):
        node.adopt()  # before: MountError "... is not a kitfs mount" ended serve()
        assert node.records.daemons() == [stuck]  # kept, to try again; the dead one dropped
        assert node.stop_unused() == [stuck.reference]
        assert node.unused == (stuck.reference,)  # what Probe reports
    # The sweeper's next round tries again, and now it goes.
    assert node.stop_unused() == [] and node.unused == ()
    assert node.records.daemons() == []
    assert not Path(stuck.mountpoint).parent.exists()


def test_adoption_removes_credentials_no_daemon_owns(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    kept = daemon_record(node.records)
    home = node.records.credentials_dir(kept.key)
    node.records.save_daemon(DaemonRecord(kept.key, kept.reference, DIGEST, ATTRS,
                                          kept.mountpoint, str(home)))
    orphan = node.records.credentials_dir("0" * 24)  # crash between the two writes
    request = node.records.credentials_dir("request-" + "1" * 32)
    for directory in (home, orphan, request):
        (directory / "credentials.json").write_text("{}")
    node.records.drop_leftover_credentials()
    assert home.exists() and not orphan.exists() and not request.exists()


def test_a_busy_volume_is_aborted_not_waited_for(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    target = tmp_path / "pods/p/mount"
    with node.records.locked(f"target:{target}"):  # a publish of it in progress
        with pytest.raises(Busy) as busy:
            node.publish("vol", target, ATTRS, None)
        assert status_of(busy.value)[0] == grpc.StatusCode.ABORTED
        assert "already in progress" in str(busy.value)
        with pytest.raises(Busy):
            node.unpublish(target)


SIGNAL_AFTER_REAP = """
import logging, os, signal, sys
from kitfs.csi import supervisor

class SignalWhenReaped(logging.Handler):
    def emit(self, record):
        if "exited with status" in record.getMessage():
            os.kill(os.getpid(), signal.SIGTERM)  # the moment after the server was reaped

supervisor.log.addHandler(SignalWhenReaped())
supervisor.log.setLevel(logging.INFO)
sys.exit(supervisor.supervise(["/bin/sh", "-c", "exit 3"]))
"""


def test_a_signal_after_the_server_is_reaped_reaches_nobody() -> None:
    """SIGTERM just after the server was reaped: the supervisor must not signal its old
    pid (ProcessLookupError ended it with a traceback; a reused pid is another process)."""
    done = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_REAP], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ,
                                                          PYTHONPATH=os.pathsep.join(sys.path)))
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr


class _Answering(http.server.BaseHTTPRequestHandler):
    """A registry that answers every request with one status."""

    status = 503

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "expected"), [
    (503, grpc.StatusCode.UNAVAILABLE), (500, grpc.StatusCode.UNAVAILABLE),
    (429, grpc.StatusCode.RESOURCE_EXHAUSTED), (400, grpc.StatusCode.INTERNAL)])
def test_a_registry_in_trouble_is_unavailable(tmp_path: Path, status: int,
                                              expected: grpc.StatusCode) -> None:
    handler = type("Answer", (_Answering,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    node = make_node(tmp_path)
    node.config = replace(node.config, client=ClientOptions(retry_budget=0.2,
                                                            server_error_retry=0.1))
    attrs = replace(ATTRS, reference=f"127.0.0.1:{server.server_address[1]}/org/m:v1")
    try:
        with pytest.raises(KitfsError) as failure:
            node.publish("vol", tmp_path / "pods/p/mount", attrs, None)
    finally:
        server.shutdown()
        server.server_close()
    got, message = status_of(failure.value)
    assert got == expected and f"HTTP {status}" in message


# -- a busy node: shared daemons starting, stuck stops, many publishes ------------------

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None
    or os.geteuid() != 0, reason="needs /dev/fuse, fusermount3 and root (bind mounts)")
WEIGHTS = "model/model.safetensors"
RPC_JOIN = 60.0  # a deadline for a thread's call, so a hang fails instead of blocking
CALL_WAIT = 3.0  # the livenessprobe sidecar's --probe-timeout: a deadline, not a timing check


@contextlib.contextmanager
def csi_server(node: Node) -> Iterator[tuple[Any, Any]]:
    """The driver's real gRPC server for `node`, in this process: (identity, node) stubs."""
    from kitfs.csi import csi_pb2_grpc
    from kitfs.csi.server import grpc_server

    short = Path(tempfile.mkdtemp(prefix="csi", dir="/tmp"))  # a socket path's 108 bytes
    server = grpc_server(node, short / "csi.sock")
    server.start()
    channel = grpc.insecure_channel(f"unix://{short / 'csi.sock'}")
    try:
        yield csi_pb2_grpc.IdentityStub(channel), csi_pb2_grpc.NodeStub(channel)
    finally:
        channel.close()
        server.stop(None).wait()
        shutil.rmtree(short, ignore_errors=True)


def probe(identity: Any) -> bool:
    from kitfs.csi import csi_pb2

    answer = identity.Probe(csi_pb2.ProbeRequest(), timeout=CALL_WAIT)
    return bool(answer.ready.value)


@needs_fuse
@pytest.mark.registry
def test_a_second_volume_waits_for_the_shared_daemon_and_succeeds(
        tmp_path: Path, registry: Any) -> None:
    """Another volume of the same daemon holding its lock (its daemon starting) makes this
    publish wait, not fail ABORTED; a retry of this same target meanwhile is ABORTED; past
    the bound the answer is ABORTED naming the shared daemon."""
    project = make_project(tmp_path / "proj", weight_bytes=1 << 20)
    ref = f"{registry.host}/hardening/shared:v1"
    assert kitfs("pack", str(project), "-t", ref, home=tmp_path / "home").returncode == 0
    node = Node(replace(make_node(tmp_path).config, daemon_env=dict(
        os.environ, PYTHONPATH=os.pathsep.join(sys.path))))
    attrs = replace(ATTRS, reference=ref)
    target = tmp_path / "pods/second/mount"
    target.parent.mkdir(parents=True)
    reached = threading.Event()
    key_locked = node._key_locked

    def spy(key: str, reference: str) -> Any:
        reached.set()  # the publish holds its target lock and asks for the daemon's
        return key_locked(key, reference)

    node._key_locked = spy  # type: ignore[method-assign]
    failures: list[BaseException] = []

    def publish() -> None:
        try:
            node.publish("second", target, attrs, None)
        except BaseException as exc:
            failures.append(exc)

    # The daemon's key, as publish finds it; its lock held as by a first volume whose
    # daemon is starting.
    key = daemon_key(trio.run(_resolve, parse_reference(ref), node.config.client), attrs)
    with node.records.locked(f"key:{key}"):
        second = threading.Thread(target=publish)
        second.start()
        assert reached.wait(RPC_JOIN)
        with pytest.raises(Busy) as retry:  # kubelet's retry of the same target
            node.publish("second", target, attrs, None)
        assert status_of(retry.value)[0] == grpc.StatusCode.ABORTED
        assert second.is_alive() and not failures  # waiting, not ABORTED
    second.join(RPC_JOIN)
    assert not second.is_alive() and not failures, failures
    try:
        assert (target / WEIGHTS).read_bytes() == (project / WEIGHTS).read_bytes()
        # Past the bound: ABORTED, saying which daemon and why.
        node.key_wait = 0.05
        other = tmp_path / "pods/third/mount"
        other.parent.mkdir(parents=True)
        with node.records.locked(f"key:{key}"), pytest.raises(Busy) as late:
            node.publish("third", other, attrs, None)
        code, message = status_of(late.value)
        assert code == grpc.StatusCode.ABORTED
        assert ref in message and "shared with another volume" in message
        assert node.records.volume(str(other)) is None
    finally:
        node.unpublish(target)
    assert node.records.daemons() == [] and node.records.volumes() == []


@needs_root
def test_probe_answers_while_an_unused_daemon_will_not_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Stopping an unused daemon may wait out umount's timeout; Probe (3 s in the sidecar)
    reports the sweeper's last finding instead of trying itself."""
    from kitfs.csi import node as node_module
    from kitfs.csi.server import Sweeper

    node = make_node(tmp_path)
    stuck = daemon_record(node.records)
    node.records.save_daemon(stuck)
    in_umount, let_go = threading.Event(), threading.Event()
    real_umount = node_module.umount

    def slow_umount(mountpoint: Path) -> str:
        in_umount.set()
        let_go.wait(RPC_JOIN)  # an umount waiting on a daemon that does not answer
        return real_umount(mountpoint)  # then: not a kitfs mount, it will not stop

    monkeypatch.setattr(node_module, "umount", slow_umount)
    sweeper = Sweeper(node, every=0.01)
    with foreign_mount(Path(stuck.mountpoint), tmp_path / "elsewhere"), \
            csi_server(node) as (identity, _):
        try:
            # Probe itself stops nothing (it used to, one umount timeout after another).
            assert not probe(identity)  # not ready: that daemon left no state file
            assert not in_umount.is_set()
            sweeper.start()
            assert in_umount.wait(RPC_JOIN)
            # Answered within the deadline mid-sweep; the sweep's finding is not in yet.
            assert not probe(identity)
            assert "will not stop" not in caplog.text
            let_go.set()
            while not node.unused:  # the sweep ends; its finding is what Probe reports
                assert sweeper._thread.is_alive()
                in_umount.clear()
                assert in_umount.wait(RPC_JOIN)  # the next sweep is under way
            assert not probe(identity)
            assert f"{stuck.reference} (unused, will not stop)" in caplog.text
        finally:
            let_go.set()
            sweeper.stop()
    assert not sweeper._thread.is_alive()


class _Stalling(http.server.BaseHTTPRequestHandler):
    """A registry that holds every request until released, counting those it holds."""

    arrived = threading.Semaphore(0)
    release = threading.Event()

    def do_GET(self) -> None:
        type(self).arrived.release()
        type(self).release.wait(RPC_JOIN)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_publishes_past_the_bound_are_refused_and_probe_still_answers(
        tmp_path: Path) -> None:
    from kitfs.csi import csi_pb2
    from kitfs.csi.server import VOLUME_SLOTS, WORKERS

    assert 0 < VOLUME_SLOTS <= WORKERS - 2  # at least two workers left for other calls
    handler = type("Stall", (_Stalling,), {"arrived": threading.Semaphore(0),
                                           "release": threading.Event()})
    registry = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=registry.serve_forever, daemon=True).start()
    node = make_node(tmp_path)
    reference = f"127.0.0.1:{registry.server_address[1]}/org/stalled:v1"
    capability = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())

    def request(n: int) -> Any:
        target = tmp_path / f"pods/p{n}/mount"
        target.parent.mkdir(parents=True, exist_ok=True)
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=f"vol{n}", target_path=str(target), volume_capability=capability,
            readonly=True, volume_context={"reference": reference})

    results: list[Any] = []
    try:
        with csi_server(node) as (identity, stub):
            calls = [stub.NodePublishVolume.future(request(n), timeout=RPC_JOIN)
                     for n in range(VOLUME_SLOTS)]
            for _ in range(VOLUME_SLOTS):  # every one of them is at the registry
                assert handler.arrived.acquire(timeout=RPC_JOIN)
            with pytest.raises(grpc.RpcError) as refused:
                stub.NodePublishVolume(request(VOLUME_SLOTS), timeout=CALL_WAIT)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already in progress on this node" in refused.value.details()
            with pytest.raises(grpc.RpcError) as unpublish:
                stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id="vol0", target_path=request(0).target_path), timeout=CALL_WAIT)
            assert unpublish.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert probe(identity)
            stub.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=CALL_WAIT)
            handler.release.set()
            for call in calls:
                results.append(call.exception(RPC_JOIN))
            # The slots are free again: the same publish now reaches the registry.
            with pytest.raises(grpc.RpcError) as after:
                stub.NodePublishVolume(request(VOLUME_SLOTS), timeout=RPC_JOIN)
            assert after.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        handler.release.set()
        registry.shutdown()
        registry.server_close()
    assert [r.code() for r in results] == [grpc.StatusCode.NOT_FOUND] * VOLUME_SLOTS


def test_cache_scope_node_is_warned_about_at_start(tmp_path: Path) -> None:
    """One cache for every repository reopens the shared read of private bytes: the
    operator must see it in the driver's log."""
    short = Path(tempfile.mkdtemp(prefix="csi", dir="/tmp"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    server = subprocess.Popen(
        [sys.executable, "-m", "kitfs.cli", "csi", "--serve", "--cache-scope", "node",
         "--endpoint", str(short / "csi.sock"), "--state-dir", str(tmp_path / "state"),
         "--staging-dir", str(tmp_path / "staging"), "--cache-dir", str(tmp_path / "cache"),
         "--metrics-addr", "off"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stderr is not None
        lines = []
        for line in server.stderr:  # up to the line saying it serves
            lines.append(line)
            if " serving " in line:
                break
        log = "".join(lines)
        assert "WARNING" in log and "--cache-scope node" in log, log
        assert "private ModelKit" in log
    finally:
        server.terminate()
        server.wait(RPC_JOIN)
        shutil.rmtree(short, ignore_errors=True)


def test_the_drivers_hosts_dir_reaches_the_mounters_daemons(tmp_path: Path) -> None:
    """`kitfs csi --hosts-dir` (registry mirrors) goes to daemons the mounter starts too."""
    from kitfs.csi.mounter import Bounds, check_request, mount_request
    from kitfs.mounts import MountConfig
    from kitfs.oci.options import ClientOptions

    key = "0" * 24
    staging, cache, state = tmp_path / "staging", tmp_path / "cache", tmp_path / "state"
    config = MountConfig(reference=f"127.0.0.1:5000/org/model:v1@sha256:{'a' * 64}",
                         mountpoint=staging / key / "mnt", cache_dir=cache,
                         client=ClientOptions(hosts_dir="/etc/kitfs/certs.d"))
    request = mount_request(config, key, home=None, verbose=0, env={})
    argv, _, _ = check_request(request, Bounds(staging_dir=staging, cache_dir=cache,
                                               state_dir=state))
    assert argv[argv.index("--hosts-dir") + 1] == "/etc/kitfs/certs.d"
