"""`kitfs mount` for real: a daemon process, a kernel mount, plain `os` calls through it.

Each test mounts the session registry's ModelKit with the real command line
and always leaves nothing behind (the `mounts` fixture detaches with
`fusermount3 -uz` and kills the daemon if a test failed half way).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import LONG_NAME, kitfs, make_project, source_files
from kitfs.mounts import find_mount, log_path, process_start_time, state_path
from registry import RegistryServer, free_port, running_registry

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
        reason="needs /dev/fuse and fusermount3",
    ),
]

@dataclass
class Kit:
    ref: str
    project: Path
    home: Path
    files: dict[str, str]  # path -> sha256, as `kit unpack` would write them (no Kitfile)


@pytest.fixture(scope="module")
def kit(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    root = tmp_path_factory.mktemp("fs-kit")
    project = make_project(root / "proj", weight_bytes=3 << 20)
    home = root / "home"
    home.mkdir()
    ref = f"{registry.host}/fs/tiny:v1"
    packed = kitfs("pack", str(project), "-t", ref, home=home)
    assert packed.returncode == 0, packed.stderr
    return Kit(ref, project, home, source_files(project))


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def pid_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_start_time(pid) is None:
            return True
        time.sleep(0.05)
    return False


@dataclass
class Mounted:
    path: Path
    pid: int


@dataclass
class Mounts:
    """Mounts made by one test, all torn down whatever the test did."""

    tmp: Path
    home: Path
    made: list[Path] = field(default_factory=list)

    def mountpoint(self, name: str = "mnt") -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        self.made.append(path)
        return path

    def mount(self, ref: str, *extra: str, name: str = "mnt") -> Mounted:
        path = self.mountpoint(name)
        proc = kitfs("mount", ref, str(path), "--cache-dir", str(self.tmp / "cache"), *extra,
                     home=self.home, timeout=60)
        assert proc.returncode == 0, proc.stderr
        info = find_mount(path)
        assert info is not None and info.fstype == "fuse.kitfs"
        state = json.loads(state_path(path).read_text())
        return Mounted(path, int(state["pid"]))

    def cleanup(self) -> None:
        for path in self.made:
            state = None
            if state_path(path).exists():
                state = json.loads(state_path(path).read_text())
            if find_mount(path) is not None:
                kitfs("umount", str(path), timeout=60)
            if find_mount(path) is not None:
                subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
            if state is not None and process_start_time(int(state["pid"])) is not None:
                os.kill(int(state["pid"]), signal.SIGKILL)
            state_path(path).unlink(missing_ok=True)
            log_path(path).unlink(missing_ok=True)


@pytest.fixture
def mounts(tmp_path: Path, kit: Kit) -> Iterator[Mounts]:
    helper = Mounts(tmp_path, kit.home)
    try:
        yield helper
    finally:
        helper.cleanup()


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_files_modes_and_bytes_match_the_source(kit: Kit, mounts: Mounts) -> None:
    start = time.monotonic()
    m = mounts.mount(kit.ref)
    ready_s = time.monotonic() - start
    assert ready_s < 15

    seen = {
        str(p.relative_to(m.path)): p for p in m.path.rglob("*") if p.is_file()
    }
    assert set(seen) == set(kit.files) | {"Kitfile"}
    for rel, digest in kit.files.items():
        assert sha256(seen[rel]) == digest, rel
        st = seen[rel].stat()
        assert st.st_size == (kit.project / rel).stat().st_size
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o444  # 0644 in the layer, write bits stripped
        assert st.st_nlink == 1 and st.st_uid == os.getuid()
    assert b"name: tiny" in (m.path / "Kitfile").read_bytes()
    assert sorted(os.listdir(m.path)) == ["Kitfile", "README.md", "data", "model"]
    root = m.path.stat()
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o555
    assert root.st_nlink == 4  # ., and data/ model/ each pointing back
    assert os.listdir(m.path / "model" / "nested" / "deeper") == [LONG_NAME]
    with pytest.raises(FileNotFoundError):
        (m.path / "model" / "missing.bin").stat()

    # the listing agrees with `kitfs ls`
    listing = kitfs("ls", kit.ref, "--json", home=kit.home)
    assert listing.returncode == 0, listing.stderr
    assert {e["path"] for e in json.loads(listing.stdout) if e["type"] == "file"} == set(seen)

    # mmap(MAP_SHARED) works (no direct_io) and serves the same bytes
    weights = m.path / "model" / "model.safetensors"
    with weights.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert hashlib.sha256(mm).hexdigest() == kit.files["model/model.safetensors"]
        assert mm[123456:123460] == (kit.project / "model/model.safetensors").read_bytes()[
            123456:123460]

    # the kernel's readahead for the mount was raised to 1 MiB
    info = find_mount(m.path)
    assert info is not None
    assert Path(f"/sys/class/bdi/{info.device}/read_ahead_kb").read_text().strip() == "1024"

    vfs = os.statvfs(m.path)
    assert vfs.f_flag & os.ST_RDONLY
    assert vfs.f_blocks * vfs.f_frsize >= sum((kit.project / r).stat().st_size for r in kit.files)


def test_several_processes_read_at_once(kit: Kit, mounts: Mounts) -> None:
    m = mounts.mount(kit.ref, "--prefetch", "none")
    target = m.path / "model" / "model.safetensors"
    code = ("import hashlib,sys;f=open(sys.argv[1],'rb');f.seek(int(sys.argv[2]));"
            "print(hashlib.sha256(f.read()).hexdigest())")
    size = target.stat().st_size
    offsets = [0, size // 3, size // 2, size - 4097]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), str(o)],
                              stdout=subprocess.PIPE, text=True) for o in offsets]
    data = (kit.project / "model" / "model.safetensors").read_bytes()
    for proc, offset in zip(procs, offsets, strict=True):
        out, _ = proc.communicate(timeout=60)
        assert out.strip() == hashlib.sha256(data[offset:]).hexdigest()


def test_every_write_fails_with_erofs(kit: Kit, mounts: Mounts) -> None:
    m = mounts.mount(kit.ref)
    target = m.path / "README.md"
    attempts = [
        lambda: open(target, "w"),  # noqa: SIM115
        lambda: open(target, "a"),  # noqa: SIM115
        lambda: open(target, "r+"),  # noqa: SIM115
        lambda: open(m.path / "new.txt", "w"),  # noqa: SIM115
        lambda: os.mkdir(m.path / "newdir"),
        lambda: os.unlink(target),
        lambda: os.rmdir(m.path / "data"),
        lambda: os.rename(target, m.path / "moved.md"),
        lambda: os.chmod(target, 0o777),
        lambda: os.symlink("README.md", m.path / "link"),
        lambda: os.truncate(target, 0),
        lambda: os.setxattr(target, "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, attempt
    assert sha256(target) == kit.files["README.md"]
    assert os.listxattr(target) == []


def test_small_memory_tier_still_serves_every_byte(kit: Kit, mounts: Mounts) -> None:
    m = mounts.mount(kit.ref, "--memory", "8M", "--prefetch", "all")
    for rel, digest in kit.files.items():
        assert sha256(m.path / rel) == digest, rel
    state = json.loads(state_path(m.path).read_text())
    assert state["status"]["engine"]["bytes_cached_memory"] <= 8 << 20


def test_filter_shows_only_the_model_layer(kit: Kit, mounts: Mounts) -> None:
    m = mounts.mount(kit.ref, "--filter", "model")
    seen = {str(p.relative_to(m.path)) for p in m.path.rglob("*") if p.is_file()}
    assert seen == {f for f in kit.files if f.startswith("model/")}
    assert sorted(os.listdir(m.path)) == ["model"]


def test_errors_before_mounting_are_one_line(kit: Kit, mounts: Mounts, tmp_path: Path,
                                             auth_registry: RegistryServer) -> None:
    def mount(ref: str, where: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return kitfs("mount", ref, str(where), "--cache-dir", str(tmp_path / "cache"),
                     *extra, home=kit.home, timeout=60)

    one_line_error(mount(kit.ref, tmp_path / "absent"), "does not exist")
    (tmp_path / "file").write_text("x")
    one_line_error(mount(kit.ref, tmp_path / "file"), "not a directory")
    full = mounts.mountpoint("full")
    (full / "keep.txt").write_text("x")
    one_line_error(mount(kit.ref, full), "not empty")

    empty = mounts.mountpoint("empty")
    one_line_error(mount("127.0.0.1:5000/UPPER/case:v1", empty), "UPPER")
    one_line_error(mount(f"{kit.ref.rsplit(':', 1)[0]}:never-pushed", empty), "never-pushed")
    start = time.monotonic()
    one_line_error(mount(f"127.0.0.1:{free_port()}/gone/away:v1", empty, "--timeout", "3"),
                   "127.0.0.1")
    assert time.monotonic() - start < 20
    one_line_error(mount(f"{auth_registry.host}/secure/x:v1", empty), auth_registry.host)
    one_line_error(mount(kit.ref, empty, "--cache-size", "lots"), "lots")
    one_line_error(mount(kit.ref, empty, "--memory", "1M"), "at least 8M")
    assert find_mount(empty) is None and not state_path(empty).exists()

    m = mounts.mount(kit.ref, name="busy")
    one_line_error(mount(kit.ref, m.path), "already a mount point")
    assert sha256(m.path / "README.md") == kit.files["README.md"]  # the first mount is fine


def test_status_then_umount_leaves_nothing(kit: Kit, mounts: Mounts) -> None:
    m = mounts.mount(kit.ref)
    assert sha256(m.path / "model" / "config.json") == kit.files["model/config.json"]
    time.sleep(1.2)  # one state refresh
    proc = kitfs("status", str(m.path), "--json")
    assert proc.returncode == 0, proc.stderr
    [doc] = json.loads(proc.stdout)
    assert doc["mountpoint"] == str(m.path) and doc["pid"] == m.pid
    assert doc["alive"] and doc["mounted"] and doc["reference"] == kit.ref
    assert doc["digest"].startswith("sha256:") and doc["files"] == len(kit.files) + 1
    assert doc["status"]["fs"]["reads"] >= 1 and "engine" in doc["status"]
    table = kitfs("status")
    assert table.returncode == 0 and str(m.path) in table.stdout and "mounted" in table.stdout

    done = kitfs("umount", str(m.path))
    assert done.returncode == 0, done.stderr
    assert "unmounted" in done.stdout
    assert find_mount(m.path) is None
    assert str(m.path) not in Path("/proc/mounts").read_text()
    assert pid_gone(m.pid)
    assert not state_path(m.path).exists()
    one_line_error(kitfs("umount", str(m.path)), "nothing is mounted")
    one_line_error(kitfs("status", str(m.path)), "no kitfs mount")


def test_kill_9_then_umount_cleans_up(kit: Kit, mounts: Mounts) -> None:
    m = mounts.mount(kit.ref)
    os.kill(m.pid, signal.SIGKILL)
    assert pid_gone(m.pid)
    with pytest.raises(OSError) as info:
        os.stat(m.path / "README.md")
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    proc = kitfs("status", str(m.path), "--json")
    [doc] = json.loads(proc.stdout)
    assert not doc["alive"] and doc["mounted"]
    done = kitfs("umount", str(m.path))
    assert done.returncode == 0, done.stderr
    assert "died" in done.stdout
    assert find_mount(m.path) is None and not state_path(m.path).exists()
    assert os.listdir(m.path) == []


def test_sigterm_unmounts_cleanly(kit: Kit, mounts: Mounts) -> None:
    m = mounts.mount(kit.ref)
    held = os.open(m.path / "README.md", os.O_RDONLY)  # an open file does not block it
    os.kill(m.pid, signal.SIGTERM)
    assert pid_gone(m.pid)
    with contextlib.suppress(OSError):  # its last close may see ENOTCONN: the daemon is gone
        os.close(held)
    assert find_mount(m.path) is None
    assert not state_path(m.path).exists()
    assert not log_path(m.path).exists()  # a clean run keeps no log


def test_foreground_mount_notifies_systemd_and_stops_on_ctrl_c(
    kit: Kit, mounts: Mounts
) -> None:
    """What kitfs-mount@.service runs: `--foreground` as a Type=notify service."""
    path = mounts.mountpoint("fg")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(mounts.tmp / "notify.sock"))
    notify.settimeout(30)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kitfs.cli", "mount", kit.ref, str(path), "--foreground",
         "--cache-dir", str(mounts.tmp / "cache"), "--config", str(kit.home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, NOTIFY_SOCKET=str(mounts.tmp / "notify.sock")),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("mounted "), first + proc.stderr.read()
        assert notify.recv(4096).startswith(b"READY=1\n")
        assert sha256(path / "data" / "train.csv") == kit.files["data/train.csv"]
        proc.send_signal(signal.SIGINT)
        assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=20) == 0
        assert find_mount(path) is None
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()


def test_dead_registry_gives_eio_within_seconds(kit: Kit, mounts: Mounts,
                                                tmp_path: Path) -> None:
    with running_registry(tmp_path / "reg") as private:
        ref = f"{private.host}/dies/tiny:v1"
        packed = kitfs("pack", str(kit.project), "-t", ref, home=kit.home)
        assert packed.returncode == 0, packed.stderr
        m = mounts.mount(ref, "--prefetch", "none", "--timeout", "3")
        assert sha256(m.path / "README.md") == kit.files["README.md"]
        private.stop()
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            sha256(m.path / "model" / "model.safetensors")
        assert info.value.errno == errno.EIO
        assert time.monotonic() - start < 15
        assert sha256(m.path / "README.md") == kit.files["README.md"]  # cached pages still serve


def test_umount_does_not_wait_for_a_hung_registry(kit: Kit, mounts: Mounts,
                                                  tmp_path: Path) -> None:
    """A registry that accepts and never answers: the blocked reader fails, umount is prompt."""
    with running_registry(tmp_path / "reg") as private:
        ref = f"{private.host}/hangs/tiny:v1"
        packed = kitfs("pack", str(kit.project), "-t", ref, home=kit.home)
        assert packed.returncode == 0, packed.stderr
        m = mounts.mount(ref, "--prefetch", "none", "--timeout", "60")
        os.kill(private.process.pid, signal.SIGSTOP)
        try:
            reader = subprocess.Popen(["cat", str(m.path / "model" / "model.safetensors")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            assert reader.poll() is None  # stuck in the daemon, waiting for the registry
            start = time.monotonic()
            done = kitfs("umount", str(m.path))
            assert done.returncode == 0, done.stderr
            assert time.monotonic() - start < 10
            assert reader.wait(timeout=10) != 0  # failed (ENOTCONN), did not hang
            assert find_mount(m.path) is None and pid_gone(m.pid)
        finally:
            os.kill(private.process.pid, signal.SIGCONT)
