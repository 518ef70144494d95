"""Which failures let a mount fall back to the kept manifest (kitfs/offline.py), by cause.

Real failures from the real client: a closed port is an outage (falls back); an
untrusted certificate, a proxy refusing the tunnel, and kitfs's own pool running out
are not (BlockedError), whatever their messages say.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from kitfs.errors import BlockedError, UnreachableError
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.proxy import Proxies, parse_proxy
from kitfs.oci.session import describe_transport_error
from kitfs.oci.transport import make_http_client
from kitfs.offline import falls_back


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_closed_port_falls_back() -> None:
    with trio.fail_after(10):
        async with RegistryClient(f"127.0.0.1:{_closed_port()}") as client:
            with pytest.raises(UnreachableError) as err:
                await client.ping()
    assert falls_back(err.value)


async def test_an_untrusted_certificate_does_not_fall_back(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))

    async def handshake(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.do_handshake()
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handshake, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with make_http_client(ClientOptions(), None) as http:
                with pytest.raises(httpx.ConnectError) as err:
                    await http.get(f"https://127.0.0.1:{port}/v2/")
            nursery.cancel_scope.cancel()
    mapped = describe_transport_error(err.value, "127.0.0.1", ClientOptions())
    assert isinstance(mapped, BlockedError) and not falls_back(mapped)


async def test_a_proxy_refusing_the_tunnel_does_not_fall_back() -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = await stream.receive_some(4096)
            if not piece:
                break
            data += piece
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, refuse, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            proxy = parse_proxy(f"http://127.0.0.1:{port}", "--proxy")
            options = ClientOptions(proxies=Proxies(explicit=proxy), retry_budget=1.0)
            async with RegistryClient("registry.example.com", options) as client:
                with pytest.raises(UnreachableError) as err:
                    await client.ping()
            nursery.cancel_scope.cancel()
    assert "refused a tunnel" in str(err.value)
    assert "TLS" not in str(err.value)  # the message alone would have let it fall back
    assert not falls_back(err.value)


def test_no_free_connection_in_our_own_pool_does_not_fall_back() -> None:
    mapped = describe_transport_error(httpx.PoolTimeout("pool"), "r.example", ClientOptions())
    assert isinstance(mapped, BlockedError) and not falls_back(mapped)
