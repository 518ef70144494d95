"""What the registry layer does when a registry misbehaves: only kitfs errors, saying what happened.

Against the real Distribution registry where it can show the fault itself (a
range past a blob's end, a blob that is not the size its descriptor says),
through a fault-injecting proxy in front of it where it cannot (HTTP 500), and
against a raw socket server for answers no real registry should send.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from faultproxy import FaultProxy, Rule, Status

from helpers import kitfs, make_project
from kitfs.engine.reader import EngineConfig
from kitfs.engine.session import open_kit
from kitfs.errors import IntegrityError, KitfsError, RegistryError
from kitfs.oci.client import OCI_MANIFEST, ClientOptions, RegistryClient
from kitfs.oci.layout import LocalStorage
from kitfs.oci.reference import parse_reference
from kitfs.oci.source import LocalSource, RegistrySource
from registry import RegistryServer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def pushed(registry: RegistryServer, repo: str, data: bytes) -> str:
    async with RegistryClient(registry.host) as c:
        await c.push_blob_bytes(repo, sha(data), data)
    return sha(data)


async def read_into(
    c: RegistryClient, repo: str, digest: str, offset: int, length: int, **kw: int
) -> bytes:
    buf = bytearray(length)
    await c.read_range_into(repo, digest, offset, [memoryview(buf)], **kw)
    return bytes(buf)


async def streamed(c: RegistryClient, repo: str, digest: str, **kw: int) -> bytes:
    async with c.stream_blob(repo, digest, **kw) as pieces:
        return b"".join([bytes(p) async for p in pieces])


# -- a range past the end of a blob (Distribution: 416, Content-Length, no body) ----------


@pytest.mark.registry
async def test_a_range_past_the_end_of_a_blob_is_a_registry_error_saying_so(
    registry: RegistryServer,
) -> None:
    data = os.urandom(1000)
    digest = await pushed(registry, "faults/past-end", data)
    async with RegistryClient(registry.host, ClientOptions(retry_budget=1)) as c:
        for offset, length in [(1000, 1), (2000, 10), (999, 2)]:
            for read in (c.read_range, partial(read_into, c)):
                with trio.fail_after(10), pytest.raises(RegistryError) as err:
                    await read("faults/past-end", digest, offset, length)
                assert "past the end of the blob" in str(err.value), err.value
                assert "1000 bytes" in str(err.value)
        # the blob and the connections to it are still good afterwards
        assert await c.read_range("faults/past-end", digest, 990, 10) == data[990:]
    source = RegistrySource(parse_reference(f"{registry.host}/faults/past-end:v1"),
                            RegistryClient(registry.host, ClientOptions(retry_budget=1)))
    try:
        with pytest.raises(RegistryError, match="past the end of the blob"):
            await source.read_range(digest, 5000, 1)
    finally:
        await source.aclose()


# -- a blob that is not the size its descriptor says ---------------------------------------


@pytest.mark.registry
@pytest.mark.parametrize("wrong", [-1, 1, -500, 4096])
async def test_a_blob_not_the_size_its_descriptor_says_is_an_integrity_error(
    registry: RegistryServer, wrong: int
) -> None:
    data = os.urandom(5000)
    digest = await pushed(registry, "faults/sizes", data)
    size = len(data) + wrong
    async with RegistryClient(registry.host, ClientOptions(retry_budget=1)) as c:
        # the descriptor's own size reads fine
        assert await c.read_range("faults/sizes", digest, 10, 20, size=len(data)) == data[10:30]
        assert await streamed(c, "faults/sizes", digest, size=len(data)) == data
        reads: list[Callable[[], Awaitable[bytes]]] = [
            partial(c.read_range, "faults/sizes", digest, 0, 100, size=size),
            partial(read_into, c, "faults/sizes", digest, 100, 100, size=size),
            partial(streamed, c, "faults/sizes", digest, size=size),
            partial(c.get_blob, "faults/sizes", digest, size=size),
        ]
        for read in reads:
            with pytest.raises(IntegrityError) as err:
                await read()
            assert "5000 bytes" in str(err.value) and str(size) in str(err.value), err.value
    source = RegistrySource(parse_reference(f"{registry.host}/faults/sizes:v1"),
                            RegistryClient(registry.host, ClientOptions(retry_budget=1)))
    try:
        with pytest.raises(IntegrityError):
            await source.read_range(digest, 0, 10, size=size)
        with pytest.raises(IntegrityError):
            async with source.stream_blob(digest, size=size) as pieces:
                async for _ in pieces:
                    pass
    finally:
        await source.aclose()


@pytest.mark.registry
async def test_a_registry_that_lost_part_of_a_blob_is_caught_by_the_descriptor_size(
    registry: RegistryServer,
) -> None:
    """The blob's file in the registry's storage is cut short: ranges inside what is left
    would read fine, but the registry's Content-Range total betrays it."""
    data = os.urandom(10_000)
    digest = await pushed(registry, "faults/cut", data)
    blob_file = registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / (
        digest[7:9]) / digest[7:] / "data"
    os.truncate(blob_file, 6000)
    async with RegistryClient(registry.host, ClientOptions(retry_budget=1)) as c:
        with pytest.raises(IntegrityError, match=r"6000 bytes.*10000"):
            await c.read_range("faults/cut", digest, 0, 100, size=len(data))


async def test_local_storage_blob_not_the_size_or_digest_its_descriptor_says(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    storage.ensure_layout()
    data = os.urandom(3000)
    digest = storage.put_blob_bytes(data)
    source = LocalSource(parse_reference("faults/local:v1"), storage)
    assert await source.read_range(digest, 10, 10, size=3000) == data[10:20]
    async with source.stream_blob(digest, size=3000) as pieces:
        assert b"".join([p async for p in pieces]) == data
    for size in (2999, 3001):
        with pytest.raises(IntegrityError, match="3000 bytes"):
            await source.read_range(digest, 0, 10, size=size)
        with pytest.raises(IntegrityError):
            async with source.stream_blob(digest, size=size) as pieces:
                async for _ in pieces:
                    pass
    # a blob corrupted on disk: streaming it is a verification, as it is from a registry
    path = storage.blob_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"x" * 3000)
    with pytest.raises(IntegrityError, match="does not match its digest"):
        async with source.stream_blob(digest) as pieces:
            async for _ in pieces:
                pass


# -- HTTP 500 from the registry ---------------------------------------------------------


def blob_gets_fail(proxy: FaultProxy, status: int) -> Rule:
    """Every blob GET through `proxy` answered with `status` and a registry-style error."""
    body = b'{"errors":[{"code":"UNKNOWN","message":"unknown error"}]}'
    return proxy.add(Status(status, body, {"Content-Type": "application/json"}),
                     method="GET", path=r"/blobs/sha256:")


@pytest.mark.registry
async def test_a_registry_answering_500_is_reported_as_such_well_within_the_budget(
    registry: RegistryServer,
) -> None:
    data = os.urandom(4000)
    digest = await pushed(registry, "faults/five-hundred", data)
    with FaultProxy(registry.host) as proxy:
        failing = blob_gets_fail(proxy, 500)
        options = ClientOptions(retry_budget=30, server_error_retry=1)
        async with RegistryClient(proxy.host, options) as c:
            started = time.monotonic()
            with trio.fail_after(10), pytest.raises(RegistryError) as err:
                await c.read_range("faults/five-hundred", digest, 0, 100)
            assert time.monotonic() - started < 5
    assert "500 Internal Server Error" in str(err.value) and "blob" in str(err.value), err.value
    assert "retrying" in str(err.value)
    assert failing.hits >= 2


@pytest.mark.registry
async def test_a_reader_is_told_the_registry_answered_500_not_that_no_data_came(
    registry: RegistryServer, tmp_path: Path,
) -> None:
    """A mount gives its client and its reads the same deadline (`--timeout`): the client's
    retries of a failing registry must end before the reader's deadline does."""
    project = make_project(tmp_path / "p", weight_bytes=3 << 20)
    proc = kitfs("pack", str(project), "-t", f"{registry.host}/faults/engine:v1",
                 home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    with FaultProxy(registry.host) as proxy:
        timeout = 4.0
        options = ClientOptions(read_timeout=timeout, retry_budget=timeout)
        config = EngineConfig(prefetch="none", read_timeout=timeout)
        async with open_kit(parse_reference(f"{proxy.host}/faults/engine:v1"), options,
                            tmp_path / "cache", config=config) as kit, trio.open_nursery() as n:
            await kit.engine.start(n)
            blob_gets_fail(proxy, 500)
            node = kit.tree.nodes["model/model.safetensors"]
            with pytest.raises(KitfsError) as err:
                await kit.engine.read(node, 0, 4096)
            n.cancel_scope.cancel()
    assert "no data" not in str(err.value)
    assert "500 Internal Server Error" in str(err.value), err.value


# -- answers no registry should send: still only kitfs errors -----------------------------


Respond = Callable[[str, str, dict[str, str]], bytes]


@contextlib.asynccontextmanager
async def raw_server(respond: Respond) -> AsyncIterator[str]:
    """A loopback server that answers each request with `respond`'s bytes, then hangs up."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            method, target, _ = head.split("\r\n")[0].split(" ")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in head.split("\r\n")[1:])}
            await stream.send_all(respond(method, target, headers))
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


DIGEST = sha(b"abc")
HEAD_416 = (b"HTTP/1.1 416 Requested Range Not Satisfiable\r\nContent-Length: 1000\r\n"
            b"Content-Range: bytes */1000\r\n\r\n")

CRAFTED: dict[str, bytes] = {
    "416 with a Content-Length and no body": HEAD_416,
    "an error whose body breaks off": (
        b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n{\"errors\": [{\"co"),
    "a malformed status line": b"HTTP/1.1 abc\r\n\r\n",
    "not HTTP at all": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "a header line without a colon": b"HTTP/1.1 200 OK\r\nbogus\r\n\r\n",
    "a Content-Length that is not a number": (
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nx"),
    "a redirect to an invalid URL": (
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://[::1\r\nContent-Length: 0\r\n\r\n"),
    "a redirect to an impossible port": (
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:99999/x\r\n"
        b"Content-Length: 0\r\n\r\n"),
    "a redirect to another scheme": (
        b"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1/x\r\nContent-Length: 0\r\n\r\n"),
    "a 206 with a malformed Content-Range": (
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes x-y/z\r\n"
        b"Content-Length: 10\r\n\r\n0123456789"),
    "headers that are not UTF-8": (
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes \xff-\xfe/\xfd\r\n"
        b"Docker-Content-Digest: \xff\r\nContent-Length: 10\r\n\r\n0123456789"),
    "a Content-Length in odd digits": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Size: \xb2\r\n"
        b"Content-Range: bytes 0-\xb2/\xb2\r\n\r\nx"),
    "a bad chunk header": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    "a body that is not the gzip it claims": (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello"),
    "a next page link to an invalid URL": (
        b"HTTP/1.1 200 OK\r\nLink: <http://[::1>; rel=\"next\"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"tags\": [\"a\"]}"),
    "an upload location that is not a URL": (  # to POST; HEAD and GET get a 404
        b"HTTP/1.1 202 Accepted\r\nLocation: http://[::1/x\r\nContent-Length: 0\r\n\r\n"),
    "a Retry-After past the end of time": (
        b"HTTP/1.1 503 Busy\r\nRetry-After: 1e400\r\nContent-Length: 0\r\n\r\n"),
    "a bearer challenge with an unusable realm": (
        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://[::1\"\r\n"
        b"Content-Length: 0\r\n\r\n"),
}


async def _drain(c: RegistryClient) -> None:
    async with c.stream_blob("r/x", DIGEST) as pieces:
        async for _ in pieces:
            pass


OPERATIONS: dict[str, Callable[[RegistryClient], Awaitable[object]]] = {
    "ping": lambda c: c.ping(),
    "get_manifest": lambda c: c.get_manifest("r/x", "v1"),
    "resolve_modelkit": lambda c: c.resolve_modelkit("r/x", "v1"),
    "put_manifest": lambda c: c.put_manifest("r/x", "v1", b"{}", OCI_MANIFEST),
    "delete_manifest": lambda c: c.delete_manifest("r/x", DIGEST),
    "head_blob": lambda c: c.head_blob("r/x", DIGEST),
    "get_blob": lambda c: c.get_blob("r/x", DIGEST),
    "stream_blob": _drain,
    "read_range": lambda c: c.read_range("r/x", DIGEST, 1, 2),
    "read_range_into": lambda c: read_into(c, "r/x", DIGEST, 1, 2),
    "push_blob_bytes": lambda c: c.push_blob_bytes("r/x", DIGEST, b"abc"),
    "list_tags": lambda c: c.list_tags("r/x"),
    "referrers": lambda c: c.referrers("r/x", DIGEST),
}


@pytest.mark.parametrize("answer", list(CRAFTED), ids=list(CRAFTED))
async def test_every_public_method_fails_with_a_kitfs_error_whatever_the_answer(
    answer: str,
) -> None:
    options = ClientOptions(retry_budget=0.05, connect_retry=0.05, read_timeout=2,
                            connect_timeout=2)
    escaped: list[str] = []
    def respond(method: str, target: str, headers: dict[str, str]) -> bytes:
        if answer.startswith("an upload location") and method != "POST":
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return CRAFTED[answer]

    async with raw_server(respond) as host:
        for name, operation in OPERATIONS.items():
            async with RegistryClient(host, options) as c:
                try:
                    with trio.fail_after(10):
                        await operation(c)
                except KitfsError as exc:
                    assert "\n" not in str(exc) and str(exc).strip(), (name, str(exc))
                except Exception as exc:
                    escaped.append(f"{name}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
    assert not escaped, "\n".join(escaped)


async def test_a_token_with_a_line_break_never_smuggles_a_header() -> None:
    """A token service's token goes into a header as is: a line break in it must not
    start a header of its own, on the blob path (which writes request heads itself)
    or on httpx's."""
    seen: list[dict[str, str]] = []

    def respond(method: str, target: str, headers: dict[str, str]) -> bytes:
        seen.append(headers)
        if target.startswith("/token"):
            body = b'{"token": "t0ken\\r\\nX-Smuggled: yes"}'
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        realm = f'Bearer realm="http://{headers["host"]}/token"'.encode()
        return (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: " + realm
                + b"\r\nContent-Length: 0\r\n\r\n")

    options = ClientOptions(retry_budget=0.05, connect_retry=0.05)
    async with raw_server(respond) as host:
        for name in ("get_manifest", "read_range", "read_range_into", "stream_blob"):
            async with RegistryClient(host, options) as c:
                with pytest.raises(RegistryError):
                    await OPERATIONS[name](c)
    assert len(seen) >= 8
    assert not [h for h in seen if "x-smuggled" in h]
