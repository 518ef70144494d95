"""A real forwarding HTTP proxy (Debian's `tinyproxy`) on a free loopback port, for tests;
`stunnel` in front of it makes it an https:// proxy (TLS to the proxy itself).

kitfs's proxy support is shown against a proxy it did not write: tinyproxy
forwards plain-HTTP requests given in absolute form and opens CONNECT
tunnels, asks for Basic credentials when told to (`BasicAuth`), and answers
403 to clients it does not `Allow`. Its log (LogLevel Connect) names every
request it was asked to forward and every tunnel. It opens its connections to
registries from `OUTGOING` (127.0.0.2, tinyproxy's `Bind`), so a registry's
request log (tests/registry.py, `request_log`) tells, request by request,
whether it came through the proxy: direct connections come from the address
they were made to (127.0.0.1, or whatever the registry's name resolves to).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from registry import free_port

TINYPROXY_BINARY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
STUNNEL_BINARY = shutil.which("stunnel4") or shutil.which("stunnel") or "/usr/bin/stunnel4"
OUTGOING = "127.0.0.2"

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


@dataclass
class Tinyproxy:
    port: int
    root: Path
    process: subprocess.Popen[bytes]
    log: Path
    credentials: tuple[str, str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, username: str | None = None, password: str | None = None) -> str:
        """http://[user:password@]127.0.0.1:port (the configured credentials by default)."""
        if username is None and self.credentials is not None:
            username, password = self.credentials
        auth = f"{username}:{password}@" if username is not None else ""
        return f"http://{auth}{self.address}"

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, target) of every request after byte `since` of the log: absolute URLs
        for forwarded requests, `host:port` for CONNECT."""
        if not self.log.exists():
            return []
        with self.log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return _REQUEST.findall(text)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The proxy hung: its socket still accepts connections, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_tinyproxy(
    root: Path, *, credentials: tuple[str, str] | None = None, allow: str = "127.0.0.1",
) -> Tinyproxy:
    """tinyproxy in the foreground; `credentials` makes it ask for Basic auth (407), an
    `allow` other than 127.0.0.1 makes it refuse this machine (403)."""
    if not os.path.exists(TINYPROXY_BINARY):
        raise RuntimeError("tinyproxy is not installed (apt-get install tinyproxy)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "tinyproxy.log"
    config = root / "tinyproxy.conf"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        f"Bind {OUTGOING}",
        "Timeout 60",
        f'LogFile "{log}"',
        "LogLevel Connect",
        f'PidFile "{root / "tinyproxy.pid"}"',
        "MaxClients 100",
        f"Allow {allow}",
        # No ConnectPort line: CONNECT to any port (a registry on 5000 as well as 443).
    ]
    if credentials is not None:
        lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
    config.write_text("\n".join(lines) + "\n")
    with (root / "tinyproxy.out").open("wb") as out:
        process = subprocess.Popen([TINYPROXY_BINARY, "-d", "-c", str(config)],
                                   stdout=out, stderr=subprocess.STDOUT)
    proxy = Tinyproxy(port, root, process, log, credentials)
    try:
        _wait_listening(port, process, "tinyproxy", root / "tinyproxy.out")
    except BaseException:
        proxy.stop()
        raise
    return proxy


@contextlib.contextmanager
def running_tinyproxy(root: Path, **kwargs: object) -> Iterator[Tinyproxy]:
    proxy = start_tinyproxy(root, **kwargs)  # type: ignore[arg-type]
    try:
        yield proxy
    finally:
        proxy.stop()


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str, out: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {out.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening within 10 s")
        time.sleep(0.05)


@contextlib.contextmanager
def tls_front(proxy: Tinyproxy, cert: Path, key: Path) -> Iterator[str]:
    """`proxy` behind stunnel, which speaks TLS with `cert` on a port of its own: yields
    the https://127.0.0.1:port URL (with the proxy's credentials, if it has any)."""
    if not os.path.exists(STUNNEL_BINARY):
        raise RuntimeError("stunnel is not installed (apt-get install stunnel4)")
    root = proxy.root / "stunnel"
    root.mkdir(exist_ok=True)
    port = free_port()
    config = root / "stunnel.conf"
    config.write_text(
        "foreground = yes\npid =\n"
        f"output = {root / 'stunnel.log'}\n"
        f"[proxy]\naccept = 127.0.0.1:{port}\nconnect = {proxy.address}\n"
        f"cert = {cert}\nkey = {key}\n")
    out = root / "stunnel.out"
    with out.open("wb") as sink:
        process = subprocess.Popen([STUNNEL_BINARY, str(config)], stdout=sink,
                                   stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, process, "stunnel", out)
        yield proxy.url().replace("http://", "https://").replace(proxy.address,
                                                                 f"127.0.0.1:{port}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
