"""A real CNCF Distribution registry on a free loopback port, for tests and benchmarks.

Debian ships it as `docker-registry`. Each instance keeps its storage in a
directory the caller owns, so a test session never touches system state.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_BINARY = shutil.which("docker-registry") or shutil.which("registry")


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


_LOG_LINE = re.compile(r'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


@dataclass
class Served:
    """What an access log says a registry served: GET bodies, in all and by blob."""

    total: int = 0
    requests: int = 0
    by_blob: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, list[int]] = field(default_factory=dict)  # each response's bytes, by blob


@dataclass
class RegistryServer:
    host: str
    root: Path
    process: subprocess.Popen[bytes]
    log: Path
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def requests(self, since: int = 0) -> list[Request]:
        """What the registry answered after byte `since` of its log (a `request_log` one)."""
        with self.log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        found = []
        for line in text.splitlines():
            if 'msg="response completed' not in line:  # "... with error" too
                continue
            fields = dict(_FIELD.findall(line))
            found.append(Request(
                fields.get("http.request.method", "").strip('"'),
                fields.get("http.request.uri", "").strip('"'),
                int(fields.get("http.response.status", "0").strip('"')),
                fields.get("http.request.remoteaddr", "").strip('"'),
            ))
        return found

    def log_size(self) -> int:
        return self.log.stat().st_size

    def mark(self) -> int:
        """Where the access log ends now: what `served` counts from."""
        return self.log.stat().st_size

    def served(self, since: int = 0) -> Served:
        """Bytes the registry served since `mark()` (started with `access_log`). A line is
        written when a response ends: wait for the responses first."""
        out = Served()
        with self.log.open("rb") as f:
            f.seek(since)
            for raw in f:
                m = _LOG_LINE.search(raw.decode(errors="replace"))
                if not m or m.group(1) != "GET" or m.group(4) == "-":
                    continue
                n = int(m.group(4))
                out.total += n
                out.requests += 1
                digest = m.group(2).rsplit("/", 1)[-1]
                if "/blobs/" in m.group(2):
                    out.by_blob[digest] = out.by_blob.get(digest, 0) + n
                    out.sizes.setdefault(digest, []).append(n)
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(frozen=True)
class Request:
    """One answer in a registry's request log."""

    method: str
    uri: str
    status: int
    remote: str
    """The client's address and port as the registry saw them ("127.0.0.2:40112")."""


_FIELD = re.compile(r'(http\.[a-z.]+)=("(?:[^"\\]|\\.)*"|\S+)')


def _write_config(root: Path, port: int, htpasswd: Path | None, access_log: bool,
                  listen: str, tls: tuple[Path, Path] | None, request_log: bool,
                  proxy: str | None = None) -> Path:
    auth = ""
    if htpasswd is not None:
        auth = f"auth:\n  htpasswd:\n    realm: kitfs-test\n    path: {htpasswd}\n"
    http = f"http:\n  addr: {listen}:{port}\n"
    if tls is not None:
        http += f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
    config = root / "config.yml"
    log = ("log:\n  level: error\n  formatter: text\n" if access_log
           # "response completed" lines: method, URI, status and the client's address
           else "log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\n"
           if request_log
           else "log:\n  level: warn\n  accesslog:\n    disabled: true\n")
    config.write_text(
        "version: 0.1\n"
        + log
        + f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        + http
        + auth
        + (f"proxy:\n  remoteurl: {proxy}\n" if proxy else "")
    )
    return config


# Straight to the registry, whatever HTTP_PROXY says; a TLS one's certificate is a test's own.
_NO_VERIFY = ssl.create_default_context()
_NO_VERIFY.check_hostname = False
_NO_VERIFY.verify_mode = ssl.CERT_NONE
_DIRECT = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_NO_VERIFY))


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"registry exited early: {log.read_text()[-2000:]}")
        try:
            _DIRECT.open(url + "/v2/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # 401 from an auth-protected registry still means it is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("registry did not become ready within 20 s")


def start_registry(
    root: Path, *, username: str | None = None, password: str | None = None,
    access_log: bool = False, request_log: bool = False, listen: str = "127.0.0.1",
    name: str | None = None, tls: tuple[Path, Path] | None = None,
    proxy: str | None = None,
) -> RegistryServer:
    """Start a registry; with `access_log` its log (server.log) lists every response's bytes,
    with `request_log` every answer with the client's address (`RegistryServer.requests`).

    It listens on `listen` (an address) and is named `name` (default: the address) in
    `host`; `tls` (certificate, key) makes it speak HTTPS. `proxy` (a registry's URL)
    makes it a read-only pull-through cache of that registry.
    """
    if REGISTRY_BINARY is None:
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    root.mkdir(parents=True, exist_ok=True)
    htpasswd = None
    if username is not None and password is not None:
        import bcrypt

        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd = root / "htpasswd"
        htpasswd.write_text(f"{username}:{hashed}\n")
    port = free_port(listen)
    config = _write_config(root, port, htpasswd, access_log, listen, tls, request_log, proxy)
    log = root / "registry.log"
    env = dict(os.environ, OTEL_TRACES_EXPORTER="none")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = RegistryServer(f"{name or listen}:{port}", root, process, log, username, password,
                            tls=tls is not None)
    try:
        _wait_ready(server.url, process, log)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_registry(
    root: Path, *, username: str | None = None, password: str | None = None
) -> Iterator[RegistryServer]:
    server = start_registry(root, username=username, password=password)
    try:
        yield server
    finally:
        server.stop()
