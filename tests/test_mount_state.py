"""Mount bookkeeping without FUSE: the mount table, mountpoint checks, state files, daemons."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import kitfs, make_project
from kitfs import mounts
from kitfs.errors import BadReferenceError, KitfsError, UnreachableError
from kitfs.mounts import MountError, MountState
from mounting import mounted
from registry import RegistryServer


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    monkeypatch.setattr(mounts, "state_dir", lambda: directory)
    return directory


def state(mountpoint: Path, pid: int | None = None) -> MountState:
    pid = os.getpid() if pid is None else pid
    return MountState(pid=pid, start_time=mounts.process_start_time(pid), reference="r/x:v1",
                      digest="sha256:" + "0" * 64, mountpoint=str(mountpoint),
                      cache_dir="/c", log=None, started=1.0)


def test_mountinfo_escapes_and_lookup() -> None:
    assert mounts._unescape(r"/mnt/with\040space\011tab\134back") == "/mnt/with space\ttab\\back"
    assert mounts._unescape("/plain") == "/plain"
    table = mounts.mount_table()
    assert any(m.mountpoint == "/" for m in table)
    proc = mounts.find_mount(Path("/proc"))
    assert proc is not None and proc.fstype == "proc" and ":" in proc.device


def test_absolute_mountpoint_does_not_touch_the_last_component(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert mounts.absolute_mountpoint(tmp_path / "link" / "mnt") == tmp_path / "real" / "mnt"
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert mounts.absolute_mountpoint("real/mnt") == tmp_path / "real" / "mnt"
    finally:
        os.chdir(here)


def test_mountpoint_checks(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="does not exist"):
        mounts.check_mountpoint(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MountError, match="not a directory"):
        mounts.check_mountpoint(tmp_path / "file")
    with pytest.raises(MountError, match="not empty"):
        mounts.check_mountpoint(tmp_path)
    with pytest.raises(MountError, match="already a mount point: a proc mount"):
        mounts.check_mountpoint(Path("/proc"))
    (tmp_path / "empty").mkdir()
    mounts.check_mountpoint(tmp_path / "empty")


def test_state_files_round_trip(state_dir: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    assert mounts.read_state(mp) is None and mounts.all_states() == []
    s = state(mp)
    s.status = {"engine": {"reads": 3}}
    mounts.write_state(s)
    assert mounts.state_path(mp).parent == state_dir
    loaded = mounts.read_state(mp)
    assert loaded == s and loaded.alive
    assert [x.mountpoint for x in mounts.all_states()] == [str(mp)]
    assert not list(state_dir.glob(".*"))  # no temp files left behind
    mounts.remove_state(mp, pid=os.getpid() + 1)  # someone else's: kept
    assert mounts.read_state(mp) is not None
    mounts.remove_state(mp, pid=os.getpid())
    assert mounts.read_state(mp) is None
    (state_dir / "junk.json").write_text("{not json")
    assert mounts.all_states() == []


def test_dead_and_recycled_pids_are_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert mounts.process_start_time(child.pid) is None
    assert not mounts.daemon_alive(child.pid, None)
    me = mounts.process_start_time(os.getpid())
    assert me is not None and mounts.daemon_alive(os.getpid(), me)
    assert not mounts.daemon_alive(os.getpid(), me + 1)  # same pid, another process


def test_umount_of_nothing_and_of_a_stale_state(state_dir: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    with pytest.raises(MountError, match="nothing is mounted"):
        mounts.umount(mp)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = state(mp)
    stale.pid, stale.start_time = child.pid, 1
    mounts.write_state(stale)
    assert "died" in mounts.umount(mp)
    assert mounts.read_state(mp) is None
    with pytest.raises(MountError, match="not a kitfs mount"):
        mounts.umount(Path("/proc"))


def test_a_daemons_failure_keeps_its_error_class(tmp_path: Path) -> None:
    """The CSI driver answers a registry outage UNAVAILABLE, a bad reference INVALID_ARGUMENT:
    the class the daemon failed with travels on its ready line, the exit status first."""
    r, w = os.pipe()
    mounts.ReadyPipe(w).failed(1, "registry gone", "UnreachableError")
    line = mounts._read_line(r)
    os.close(r)
    assert line == "error 1/UnreachableError registry gone"
    with pytest.raises(UnreachableError, match=r"^registry gone$") as failure:
        mounts.daemon_result(line, tmp_path)
    assert failure.value.exit_code == 1
    for line, exit_code in (("error 2 bad flag", 2), ("error 1/NoSuchClass x", 1),
                            ("error 1/__import__ x", 1), ("error 4/MountError x", 4)):
        with pytest.raises(KitfsError) as failure:
            mounts.daemon_result(line, tmp_path)
        assert type(failure.value) is MountError and failure.value.exit_code == exit_code
    with pytest.raises(BadReferenceError):
        mounts.daemon_result("error 2/BadReferenceError no such thing", tmp_path)


def test_ready_pipe_protocol(state_dir: Path, tmp_path: Path) -> None:
    r, w = os.pipe()
    mounts.ReadyPipe(w).failed(3, "registry said no\nreally")
    assert mounts._read_line(r) == "error 3 registry said no really"
    os.close(r)
    r, w = os.pipe()
    pipe = mounts.ReadyPipe(w)
    pipe.ready()
    pipe.failed(1, "ignored: the line is sent once")
    assert not pipe.pending
    assert mounts._read_line(r) == "ready"
    os.close(r)


def test_start_daemon_relays_the_daemons_error(state_dir: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    # the child is the real CLI: a bad reference fails in it exactly as in the parent
    with pytest.raises(BadReferenceError, match="UPPER") as info:
        mounts.start_daemon(["mount", "127.0.0.1:1/UPPER:v1", str(mp), "--foreground"], mp)
    assert info.value.exit_code == 2
    assert mounts.read_state(mp) is None


def test_umount_after_a_crash_keeps_the_dead_daemons_log(state_dir: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = state(mp)
    stale.pid, stale.start_time = child.pid, 1
    mounts.write_state(stale)
    mounts.log_path(mp).write_text("the last words of a daemon\n")
    report = mounts.umount(mp)
    kept = mounts.kept_log_path(mp)
    assert "died" in report and f"its log is kept at {kept}" in report
    assert kept.read_text() == "the last words of a daemon\n"
    assert not mounts.log_path(mp).exists()  # the next daemon starts a log of its own
    # an empty log says nothing: nothing is moved, and an older kept log stays
    mounts.log_path(mp).write_text("")
    assert mounts.keep_earlier_log(mp) is None
    assert kept.read_text() == "the last words of a daemon\n"


def _daemon_pid(mountpoint: Path) -> int:
    return int(json.loads(mounts.state_path(mountpoint).read_text())["pid"])


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while mounts.process_start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.fuse
@pytest.mark.registry
@pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                    reason="needs /dev/fuse and fusermount3")
def test_a_crashed_daemons_log_outlives_the_next_clean_mount(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A daemon deletes its log when it ends cleanly; the next daemon at a mountpoint
    appends to the log the last one left, so a crashed daemon's log went with it."""
    project = make_project(tmp_path / "p", weight_bytes=4096)
    ref = f"{registry.host}/mounts/crash-log:v1"
    assert kitfs("pack", str(project), "-t", ref, home=tmp_path / "h").returncode == 0
    mp, cache = tmp_path / "mnt", tmp_path / "cache"
    kept = mounts.kept_log_path(mp)
    try:
        # killed, then cleaned up with `kitfs umount` (as the `mounted` helper does on exit)
        with mounted(ref, mp, cache, "-v", home=tmp_path / "h"):
            first = _daemon_pid(mp)
            os.kill(first, signal.SIGKILL)
            assert _gone(first)
        assert f"kitfs[{first}]" in kept.read_text()
        with mounted(ref, mp, cache, home=tmp_path / "h"):
            pass  # a clean run: its own log goes, the crashed daemon's stays
        assert not mounts.log_path(mp).exists()
        assert f"kitfs[{first}]" in kept.read_text()

        # killed, and its dead mount detached by hand: the next mount keeps the log
        with mounted(ref, mp, cache, "-v", home=tmp_path / "h"):
            second = _daemon_pid(mp)
            os.kill(second, signal.SIGKILL)
            assert _gone(second)
            subprocess.run(["fusermount3", "-uz", str(mp)], check=True)
            again = kitfs("mount", ref, str(mp), "--cache-dir", str(cache),
                          home=tmp_path / "h")
            assert again.returncode == 0, again.stderr
            assert f"earlier log of the previous daemon here kept at {kept}" in again.stdout
        assert f"kitfs[{second}]" in kept.read_text()
        assert not mounts.log_path(mp).exists()
    finally:
        kept.unlink(missing_ok=True)
        mounts.log_path(mp).unlink(missing_ok=True)
