"""`kitfs csi mounter`: the process that owns the mount daemons, outside the driver.

The CSI driver's container is upgraded, OOM-killed and restarted like any
other; every process in it dies with it. So, as mountpoint-s3's CSI driver
does with its mountpoint pods, the daemons are started by a second, rarely
changed process in its own DaemonSet: the driver sends it a request over a
root-only Unix socket and it starts `kitfs mount --foreground` as its own
child (spawn_daemon, the same code `kitfs mount` and the driver use), then
answers with the daemon's one ready line. Both pods run with hostPID and
share /run/kitfs, so the driver sees each daemon's state file and stops it
by pid (kitfs.mounts.umount) as if it had started it; the mounter reaps it.

The protocol, one request per connection: the client sends one JSON object
of plain fields on one line (mount_request: the pinned reference, the
daemon's key, its cache dir and credentials dir, filter, verify, ...) and
reads one line back, `ready` or `error CODE TEXT`, exactly the ReadyPipe line
start_daemon reads. The mounter builds the daemon's command line itself with
its own daemon_argv, so a driver and a mounter of different releases agree
on fields, never on each other's flags. It mounts only at
<--staging-dir>/<key>/mnt, caches only under --cache-dir, reads credentials
only from <--state-dir>/homes/<key> or its own kit home, and passes only the
proxy and CA variables of the request's environment (ENV_ALLOWED); nothing
of that environment is logged (a proxy URL may hold a password).

Versions: the driver rolls, the mounter is replaced by drain, so the two
differ for a while. `version` is the oldest protocol that understands a
request: fields added later are optional and an older mounter ignores what
it does not know; a request needing a newer protocol is refused, saying so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, get_args

from kitfs.cache.memory import DEFAULT_MEMORY_TIER_BYTES
from kitfs.csi import LAUNCH_WAIT
from kitfs.csi.volumes import is_canonical, is_key
from kitfs.engine.api import PrefetchMode, VerifyMode
from kitfs.errors import KitfsError, UsageError
from kitfs.mounts import (
    MountConfig,
    MountError,
    MountState,
    Starting,
    await_daemon,
    daemon_argv,
    daemon_result,
    keep_earlier_log,
    spawn_daemon,
)
from kitfs.oci.credentials import kitops_home
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import parse_reference

log = logging.getLogger(__name__)

#: The protocol this mounter speaks (see the module's docstring on versions).
PROTOCOL = 1
#: A request is a few paths and options: far below this.
MAX_REQUEST = 1 << 20
#: For the request to arrive once connected.
REQUEST_WAIT = 30.0
CONNECT_WAIT = 10.0
#: The driver waits this much longer, to read the mounter's own answer at its deadline.
ANSWER_MARGIN = 30.0
#: How often the mounter collects daemons that ended (between connections).
REAP_INTERVAL = 0.5
#: The exit status of a refused request, as kitfs gives bad usage.
REFUSED = 2
#: The environment a daemon takes from the request: how to reach the registry.
ENV_ALLOWED = frozenset(
    name for base in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "KITFS_PROXY", "SSL_CERT_FILE")
    for name in (base, base.lower()))


class MounterUnavailable(MountError):
    """The mounter does not answer: the driver cannot start daemons (publish waits)."""


class Refused(Exception):
    """A request the mounter will not run; the message names what is wrong, not the env."""


@dataclass(frozen=True)
class Bounds:
    """What a request may name: the driver's directories as the mounter's flags say
    (their defaults are the driver's), and its own kit home (node credentials)."""

    staging_dir: Path
    cache_dir: Path
    state_dir: Path
    node_home: Path = field(default_factory=lambda: Path(os.path.abspath(kitops_home())))
    launch_wait: float = LAUNCH_WAIT


def allowed_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in ENV_ALLOWED}


def mount_request(config: MountConfig, key: str, *, home: str | None, verbose: int,
                  env: Mapping[str, str]) -> dict[str, Any]:
    """The request (protocol v1) for a daemon mounting `config` at <staging>/<key>/mnt;
    only ENV_ALLOWED variables of `env` go in it."""
    client = config.client
    return {"version": PROTOCOL, "key": key, "reference": config.reference,
            "cache_dir": str(config.cache_dir),
            "home": os.path.abspath(home) if home else None,
            "filters": list(config.filters), "verify": config.verify,
            "prefetch": config.prefetch, "memory": config.memory,
            "cache_size": config.cache_size, "timeout": client.read_timeout,
            "tls_verify": client.tls_verify, "plain_http": client.plain_http,
            "ca_file": client.ca_file, "cert_file": client.cert_file,
            "key_file": client.key_file, "hosts_dir": client.hosts_dir,
            "verbose": verbose, "env": allowed_env(env)}


_REQUIRED = object()


def _get(request: dict[str, Any], name: str, kind: type | tuple[type, ...],
         default: Any = _REQUIRED) -> Any:
    """A field of `kind` (None allowed where the default is None); bool is not an int."""
    if name not in request:
        if default is _REQUIRED:
            raise Refused(f"the request has no {name!r}")
        return default
    value = request[name]
    if value is None and default is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise Refused(f"{name!r} is not {' or '.join(k.__name__ for k in kinds)}")
    return value


def _path(value: str | None, name: str) -> str | None:
    if value is not None and not is_canonical(value):
        raise Refused(f"{name!r} is not a canonical absolute path")
    return value


def check_request(request: object, bounds: Bounds) -> tuple[list[str], dict[str, str], Path]:
    """The daemon's argv, environment and mountpoint for a request within `bounds`, or
    Refused naming the field at fault (never a value from the environment)."""
    if not isinstance(request, dict):
        raise Refused("a request is one JSON object")
    version = _get(request, "version", int)
    if version > PROTOCOL:
        raise Refused(f"the driver needs mounter protocol v{version}, this mounter speaks "
                      f"v{PROTOCOL}: replace the kitfs-mounter pod on this node (drain it "
                      "first; its container's end stops the mounts)")
    if version < 1:
        raise Refused(f"no mounter protocol v{version}")
    key = _get(request, "key", str)
    if not is_key(key):
        raise Refused("'key' is not a daemon key (24 hex digits)")
    text = _get(request, "reference", str)
    try:
        ref = parse_reference(text)
    except KitfsError as exc:
        raise Refused(f"'reference': {exc}") from None
    if ref.digest is None or ref.is_local:
        raise Refused("'reference' is not a registry reference pinned by @digest")
    cache_dir = _path(_get(request, "cache_dir", str), "cache_dir")
    assert cache_dir is not None
    if not Path(cache_dir).is_relative_to(bounds.cache_dir):
        raise Refused(f"'cache_dir' is not under {bounds.cache_dir}")
    home = _path(_get(request, "home", str, None), "home")
    if home is not None and Path(home) not in (bounds.state_dir / "homes" / key,
                                                bounds.node_home):
        raise Refused(f"'home' is neither {bounds.state_dir / 'homes' / key} nor "
                      f"{bounds.node_home}")
    filters = _get(request, "filters", list, [])
    if not all(isinstance(f, str) for f in filters):
        raise Refused("'filters' is not a list of strings")
    verify = _get(request, "verify", str, "lazy")
    prefetch = _get(request, "prefetch", str, "model")
    if verify not in get_args(VerifyMode) or prefetch not in get_args(PrefetchMode):
        raise Refused("'verify' or 'prefetch' is not a mode kitfs mount knows")
    memory = _get(request, "memory", int, DEFAULT_MEMORY_TIER_BYTES)
    cache_size = _get(request, "cache_size", int, None)
    timeout = _get(request, "timeout", (int, float), 30.0)
    verbose = _get(request, "verbose", int, 0)
    if memory <= 0 or (cache_size is not None and cache_size <= 0) or timeout <= 0 \
            or not 0 <= verbose <= 3:
        raise Refused("'memory', 'cache_size', 'timeout' or 'verbose' is out of range")
    env = _get(request, "env", dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise Refused("'env' is not an object of strings")
    client = ClientOptions(
        plain_http=_get(request, "plain_http", bool, False),
        tls_verify=_get(request, "tls_verify", bool, True),
        ca_file=_path(_get(request, "ca_file", str, None), "ca_file"),
        cert_file=_path(_get(request, "cert_file", str, None), "cert_file"),
        key_file=_path(_get(request, "key_file", str, None), "key_file"),
        # registry mirrors (hosts.toml): a later, optional field; a mounter without it
        # reads its own /etc/kitfs/certs.d or $KITFS_HOSTS_DIR
        hosts_dir=_path(_get(request, "hosts_dir", str, None), "hosts_dir"),
        read_timeout=float(timeout))
    mountpoint = bounds.staging_dir / key / "mnt"
    config = MountConfig(
        reference=text, mountpoint=mountpoint, cache_dir=Path(cache_dir), client=client,
        filters=tuple(filters), prefetch=prefetch, verify=verify, memory=memory,
        cache_size=cache_size, allow_other=True)  # pods run as any user
    argv = daemon_argv(config, kitops_home=home, verbose=verbose)
    daemon_env = {k: v for k, v in os.environ.items() if k not in ENV_ALLOWED}
    daemon_env.update(allowed_env(env))
    return argv, daemon_env, mountpoint


# -- the client (the driver) -----------------------------------------------------------


def _recv_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        piece = conn.recv(65536)
        if not piece:
            break
        data += piece
    return data.partition(b"\n")[0]


def request_daemon(path: Path, request: Mapping[str, Any], mountpoint: Path) -> MountState:
    """Have the mounter at `path` start the daemon of `request` (mount_request), which
    mounts at `mountpoint`; its state, or its failure as start_daemon raises it
    (MounterUnavailable when the mounter does not answer)."""
    body = json.dumps(dict(request)).encode() + b"\n"
    down = (f"the kitfs mounter does not answer at {path}: is the kitfs-mounter pod "
            "running on this node?")
    wait = LAUNCH_WAIT + ANSWER_MARGIN
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(CONNECT_WAIT)
        try:
            conn.connect(str(path))
            conn.sendall(body)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(wait)
            line = _recv_line(conn).decode(errors="replace").strip()
        except TimeoutError:
            raise MounterUnavailable(f"{down} (no answer within {wait:g}s)") from None
        except OSError as exc:
            raise MounterUnavailable(f"{down} ({exc.strerror or exc})") from None
    if not line:
        raise MounterUnavailable(f"{down} (it closed the connection without an answer)")
    return daemon_result(line, mountpoint)


# -- the server -----------------------------------------------------------------------


def _zombie_children() -> list[int]:
    """This process's children that ended and wait to be collected (from /proc)."""
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2:].split()
        if len(fields) > 1 and fields[0] == b"Z" and int(fields[1]) == me:
            found.append(int(entry.name))
    return found


class _Children:
    """The daemons being started, whose exit status await_daemon collects itself; every
    other child that ends (a daemon the driver stopped, or that died) is reaped here."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.launching: set[int] = set()

    @contextlib.contextmanager
    def spawning(self, argv: list[str], env: dict[str, str], mountpoint: Path
                 ) -> Iterator[Starting]:
        """Spawn under the lock, so that the reaper never sees the new pid before it is
        known to be one being started; it is an ordinary child again on leaving."""
        with self.lock:
            starting = spawn_daemon(argv, mountpoint, env)
            self.launching.add(starting.process.pid)
        try:
            yield starting
        finally:
            with self.lock:
                self.launching.discard(starting.process.pid)

    def _collect(self, pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            _, status = os.waitpid(pid, os.WNOHANG)
            log.info("reaped process %d (exit status %d)", pid,
                     os.waitstatus_to_exitcode(status))

    def reap(self) -> None:
        """Collect every child that ended, but those being started."""
        with self.lock:
            while True:
                try:  # peek: which child would waitpid(-1) take?
                    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    return
                if info is None:
                    return
                if info.si_pid in self.launching:  # ended starting: await_daemon's
                    for pid in _zombie_children():
                        if pid not in self.launching:
                            self._collect(pid)
                    return
                self._collect(info.si_pid)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _launch(argv: list[str], env: dict[str, str], mountpoint: Path, children: _Children,
            wait: float) -> str:
    """Start the daemon; its ready line, or why it could not start in the same form."""
    try:
        mountpoint.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        return f"error 1 cannot create the mountpoint {mountpoint}: {exc.strerror}"
    keep_earlier_log(mountpoint)
    try:
        with children.spawning(argv, env, mountpoint) as starting:
            log.info("starting daemon pid %d at %s", starting.process.pid, mountpoint)
            return await_daemon(starting, wait)
    except MountError as exc:
        return f"error 1 {exc}"


def _answer(conn: socket.socket, children: _Children, bounds: Bounds) -> None:
    conn.settimeout(REQUEST_WAIT)
    try:
        if _peer_uid(conn) != os.geteuid():
            raise Refused("the caller is not the mounter's user")
        raw = _recv_line(conn)
        try:
            request = json.loads(raw)
        except (ValueError, RecursionError):
            raise Refused("the request is not one line of JSON") from None
        argv, env, mountpoint = check_request(request, bounds)
    except Refused as exc:
        log.warning("refused a request: %s", exc)
        line = f"error {REFUSED} the kitfs mounter refused the request: {exc}"
    else:
        line = _launch(argv, env, mountpoint, children, bounds.launch_wait)
        log.info("the daemon at %s: %s", mountpoint, line)
    with contextlib.suppress(OSError):  # a driver killed meanwhile: its next one adopts
        conn.sendall(line.encode() + b"\n")


def _serve_one(conn: socket.socket, children: _Children, bounds: Bounds) -> None:
    with conn:
        try:
            _answer(conn, children, bounds)
        except OSError as exc:
            log.warning("a request failed: %s", exc)
        except Exception as exc:  # the driver gets an answer, not a hung-up socket
            log.exception("a request failed")
            with contextlib.suppress(OSError):
                conn.sendall(f"error 70 internal error: {type(exc).__name__}\n".encode())


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


def serve(path: Path, bounds: Bounds) -> int:
    """Answer requests until SIGTERM/SIGINT; the daemons stay (their mounts with them)."""
    from kitfs.csi.supervisor import become_subreaper

    become_subreaper()
    children = _Children()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with _listen(path) as listener:
        log.info("the kitfs mounter listens on %s (pid %d)", path, os.getpid())
        while not stop.is_set():
            children.reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_serve_one, args=(conn, children, bounds), daemon=True,
                             name="mount-request").start()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    log.info("stopping; the daemons keep serving their mounts")
    return 0
