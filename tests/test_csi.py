"""`kitfs csi` driven exactly as kubelet drives it: gRPC over its Unix socket.

The driver runs as a real process tree (supervisor, gRPC server, one `kitfs
mount` daemon per shared volume) against the real registry and real FUSE.
Requests carry what kubelet sends for an inline ephemeral volume: its
target-path layout (the parent made by kubelet, the target not), its
volume_context keys (csi.storage.k8s.io/...), a dockerconfigjson secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
import trio

from helpers import kitfs, make_project, ok
from kitfs.csi import DRIVER_NAME, csi_pb2, csi_pb2_grpc
from kitfs.mounts import all_states, daemon_alive, find_mount
from registry import RegistryServer, free_port
from scraping import scrape, value

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.registry,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None
        or os.geteuid() != 0,
        reason="needs /dev/fuse, fusermount3 and root (bind mounts)",
    ),
]

WEIGHTS = "model/model.safetensors"
METRICS_PORT = free_port()
RPC_WAIT = 60.0  # a deadline for calls, not a timing check: a hang fails instead of blocking


@dataclass
class Model:
    ref: str
    weights: bytes


@dataclass
class Driver:
    root: Path
    socket: Path
    log: Path
    process: subprocess.Popen[bytes]
    node: Any  # csi_pb2_grpc.NodeStub
    identity: Any  # csi_pb2_grpc.IdentityStub
    channel: grpc.Channel

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def target(self, pod: str, volume: str = "model") -> Path:
        """kubelet's layout: it makes the parent (and vol_data.json there), not the target."""
        parent = (self.root / "var/lib/kubelet/pods" / pod / "volumes/kubernetes.io~csi"
                  / volume)
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def publish(self, target: Path, reference: str, *, pod: str = "pod",
                secret: str | None = None, block: bool = False, **attributes: str) -> Any:
        context = {
            "reference": reference, **attributes,
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.name": pod,
            "csi.storage.k8s.io/pod.namespace": "default",
            "csi.storage.k8s.io/pod.uid": target.parents[3].name,
            "csi.storage.k8s.io/serviceAccount.name": "default",
        }
        capability = csi_pb2.VolumeCapability(
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        if block:
            capability.block.SetInParent()
        else:
            capability.mount.SetInParent()
        return self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id(target), target_path=str(target), volume_capability=capability,
            readonly=True, volume_context=context,
            secrets={".dockerconfigjson": secret} if secret is not None else {},
        ), timeout=RPC_WAIT)

    def unpublish(self, target: Path) -> Any:
        return self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id(target), target_path=str(target)), timeout=RPC_WAIT)

    def daemons(self) -> list[Any]:
        """The kitfs daemons serving this driver's staging mounts (their state files)."""
        return [s for s in all_states() if s.mountpoint.startswith(str(self.staging) + "/")]

    def server_pid(self) -> int:
        """The supervisor's child that runs the gRPC server (`... csi ... --serve`)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if b"--serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    return int(pid)
        raise AssertionError("no CSI server process under the supervisor")


def volume_id(target: Path) -> str:
    """kubelet names an ephemeral volume csi-<sha256 of pod uid and volume name>."""
    pod_uid, name = target.parents[3].name, target.parent.name
    return "csi-" + hashlib.sha256(f"{pod_uid}{name}".encode()).hexdigest()


def code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    error: Any = failure.value
    return error.code(), error.details()


def dockerconfig(host: str, user: str, password: str) -> str:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}})


def pack(project: Path, ref: str, home: Path, *flags: str) -> None:
    packed = kitfs("pack", str(project), "-t", ref, *flags, home=home)
    assert packed.returncode == 0, packed.stderr


@pytest.fixture(scope="module")
def model(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Model:
    root = tmp_path_factory.mktemp("csi-kit")
    project = make_project(root / "proj", weight_bytes=4 << 20)
    ref = f"{registry.host}/csi/tiny:v1"
    pack(project, ref, root / "home")
    return Model(ref, (project / WEIGHTS).read_bytes())


def _secure(registry: RegistryServer, root: Path, name: str, *flags: str) -> Model:
    project = make_project(root / "proj", weight_bytes=1 << 20)
    home = root / "home"
    host = registry.host
    login = kitfs("login", host, "-u", str(registry.username), "--password-stdin",
                  home=home, stdin=f"{registry.password}\n")
    assert login.returncode == 0, login.stderr
    ref = f"{host}/csi/{name}:v1"
    pack(project, ref, home, *flags)
    return Model(ref, (project / WEIGHTS).read_bytes())


@pytest.fixture(scope="module")
def secure_model(auth_registry: RegistryServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Model:
    return _secure(auth_registry, tmp_path_factory.mktemp("csi-secure"), "secure")


@pytest.fixture(scope="module")
def secure_gzip_model(auth_registry: RegistryServer,
                      tmp_path_factory: pytest.TempPathFactory) -> Model:
    """Compressed layers: their layouts are cached by digest, so a mount needs no tar
    header from the registry once another mount read them."""
    return _secure(auth_registry, tmp_path_factory.mktemp("csi-secure-gz"), "secure-gz",
                   "--compression", "gzip")


def _env(root: Path) -> dict[str, str]:
    """The driver's environment; its node policy ($KITFS_POLICY) allows everything until a
    test writes rules into it (read again at each publish)."""
    policy = root / "policy.yaml"
    if not policy.exists():
        policy.write_text(ALLOW_ALL)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
                KITOPS_HOME=str(root / "node-home"), DOCKER_CONFIG=str(root / "node-docker"),
                KITFS_POLICY=str(policy))


ALLOW_ALL = "version: 1\ndefault: allow\n"


def _start_driver(root: Path, mounter: Path | None = None, metrics: str = "off") -> Driver:
    """The driver as its DaemonSet runs it: `kitfs csi` (supervisor, then server)."""
    sock = root / "csi" / "csi.sock"
    root.mkdir(parents=True, exist_ok=True)
    env = _env(root)
    log = root / "driver.log"
    extra = ["--mounter", f"unix://{mounter}"] if mounter is not None else []
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kitfs.cli", "csi", "--endpoint", f"unix://{sock}",
             "--node-id", "node-1", "--cache-dir", str(root / "cache"),
             "--state-dir", str(root / "state"), "--staging-dir", str(root / "staging"),
             "--metrics-addr", metrics, "--cache-size", "64M", *extra],
            stdout=out, stderr=out, env=env, start_new_session=True)
    channel = grpc.insecure_channel(f"unix://{sock}")
    driver = Driver(root, sock, log, process, csi_pb2_grpc.NodeStub(channel),
                    csi_pb2_grpc.IdentityStub(channel), channel)
    driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=RPC_WAIT,
                                  wait_for_ready=True)
    return driver


def _stop_driver(driver: Driver) -> None:
    """Stop the driver, then what it leaves by design: daemons and mounts outlive it."""
    driver.channel.close()
    driver.process.send_signal(signal.SIGTERM)
    try:
        driver.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(driver.process.pid, signal.SIGKILL)
        driver.process.wait()
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        point = line.split()[4]
        if point.startswith(str(driver.root / "var")):
            subprocess.run(["umount", "-l", point], capture_output=True)
    for state in driver.daemons():
        kitfs("umount", state.mountpoint)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    d = _start_driver(tmp_path_factory.mktemp("csi"), metrics=f"127.0.0.1:{METRICS_PORT}")
    try:
        yield d
    finally:
        _stop_driver(d)


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_identity_and_node_info(driver: Driver) -> None:
    info = driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=RPC_WAIT)
    assert info.name == DRIVER_NAME == "kitfs.kitops.org"
    assert info.vendor_version
    caps = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(),
                                                 timeout=RPC_WAIT)
    assert not any(c.service.type == c.service.CONTROLLER_SERVICE for c in caps.capabilities)
    assert driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_WAIT).ready.value
    assert driver.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(),
                                   timeout=RPC_WAIT).node_id == "node-1"
    assert list(driver.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(),
                                                timeout=RPC_WAIT).capabilities) == []
    # What the driver does not serve says so, as the spec asks.
    assert code(lambda: driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(),
                                                    timeout=RPC_WAIT))[0] \
        == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_endpoint_shows_the_drivers_mounts(driver: Driver, model: Model) -> None:
    """The driver serves its volumes' metrics (on by default in a DaemonSet), parsed as
    Prometheus parses them; one mount per shared daemon, whatever the number of pods."""
    first, second = driver.target("pod-m1"), driver.target("pod-m2")
    driver.publish(first, model.ref, pod="m1")
    driver.publish(second, model.ref, pod="m2")
    try:
        assert read_all(first / WEIGHTS) == model.weights
        (daemon,) = driver.daemons()
        samples, types = scrape(METRICS_PORT)
        assert value(samples, "kitfs_mounts_alive") == 1
        assert value(samples, "kitfs_mount_healthy", mountpoint=daemon.mountpoint) == 1
        assert types["kitfs_read_seconds"] == "histogram"
        # The daemon's state (what the driver exports) is refreshed about every second.
        deadline = time.monotonic() + 30
        while value(samples, "kitfs_read_bytes_total", mountpoint=daemon.mountpoint) \
                < len(model.weights):
            assert time.monotonic() < deadline, "the read never showed in the metrics"
            time.sleep(0.2)
            samples, _ = scrape(METRICS_PORT)
    finally:
        driver.unpublish(first)
        driver.unpublish(second)
    samples, _ = scrape(METRICS_PORT)
    assert value(samples, "kitfs_mounts_alive") == 0


def test_pods_share_one_daemon_until_the_last_unpublish(driver: Driver, model: Model) -> None:
    first, second = driver.target("pod-a"), driver.target("pod-b")
    driver.publish(first, model.ref, pod="a")
    assert read_all(first / WEIGHTS) == model.weights
    driver.publish(second, model.ref, pod="b")
    assert read_all(second / WEIGHTS) == model.weights

    (daemon,) = driver.daemons()  # one daemon serves both pods
    assert daemon.alive
    argv = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--cache-size") + 1] == str(64 << 20).encode()  # the node's bound
    a, b, staged = find_mount(first), find_mount(second), find_mount(Path(daemon.mountpoint))
    assert a is not None and b is not None and staged is not None
    assert a.device == b.device == staged.device  # binds of the daemon's one FUSE mount
    with pytest.raises(OSError):
        (first / "model" / "new.txt").write_text("read-only")

    # kubelet retries: publishing the same volume again is a no-op, not a second mount
    driver.publish(first, model.ref, pod="a")
    mounted = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split()[4] == str(first)]
    assert len(mounted) == 1
    # ...but the same target asked for something else is refused
    assert code(lambda: driver.publish(first, model.ref, pod="a", prefetch="none"))[0] \
        == grpc.StatusCode.ALREADY_EXISTS

    driver.unpublish(first)
    assert find_mount(first) is None and not first.exists()
    assert read_all(second / WEIGHTS) == model.weights  # the other pod keeps reading
    assert daemon_alive(daemon.pid, daemon.start_time)
    driver.unpublish(first)  # again: nothing left to do, still OK

    driver.unpublish(second)
    assert find_mount(second) is None and not second.exists()
    assert not daemon_alive(daemon.pid, daemon.start_time)  # the last user stopped it
    assert find_mount(Path(daemon.mountpoint)) is None
    assert not Path(daemon.mountpoint).parent.exists()
    assert driver.daemons() == []
    driver.unpublish(driver.target("never-published"))  # unknown target: OK


def test_a_dead_daemon_is_reported_and_remounted(driver: Driver, model: Model) -> None:
    target = driver.target("pod-dead")
    driver.publish(target, model.ref, pod="dead", filter="model,docs")
    (daemon,) = driver.daemons()
    os.kill(daemon.pid, signal.SIGKILL)
    with pytest.raises(OSError):  # the pod's mount is dead: every access says ENOTCONN
        os.listdir(target)
    # Its FUSE connection ends before the process does: wait until it is gone (a zombie).
    deadline = time.monotonic() + RPC_WAIT
    while daemon_alive(daemon.pid, daemon.start_time) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_WAIT).ready.value

    driver.publish(target, model.ref, pod="dead", filter="model,docs")  # kubelet again
    (again,) = driver.daemons()
    assert again.pid != daemon.pid
    assert read_all(target / WEIGHTS) == model.weights
    assert driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_WAIT).ready.value
    driver.unpublish(target)
    assert driver.daemons() == [] and not target.exists()
    assert not daemon_alive(again.pid, again.start_time)


def test_concurrent_publishes_of_one_model(driver: Driver, model: Model) -> None:
    """Pods of one model on one node share its daemon: while one volume starts it, the
    others wait for it (each is its own volume, so none is ABORTED), and leave it alike."""
    targets = [driver.target(f"pod-c{i}") for i in range(4)]
    errors: list[BaseException] = []

    def each(call: Callable[[Path], Any]) -> None:
        def run(target: Path) -> None:
            try:
                call(target)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(t,)) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    each(lambda target: driver.publish(target, model.ref, pod=target.parents[3].name))
    assert errors == []
    assert len(driver.daemons()) == 1
    for target in targets:
        assert read_all(target / WEIGHTS) == model.weights
    each(driver.unpublish)
    assert errors == []
    assert driver.daemons() == []
    assert all(find_mount(t) is None for t in targets)


def test_bad_requests_get_the_right_codes(driver: Driver, model: Model) -> None:
    target = driver.target("pod-bad")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    status, message = code(lambda: driver.publish(target, "127.0.0.1:5000/UPPER/case:v1"))
    assert status == invalid and "UPPER" in message
    status, message = code(lambda: driver.publish(target, model.ref, verify="maybe"))
    assert status == invalid and "verify" in message
    status, message = code(lambda: driver.publish(target, model.ref, filter="weights"))
    assert status == invalid and "weights" in message
    status, message = code(lambda: driver.publish(target, model.ref, colour="blue"))
    assert status == invalid and "colour" in message
    status, message = code(lambda: driver.publish(target, model.ref, block=True))
    assert status == invalid and "block" in message
    status, message = code(lambda: driver.publish(target, "tiny:v1"))
    assert status == invalid and "registry" in message
    status, message = code(lambda: driver.publish(target, model.ref, secret="{not json"))
    assert status == invalid and "JSON" in message
    for auth in ("bm8tY29sb24=", "%%%not base64", "//79/A=="):  # "no-colon", junk, not UTF-8
        secret = json.dumps({"auths": {"registry.example": {"auth": auth}}})
        status, message = code(lambda s=secret: driver.publish(target, model.ref, secret=s))
        assert status == invalid and "'registry.example'" in message and auth not in message

    status, message = code(lambda: driver.publish(target, model.ref.replace(":v1", ":nope")))
    assert status == grpc.StatusCode.NOT_FOUND and "nope" in message
    status, message = code(lambda: driver.publish(target, f"127.0.0.1:{free_port()}/gone/x:v1"))
    assert status == grpc.StatusCode.UNAVAILABLE and "127.0.0.1" in message
    assert not target.exists() and driver.daemons() == []
    assert "Traceback" not in driver.log.read_text()


def test_registry_credentials_from_the_pod_secret(driver: Driver, secure_model: Model,
                                                  auth_registry: RegistryServer) -> None:
    host, password = auth_registry.host, str(auth_registry.password)
    target = driver.target("pod-secure")
    status, message = code(lambda: driver.publish(target, secure_model.ref))
    assert status == grpc.StatusCode.UNAUTHENTICATED and host in message
    wrong = dockerconfig(host, "kitfs", "not-the-password")
    status, message = code(lambda: driver.publish(target, secure_model.ref, secret=wrong))
    assert status == grpc.StatusCode.UNAUTHENTICATED and "wrong username or password" in message

    driver.publish(target, secure_model.ref, secret=dockerconfig(host, "kitfs", password))
    assert read_all(target / WEIGHTS) == secure_model.weights
    (daemon,) = driver.daemons()
    homes = list((driver.root / "state" / "homes").iterdir())
    assert [(h.stat().st_mode & 0o777, (h / "credentials.json").stat().st_mode & 0o777)
            for h in homes] == [(0o700, 0o600)]

    # The password is on no command line, in no log (the driver's, the daemon's).
    secret_bytes = password.encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            assert secret_bytes not in cmdline.read_bytes(), cmdline
    assert password not in driver.log.read_text()
    assert daemon.log is not None
    assert password not in Path(daemon.log).read_text(errors="replace")

    driver.unpublish(target)
    assert driver.daemons() == [] and list((driver.root / "state" / "homes").iterdir()) == []


def test_signatures_are_checked_at_publish(driver: Driver, model: Model,
                                           tmp_path: Path) -> None:
    """signatureKey (PEM) and the node policy: a volume whose digest is not signed as asked
    is refused with PERMISSION_DENIED and nothing is mounted."""
    from test_signatures_registry import PASSWORD, keypair

    key, pub = keypair(tmp_path, "ecdsa")
    (tmp_path / "other").mkdir()
    _, other = keypair(tmp_path / "other", "ed25519")
    ok(kitfs("sign", "--key", str(key), model.ref,
             env={**os.environ, "COSIGN_PASSWORD": PASSWORD}))
    target = driver.target("pod-signed")
    denied, invalid = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT

    status, message = code(lambda: driver.publish(
        target, model.ref, signatureKey=other.read_text(), signatureIgnoreTlog="true"))
    assert status == denied and "does not verify with" in message, message
    assert not target.exists() and driver.daemons() == []
    status, message = code(lambda: driver.publish(target, model.ref,
                                                  signatureKey=pub.read_text()))
    assert status == invalid and 'signatureIgnoreTlog: "true"' in message, message
    status, message = code(lambda: driver.publish(target, model.ref, signatureKey=str(pub),
                                                  signatureIgnoreTlog="true"))
    assert status == invalid and "not a file name" in message
    status, message = code(lambda: driver.publish(target, model.ref,
                                                  signatureIdentity="me@example.com"))
    assert status == invalid and "signatureIssuer" in message

    driver.publish(target, model.ref, signatureKey=pub.read_text(), signatureIgnoreTlog="true")
    try:
        assert read_all(target / WEIGHTS) == model.weights
    finally:
        driver.unpublish(target)

    # A signed child whose model.path names an unsigned parent: the parent's weights would
    # be served unsigned, so the publish is refused until the parent is signed too.
    parent, child = trio.run(_parent_and_child, model.ref.split("/")[0])
    ok(kitfs("sign", "--key", str(key), child, env={**os.environ, "COSIGN_PASSWORD": PASSWORD}))
    signed = {"signatureKey": pub.read_text(), "signatureIgnoreTlog": "true"}
    status, message = code(lambda: driver.publish(target, child, **signed))
    assert status == denied and f"parent ModelKit {parent}" in message, message
    assert not target.exists() and driver.daemons() == []
    ok(kitfs("sign", "--key", str(key), parent, env={**os.environ, "COSIGN_PASSWORD": PASSWORD}))
    driver.publish(target, child, **signed)
    try:
        assert read_all(target / "weights" / "w.bin") == PARENT_WEIGHTS
        (daemon,) = driver.daemons()
        argv = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--verify") + 1] == b"strict"  # signed: verified bytes only
    finally:
        driver.unpublish(target)

    # The node's policy, edited while the driver runs, applies to the next publish.
    policy = driver.root / "policy.yaml"
    host = model.ref.split("/")[0]
    (driver.root / "node.pub").write_bytes(other.read_bytes())
    policy.write_text(f"version: 1\ndefault: allow\nrules:\n  - match: {host}/csi/*\n"
                      f"    require: [{{key: node.pub}}]\n    ignoreTlog: true\n")
    try:
        status, message = code(lambda: driver.publish(
            target, model.ref, signatureKey=pub.read_text(), signatureIgnoreTlog="true"))
        assert status == denied and f"{policy} rule 1" in message, message
        assert not target.exists() and driver.daemons() == []
        # A policy that requires signatures somewhere: volumes default to verify: strict
        # (a parent may be one it requires signed, which is known only once resolved).
        policy.write_text(f"version: 1\ndefault: allow\nrules:\n  - match: {host}/elsewhere/*"
                          f"\n    require: [{{key: node.pub}}]\n    ignoreTlog: true\n")
        driver.publish(target, model.ref)
        try:
            (daemon,) = driver.daemons()
            argv = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"--verify") + 1] == b"strict"
        finally:
            driver.unpublish(target)
    finally:
        policy.write_text(ALLOW_ALL)
    assert "Traceback" not in driver.log.read_text()


def test_a_signed_volume_never_joins_a_daemon_serving_other_parents(
        driver: Driver, model: Model, tmp_path: Path) -> None:
    """A daemon started for an unsigned volume resolved the parent's tag then; the tag has
    moved to a signed parent since. A signed volume of the same child (same digest, filter,
    verify: the same daemon) checks the new parent, so it must not be bound to the daemon
    still serving the old one."""
    from crafted import build_tar, craft_layer, publish_kit
    from test_signatures_registry import PASSWORD, keypair

    host = model.ref.split("/")[0]
    key, pub = keypair(tmp_path, "ecdsa")
    _, child = trio.run(_parent_and_child, host)
    first, second = driver.target("pod-old-parent"), driver.target("pod-new-parent")
    driver.publish(first, child, verify="strict")
    try:
        assert read_all(first / "weights" / "w.bin") == PARENT_WEIGHTS
        newer = craft_layer(build_tar([("weights/w.bin", b"newer weights\n")]), kind="model",
                            path="./weights")
        parent = trio.run(lambda: publish_kit(host, "csi/parent", "v1", [newer], {
            "manifestVersion": "1.0.0", "package": {"name": "parent"},
            "model": {"name": "w", "path": "./weights"}}))
        signer = {**os.environ, "COSIGN_PASSWORD": PASSWORD}
        ok(kitfs("sign", "--key", str(key), parent, env=signer))
        ok(kitfs("sign", "--key", str(key), child, env=signer))
        status, message = code(lambda: driver.publish(
            second, child, verify="strict", signatureKey=pub.read_text(),
            signatureIgnoreTlog="true"))
        assert status == grpc.StatusCode.PERMISSION_DENIED, message
        assert "not those whose signatures were checked" in message, message
        assert not second.exists() and len(driver.daemons()) == 1
    finally:
        driver.unpublish(first)


PARENT_WEIGHTS = b"parent weights\n" * 1000


async def _parent_and_child(host: str) -> tuple[str, str]:
    """A parent ModelKit holding weights, and a child whose model.path names it."""
    from crafted import build_tar, craft_layer, publish_kit

    model = craft_layer(build_tar([("weights/w.bin", PARENT_WEIGHTS)]), kind="model",
                        path="./weights")
    parent = await publish_kit(host, "csi/parent", "v1", [model], {
        "manifestVersion": "1.0.0", "package": {"name": "parent"},
        "model": {"name": "w", "path": "./weights"}})
    docs = craft_layer(build_tar([("README.md", b"child\n")]), kind="docs", path="./README.md")
    child = await publish_kit(host, "csi/child", "v1", [docs], {
        "manifestVersion": "1.0.0", "package": {"name": "child"},
        "model": {"path": parent}, "docs": [{"path": "./README.md"}]})
    return parent, child


class _Denying(http.server.BaseHTTPRequestHandler):
    """A registry that knows the user and refuses them (HTTP 403), which the htpasswd
    registry never does (it answers wrong credentials with 401)."""

    def do_GET(self) -> None:
        if self.headers.get("Authorization"):
            self.send_response(403)
            body = b'{"errors":[{"code":"DENIED","message":"no pull access"}]}'
        else:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="denying"')
            body = b"{}"
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_denied_access_is_permission_denied(driver: Driver) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Denying)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        secret = dockerconfig(host, "someone", "their-password")
        status, message = code(lambda: driver.publish(driver.target("pod-denied"),
                                                      f"{host}/private/model:v1", secret=secret))
        assert status == grpc.StatusCode.PERMISSION_DENIED and "denied" in message
    finally:
        server.shutdown()
        server.server_close()


def probe_until_served(driver: Driver) -> Any:
    """Probe as kubelet's liveness sidecar does, again while the socket has no server: a call
    on the connection the killed server reset fails UNAVAILABLE, the next one waits for the
    new server (wait_for_ready)."""
    for _ in range(10):
        try:
            return driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_WAIT,
                                         wait_for_ready=True)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
    raise AssertionError("no CSI server came back")


def slow_reader(path: Path, got: bytearray, halfway: threading.Event,
                go: threading.Event) -> None:
    """Read `path` into `got`: half of it, then wait for `go` (the test kills something)."""
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(128 << 10):
            got.extend(piece)
            if len(got) >= size // 2 and not halfway.is_set():
                halfway.set()
                go.wait(RPC_WAIT)


def test_server_killed_mid_read(model: Model, registry: RegistryServer,
                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGKILL the gRPC server while a pod streams a file: the read finishes with the
    right bytes, the supervisor starts a new server, it adopts the volume, and
    unpublish still cleans everything up."""
    root = tmp_path_factory.mktemp("csi-kill")
    project = make_project(root / "proj", weight_bytes=6 << 20)  # not in any cache yet
    ref = f"{registry.host}/csi/streamed:v1"
    pack(project, ref, root / "home")
    expected = (project / WEIGHTS).read_bytes()

    driver = _start_driver(root / "node")
    halfway, go = threading.Event(), threading.Event()
    try:
        target = driver.target("pod-stream")
        driver.publish(target, ref, pod="stream", prefetch="none")
        (daemon,) = driver.daemons()
        old_server = driver.server_pid()

        got = bytearray()
        thread = threading.Thread(target=slow_reader,
                                  args=(target / WEIGHTS, got, halfway, go))
        thread.start()
        assert halfway.wait(RPC_WAIT)
        os.kill(old_server, signal.SIGKILL)
        probe = probe_until_served(driver)
        go.set()
        thread.join()
        assert bytes(got) == expected
        new_server = driver.server_pid()
        assert new_server != old_server
        assert probe.ready.value
        assert daemon_alive(daemon.pid, daemon.start_time)  # the same daemon, never restarted
        log = driver.log.read_text()
        assert "exited with status -9" in log and "adopted the daemon for" in log

        driver.publish(target, ref, pod="stream", prefetch="none")  # kubelet retry: OK
        driver.unpublish(target)
        assert find_mount(target) is None and not target.exists()
        assert not daemon_alive(daemon.pid, daemon.start_time)
        assert driver.daemons() == []
        assert "Traceback" not in driver.log.read_text()
    finally:
        go.set()
        _stop_driver(driver)


# -- the mounter: daemons that outlive the driver's container ----------------------------


@dataclass
class Mounter:
    socket: Path
    log: Path
    process: subprocess.Popen[bytes]
    node: Path  # the driver's root its bounds are (--staging-dir, --cache-dir, --state-dir)

    def ask(self, request: Any) -> str:
        """One raw request, as the driver sends it; the mounter's one-line answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(RPC_WAIT)
            conn.connect(str(self.socket))
            conn.sendall((request if isinstance(request, str) else json.dumps(request))
                         .encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
            return conn.makefile("rb").readline().decode().strip()

    def mountpoint(self, key: str) -> Path:
        return self.node / "staging" / key / "mnt"

    def daemon_pid(self, key: str) -> int:
        """The pid it logged starting the daemon for `key`."""
        for line in self.log.read_text().splitlines():
            if "starting daemon pid" in line and line.endswith(f"{self.mountpoint(key)}"):
                return int(line.split("starting daemon pid ")[1].split()[0])
        raise AssertionError(f"no daemon started for {key}")


def _start_mounter(root: Path, node: Path, *flags: str) -> Mounter:
    """`kitfs csi mounter` as its DaemonSet runs it, for a driver rooted at `node` (as
    _start_driver lays it out); returns once it listens."""
    sock = root / "mounter" / "mounter.sock"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "mounter.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kitfs.cli", "csi", "mounter", "--socket", f"unix://{sock}",
             "--staging-dir", str(node / "staging"), "--cache-dir", str(node / "cache"),
             "--state-dir", str(node / "state"), *flags],
            stdout=out, stderr=out, env=_env(root), start_new_session=True)
    for _ in range(int(RPC_WAIT / 0.05)):  # a deadline for its start, not a timing check
        if "listens on" in log.read_text():
            return Mounter(sock, log, process, node)
        assert process.poll() is None, log.read_text()
        threading.Event().wait(0.05)
    raise AssertionError("the mounter did not start: " + log.read_text())


def _stop_mounter(mounter: Mounter) -> None:
    if mounter.process.poll() is None:
        mounter.process.send_signal(signal.SIGTERM)
        mounter.process.wait(timeout=30)


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2:].split()[1])


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it, whatever their sessions: what a container holds
    when its first process is `pid` (the runtime kills them all when it stops)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            children.setdefault(parent_pid(int(stat.parent.name)), []).append(
                int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo.extend(children.get(p, ()))
    return found


def kill_container(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process tree at once, as a container restart does (cgroup kill)."""
    for pid in descendants(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def gone(pid: int) -> bool:
    """Not even a zombie: someone collected it. Waits for the mounter's reaper."""
    for _ in range(int(RPC_WAIT / 0.05)):
        if not Path(f"/proc/{pid}").exists():
            return True
        threading.Event().wait(0.05)
    return False


@pytest.fixture(scope="module")
def mounter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounter]:
    m = _start_mounter(tmp_path_factory.mktemp("mounter"), tmp_path_factory.mktemp("node"))
    try:
        yield m
    finally:
        _stop_mounter(m)


def test_driver_container_killed_mid_read(model: Model, registry: RegistryServer,
                                          mounter: Mounter,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGKILL the whole driver (supervisor, server and every process below them, as a
    container restart does) while a pod streams a file: the mounter's daemon finishes the
    read, a new driver adopts the volume, a second pod shares the daemon, and the last
    unpublish stops it (reaped). Without --mounter the read fails: the daemon dies too."""
    root = tmp_path_factory.mktemp("csi-restart")
    project = make_project(root / "proj", weight_bytes=6 << 20)  # not in any cache yet
    ref = f"{registry.host}/csi/restart:v1"
    pack(project, ref, root / "home")
    expected = (project / WEIGHTS).read_bytes()

    driver = _start_driver(mounter.node, mounter.socket)
    halfway, go = threading.Event(), threading.Event()
    try:
        target = driver.target("pod-stream")
        driver.publish(target, ref, pod="stream", prefetch="none")
        (daemon,) = driver.daemons()
        assert parent_pid(daemon.pid) == mounter.process.pid  # not in the driver's tree

        got = bytearray()
        thread = threading.Thread(target=slow_reader,
                                  args=(target / WEIGHTS, got, halfway, go))
        thread.start()
        assert halfway.wait(RPC_WAIT)
        driver.channel.close()
        assert daemon.pid not in descendants(driver.process.pid)
        assert driver.server_pid() in descendants(driver.process.pid)
        kill_container(driver.process)  # supervisor, server and all below them
        assert driver.process.returncode == -signal.SIGKILL
        go.set()
        thread.join()
        assert bytes(got) == expected
        assert daemon_alive(daemon.pid, daemon.start_time)

        driver = _start_driver(mounter.node, mounter.socket)  # same --state-dir
        assert "adopted the daemon for" in driver.log.read_text()
        driver.publish(target, ref, pod="stream", prefetch="none")  # kubelet retry: OK
        second = driver.target("pod-second")
        driver.publish(second, ref, pod="second", prefetch="none")
        assert read_all(second / WEIGHTS) == expected
        assert [d.pid for d in driver.daemons()] == [daemon.pid]  # shared, not restarted

        driver.unpublish(target)
        assert daemon_alive(daemon.pid, daemon.start_time)
        driver.unpublish(second)
        assert find_mount(target) is None and find_mount(second) is None
        assert not target.exists() and not second.exists()
        assert not daemon_alive(daemon.pid, daemon.start_time)
        assert gone(daemon.pid)  # the mounter reaped it: no zombie
        assert driver.daemons() == []
        for log in (driver.log, mounter.log):
            assert "Traceback" not in log.read_text()
    finally:
        go.set()
        _stop_driver(driver)


def test_publish_without_a_mounter_is_unavailable(model: Model,
                                                  tmp_path_factory: pytest.TempPathFactory
                                                  ) -> None:
    """A mounter that stops leaves its daemons serving here (outside Kubernetes nothing
    kills them); publishing a new daemon is UNAVAILABLE, joining the running one and
    unpublish (which stops it) still work."""
    root = tmp_path_factory.mktemp("csi-no-mounter")
    own = _start_mounter(root / "mounter", root / "node")
    driver = _start_driver(root / "node", own.socket)
    try:
        target = driver.target("pod-kept")
        driver.publish(target, model.ref, pod="kept")
        (daemon,) = driver.daemons()
        _stop_mounter(own)
        assert not own.socket.exists()
        assert read_all(target / WEIGHTS) == model.weights

        other = driver.target("pod-new")
        status, message = code(lambda: driver.publish(other, model.ref, pod="new",
                                                      prefetch="none"))
        assert status == grpc.StatusCode.UNAVAILABLE
        assert "mounter" in message and str(own.socket) in message
        assert not other.exists() and len(driver.daemons()) == 1
        joined = driver.target("pod-join")  # joining a running daemon needs no mounter
        driver.publish(joined, model.ref, pod="join")
        assert read_all(joined / WEIGHTS) == model.weights

        driver.unpublish(joined)
        driver.unpublish(target)  # umount by pid: no mounter needed
        assert find_mount(target) is None and not target.exists()
        assert not daemon_alive(daemon.pid, daemon.start_time)
        assert driver.daemons() == []
        assert "Traceback" not in driver.log.read_text()
    finally:
        _stop_driver(driver)
        _stop_mounter(own)


def pinned(ref: str) -> str:
    """`ref` pinned by the digest its registry gives the tag now."""
    name, tag = ref.rsplit(":", 1)
    host, repo = name.split("/", 1)
    request = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}", method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(request, timeout=RPC_WAIT) as answer:
        return f"{ref}@{answer.headers['Docker-Content-Digest']}"


def mount_request(mounter: Mounter, key: str, reference: str, **fields: Any) -> dict[str, Any]:
    """A v1 request as a driver whose directories are the mounter's sends it."""
    return {"version": 1, "key": key, "reference": reference,
            "cache_dir": str(mounter.node / "cache" / "repos" / key), "home": None,
            "filters": ["model"], "verify": "lazy", "prefetch": "none", **fields}


@contextlib.contextmanager
def hung_registry() -> Iterator[str]:
    """HOST:PORT of a registry that takes connections (the kernel's backlog) and never
    answers: a daemon starting against it waits for as long as its --timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


HUNG_DIGEST = "@sha256:" + "0" * 64


def test_the_mounter_runs_only_daemon_mounts_within_its_bounds(mounter: Mounter,
                                                               tmp_path: Path) -> None:
    """Every path in a request stays inside the driver's directories, the daemon's command
    line is the mounter's own, and of the request's environment only the proxy and CA
    variables reach the daemon (the reviewer's PYTHONPATH with a sitecustomize.py did)."""
    assert mounter.socket.stat().st_mode & 0o777 == 0o600
    key, other = "a" * 24, "b" * 24
    ref = "127.0.0.1:1/csi/closed:v1" + HUNG_DIGEST  # nothing listens on port 1
    good = mount_request(mounter, key, ref)
    node = mounter.node
    refused = [
        {**good, "version": 2},  # a newer driver's request this mounter cannot read
        {**good, "key": "../../../../etc/x"},  # the mountpoint is <staging>/<key>/mnt
        {**good, "key": other.upper()},
        {**good, "cache_dir": str(tmp_path / "cache")},
        {**good, "cache_dir": f"{node}/cache/../elsewhere"},
        {**good, "cache_dir": "relative/cache"},
        {**good, "home": str(tmp_path)},
        {**good, "home": str(node / "state" / "homes" / other)},  # another daemon's
        {**good, "reference": "127.0.0.1:1/csi/closed:v1"},  # not pinned
        {**good, "filters": "model"},
        {**good, "verify": "never"},
        {**good, "memory": True},
        {**good, "ca_file": "ca.pem"},
        {**good, "hosts_dir": "certs.d"},
        {**good, "env": {"HTTPS_PROXY": 1}},
        {k: v for k, v in good.items() if k != "cache_dir"},
        {"argv": ["mount", ref, str(tmp_path), "--foreground"], "env": None,
         "mountpoint": str(tmp_path)},  # the old protocol: a command line
        [good],
        "not json",
        "[" * 100_000,  # nested past Python's recursion limit
    ]
    for request in refused:
        answer = mounter.ask(request)
        assert answer.startswith("error 2 the kitfs mounter refused the request: "), \
            (request, answer)
    assert "protocol v2" in mounter.ask(refused[0]) and "drain" in mounter.ask(refused[0])
    # A well-formed request runs (the daemon's own error comes back as it said it), with
    # the proxy of the request (a password in it is never logged) and nothing else of it.
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "ran-as-root"
    (site / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {"KITFS_PROXY": "http://user:hunter2-not-logged@127.0.0.1:1",
           "PYTHONPATH": str(site), "LD_PRELOAD": str(tmp_path / "nothing.so")}
    answer = mounter.ask({**good, "home": str(node / "state" / "homes" / key), "env": env})
    assert answer.startswith("error ") and "refused the request" not in answer, answer
    assert "127.0.0.1:1" in answer  # the registry (through its proxy) could not be reached
    assert not marker.exists()
    mountpoint = mounter.mountpoint(key)
    assert find_mount(mountpoint) is None and list(mountpoint.iterdir()) == []
    assert "hunter2-not-logged" not in mounter.log.read_text()
    assert mounter.process.poll() is None


def test_a_request_of_another_version_still_mounts(mounter: Mounter, model: Model) -> None:
    """A driver one release newer (a field this mounter does not know) or older (fields
    this one added, absent) is understood: the mounter is replaced only by a drain."""
    key = "c" * 24
    request = mount_request(mounter, key, pinned(model.ref), from_a_newer_driver={"x": 1})
    for added_later in ("memory", "cache_size", "verbose", "tls_verify", "prefetch"):
        request.pop(added_later, None)
    assert mounter.ask(request) == "ready", mounter.log.read_text()[-2000:]
    mountpoint = mounter.mountpoint(key)
    pid = mounter.daemon_pid(key)
    try:
        assert read_all(mountpoint / WEIGHTS) == model.weights
        assert parent_pid(pid) == mounter.process.pid
    finally:
        ok(kitfs("umount", str(mountpoint)))
    assert gone(pid)  # reaped by the mounter


def test_a_daemon_start_that_hangs_does_not_stop_reaping(mounter: Mounter,
                                                         model: Model) -> None:
    """While a daemon is still starting (its registry never answers), a daemon that ends
    is reaped all the same: no zombie waits for the hung start to finish."""
    hung, key = "d" * 24, "e" * 24
    answers: list[str] = []
    with hung_registry() as host:
        request = mount_request(mounter, hung, f"{host}/csi/hung:v1{HUNG_DIGEST}",
                                timeout=600)  # the daemon waits; the mounter's deadline: 300 s
        asking = threading.Thread(target=lambda: answers.append(mounter.ask(request)))
        asking.start()
        try:
            for _ in range(int(RPC_WAIT / 0.05)):  # a deadline, not a timing check
                if f"{mounter.mountpoint(hung)}" in mounter.log.read_text():
                    break
                threading.Event().wait(0.05)
            starting = mounter.daemon_pid(hung)

            assert mounter.ask(mount_request(mounter, key, pinned(model.ref))) == "ready"
            ended = mounter.daemon_pid(key)
            ok(kitfs("umount", str(mounter.mountpoint(key))))
            assert gone(ended)  # reaped while the other start still hangs
            assert asking.is_alive() and answers == []
        finally:
            with contextlib.suppress(ProcessLookupError, UnboundLocalError):
                os.kill(starting, signal.SIGKILL)
            asking.join(RPC_WAIT)
    assert answers and answers[0].startswith("error ") and "before the mount was ready" \
        in answers[0], answers
    assert gone(starting)


def test_a_daemon_start_that_hangs_is_stopped_at_the_deadline(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """`--launch-wait`: the mounter stops a daemon that is not mounted by then, collects
    it, and answers with an error the driver relays (kubelet retries the publish)."""
    root = tmp_path_factory.mktemp("mounter-deadline")
    own = _start_mounter(root / "mounter", root / "node", "--launch-wait", "1")
    key = "f" * 24
    try:
        with hung_registry() as host:
            answer = own.ask(mount_request(own, key, f"{host}/csi/hung:v1{HUNG_DIGEST}",
                                           timeout=600))
        assert answer.startswith("error 1 the kitfs daemon was not ready within 1s and was "
                                 "stopped"), answer
        pid = own.daemon_pid(key)
        assert gone(pid)
        assert find_mount(own.mountpoint(key)) is None
        assert own.process.poll() is None and "Traceback" not in own.log.read_text()
    finally:
        _stop_mounter(own)


class _ManifestCopy(http.server.BaseHTTPRequestHandler):
    """The reviewer's attack: a registry of one's own serving a copy of a private
    manifest's bytes (no credentials needed), and nothing else."""

    manifest = b""
    sizes: ClassVar[dict[str, int]] = {}  # blobs it claims to have (HEAD only): digest -> size
    blobs: ClassVar[dict[str, bytes]] = {}  # blobs it has (the config: metadata leaks more easily)

    def _answer(self, body: bool) -> None:
        digest = self.path.rsplit("/", 1)[-1]
        if "/manifests/" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            data = self.manifest
        elif digest in self.blobs:
            self.send_response(200)
            data = self.blobs[digest]
        elif not body and digest in self.sizes:
            self.send_response(200)
            self.send_header("Content-Length", str(self.sizes[digest]))
            self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            return
        else:
            self.send_response(404)
            data = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}'
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("claims_blobs", "compressed"),
                         [(False, False), (True, False), (True, True)],
                         ids=["honest", "lying", "lying-gzip"])
def test_a_copied_manifest_does_not_join_a_private_daemon(
        driver: Driver, auth_registry: RegistryServer, request: pytest.FixtureRequest,
        claims_blobs: bool, compressed: bool) -> None:
    """A registry of one's own serving a private manifest's bytes reads nothing private:
    it does not join the owner's daemon, and when it claims the blobs too (HEAD 200), the
    daemon it gets does not find the owner's chunks in the node's cache (before the cache
    was split per repository, it read the private weights from there)."""
    secure_model: Model = request.getfixturevalue(
        "secure_gzip_model" if compressed else "secure_model")
    repository = secure_model.ref.split("/", 1)[1].split(":")[0]
    host, password = auth_registry.host, str(auth_registry.password)
    login = base64.b64encode(f"kitfs:{password}".encode()).decode()

    def fetch(path: str, put: bytes | None = None) -> bytes:
        asked = urllib.request.Request(
            f"http://{host}/v2/{repository}/{path}", data=put,
            method="PUT" if put is not None else "GET", headers={
                "Authorization": f"Basic {login}",
                "Accept": "application/vnd.oci.image.manifest.v1+json",
                "Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(asked, timeout=RPC_WAIT) as answer:
            return bytes(answer.read())

    doc = json.loads(fetch("manifests/v1"))
    # As kit packs it: no kitfs table of contents, so mounts stream the compressed layers
    # and cache their layouts and chunks by layer digest.
    doc.get("annotations", {}).pop("dev.kitfs.toc.digest", None)
    manifest = json.dumps(doc).encode()
    fetch("manifests/plain", put=manifest)
    owner = driver.target("pod-owner")
    driver.publish(owner, secure_model.ref.replace(":v1", ":plain"),
                   secret=dockerconfig(host, "kitfs", password))
    (daemon,) = driver.daemons()
    sizes = {d["digest"]: d["size"] for d in [doc["config"], *doc["layers"]]}
    config = {doc["config"]["digest"]: fetch(f"blobs/{doc['config']['digest']}")}
    handler = type("Copy", (_ManifestCopy,), {"manifest": manifest,
                                              "sizes": sizes if claims_blobs else {},
                                              "blobs": config if claims_blobs else {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    intruder = driver.target("pod-intruder")
    try:
        evil = f"127.0.0.1:{server.server_address[1]}/evil/x:v1"
        assert read_all(owner / WEIGHTS) == secure_model.weights  # in the node's cache now
        if not claims_blobs:  # no blobs there: refused before any daemon starts
            status, message = code(lambda: driver.publish(intruder, evil, pod="intruder"))
            assert status == grpc.StatusCode.NOT_FOUND and "blob" in message
            assert find_mount(intruder) is None and not intruder.exists()
        else:  # a daemon of its own (another key): whatever it mounts, no private byte
            try:
                driver.publish(intruder, evil, pod="intruder")
            except grpc.RpcError:
                assert find_mount(intruder) is None and not intruder.exists()
            else:
                leaked = None
                with contextlib.suppress(OSError):
                    leaked = read_all(intruder / WEIGHTS)
                driver.unpublish(intruder)
                assert leaked is None, "the intruder read the private weights"
        assert [d.pid for d in driver.daemons()] == [daemon.pid]
    finally:
        server.shutdown()
        server.server_close()
        driver.unpublish(owner)
    assert driver.daemons() == []


class _Stalling(http.server.BaseHTTPRequestHandler):
    """A registry that holds every request until the test lets it answer (404)."""

    arrived: threading.Event
    release: threading.Event

    def do_GET(self) -> None:
        self.arrived.set()
        self.release.wait(RPC_WAIT)
        body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_retry_of_a_slow_publish_is_aborted_not_queued(driver: Driver) -> None:
    """kubelet retries a publish past its deadline: the retry answers ABORTED at once
    instead of holding a gRPC worker behind the first, which still finishes."""
    arrived, release = threading.Event(), threading.Event()
    handler = type("Stall", (_Stalling,), {"arrived": arrived, "release": release})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = driver.target("pod-slow")
    ref = f"127.0.0.1:{server.server_address[1]}/slow/model:v1"
    first: list[tuple[grpc.StatusCode, str]] = []
    thread = threading.Thread(target=lambda: first.append(code(lambda: driver.publish(
        target, ref, pod="slow"))))
    try:
        thread.start()
        assert arrived.wait(RPC_WAIT)
        status, message = code(lambda: driver.publish(target, ref, pod="slow"))
        assert status == grpc.StatusCode.ABORTED and "already in progress" in message
        status, message = code(lambda: driver.unpublish(target))
        assert status == grpc.StatusCode.ABORTED
        assert not release.is_set()  # both answered while the first still waits
    finally:
        release.set()
        thread.join()
        server.shutdown()
        server.server_close()
    assert first[0][0] == grpc.StatusCode.NOT_FOUND
    assert not target.exists() and driver.daemons() == []


def test_a_target_path_must_be_the_canonical_one(driver: Driver, model: Model,
                                                 tmp_path: Path) -> None:
    target = driver.target("pod-paths")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (target.parent / "link").symlink_to(elsewhere)
    (target.parents[1] / "linked-parent").symlink_to(target.parent)
    bad = [str(target.parent / "link"),  # the last component is a symlink
           str(target.parents[1] / "linked-parent" / "mount"),  # a symlink in the parents
           str(target.parent / ".." / target.parent.name / "mount"),
           str(target) + "/", "relative/mount"]
    for path in bad:
        status, message = code(lambda path=path: driver.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id(target), target_path=path, readonly=True,
                volume_capability=csi_pb2.VolumeCapability(mount={}),
                volume_context={"reference": model.ref}), timeout=RPC_WAIT))
        assert status == grpc.StatusCode.INVALID_ARGUMENT and "target_path" in message, path
        status, _ = code(lambda path=path: driver.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id(target), target_path=path),
            timeout=RPC_WAIT))
        assert status == grpc.StatusCode.INVALID_ARGUMENT, path
    assert list(elsewhere.iterdir()) == [] and find_mount(elsewhere) is None
    assert driver.daemons() == []


def test_a_bad_cache_size_is_refused_before_serving(tmp_path: Path) -> None:
    done = kitfs("csi", "--endpoint", str(tmp_path / "csi.sock"), "--cache-size", "12Q",
                 "--metrics-addr", "off")
    assert done.returncode == 2 and "12Q" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "csi.sock").exists()
