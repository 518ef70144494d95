"""`kitfs csi mounter`: the process that owns the mount daemons, outside the driver.

The CSI driver's container is upgraded, OOM-killed and restarted like any
other; every process in it dies with it. So, as mountpoint-s3's CSI driver
does with its mountpoint pods, the daemons are started by a second, rarely
changed process in its own DaemonSet: the driver sends it a request over a
root-only Unix socket and it starts `kitfs mount --foreground` as its own
child (launch_daemon, the same code `kitfs mount` and the driver use), then
answers with the daemon's one ready line. Both pods run with hostPID and
share /run/kitfs, so the driver sees each daemon's state file and stops it
by pid (kitfs.mounts.umount) as if it had started it; the mounter reaps it.

The protocol, one request per connection: the client sends one JSON line
{"argv": ["mount", ...], "env": {...} | null, "mountpoint": "..."} and reads
one line back, `ready` or `error CODE TEXT`, exactly the ReadyPipe line
start_daemon reads. The mounter runs nothing but a well-formed daemon
`kitfs mount ... --foreground` whose mountpoint is the one named; the
environment (it may hold a proxy password) is never logged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from kitfs.errors import UsageError
from kitfs.mounts import (
    MountError,
    MountState,
    absolute_mountpoint,
    daemon_result,
    launch_daemon,
)

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "unix:///run/kitfs/mounter.sock"
#: A request is a command line and an environment: far below this.
MAX_REQUEST = 1 << 20
#: For the request to arrive once connected; the daemon's start is not bounded here.
REQUEST_WAIT = 30.0
CONNECT_WAIT = 10.0
#: How long the driver waits for a daemon's ready line (resolving, fetching the
#: manifest and mounting take seconds; kubelet retries a publish that fails).
LAUNCH_WAIT = 300.0
#: How often the mounter collects daemons that ended (between connections).
REAP_INTERVAL = 0.5
#: The exit status of a refused request, as kitfs gives bad usage.
REFUSED = 2


class MounterUnavailable(MountError):
    """The mounter does not answer: the driver cannot start daemons (publish waits)."""


class Refused(Exception):
    """A request the mounter will not run; the message names what is wrong, not the env."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Refused(message)


def _mount_parser() -> argparse.ArgumentParser:
    """`kitfs mount`'s own parser: a request is checked as the daemon will read it."""
    from kitfs.cli import add_global_options
    from kitfs.commands import mount

    parser = _Parser(prog="kitfs mount", add_help=False)
    add_global_options(parser)
    mount.COMMAND.add_arguments(parser)
    return parser


def check_request(request: object) -> tuple[list[str], dict[str, str] | None, Path]:
    """The argv, env and mountpoint of a request that is a daemon mount, or Refused."""
    if not isinstance(request, dict) or set(request) != {"argv", "env", "mountpoint"}:
        raise Refused("a request is {\"argv\": [...], \"env\": {...} or null, "
                      "\"mountpoint\": \"...\"}")
    argv, env, mountpoint = request["argv"], request["env"], request["mountpoint"]
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise Refused("argv is not a list of strings")
    if not argv or argv[0] != "mount":
        raise Refused(f"only `kitfs mount` is run, not {argv[:1]}")
    if env is not None and not (isinstance(env, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise Refused("env is not an object of strings")
    if not isinstance(mountpoint, str) or not os.path.isabs(mountpoint):
        raise Refused("mountpoint is not an absolute path")
    args = _mount_parser().parse_args(argv[1:])
    if not args.foreground:
        raise Refused("a daemon runs with --foreground")
    if args.ready_fd is not None or args.check_only:
        raise Refused("--ready-fd and --check-only are the mounter's to give")
    if absolute_mountpoint(args.mountpoint) != absolute_mountpoint(mountpoint):
        raise Refused(f"argv mounts {args.mountpoint}, not the mountpoint {mountpoint}")
    return argv, env, absolute_mountpoint(mountpoint)


# -- the client (the driver) -----------------------------------------------------------


def _recv_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        piece = conn.recv(65536)
        if not piece:
            break
        data += piece
    return data.partition(b"\n")[0]


def request_daemon(path: Path, argv: Sequence[str], mountpoint: Path,
                   env: Mapping[str, str] | None) -> MountState:
    """Have the mounter at `path` start the daemon; its state, or its failure as
    start_daemon raises it (MounterUnavailable when the mounter does not answer)."""
    body = json.dumps({"argv": list(argv), "env": dict(env) if env is not None else None,
                       "mountpoint": str(mountpoint)}).encode() + b"\n"
    down = (f"the kitfs mounter does not answer at {path}: is the kitfs-mounter pod "
            "running on this node?")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(CONNECT_WAIT)
        try:
            conn.connect(str(path))
            conn.sendall(body)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(LAUNCH_WAIT)
            line = _recv_line(conn).decode(errors="replace").strip()
        except TimeoutError:
            raise MounterUnavailable(f"{down} (no answer within {LAUNCH_WAIT:g}s)") from None
        except OSError as exc:
            raise MounterUnavailable(f"{down} ({exc.strerror or exc})") from None
    if not line:
        raise MounterUnavailable(f"{down} (it closed the connection without an answer)")
    return daemon_result(line, mountpoint)


# -- the server -----------------------------------------------------------------------


class _Launches:
    """Daemons being started. While any is, nothing reaps with waitpid(-1): it could
    take the exit status launch_daemon waits for from a daemon that died starting."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        with self.lock:
            self.count += 1
        try:
            yield
        finally:
            with self.lock:
                self.count -= 1

    def reap(self) -> None:
        """Collect every child that ended: daemons the driver stopped, or that died."""
        with self.lock:
            if self.count:
                return
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                log.info("reaped process %d (exit status %d)", pid,
                         os.waitstatus_to_exitcode(status))


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _answer(conn: socket.socket, launches: _Launches) -> None:
    conn.settimeout(REQUEST_WAIT)
    try:
        if _peer_uid(conn) != os.geteuid():
            raise Refused("the caller is not the mounter's user")
        raw = _recv_line(conn)
        try:
            request = json.loads(raw)
        except ValueError:
            raise Refused("the request is not one line of JSON") from None
        argv, env, mountpoint = check_request(request)
    except Refused as exc:
        log.warning("refused a request: %s", exc)
        line = f"error {REFUSED} the kitfs mounter refused the request: {exc}"
    else:
        conn.settimeout(None)
        log.info("starting a daemon at %s", mountpoint)
        with launches.one():
            line, _ = launch_daemon(argv, mountpoint, env)
        log.info("the daemon at %s: %s", mountpoint, line)
    with contextlib.suppress(OSError):  # a driver killed meanwhile: its next one adopts
        conn.sendall(line.encode() + b"\n")


def _serve_one(conn: socket.socket, launches: _Launches) -> None:
    with conn:
        try:
            _answer(conn, launches)
        except OSError as exc:
            log.warning("a request failed: %s", exc)


def _listen(path: Path) -> socket.socket:
    """The socket, root's alone: its directory made 0700 when missing, the socket 0600
    from the moment it exists (umask around bind)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by the mounter before this one
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise UsageError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    listener.listen(16)
    listener.settimeout(REAP_INTERVAL)
    return listener


def serve(path: Path) -> int:
    """Answer requests until SIGTERM/SIGINT; the daemons stay (their mounts with them)."""
    from kitfs.csi.supervisor import become_subreaper

    become_subreaper()
    launches = _Launches()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with _listen(path) as listener:
        log.info("the kitfs mounter listens on %s (pid %d)", path, os.getpid())
        while not stop.is_set():
            launches.reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_serve_one, args=(conn, launches), daemon=True,
                             name="mount-request").start()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    log.info("stopping; the daemons keep serving their mounts")
    return 0
