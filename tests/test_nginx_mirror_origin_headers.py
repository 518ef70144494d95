"""deploy/mirror/nginx.conf in front of an origin with odd headers (a small Python server).

What storage and load balancers really send: `Cache-Control: private, max-age=0` on
GCS signed URLs, a stickiness Set-Cookie, a registry that ignores Range and answers 200
with `max-age`. The mirror stores 206 pieces whatever the headers say, never stores a
200, never passes the cookie on; a malformed digest is not cached at all; a relative
redirect is followed against the origin, with the client's credentials.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from nginxmirror import Nginx, start_mirror
from test_nginx_mirror import blob_url, get

REPO = "odd/headers"
TOKEN = "Bearer client-token"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


PRIVATE = bytes(range(256)) * 400  # 206, Cache-Control private, Set-Cookie
WHOLE = b"w" * 50_000  # 200 whatever the Range, Cache-Control max-age
BEHIND = b"r" * 30_000  # 307 with a relative Location, served there (206) with the token
BLOBS = {_digest(PRIVATE): PRIVATE, _digest(WHOLE): WHOLE, _digest(BEHIND): BEHIND}


class _Origin(BaseHTTPRequestHandler):
    hits: collections.Counter[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _range(self, blob: bytes, headers: dict[str, str]) -> None:
        spec = self.headers.get("Range", "")
        if not spec.startswith("bytes="):
            self._send(200, blob, headers)
            return
        first, _, last = spec.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else len(blob) - 1, len(blob) - 1)
        self._send(206, blob[start:end + 1],
                   {**headers, "Content-Range": f"bytes {start}-{end}/{len(blob)}"})

    def do_GET(self) -> None:
        self.hits[self.path] += 1
        digest = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/storage/"):
            if self.headers.get("Authorization") != TOKEN:
                self._send(401, b"", {})
            else:
                self._range(BLOBS["sha256:" + digest], {})
        elif self.path == f"/v2/{REPO}/blobs/{_digest(PRIVATE)}":
            self._range(PRIVATE, {"Cache-Control": "private, max-age=0",
                                  "Expires": "Thu, 01 Jan 1970 00:00:00 GMT",
                                  "Set-Cookie": "lb=node-3; Path=/", "Vary": "*"})
        elif self.path == f"/v2/{REPO}/blobs/{_digest(WHOLE)}":
            self._send(200, WHOLE, {"Cache-Control": "public, max-age=3600"})
        elif self.path == f"/v2/{REPO}/blobs/{_digest(BEHIND)}":
            self._send(307, b"", {"Location": f"/storage/{_digest(BEHIND)[7:]}"})
        else:
            self._send(404, b"", {"Cache-Control": "public, max-age=3600"})


@dataclass
class Setup:
    hits: collections.Counter[str]
    mirror: Nginx


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    hits: collections.Counter[str] = collections.Counter()
    handler = type("Origin", (_Origin,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirror = start_mirror(f"http://127.0.0.1:{server.server_port}",
                              tmp_path_factory.mktemp("odd-mirror"))
        try:
            yield Setup(hits, mirror)
        finally:
            mirror.stop()
    finally:
        server.shutdown()
        server.server_close()


def test_a_private_206_with_a_cookie_is_cached_and_the_cookie_not_passed_on(
        setup: Setup) -> None:
    path = f"/v2/{REPO}/blobs/{_digest(PRIVATE)}"
    for _node in range(2):
        status, headers, body = get(setup.mirror.url + path, {"Range": "bytes=10-99"})
        assert status == 206 and body == PRIVATE[10:100]
        assert "set-cookie" not in headers
    assert setup.hits[path] == 1  # the second node's read cost the origin nothing


def test_a_200_is_never_stored_whatever_its_cache_control(setup: Setup) -> None:
    path = f"/v2/{REPO}/blobs/{_digest(WHOLE)}"
    for headers in ({"Range": "bytes=0-99"}, {}, {"Range": "bytes=0-99"}):
        status, _, body = get(setup.mirror.url + path, headers)
        assert status == 200 and body == WHOLE
    assert setup.hits[path] == 3


def test_a_malformed_digest_is_passed_through_uncached(setup: Setup) -> None:
    for digest in ("sha256:abcd", "sha256:" + "a" * 65):
        path = f"/v2/{REPO}/blobs/{digest}"
        for _ in range(2):
            assert get(setup.mirror.url + path, {"Range": "bytes=0-9"})[0] == 404
        assert setup.hits[path] == 2
    lines = [line for line in setup.mirror.settled().splitlines() if "sha256:abcd " in line]
    assert len(lines) == 2 and all("cache=- " in line for line in lines)


def test_a_relative_redirect_is_followed_against_the_origin_with_the_token(
        setup: Setup) -> None:
    digest = _digest(BEHIND)
    url = blob_url(setup.mirror.url, REPO, digest)
    for _ in range(2):
        status, headers, body = get(url, {"Range": "bytes=100-199", "Authorization": TOKEN})
        assert status == 206 and body == BEHIND[100:200] and "location" not in headers
    assert setup.hits[f"/storage/{digest[7:]}"] == 1
    assert setup.hits[f"/v2/{REPO}/blobs/{digest}"] == 1

