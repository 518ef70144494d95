"""The real network path: sockets, deadlines, TLS, big reads, dropped connections."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpcore
import httpx
import pytest
import trio

from kitfs.errors import IntegrityError, RegistryError, UnreachableError, UsageError
from kitfs.oci.auth import parse_challenges
from kitfs.oci.blobtransport import BLOB_EXTENSION, Sink
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.retry import parse_retry_after
from kitfs.oci.session import describe_transport_error, retryable_transport_error
from kitfs.oci.transport import (
    SOCKET_READ_SIZE,
    base_url,
    is_loopback,
    make_http_client,
    ssl_context,
)

BLOB = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
TEXT = BLOB[: len(BLOB) // 2].hex().encode()  # served gzipped: shrinks to about half


@dataclass
class Served:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class MiniServer:
    """A tiny HTTP/1.1 server on loopback that serves one blob and can misbehave."""

    port: int = 0
    requests: list[Served] = field(default_factory=list)
    drop_after: list[int] = field(default_factory=list)  # per blob GET: close after N bytes
    stall: bool = False
    chunked: bool = False  # send bodies with Transfer-Encoding: chunked
    close_silently: bool = False  # close after each response without saying so
    ignore_range: bool = False  # answer range requests with 200 and the whole blob
    stall_after: int | None = None  # send this many body bytes (0 on later GETs), then stall
    fail_with: list[int] = field(default_factory=list)  # per blob GET: answer this status first
    # send this many body bytes, then the rest once the event is set
    hold_after: tuple[int, trio.Event] | None = None
    gzip: bool = False  # serve TEXT gzipped (Content-Encoding: gzip), whatever was asked for
    connections: int = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                if self.stall:
                    await trio.sleep_forever()
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
                self.requests.append(Served(method, path, headers))
                if path == "/v2/":
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    continue
                if self.fail_with:
                    code = self.fail_with.pop(0)
                    junk = b"X" * 5000  # an error body that must not land in anyone's buffers
                    await stream.send_all(
                        f"HTTP/1.1 {code} Busy\r\nContent-Length: {len(junk)}\r\n\r\n".encode()
                        + junk
                    )
                    continue
                start = 0
                status = "200 OK"
                extra = ""
                rng = None if self.ignore_range else headers.get("range")
                if rng:
                    first, last = rng.removeprefix("bytes=").split("-")
                    start = int(first)
                    end = int(last) + 1 if last else len(BLOB)
                    status = "206 Partial Content"
                    extra = f"Content-Range: bytes {start}-{end - 1}/{len(BLOB)}\r\n"
                else:
                    end = len(BLOB)
                body = BLOB[start:end]
                if self.gzip:
                    body = gzip.compress(TEXT[start:end], mtime=0)
                    extra += "Content-Encoding: gzip\r\n"
                if self.chunked:
                    await stream.send_all(
                        f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n{extra}\r\n".encode()
                    )
                    for i in range(0, len(body), 300_000):
                        piece = body[i : i + 300_000]
                        await stream.send_all(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
                    await stream.send_all(b"0\r\nX-Trailer: y\r\n\r\n")
                    continue
                await stream.send_all(
                    f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
                )
                if self.stall_after is not None:
                    n, self.stall_after = self.stall_after, 0
                    await stream.send_all(body[:n])
                    await trio.sleep_forever()
                if self.hold_after is not None:
                    (n, go), self.hold_after = self.hold_after, None
                    await stream.send_all(body[:n])
                    await go.wait()
                    body = body[n:]
                if self.drop_after:
                    await stream.send_all(body[: self.drop_after.pop(0)])
                    await stream.aclose()
                    return
                await stream.send_all(body)
                if self.close_silently:
                    await stream.aclose()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


@asynccontextmanager
async def mini_server(
    server: MiniServer, wrap: Callable[[trio.SocketStream], trio.abc.Stream] | None = None
) -> AsyncIterator[MiniServer]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, _handler(server, wrap), 0, host="127.0.0.1")
        )
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def _handler(
    server: MiniServer, wrap: Callable[[trio.SocketStream], trio.abc.Stream] | None
) -> Callable[[trio.SocketStream], object]:
    async def handle(stream: trio.SocketStream) -> None:
        await server.handle(wrap(stream) if wrap else stream)

    return handle


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_closed_port_is_unreachable_quickly() -> None:
    port = closed_port()
    with trio.fail_after(4):
        async with RegistryClient(f"127.0.0.1:{port}") as c:
            with pytest.raises(UnreachableError) as err:
                await c.ping()
    assert f"127.0.0.1:{port}" in str(err.value)


async def test_stalled_registry_times_out() -> None:
    async with mini_server(MiniServer(stall=True)) as server:
        options = ClientOptions(read_timeout=0.3, retry_budget=0.5)
        with trio.fail_after(6):
            async with RegistryClient(f"127.0.0.1:{server.port}", options) as c:
                with pytest.raises(UnreachableError, match=r"sent nothing for 0\.3s"):
                    await c.ping()
                with pytest.raises(UnreachableError, match=r"sent nothing for 0\.3s"):
                    await c.read_range("org/kit", DIGEST, 0, 10)


async def test_dropped_connection_resumed_and_big_reads() -> None:
    server = MiniServer(drop_after=[1 << 20, 12345])
    async with mini_server(server), RegistryClient(f"127.0.0.1:{server.port}") as c:
        async with c.stream_blob("org/kit", DIGEST) as chunks:
            sizes = [len(x) async for x in chunks]
        assert sum(sizes) == len(BLOB)
        assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == SOCKET_READ_SIZE
        ranges = [r.headers.get("range") for r in server.requests]
        assert ranges == [None, f"bytes={1 << 20}-", f"bytes={(1 << 20) + 12345}-"]
        assert server.requests[0].headers["accept-encoding"] == "identity"
        # a range read whose connection drops midway is re-requested from where it stopped
        server.drop_after = [100]
        got = await c.read_range("org/kit", DIGEST, 1000, 2 << 20)
        assert got == BLOB[1000 : 1000 + (2 << 20)]
        assert server.requests[-1].headers["range"] == f"bytes=1100-{1000 + (2 << 20) - 1}"


def _scatter(sizes: list[int]) -> tuple[list[bytearray], list[int]]:
    return [bytearray(b"?" * n) for n in sizes], []


async def test_range_received_into_scattered_buffers() -> None:
    """read_range_into fills uneven buffers in order whatever path the bytes take."""
    sizes = [1, 700_000, 1 << 20, 3, 300_001]
    offset = 12_345
    want = BLOB[offset : offset + sum(sizes)]

    def expected(bufs: list[bytearray]) -> None:
        assert b"".join(bufs) == want

    cases: list[tuple[str, MiniServer]] = [
        ("in place", MiniServer()),
        ("dropped twice mid-body", MiniServer(drop_after=[100, 900_000])),
        ("range ignored: skipped forward", MiniServer(ignore_range=True)),
        ("chunked: copied", MiniServer(chunked=True)),
        ("busy first: error body discarded", MiniServer(fail_with=[503, 503])),
    ]
    for name, server in cases:
        async with mini_server(server), RegistryClient(f"127.0.0.1:{server.port}") as c:
            bufs, done = _scatter(sizes)
            with trio.fail_after(20):
                await c.read_range_into(
                    "org/kit", DIGEST, offset, [memoryview(b) for b in bufs], done.append
                )
            expected(bufs)
            assert done == list(range(len(sizes))), name
    # nothing to read; a range past the end of the blob is an error, never short data
    async with mini_server(MiniServer()) as server, RegistryClient(
        f"127.0.0.1:{server.port}"
    ) as c:
        await c.read_range_into("org/kit", DIGEST, 0, [])
        bufs, done = _scatter([10, 10])
        with pytest.raises(RegistryError, match="past the end of the blob"):
            await c.read_range_into(
                "org/kit", DIGEST, len(BLOB) - 15, [memoryview(b) for b in bufs], done.append
            )


async def test_many_small_buffers_are_received_in_batches_each_reported_once() -> None:
    """Small buffers (256 KiB blocks) are received up to 2 MiB per worker-thread hop: each
    is still reported filled once, in order, on the event loop (no caller code runs in the
    receiving thread)."""
    sizes = [65_536 + 7 * i for i in range(40)]  # 2.6 MB: more than one batch
    offset = 99
    server = MiniServer()
    async with mini_server(server), RegistryClient(f"127.0.0.1:{server.port}") as c:
        bufs, done = _scatter(sizes)
        main = threading.get_ident()
        threads: set[int] = set()

        def filled(i: int) -> None:
            threads.add(threading.get_ident())
            done.append(i)

        with trio.fail_after(20):
            await c.read_range_into("org/kit", DIGEST, offset, [memoryview(b) for b in bufs],
                                    filled)
    assert b"".join(bufs) == BLOB[offset : offset + sum(sizes)]
    assert done == list(range(len(sizes)))
    assert threads == {main}


async def test_a_complete_buffer_is_reported_while_the_rest_of_its_batch_is_awaited() -> None:
    """The registry sends one 256 KiB block and waits for the client to report it: a hop
    that waited for its whole 2 MiB batch first would wait forever."""
    go = trio.Event()
    server = MiniServer(hold_after=(256 << 10, go))
    async with mini_server(server), RegistryClient(f"127.0.0.1:{server.port}") as c:
        bufs, done = _scatter([256 << 10] * 8)

        def filled(i: int) -> None:
            done.append(i)
            go.set()

        with trio.fail_after(10):
            await c.read_range_into("org/kit", DIGEST, 0, [memoryview(b) for b in bufs], filled)
    assert done == list(range(8)) and b"".join(bufs) == BLOB[: 2 << 20]


async def test_an_encoded_body_lands_decoded_across_many_buffers() -> None:
    """A server that gzips a range although asked not to: decoded bytes are copied into
    the buffers, never received in place (decoding one piece of a batch in place
    overwrote the encoded bytes of the next)."""
    sizes = [4096] * 64
    async with mini_server(MiniServer(gzip=True)) as server, RegistryClient(
        f"127.0.0.1:{server.port}"
    ) as c:
        bufs, done = _scatter(sizes)
        with trio.fail_after(10):
            await c.read_range_into("org/kit", DIGEST, 0, [memoryview(b) for b in bufs],
                                    done.append)
    assert b"".join(bufs) == TEXT[: sum(sizes)] and done == list(range(len(sizes)))


async def test_range_into_gives_up_after_the_budget_and_reports_what_arrived() -> None:
    server = MiniServer(drop_after=[(1 << 20) + 5] + [0] * 1000)
    async with mini_server(server):
        options = ClientOptions(retry_budget=0.3)
        async with RegistryClient(f"127.0.0.1:{server.port}", options) as c:
            bufs, done = _scatter([1 << 20, 1 << 20])
            with trio.fail_after(10), pytest.raises(UnreachableError):
                await c.read_range_into(
                    "org/kit", DIGEST, 0, [memoryview(b) for b in bufs], done.append
                )
    assert done == [0] and bufs[0] == BLOB[: 1 << 20]


async def test_range_into_a_stalled_body_times_out_or_is_cancelled_promptly() -> None:
    """The worker thread receiving a body notices its deadline and its task's cancellation."""
    server = MiniServer(stall_after=(1 << 20) + 100)
    async with mini_server(server):
        options = ClientOptions(read_timeout=0.5, retry_budget=0.5)
        async with RegistryClient(f"127.0.0.1:{server.port}", options) as c:
            bufs, done = _scatter([1 << 20, 1 << 20])
            t0 = trio.current_time()
            with trio.fail_after(10), pytest.raises(UnreachableError):
                await c.read_range_into(
                    "org/kit", DIGEST, 0, [memoryview(b) for b in bufs], done.append
                )
            assert done == [0] and bufs[0] == BLOB[: 1 << 20]
            assert trio.current_time() - t0 < 5
        server.stall_after = (1 << 20) + 100
        options = ClientOptions(read_timeout=30, retry_budget=0.5)
        async with RegistryClient(f"127.0.0.1:{server.port}", options) as c:
            bufs, done = _scatter([1 << 20, 1 << 20])
            t0 = trio.current_time()
            with trio.move_on_after(0.5):
                await c.read_range_into(
                    "org/kit", DIGEST, 0, [memoryview(b) for b in bufs], done.append
                )
            assert trio.current_time() - t0 < 2  # not the 30 s read timeout
            assert done == [0]


async def test_blob_connections_kept_alive() -> None:
    server = MiniServer()
    async with mini_server(server), RegistryClient(f"127.0.0.1:{server.port}") as c:
        for offset in (0, 10, 1 << 20):
            assert (
                await c.read_range("org/kit", DIGEST, offset, 1000) == BLOB[offset : offset + 1000]
            )
        async with c.stream_blob("org/kit", DIGEST) as chunks:
            assert sum([len(x) async for x in chunks]) == len(BLOB)
        assert server.connections == 1
        # a server that hangs up after each answer: the next request reconnects
        server.close_silently = True
        for offset in (5, 50, 500):
            assert await c.read_range("org/kit", DIGEST, offset, 10) == BLOB[offset : offset + 10]
        assert len(server.requests) == 7


async def test_chunked_blob_body() -> None:
    server = MiniServer(chunked=True)
    async with mini_server(server), RegistryClient(f"127.0.0.1:{server.port}") as c:
        async with c.stream_blob("org/kit", DIGEST) as chunks:
            assert b"".join([x async for x in chunks]) == BLOB
        assert await c.read_range("org/kit", DIGEST, 299_990, 20) == BLOB[299_990:300_010]
        assert server.connections == 1  # the trailer was consumed and the connection reused


async def test_a_chunked_blob_longer_or_shorter_than_its_descriptor_fails_its_stream() -> None:
    """Without a Content-Length only the bytes themselves tell the size: more than the
    descriptor says fail as they come, fewer at the end."""
    server = MiniServer(chunked=True)
    async with mini_server(server), RegistryClient(f"127.0.0.1:{server.port}") as c:
        received = 0
        with pytest.raises(IntegrityError, match=f"more than the expected {len(BLOB) - 1} bytes"):
            async with c.stream_blob("org/kit", DIGEST, size=len(BLOB) - 1) as chunks:
                async for chunk in chunks:
                    received += len(chunk)
        assert received < len(BLOB)
        with pytest.raises(IntegrityError, match=f"got {len(BLOB)} of {len(BLOB) + 1} bytes"):
            async with c.stream_blob("org/kit", DIGEST, size=len(BLOB) + 1) as chunks:
                async for _ in chunks:
                    pass
        async with c.stream_blob("org/kit", DIGEST, size=len(BLOB)) as chunks:
            assert b"".join([x async for x in chunks]) == BLOB


async def test_dropped_connection_beyond_budget_fails() -> None:
    async with mini_server(MiniServer(drop_after=[10] * 1000)) as server:
        options = ClientOptions(retry_budget=0.3)
        async with RegistryClient(f"127.0.0.1:{server.port}", options) as c:
            with pytest.raises((UnreachableError, IntegrityError)):
                async with c.stream_blob("org/kit", DIGEST) as chunks:
                    async for _ in chunks:
                        pass


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_ca_file_and_verify_off(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))

    def wrap(s: trio.SocketStream) -> trio.abc.Stream:
        return trio.SSLStream(s, server_ctx, server_side=True)

    async with mini_server(MiniServer(), wrap) as server:
        # Loopback registries always get plain http, so drive the TLS client directly.
        url = f"https://127.0.0.1:{server.port}/v2/"
        async with make_http_client(ClientOptions(), None) as http:
            with pytest.raises(httpx.ConnectError) as err:
                await http.get(url)
        mapped = describe_transport_error(err.value, "127.0.0.1", ClientOptions())
        assert isinstance(mapped, UnreachableError) and "not trusted" in str(mapped)
        assert not retryable_transport_error(err.value)
        for options in (ClientOptions(ca_file=str(cert)), ClientOptions(tls_verify=False)):
            async with make_http_client(options, None) as http:
                response = await http.get(url)
                assert response.status_code == 200 and response.content == b"{}"
                # the lean blob path speaks TLS too, and reuses its connection
                blob_url = f"https://127.0.0.1:{server.port}/v2/org/kit/blobs/{DIGEST}"
                for _ in range(2):
                    blob = await http.get(blob_url, extensions={BLOB_EXTENSION: True})
                    assert blob.status_code == 200 and blob.content == BLOB
                # a Sink over TLS: pieces come as bytes and are copied into its buffers
                out = bytearray(len(BLOB))
                sink = Sink([memoryview(out)])
                sink.enabled = True
                async with http.stream("GET", blob_url, extensions={BLOB_EXTENSION: sink}) as r:
                    async for piece in r.aiter_raw():
                        sink.place(piece)
                assert sink.full and out == BLOB


def test_ssl_context_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot load TLS files"):
        ssl_context(ClientOptions(ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(UsageError, match="needs a client certificate"):
        ssl_context(ClientOptions(key_file=str(tmp_path / "k.pem")))
    ctx = ssl_context(ClientOptions(tls_verify=False))
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def test_scheme_choice() -> None:
    for host in ["localhost:5000", "127.0.0.1:5000", "127.3.4.5", "[::1]:5000", "a.localhost"]:
        assert is_loopback(host), host
        assert base_url(host, ClientOptions()).startswith("http://")
    for host in ["ghcr.io", "10.0.0.1:5000", "[fe80::1]:5000", "localhost.example.com"]:
        assert not is_loopback(host), host
        assert base_url(host, ClientOptions()).startswith("https://")
    assert base_url("ghcr.io", ClientOptions(plain_http=True)) == "http://ghcr.io"


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_parse_challenges() -> None:
    [c] = parse_challenges(
        [
            'Bearer realm="https://auth.io/token",service="reg.io",'
            'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"'
        ]
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.io/token",
        "service": "reg.io",
        "scope": "repository:a/b:pull,push repository:c:pull",
        "error": "insufficient_scope",
    }
    basic, bearer = parse_challenges(['Basic realm="x", Bearer realm="y"'])
    assert (basic.scheme, basic.params, bearer.params) == ("basic", {"realm": "x"}, {"realm": "y"})
