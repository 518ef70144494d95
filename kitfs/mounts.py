"""Mount bookkeeping shared by the daemon and the CLI: state files, mount table, unmount.

Each daemon writes one JSON state file, named by a hash of its absolute
mountpoint, under `/run/kitfs/` (root) or `$XDG_RUNTIME_DIR/kitfs/`. It says
who serves the mount (pid and process start time, so a recycled pid is not
mistaken for the daemon), what is mounted, and the engine's counters,
refreshed about every second. `kitfs status` reads these files; `kitfs
umount` uses them to find the daemon to stop, and cleans up after a daemon
that was killed (its mount is left dead: every access says ENOTCONN).

A daemon started by `kitfs mount` logs to `<key>.log` beside its state file
and deletes that log when it ends cleanly with nothing to report. A log still
there when the mountpoint is cleaned up or mounted again was kept for a
reason (a crash, warnings), so it is moved to `<key>.log.1` first: the next
daemon appends to `<key>.log`, and its clean end would delete both.

The kernel's mount table (`/proc/self/mountinfo`) is read directly rather
than stat()ing mountpoints: a stat of a dead FUSE mount fails, and a stat of
a live one from inside the daemon before its loop runs would deadlock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kitfs.cache.memory import DEFAULT_MEMORY_TIER_BYTES
from kitfs.engine.api import PrefetchMode, VerifyMode
from kitfs.errors import KitfsError
from kitfs.oci.options import ClientOptions
from kitfs.signing.flags import MOUNT_FLAGS, SignatureFlags

log = logging.getLogger(__name__)

FS_TYPE = "fuse.kitfs"
STATE_SUFFIX = ".json"
LOG_SUFFIX = ".log"
KEPT_LOG_SUFFIX = ".1"


class MountError(KitfsError):
    """A mountpoint that cannot be mounted on or unmounted, or a daemon that failed."""


# -- where things live --------------------------------------------------------------


# What one mount is asked to be; lives here (not in daemon.py) so that `kitfs mount`
# can build it and start the daemon without importing pyfuse3 and the engine.
@dataclass(frozen=True)
class MountConfig:
    reference: str
    mountpoint: Path  # absolute
    cache_dir: Path
    client: ClientOptions = field(default_factory=ClientOptions)
    filters: tuple[str, ...] = ()
    prefetch: PrefetchMode = "model"
    cache_size: int | None = None  # bytes; None: no budget
    memory: int = DEFAULT_MEMORY_TIER_BYTES  # the daemon's in-memory chunk tier, bytes
    verify: VerifyMode = "lazy"
    allow_other: bool = False
    foreground: bool = False
    #: Kernel readahead for the mount; sets the size of FUSE read requests (design.md).
    read_ahead_kb: int = 1024
    #: Bound on one FUSE request: past it the reader gets EIO.
    request_timeout: float = 30.0
    log_file: Path | None = None
    #: HOST:PORT the daemon serves Prometheus metrics on (kitfs/metrics.py); None: off.
    metrics_addr: str | None = None
    #: Who must have signed (kitfs/enforcement.py; the node's policy file applies as well).
    signature: SignatureFlags = field(default_factory=SignatureFlags)


def state_dir() -> Path:
    """Per-user runtime directory: tmpfs, gone at reboot along with every mount."""
    if os.geteuid() == 0:
        return Path("/run/kitfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "kitfs"
    return Path(tempfile.gettempdir()) / f"kitfs-{os.geteuid()}"


def default_cache_dir() -> Path:
    """`$KITFS_CACHE_DIR`, else the node-wide cache for root, else the user's cache."""
    env = os.environ.get("KITFS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if os.geteuid() == 0:
        return Path("/var/cache/kitfs")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kitfs"


def absolute_mountpoint(path: str | os.PathLike[str]) -> Path:
    """The canonical absolute mountpoint; the last component is never resolved.

    Resolving it would stat the mountpoint itself, which fails on a dead FUSE
    mount (ENOTCONN) exactly when `umount` needs the path.
    """
    p = Path(os.path.abspath(os.fspath(path)))
    if p.parent == p:
        return p
    return Path(os.path.realpath(p.parent)) / p.name


def state_key(mountpoint: Path) -> str:
    return hashlib.sha256(os.fsencode(str(mountpoint))).hexdigest()[:20]


def state_path(mountpoint: Path) -> Path:
    return state_dir() / (state_key(mountpoint) + STATE_SUFFIX)


def log_path(mountpoint: Path) -> Path:
    return state_dir() / (state_key(mountpoint) + LOG_SUFFIX)


def kept_log_path(mountpoint: Path) -> Path:
    """Where the log of the previous daemon at `mountpoint` is kept (one generation)."""
    return state_dir() / (state_key(mountpoint) + LOG_SUFFIX + KEPT_LOG_SUFFIX)


def keep_earlier_log(mountpoint: Path) -> Path | None:
    """Move a log an earlier daemon left at `mountpoint` out of the next daemon's way.

    Returns where it went, or None when there was nothing worth keeping (no log,
    an empty one) or it could not be moved (then the next daemon appends to it).
    """
    current, kept = log_path(mountpoint), kept_log_path(mountpoint)
    try:
        if current.stat().st_size == 0:
            return None
        os.replace(current, kept)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("could not keep the earlier log %s as %s: %s", current, kept, exc.strerror)
        return None
    return kept


# -- processes ----------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (None if it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: fields resume after the last ')'
    fields = raw[raw.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def daemon_alive(pid: int, start_time: int | None) -> bool:
    started = process_start_time(pid)
    return started is not None and (start_time is None or started == start_time)


# -- the mount table ----------------------------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    device: str  # "major:minor": names the mount's backing device info in /sys/class/bdi
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field_:
        return field_
    raw = field_.encode()
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mount_table() -> list[MountInfo]:
    try:
        text = Path("/proc/self/mountinfo").read_text(errors="surrogateescape")
    except OSError as exc:
        raise MountError(f"cannot read the mount table: {exc.strerror}") from None
    mounts: list[MountInfo] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if not sep or len(parts) < 5 or len(rparts) < 2:
            continue
        mounts.append(MountInfo(_unescape(parts[4]), parts[2], rparts[0], _unescape(rparts[1])))
    return mounts


def find_mount(mountpoint: Path) -> MountInfo | None:
    """The topmost mount at exactly `mountpoint`, if any."""
    found = None
    for info in mount_table():
        if info.mountpoint == str(mountpoint):
            found = info
    return found


# -- checks before mounting ---------------------------------------------------------


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse, in one line, every mountpoint a mount would fail on or hide data behind."""
    existing = find_mount(mountpoint)
    if existing is not None and existing.fstype == "autofs":
        # systemd's automount (x-systemd.automount) waits at the mountpoint for exactly
        # this mount; looking inside would wait on that automount: a deadlock.
        return
    if existing is not None:
        what = "a kitfs mount" if existing.fstype == FS_TYPE else f"a {existing.fstype} mount"
        hint = f" (unmount it first: kitfs umount {mountpoint})" if existing.fstype == FS_TYPE \
            else ""
        raise MountError(f"{mountpoint} is already a mount point: {what}{hint}")
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist (create it first)") from None
    except OSError as exc:
        raise MountError(f"cannot use mountpoint {mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    try:
        with os.scandir(mountpoint) as it:
            if next(it, None) is not None:
                raise MountError(
                    f"mountpoint {mountpoint} is not empty (a mount would hide its files)"
                )
    except PermissionError:
        raise MountError(f"cannot read mountpoint {mountpoint}: permission denied") from None
    if not os.access(mountpoint, os.W_OK | os.X_OK) and os.geteuid() != 0:
        raise MountError(f"mountpoint {mountpoint} is not writable by you (FUSE needs that)")


# -- state files --------------------------------------------------------------------


@dataclass
class MountState:
    pid: int
    start_time: int | None  # of the daemon process, in clock ticks since boot
    reference: str
    digest: str
    mountpoint: str
    cache_dir: str
    log: str | None
    started: float  # Unix time
    files: int = 0
    size: int = 0
    filters: list[str] = field(default_factory=list)
    #: Set when the registry was unreachable and the mount opened what `kitfs cache warm`
    #: kept (kitfs/offline.py): says so, and as resolved when.
    offline: str | None = None
    updated: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    #: What each signature check that passed vouched for (empty: none was required).
    signatures: list[str] = field(default_factory=list)
    #: The digests of the parent ModelKits served (model.path), nearest first: what the
    #: CSI driver compares with the parents it checked. None: an older daemon's state.
    parents: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MountState:
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        return cls(**known)

    @property
    def alive(self) -> bool:
        return daemon_alive(self.pid, self.start_time)


def write_state(state: MountState) -> None:
    """Atomically (temp + rename): a reader sees the old or the new file, never half."""
    path = state_path(Path(state.mountpoint))
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state.to_json(), separators=(",", ":")))
    os.replace(tmp, path)


def read_state(mountpoint: Path) -> MountState | None:
    return _load(state_path(mountpoint))


def _load(path: Path) -> MountState | None:
    try:
        doc = json.loads(path.read_text())
        return MountState.from_json(doc) if isinstance(doc, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def remove_state(mountpoint: Path, pid: int | None = None) -> None:
    """Remove the state file (only if it is `pid`'s, when given: a newer mount may own it)."""
    path = state_path(mountpoint)
    if pid is not None:
        current = _load(path)
        if current is not None and current.pid != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def all_states() -> list[MountState]:
    directory = state_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    states = []
    for name in names:
        if name.endswith(STATE_SUFFIX) and not name.startswith("."):
            state = _load(directory / name)
            if state is not None:
                states.append(state)
    return sorted(states, key=lambda s: s.mountpoint)


# -- unmounting ---------------------------------------------------------------------


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def detach(mountpoint: Path) -> None:
    """Unmount without a daemon: fusermount3 -u, then lazily (-z) if something holds it."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    attempts: list[list[str]] = []
    if tool is not None:
        attempts = [[tool, "-u", "-q", str(mountpoint)], [tool, "-u", "-z", "-q", str(mountpoint)]]
    elif os.geteuid() == 0:
        attempts = [["umount", str(mountpoint)], ["umount", "-l", str(mountpoint)]]
    last = "no fusermount3 found"
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 or find_mount(mountpoint) is None:
            return
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    raise MountError(f"cannot unmount {mountpoint}: {last}")


def _is_kitfs(info: MountInfo | None) -> bool:
    return info is not None and info.fstype == FS_TYPE


def umount(mountpoint: Path, timeout: float = 20.0) -> str:
    """Stop the daemon serving `mountpoint` (or clean up after a dead one); a one-line report."""
    state = read_state(mountpoint)
    info = find_mount(mountpoint)
    if info is not None and not _is_kitfs(info):
        raise MountError(f"{mountpoint} is not a kitfs mount (it is {info.fstype})")
    if state is not None and state.alive:
        try:
            os.kill(state.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise MountError(
                f"not allowed to stop the kitfs daemon (pid {state.pid}) serving {mountpoint}"
            ) from None
        if not _wait(lambda: not state.alive, timeout):
            raise MountError(
                f"the kitfs daemon (pid {state.pid}) did not exit within {timeout:g}s; "
                f"see {state.log or 'its log'}"
            )
        if _is_kitfs(find_mount(mountpoint)):  # it died without unmounting
            detach(mountpoint)
        remove_state(mountpoint, state.pid)
        return f"unmounted {mountpoint}"
    if info is None and state is None:
        raise MountError(f"nothing is mounted at {mountpoint}")
    if info is not None:
        detach(mountpoint)
    remove_state(mountpoint)
    kept = keep_earlier_log(mountpoint)
    where = f"; its log is kept at {kept}" if kept is not None else ""
    if state is not None:
        return (f"unmounted {mountpoint} (its daemon, pid {state.pid}, had died; "
                f"cleaned up{where})")
    return f"unmounted {mountpoint} (no daemon was serving it{where})"


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def ensure_state_dir() -> Path:
    directory = state_dir()
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise MountError(f"cannot create {directory}: {exc.strerror}") from None
    return directory


# -- starting a daemon --------------------------------------------------------------

READY = "ready"


class ReadyPipe:
    """The daemon's half of the start-up handshake: one line, `ready` or `error CODE TEXT`.

    The parent (`kitfs mount`) waits on it, so the command returns only once
    the mount answers, and relays a failure before mounting as its own
    one-line error with the same exit status.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @property
    def pending(self) -> bool:
        return self._fd is not None

    def ready(self) -> None:
        self._send(READY)

    def failed(self, exit_code: int, message: str, kind: str | None = None) -> None:
        """`kind`: the error's class in kitfs.errors, sent as `error CODE/KIND TEXT` so
        that a driver can answer a registry outage differently from a bad request; a
        reader that knows no kinds still finds the exit status before the slash."""
        self._send(f"error {exit_code}{'/' + kind if kind else ''} {message}")

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, (" ".join(line.split("\n")) + "\n").encode())
        except OSError:
            pass  # the parent is gone (Ctrl-C): nobody to tell
        finally:
            os.close(fd)


def _read_line(fd: int, deadline: float | None = None) -> str | None:
    """The line on `fd` (what came before EOF, if no newline); None once `deadline`
    (time.monotonic()) passes first."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    while not data.endswith(b"\n"):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
        piece = os.read(fd, 4096)
        if not piece:
            break
        data += piece
    return data.decode(errors="replace").strip()


def daemon_argv(
    config: MountConfig, *, kitops_home: str | None = None, verbose: int = 0
) -> list[str]:
    """The `kitfs mount --foreground` command line a background daemon for `config` runs
    (start_daemon adds --ready-fd); `kitfs mount` and the CSI driver both start daemons."""

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else None

    argv = ["mount", config.reference, str(config.mountpoint), "--foreground",
            "--cache-dir", str(config.cache_dir), "--prefetch", config.prefetch,
            "--verify", config.verify, "--timeout", repr(config.client.read_timeout),
            "--memory", str(config.memory),
            "--tls-verify", "true" if config.client.tls_verify else "false"]
    if config.cache_size is not None:
        argv += ["--cache-size", str(config.cache_size)]
    for text in config.filters:
        argv += ["--filter", text]
    if config.allow_other:
        argv.append("--allow-other")
    if config.metrics_addr is not None:
        argv += ["--metrics-addr", config.metrics_addr]
    if config.client.plain_http:
        argv.append("--plain-http")
    for flag, value in (("--ca-file", config.client.ca_file), ("--cert", config.client.cert_file),
                        ("--key", config.client.key_file), ("--config", kitops_home),
                        ("--hosts-dir", config.client.hosts_dir)):
        if value:
            argv += [flag, str(absolute(value))]
    sig = config.signature
    for flag, value in ((MOUNT_FLAGS.key, sig.key), (MOUNT_FLAGS.identity, sig.identity),
                        (MOUNT_FLAGS.issuer, sig.issuer),
                        (MOUNT_FLAGS.trusted_root, sig.trusted_root)):
        if value:
            argv += [flag, value]
    if sig.ignore_tlog:
        argv.append(MOUNT_FLAGS.ignore_tlog)
    if verbose:
        argv.append("-" + "v" * verbose)
    return argv


@dataclass
class Starting:
    """A daemon spawned and not yet awaited: the end of its ready pipe is ours to read."""

    process: subprocess.Popen[bytes]
    ready_fd: int
    logfile: Path


#: How long a daemon that missed its start deadline gets to unmount after SIGTERM.
STOP_GRACE = 5.0


def spawn_daemon(argv: Sequence[str], mountpoint: Path,
                 env: Mapping[str, str] | None = None) -> Starting:
    """Run `python -m kitfs.cli mount --foreground ...` detached, in a session of its own,
    logging to the mountpoint's log; a MountError when it cannot be run at all."""
    ensure_state_dir()
    logfile = log_path(mountpoint)
    r, w = os.pipe()
    try:
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kitfs.cli", *argv, "--ready-fd", str(w)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(w,),
                start_new_session=True, cwd="/", env=env,
            )
    except OSError as exc:
        os.close(r)
        raise MountError(f"cannot start the kitfs daemon: {exc.strerror}") from None
    finally:
        os.close(w)
    return Starting(proc, r, logfile)


def _stop_starting(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM to the daemon's session (it unmounts if it got that far), SIGKILL after
    STOP_GRACE; its exit status, collected."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def await_daemon(starting: Starting, timeout: float | None = None) -> str:
    """The daemon's one line: its own (`ready`, or `error CODE TEXT` from its ReadyPipe),
    or one made here in the same form when it died before saying anything or said
    nothing within `timeout` seconds (then it is stopped and collected)."""
    proc, logfile = starting.process, starting.logfile
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        line = _read_line(starting.ready_fd, deadline)
    except BaseException:
        proc.terminate()  # Ctrl-C while waiting: the daemon unmounts if it got that far
        raise
    finally:
        os.close(starting.ready_fd)
    if line is None:
        stopped = _stop_starting(proc)
        log.warning("the kitfs daemon (pid %d) was not ready within %gs; stopped it "
                    "(exit status %d)", proc.pid, timeout, stopped)
        return (f"error 1 the kitfs daemon was not ready within {timeout:g}s and was "
                f"stopped (log: {logfile})")
    if line == READY or line.startswith("error "):
        return line
    try:
        status: int | None = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        status = None
    tail = _log_tail(logfile)
    message = (f"the kitfs daemon exited (status {status}) before the mount was ready"
               + (f": {tail}" if tail else "") + f" (log: {logfile})")
    return f"error {status if status and status > 0 else 1} {' '.join(message.split())}"


def launch_daemon(argv: Sequence[str], mountpoint: Path,
                  env: Mapping[str, str] | None = None,
                  timeout: float | None = None) -> tuple[str, Path | None]:
    """Start a daemon (spawn_daemon) and wait for its one line (await_daemon), so that a
    caller in another process reads exactly what start_daemon would. The daemon gets
    `env`, or this process's environment (HTTP_PROXY and the like included, so it
    reaches the registry as the command did). Also returns where the log an earlier
    daemon at this mountpoint left was kept (see keep_earlier_log), if it left one.
    """
    ensure_state_dir()
    earlier = keep_earlier_log(mountpoint)
    try:
        starting = spawn_daemon(argv, mountpoint, env)
    except MountError as exc:
        return f"error 1 {exc}", earlier
    return await_daemon(starting, timeout), earlier


def daemon_result(line: str, mountpoint: Path) -> MountState:
    """The state of the daemon that said `line` (launch_daemon's), or its failure raised as
    a MountError with the daemon's exit status."""
    if line == READY:
        state = read_state(mountpoint)
        if state is None:
            raise MountError(f"the kitfs daemon reported ready but wrote no state; see "
                             f"{log_path(mountpoint)}")
        return state
    if not line.startswith("error "):
        raise MountError(f"unexpected answer from the kitfs daemon: {line[:200]!r}")
    _, status, message = [*line.split(" ", 2), "", ""][:3]
    code, _, kind = status.partition("/")
    error = _daemon_error(kind, message or "the kitfs daemon failed")
    error.exit_code = int(code) if code.isdigit() else 1
    raise error


def _daemon_error(kind: str, message: str) -> KitfsError:
    """The daemon's error as its own class (kitfs.errors names it), else a MountError."""
    from kitfs import errors

    found = getattr(errors, kind, None) if kind.isidentifier() else None
    if isinstance(found, type) and issubclass(found, KitfsError):
        try:
            return found(message)
        except TypeError:  # a class that needs more than a message
            pass
    return MountError(message)


def start_daemon(
    argv: Sequence[str], mountpoint: Path, env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> tuple[MountState, Path | None]:
    """Start a daemon here and return once it is mounted: its state and the earlier log
    kept (launch_daemon); its failure raised as a MountError. `timeout`: a daemon silent
    that long is stopped and that is the failure (None: wait as long as it lives)."""
    line, earlier = launch_daemon(argv, mountpoint, env, timeout)
    return daemon_result(line, mountpoint), earlier
