"""The fault proxy itself, in front of a real Distribution registry.

Tests that use the proxy trust two things checked here: without rules it is
invisible (byte-exact bodies, ranges, HEAD, keep-alive, uploads), and each
fault does exactly what it says, no more, and only to the requests it matches.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from faultproxy import (
    Corrupt,
    FaultProxy,
    Hang,
    IgnoreRange,
    Replace,
    Reset,
    Slow,
    Status,
    Truncate,
    parse_range,
)

from registry import RegistryServer

pytestmark = pytest.mark.registry

REPO = "faultproxy/blob"
SIZE = 300_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def connect(host: str, timeout: float = 5.0) -> http.client.HTTPConnection:
    name, _, port = host.rpartition(":")
    return http.client.HTTPConnection(name, int(port), timeout=timeout)


def fetch(
    host: str, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = connect(host, timeout)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def push(host: str, repo: str, data: bytes) -> str:
    """A monolithic upload (POST, then PUT ?digest=) with the registry's own API."""
    digest = sha(data)
    conn = connect(host)
    try:
        conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        response = conn.getresponse()
        response.read()
        assert response.status == 202, response.status
        location = response.getheader("Location") or ""
        sep = "&" if "?" in location else "?"
        conn.request("PUT", f"{location}{sep}digest={digest}", body=data,
                     headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        response.read()
        assert response.status == 201, response.status
    finally:
        conn.close()
    return digest


@pytest.fixture(scope="module")
def blob(registry: RegistryServer) -> tuple[bytes, str]:
    data = os.urandom(SIZE)
    return data, push(registry.host, REPO, data)


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


# -- pass-through ----------------------------------------------------------------------


def test_pass_through_is_byte_exact(
    registry: RegistryServer, proxy: FaultProxy, blob: tuple[bytes, str]
) -> None:
    data, digest = blob
    conn = connect(proxy.host)
    sockets = set()
    for rng, want in [(None, data), ("bytes=0-0", data[:1]), ("bytes=1000-70999", data[1000:71000]),
                      ("bytes=299990-", data[-10:]), ("bytes=-7", data[-7:])]:
        conn.request("GET", blob_path(digest), headers={"Range": rng} if rng else {})
        response = conn.getresponse()
        body = response.read()
        assert body == want
        direct = fetch(registry.host, blob_path(digest), headers={"Range": rng} if rng else {})
        assert response.status == direct[0] == (206 if rng else 200)
        for name in ("Content-Length", "Content-Range", "Docker-Content-Digest", "Etag"):
            assert response.getheader(name) == direct[1].get(name)
        sockets.add(conn.sock)
    conn.request("HEAD", blob_path(digest))
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Length") == str(SIZE)
    assert response.read() == b""
    conn.request("GET", f"/v2/{REPO}/manifests/missing")
    response = conn.getresponse()
    assert response.status == 404 and b"MANIFEST_UNKNOWN" in response.read()
    sockets.add(conn.sock)
    conn.close()
    assert len(sockets) == 1, "every request rode one kept-alive connection"
    assert [s.status for s in proxy.requests()] == [200, 206, 206, 206, 206, 200, 404]
    assert proxy.blob_requests(digest) == 5
    assert proxy.blob_requests(digest, method="HEAD") == 1
    assert proxy.settle()
    assert [s.sent for s in proxy.requests("GET", "/blobs/")] == [SIZE, 1, 70_000, 10, 7]


def test_head_has_no_body_on_the_wire(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    """A raw client, like kitfs's blob transport: HEAD then GET on one socket, framing exact."""
    data, digest = blob
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(f"HEAD {blob_path(digest)} HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n"
                  f"GET {blob_path(digest)} HTTP/1.1\r\nHost: {proxy.host}\r\n"
                  f"Range: bytes=10-19\r\n\r\n".encode())
        received = b""
        while received.count(b"\r\n\r\n") < 2 or not received.endswith(data[10:20]):
            chunk = s.recv(65536)
            assert chunk, received
            received += chunk
    head, get = received.split(b"HTTP/1.1 206", 1)
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert get.endswith(b"\r\n\r\n" + data[10:20])
    assert b"Content-Range: bytes 10-19/300000" in get


def test_registry_errors_pass_through_as_they_are(
    proxy: FaultProxy, blob: tuple[bytes, str]
) -> None:
    """Distribution's 416 declares the blob's length and sends a short text: the client
    sees that same broken framing (a short body, then the connection closes)."""
    _, digest = blob
    conn = connect(proxy.host)
    conn.request("GET", blob_path(digest), headers={"Range": f"bytes={SIZE}-{SIZE + 10}"})
    response = conn.getresponse()
    assert response.status == 416
    assert response.getheader("Content-Length") == str(SIZE)
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()


def test_uploads_and_locations_go_through_the_proxy(proxy: FaultProxy) -> None:
    """The Host header is passed through, so the registry's Locations name the proxy."""
    data = os.urandom(50_000)
    digest = push(proxy.host, "faultproxy/upload", data)
    assert [s.method for s in proxy.requests()] == ["POST", "PUT"]
    status, headers, _ = fetch(proxy.host, f"/v2/faultproxy/upload/blobs/{digest}", method="HEAD")
    assert status == 200 and headers["Location"] is None
    # A chunked request body (PATCH) is re-framed upstream.
    conn = connect(proxy.host)
    conn.request("POST", "/v2/faultproxy/upload/blobs/uploads/")
    response = conn.getresponse()
    response.read()
    location = response.getheader("Location") or ""
    assert location.startswith(proxy.url)
    more = os.urandom(70_000)
    conn.request("PATCH", location, body=iter([more[:30_000], more[30_000:]]),
                 headers={"Content-Type": "application/octet-stream"}, encode_chunked=True)
    response = conn.getresponse()
    response.read()
    assert response.status == 202
    location = response.getheader("Location") or ""
    assert location.startswith(proxy.url)
    conn.request("PUT", f"{location}&digest={sha(more)}", body=b"")
    response = conn.getresponse()
    response.read()
    assert response.status == 201
    conn.close()
    assert fetch(proxy.host, f"/v2/faultproxy/upload/blobs/{sha(more)}")[2] == more


def test_chunked_upstream_body_is_reframed(tmp_path: Path) -> None:
    """Distribution frames its answers with Content-Length; a stub shows chunked ones survive."""
    payload = os.urandom(200_000)

    class Chunky(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(payload), 33_333):
                piece = payload[i : i + 33_333]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    class Quiet(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # the proxy resets its upstream connection when it truncates

    stub = Quiet(("127.0.0.1", 0), Chunky)
    threading.Thread(target=stub.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with FaultProxy(f"127.0.0.1:{stub.server_address[1]}") as proxy:
            conn = connect(proxy.host)
            for _ in range(2):  # and the connection stays usable
                conn.request("GET", "/x")
                response = conn.getresponse()
                assert response.chunked and response.read() == payload
            proxy.add(Truncate(50_000))
            conn.request("GET", "/x")
            with pytest.raises(http.client.IncompleteRead):
                conn.getresponse().read()
            conn.close()
    finally:
        stub.shutdown()
        stub.server_close()


def test_unreachable_upstream_is_a_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with FaultProxy(dead) as proxy:
        status, _, body = fetch(proxy.host, "/v2/")
        assert status == 502 and b"upstream" in body
        assert proxy.requests()[0].error


# -- faults ----------------------------------------------------------------------------


def test_status_answers_instead_and_counts(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    rule = proxy.add(Status(503, b"busy", {"Retry-After": "2"}), path=r"/blobs/sha256:", count=2)
    conn = connect(proxy.host)
    for _ in range(2):
        conn.request("GET", blob_path(digest))
        response = conn.getresponse()
        assert (response.status, response.read()) == (503, b"busy")
        assert response.getheader("Retry-After") == "2"
    conn.request("GET", blob_path(digest))  # spent: forwarded again, same connection
    assert conn.getresponse().read() == data
    conn.close()
    assert rule.hits == 2 and rule.spent
    assert [s.status for s in proxy.requests()] == [503, 503, 200]
    assert [s.rule is rule for s in proxy.requests()] == [True, True, False]


def test_status_with_broken_framing_closes(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    """A 416 that declares N bytes and sends none, as Distribution's own nearly does."""
    _, digest = blob
    proxy.add(Status(416, headers={"Content-Length": "1000", "Content-Range": f"bytes */{SIZE}"}))
    conn = connect(proxy.host)
    conn.request("GET", blob_path(digest), headers={"Range": "bytes=0-9"})
    response = conn.getresponse()
    assert response.status == 416 and response.getheader("Content-Length") == "1000"
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()
    proxy.clear()
    conn.request("HEAD", blob_path(digest))  # a HEAD's empty body is correct framing
    assert conn.getresponse().status == 200


def test_hang_before_answering(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    _, digest = blob
    proxy.add(Hang(0.6), count=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fetch(proxy.host, blob_path(digest), timeout=0.2)
    conn = connect(proxy.host)  # the next one, still hanging: then closed without a word
    proxy.add(Hang(0.3), count=1)
    conn.request("GET", blob_path(digest))
    with pytest.raises(http.client.RemoteDisconnected):
        conn.getresponse()
    conn.close()
    assert time.monotonic() - started < 2
    assert proxy.settle(2)
    assert [s.status for s in proxy.requests()] == [None, None]


def test_hang_after_headers_and_mid_body(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    proxy.add(Hang(5, after_bytes=0), count=1)
    proxy.add(Hang(5, after_bytes=12_345), count=1)
    conn = connect(proxy.host, timeout=0.3)
    conn.request("GET", blob_path(digest))
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Length") == str(SIZE)
    with pytest.raises(TimeoutError):
        response.read()
    conn.close()
    conn = connect(proxy.host, timeout=0.3)
    conn.request("GET", blob_path(digest))
    response = conn.getresponse()
    assert response.read(12_345) == data[:12_345]
    with pytest.raises(TimeoutError):
        response.read(1)
    conn.close()


def test_truncate(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    proxy.add(Truncate(1000), method="GET", count=2)
    for rng, want in [(None, data[:1000]), ("bytes=5000-99999", data[5000:6000])]:
        conn = connect(proxy.host)
        conn.request("GET", blob_path(digest), headers={"Range": rng} if rng else {})
        response = conn.getresponse()
        assert response.getheader("Content-Length") == str(len(data) if rng is None else 95_000)
        with pytest.raises(http.client.IncompleteRead) as caught:
            response.read()
        assert caught.value.partial == want
        conn.close()
    assert proxy.settle()
    assert [s.sent for s in proxy.requests()] == [1000, 1000]


def test_corrupt_flips_exact_blob_offsets(
    registry: RegistryServer, blob: tuple[bytes, str]
) -> None:
    """Offsets are blob offsets, whatever the range and wherever the 1000-byte pieces split."""
    data, digest = blob
    offsets = {10, 1500, 1999, 2000, 2001, 2999, 3000, 4500, SIZE - 1}
    with FaultProxy(registry.host, piece_size=1000) as proxy:
        proxy.add(Corrupt(offsets), path=r"/blobs/sha256:")
        for lo, hi in [(1500, 4501), (1501, 2500), (0, SIZE)]:
            _, _, body = fetch(proxy.host, blob_path(digest),
                               headers={"Range": f"bytes={lo}-{hi - 1}"})
            flipped = {lo + i for i, (a, b) in enumerate(zip(body, data[lo:hi], strict=True))
                       if a != b}
            assert flipped == {o for o in offsets if lo <= o < hi}
            assert all(body[o - lo] == data[o] ^ 0xFF for o in flipped)
        _, _, body = fetch(proxy.host, blob_path(digest))  # a 200 counts from 0
        assert {i for i in range(SIZE) if body[i] != data[i]} == offsets


def test_replace_rewrites_in_place(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    calls: list[tuple[int, int]] = []

    def lie(offset: int, piece: bytes) -> bytes:
        calls.append((offset, len(piece)))
        out = bytearray(piece)
        for i in range(max(offset, 100_000), min(offset + len(piece), 100_512)):
            out[i - offset] = 0
        return bytes(out)

    proxy.add(Replace(lie), count=1)
    _, _, body = fetch(proxy.host, blob_path(digest), headers={"Range": "bytes=90000-199999"})
    assert body == data[90_000:100_000] + bytes(512) + data[100_512:200_000]
    assert calls[0][0] == 90_000 and sum(n for _, n in calls) == 110_000
    proxy.add(Replace(lambda offset, piece: piece[1:]), count=1)
    with pytest.raises(http.client.IncompleteRead):
        fetch(proxy.host, blob_path(digest))
    assert proxy.settle() and "changed" in (proxy.requests()[-1].error or "")


def test_slow(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    proxy.add(Slow(200_000))
    started = time.monotonic()
    _, _, body = fetch(proxy.host, blob_path(digest), headers={"Range": "bytes=0-59999"})
    took = time.monotonic() - started
    assert body == data[:60_000]
    assert 0.25 < took < 1.5


def test_reset(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    _, digest = blob
    proxy.add(Reset(), count=1)
    proxy.add(Reset(rst=False), count=1)
    with pytest.raises(ConnectionResetError) as caught:
        fetch(proxy.host, blob_path(digest))
    assert type(caught.value) is ConnectionResetError  # a RST, not a clean close
    with pytest.raises(http.client.RemoteDisconnected):
        fetch(proxy.host, blob_path(digest))
    assert fetch(proxy.host, blob_path(digest))[0] == 200
    assert [s.status for s in proxy.requests()] == [None, None, 200]


def test_ignore_range(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    proxy.add(IgnoreRange(), Corrupt([5]), count=1)
    status, headers, body = fetch(proxy.host, blob_path(digest), headers={"Range": "bytes=0-9"})
    assert status == 200 and headers["Content-Range"] is None
    assert body == data[:5] + bytes([data[5] ^ 0xFF]) + data[6:]
    assert proxy.requests()[0].range == "bytes=0-9"


def test_range_predicate(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    """overlaps=(lo, hi) is half-open; a request without Range covers the whole blob."""
    _, digest = blob
    proxy.add(Status(500), path=digest, overlaps=(2000, 3000))
    cases = {"bytes=0-1999": 206, "bytes=0-2000": 500, "bytes=2999-": 500, "bytes=3000-3999": 206,
             "bytes=0-9, 2500-2600": 500, "bytes=-10": 500, None: 500}
    for rng, want in cases.items():
        status = fetch(proxy.host, blob_path(digest), headers={"Range": rng} if rng else {})[0]
        assert status == want, rng
    assert fetch(proxy.host, f"/v2/{REPO}/manifests/x")[0] == 404  # path does not match


def test_parse_range() -> None:
    assert parse_range(None) is None
    assert parse_range("bytes=0-9,20-,-5") == [(0, 10), (20, None), (None, None)]
    assert parse_range("items=0-9") == []


def test_count_is_exact_under_concurrency(proxy: FaultProxy, blob: tuple[bytes, str]) -> None:
    _, digest = blob
    proxy.add(Status(503), count=5)
    statuses: list[int] = []

    def one() -> None:
        statuses.append(fetch(proxy.host, blob_path(digest), headers={"Range": "bytes=0-99"})[0])

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(statuses) == [206] * 15 + [503] * 5
    proxy.clear()
    assert proxy.rules == []


def test_close_is_prompt_and_ends_hangs(registry: RegistryServer, blob: tuple[bytes, str]) -> None:
    _, digest = blob
    proxy = FaultProxy(registry.host)
    idle = connect(proxy.host)
    idle.request("GET", "/v2/")
    idle.getresponse().read()
    proxy.add(Hang(30))
    errors: list[BaseException] = []

    def hung() -> None:
        try:
            fetch(proxy.host, blob_path(digest), timeout=10)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=hung)
    thread.start()
    deadline = time.monotonic() + 2
    while len(proxy.requests()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    with proxy:
        pass
    assert time.monotonic() - started < 1
    thread.join(2)
    assert isinstance(errors[0], http.client.RemoteDisconnected)
    with pytest.raises(ConnectionError):
        fetch(proxy.host, "/v2/")
    idle.close()


def test_listens_on_loopback_only(proxy: FaultProxy) -> None:
    assert proxy.host.startswith("127.0.0.1:")
    assert proxy._server.socket.getsockname()[0] == "127.0.0.1"


# -- kitfs through it -----------------------------------------------------------------


async def test_kitfs_client_through_the_proxy(proxy: FaultProxy, tmp_path: Path) -> None:
    """kitfs's own client (httpx, and its raw blob transport) pushes and pulls through it."""
    from kitfs.oci.client import ClientOptions, RegistryClient

    data = os.urandom(3 << 20)
    path = tmp_path / "layer"
    path.write_bytes(data)
    digest = sha(data)
    async with RegistryClient(proxy.host, ClientOptions(retry_budget=5)) as c:
        await c.push_blob("faultproxy/kitfs", digest, len(data), str(path))
        assert await c.head_blob("faultproxy/kitfs", digest) == len(data)
        async with c.stream_blob("faultproxy/kitfs", digest) as chunks:
            assert b"".join([x async for x in chunks]) == data
        assert await c.read_range("faultproxy/kitfs", digest, 1 << 20, 4096) == data[
            1 << 20 : (1 << 20) + 4096]
        proxy.clear_log()
        proxy.add(Status(503), method="GET", path=digest, count=1)
        assert await c.read_range("faultproxy/kitfs", digest, 5, 10) == data[5:15]
        assert proxy.blob_requests(digest) == 2
