"""Run nginx, and deploy/mirror/nginx.conf as shipped, for tests and benchmarks/fleet.py."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from registry import free_port

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "mirror" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Nginx:
    host: str
    state: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self, name: str = "access.log") -> str:
        path = self.state / name
        return path.read_text() if path.exists() else ""

    def settled(self, name: str = "access.log", quiet: float = 0.3,
                timeout: float = 10.0) -> str:
        """The log once nothing has been added to it for `quiet` seconds: nginx writes a
        request's line after its answer has gone out, so a client that just got its
        answer may read the log before the line is there."""
        deadline = time.monotonic() + timeout
        text, since = self.log(name), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.log(name)
            if now != text:
                text, since = now, time.monotonic()
            elif text and time.monotonic() - since >= quiet:
                break
        return text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _wait_listening(host: str, process: subprocess.Popen[bytes], what: Path) -> None:
    address, port = host.rsplit(":", 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {(what / 'error.log').read_text()[-2000:]}")
        try:
            socket.create_connection((address, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not listen within 20 s")


def start_nginx(config: str, state: Path, host: str) -> Nginx:
    state.mkdir(parents=True, exist_ok=True)
    conf = state / "nginx.conf"
    conf.write_text(config)
    process = subprocess.Popen(
        [NGINX, "-p", str(state), "-c", str(conf), "-e", str(state / "error.log"),
         "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = Nginx(host, state, process)
    try:
        _wait_listening(host, process, state)
    except BaseException:
        server.stop()
        raise
    return server


def render(origin: str, state: Path, port: int) -> str:
    """The shipped template with its documented variables set, and nothing else changed."""
    values = {
        "MIRROR_LISTEN": f"127.0.0.1:{port}", "MIRROR_ORIGIN": origin,
        "MIRROR_CACHE": str(state / "cache"), "MIRROR_CACHE_SIZE": "1g",
        "MIRROR_STATE": str(state), "MIRROR_USER": "root", "MIRROR_RESOLVER": "127.0.0.1",
    }
    text = CONFIG.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text, "a variable of the template is not documented here"
    return text


def start_mirror(origin: str, state: Path) -> Nginx:
    port = free_port()
    return start_nginx(render(origin, state, port), state, f"127.0.0.1:{port}")


