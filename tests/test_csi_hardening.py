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
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from kitfs.csi.codes import status_of
from kitfs.csi.node import DriverConfig, Node
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
