"""A lean HTTP/1.1 GET path for blob bodies, beside httpx's own transport.

Why it exists: through httpx, h11 and httpcore every received buffer is
copied three times (into h11's receive buffer, out of it as an event, into a
`bytes` for httpx) and walks a state machine; on these machines that caps one
stream near 1 GB/s of CPU-bound Python while curl does 2 GB/s. Blob GETs are
the one request kitfs makes by the gigabyte, so they get this path: the body
is handed to the caller as the very `bytes` objects the socket read
returned, in reads of `read_size`, or, when the request carries a `Sink`,
received straight into the caller's buffers (no copy at all in Python).

Everything else (auth, redirects, retries, error mapping) stays in
`RegistrySession`, which marks blob GETs with the `BLOB_EXTENSION` request
extension; unmarked requests, and every other method, go to the wrapped
httpx transport. The exceptions raised here are httpx's transport errors and
nothing else (socket, TLS and parsing failures are turned into them where
they happen), so the session maps them exactly as it maps httpx's own; only
the caller's own `Sink` callbacks and cancellation pass through as they are.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import httpx
import trio

from kitfs.oci.proxy import Proxies, Proxy

BLOB_EXTENSION = "kitfs.blob"
_MAX_HEAD = 64 << 10
_IDLE_EXPIRY = 15.0
_MAX_IDLE_PER_HOST = 16


class Sink:
    """Caller-owned buffers that a blob range lands in, filled in order.

    The transport receives a body straight into `rooms()` (one copy, kernel to
    buffer) while `enabled`; its consumer `place()`s every piece it is handed,
    which costs nothing for a piece received in place and copies anything else
    (bytes buffered with the headers, a TLS stream, a retried response). So the
    bytes in the buffers never depend on which path a piece took. `filled(i)`
    is called once buffer i is complete, before later ones are handed out (on a
    plain TCP connection, small buffers are received up to 2 MiB at a time).

    On a plain TCP connection buffers are received whole in a worker thread
    (no event-loop work per socket read); `filled(i)` is then called on the
    event loop for every buffer that hop completed, one after another. What
    the consumer does with them (checks, hashing) is its own business: no
    consumer code runs in the receiving thread.
    """

    def __init__(
        self,
        buffers: Sequence[memoryview],
        filled: Callable[[int], None] | None = None,
    ) -> None:
        self._buffers = buffers
        self._filled = filled
        self._index = 0
        self._at = 0
        self.enabled = False
        self._last: memoryview | None = None

    @property
    def full(self) -> bool:
        return self._index >= len(self._buffers)

    def rooms(self, limit: int, most: int) -> list[memoryview]:
        """Where the next received bytes go (at most `limit`): the rest of the current
        buffer, then whole buffers after it while the total is under `most`. Empty: use
        your own buffer."""
        out: list[memoryview] = []
        if not self.enabled:
            return out
        index, at, total = self._index, self._at, 0
        while index < len(self._buffers) and total < limit and (not out or total < most):
            buf = self._buffers[index]
            n = min(len(buf) - at, limit - total)
            out.append(buf[at : at + n])
            total += n
            index, at = index + 1, 0
        return out

    def received(self, piece: memoryview) -> memoryview:
        """Mark `piece` (one of the last `rooms()`, or a prefix of it) as received in place."""
        self._last = piece
        return piece

    def place(self, piece: bytes | bytearray | memoryview) -> None:
        """Account for the next piece of the body, copying it unless it was received in place."""
        if piece is self._last:
            self._last = None
            self._advance(len(piece))
            return
        view = memoryview(piece)
        while view.nbytes:
            if self.full:
                raise ValueError("more bytes than the sink's buffers hold")
            buf = self._buffers[self._index]
            n = min(view.nbytes, len(buf) - self._at)
            buf[self._at : self._at + n] = view[:n]
            view = view[n:]
            self._advance(n)

    def release(self) -> None:
        """Let go of the caller's buffers and callbacks: the read is over.

        A finished httpx response is a reference cycle (the response and its
        bound stream) that only the cyclic garbage collector frees, and the
        sink hangs off its request: while the sink held them, every buffer of
        the range (and through `filled`, the caller's own) stayed alive until a
        collection, hundreds of MiB at a time on a fast read.
        """
        self._buffers = ()
        self._filled = None
        self._last = None
        self.enabled = False

    def _advance(self, n: int) -> None:
        self._at += n
        while not self.full and self._at >= len(self._buffers[self._index]):
            self._at -= len(self._buffers[self._index])
            if self._filled is not None:
                self._filled(self._index)
            self._index += 1


_Key = tuple[str, str, int, Proxy | None]
"""What a kept-alive connection can serve: scheme, host and port, through which proxy."""


@dataclass
class _Connection:
    stream: trio.abc.Stream
    key: _Key
    forward: Proxy | None = None
    """The http:// proxy this connection talks to: requests go in absolute form."""
    idle_since: float = 0.0
    reused: bool = False
    buffered: bytearray = field(default_factory=bytearray)


class BlobTransport(httpx.AsyncBaseTransport):
    """Serves marked GETs over its own keep-alive connections; delegates the rest."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        ssl_context: ssl.SSLContext,
        *,
        connect_timeout: float,
        read_timeout: float,
        read_size: int,
        proxies: Proxies = Proxies(),  # noqa: B008 - frozen, so sharing is safe
    ) -> None:
        self._inner = inner
        self._proxies = proxies
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._read_size = read_size
        self._idle: dict[_Key, list[_Connection]] = {}

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await trio.aclose_forcefully(conn.stream)
        await self._inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET" or not request.extensions.get(BLOB_EXTENSION):
            return await self._inner.handle_async_request(request)
        if request.url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {request.url.scheme!r}")
        for _ in range(2):
            conn = await self._checkout(request.url)
            try:
                await self._send_head(conn, request)
                status, reason, headers = await self._read_head(conn)
            except _StaleConnection:
                # A kept-alive connection the server had closed: try once on a new one.
                await trio.aclose_forcefully(conn.stream)
                continue
            except BaseException:
                await trio.aclose_forcefully(conn.stream)
                raise
            sink = request.extensions.get(BLOB_EXTENSION)
            # Received in place only as sent: httpx decodes a Content-Encoding piece by
            # piece, and decoded bytes placed at the cursor would overwrite encoded ones
            # of the same batch not yet decoded.
            encoded = any(name.lower() == b"content-encoding" and value.lower() != b"identity"
                          for name, value in headers)
            body = _Body(self, conn, _framing(status, headers), self._read_size,
                         self._read_timeout,
                         sink if isinstance(sink, Sink) and status in (200, 206) and not encoded
                         else None)
            return httpx.Response(
                status,
                headers=headers,
                stream=body,
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
            )
        raise httpx.ConnectError("server closed the kept-alive connection twice")

    # -- connections ------------------------------------------------------------------

    async def _checkout(self, url: httpx.URL) -> _Connection:
        port = url.port or (443 if url.scheme == "https" else 80)
        proxy = self._proxies.select(url.scheme, url.raw_host.decode("ascii"), port)
        if proxy is not None and not proxy.supported:
            raise httpx.UnsupportedProtocol(proxy.unsupported)
        key = (url.scheme, url.host, port, proxy)
        idle = self._idle.get(key, [])
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < _IDLE_EXPIRY:
                conn.reused = True
                return conn
            await trio.aclose_forcefully(conn.stream)
        stream = await self._connect(url.scheme, url.raw_host.decode("ascii"), port, proxy)
        forward = proxy if proxy is not None and url.scheme == "http" else None
        return _Connection(stream, key, forward)

    async def _connect(
        self, scheme: str, host: str, port: int, proxy: Proxy | None
    ) -> trio.abc.Stream:
        """A connection to `host:port`, or to its proxy: as it is for an http:// URL (the
        request goes to the proxy in absolute form), tunnelled with CONNECT for https://."""
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self._connect_timeout):
                if proxy is None:
                    stream = await trio.open_tcp_stream(host, port)
                else:
                    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
                    if proxy.scheme == "https":
                        stream = await self._tls(stream, proxy.host)
                    if scheme == "https":
                        await self._tunnel(stream, host, port, proxy)
                if scheme == "https":
                    stream = await self._tls(stream, host)
                return stream
        except BaseException as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            where = f"{host}:{port}" if proxy is None else f"proxy {proxy.netloc}"
            if isinstance(exc, trio.TooSlowError):
                raise httpx.ConnectTimeout(f"no connection to {where}") from None
            if isinstance(exc, OSError | trio.BrokenResourceError | ValueError):
                # ValueError: a host name the resolver cannot even encode (UnicodeError).
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            raise

    async def _tls(self, stream: trio.abc.Stream, host: str) -> trio.SSLStream[trio.abc.Stream]:
        tls = trio.SSLStream(stream, self._ssl, server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return tls

    async def _tunnel(self, stream: trio.abc.Stream, host: str, port: int, proxy: Proxy) -> None:
        """Ask `proxy` for a tunnel to `host:port`; httpx.ProxyError if it says no (as
        httpcore's tunnel says it: "407 Proxy Authentication Required")."""
        target = (f"[{host}]" if ":" in host else host) + f":{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.authorization is not None:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        if any(c in line for line in lines for c in "\r\n\0"):
            raise httpx.LocalProtocolError("line break or NUL in the CONNECT request")
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = _Connection(stream, ("", host, port, proxy))
        status, reason, _ = await self._read_head(answer)
        if not 200 <= status < 300:
            raise httpx.ProxyError(f"{status} {reason.decode('latin-1')}".rstrip())
        if answer.buffered:
            raise httpx.ProxyError("the proxy sent data before the tunnel was used")

    async def _release(self, conn: _Connection) -> None:
        """Keep a connection whose response was read to the end, for the next request."""
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= _MAX_IDLE_PER_HOST:
            await trio.aclose_forcefully(idle.pop(0).stream)
        conn.idle_since = trio.current_time()
        conn.reused = False
        idle.append(conn)

    # -- the exchange -----------------------------------------------------------------

    async def _send_head(self, conn: _Connection, request: httpx.Request) -> None:
        url = request.url
        target = url.raw_path
        lines = [b"GET " + target + b" HTTP/1.1"]
        if conn.forward is not None:  # to an http:// proxy: the whole URL, and its credentials
            lines[0] = b"GET " + url.raw_scheme + b"://" + url.netloc + target + b" HTTP/1.1"
            if conn.forward.authorization is not None:
                lines.append(b"Proxy-Authorization: " + conn.forward.authorization.encode())
        lines.extend(k + b": " + v for k, v in request.headers.raw)
        if any(c in line for line in lines for c in (b"\r", b"\n", b"\0")):
            # A token or path with a line break would smuggle headers (h11 refuses these too).
            raise httpx.LocalProtocolError("line break or NUL in the request head")
        try:
            with trio.fail_after(self._read_timeout):
                await conn.stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
        except trio.TooSlowError:
            raise httpx.WriteTimeout("sending the request timed out") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if conn.reused:
                raise _StaleConnection from exc
            raise httpx.WriteError(str(exc) or "connection lost") from exc

    async def _read_head(self, conn: _Connection) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        buf = conn.buffered
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("response headers too long")
            data = await _receive(conn.stream, 65536, self._read_timeout)
            if not data:
                if conn.reused and not buf:
                    raise _StaleConnection
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            buf += data
        head = bytes(buf[:end])
        del buf[: end + 4]
        status_line, *header_lines = head.split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"malformed status line {status_line[:80]!r}")
        headers: list[tuple[bytes, bytes]] = []
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError("malformed response header")
            headers.append((name.strip(), value.strip()))
        status = int(parts[1])
        if 100 <= status < 200:  # an interim response: the real one follows
            return await self._read_head(conn)
        reason = parts[2] if len(parts) > 2 else b""
        return status, reason, headers


class _StaleConnection(Exception):
    pass


@dataclass(frozen=True)
class _Framing:
    length: int | None  # bytes of body; None: until the connection closes
    chunked: bool
    keep_alive: bool


def _framing(status: int, headers: list[tuple[bytes, bytes]]) -> _Framing:
    values = {k.lower(): v for k, v in headers}
    keep_alive = values.get(b"connection", b"").lower() != b"close"
    if status in (204, 304):
        return _Framing(0, False, keep_alive)
    if b"chunked" in values.get(b"transfer-encoding", b"").lower():
        return _Framing(None, True, keep_alive)
    length = values.get(b"content-length")
    if length is not None:
        if not length.isdigit():
            raise httpx.RemoteProtocolError("malformed Content-Length")
        return _Framing(int(length), False, keep_alive)
    return _Framing(None, False, False)


async def _receive(stream: trio.abc.Stream, max_bytes: int, timeout: float) -> bytes:
    try:
        with trio.fail_after(timeout):
            return bytes(await stream.receive_some(max_bytes))
    except trio.TooSlowError:
        raise httpx.ReadTimeout(f"no data for {timeout:g}s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.ReadError(str(exc) or "connection lost") from exc


#: How often a receiving worker thread looks whether its task was cancelled.
_POLL_SLICE_MS = 200


#: Up to this much is received into consecutive sink buffers in one thread hop.
_RECEIVE_BATCH = 2 << 20


async def _receive_into_sink(
    stream: trio.SocketStream, rooms: list[memoryview], timeout: float,
) -> tuple[list[memoryview], BaseException | None]:
    """Fill `rooms` (the rest of a sink buffer and whole ones after it) in one worker
    thread: what arrived of each (fewer at EOF), and what stopped it early, if anything.

    One thread hop per up to 2 MiB instead of an event-loop round per socket
    read (about 440 KiB each on loopback): the event loop, which also answers
    every FUSE request, spent a fifth of its time receiving. Several buffers per
    hop, not one: a range of 256 KiB blocks paid a hop per block (random tensor
    reads 0.15-0.19 GB/s, 0.17-0.22 with batches). The socket is polled in short
    slices so a cancelled read returns within one, and the thread is always
    waited for, so nobody closes the socket under it. The hop ends as soon as
    the socket runs dry with a buffer complete, so a consumer waiting for the
    first block of a slow range does not wait for the batch; buffers completed
    before a timeout, an error or a cancellation are still handed out.
    """
    fd = stream.socket.fileno()
    got = [0] * len(rooms)
    stopped: list[BaseException] = []

    def fill() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        quiet_since = time.monotonic()
        k = 0
        try:
            while k < len(rooms):
                views = [rooms[k][got[k] :], *rooms[k + 1 :]]
                try:
                    n = os.readv(fd, views)
                except BlockingIOError:
                    if k:  # buffers complete and the socket dry: hand them out now
                        break
                    if time.monotonic() - quiet_since > timeout:
                        raise TimeoutError from None
                    trio.from_thread.check_cancelled()
                    poller.poll(_POLL_SLICE_MS)
                    continue
                if n == 0:
                    raise EOFError  # the peer closed: what arrived is handed out first
                quiet_since = time.monotonic()
                while n and k < len(rooms):
                    view = rooms[k]
                    take = min(n, len(view) - got[k])
                    got[k] += take
                    n -= take
                    if got[k] == len(view):
                        k += 1
        except BaseException as exc:  # handed to the event loop with what did arrive
            stopped.append(exc)

    await trio.to_thread.run_sync(fill)
    pieces = [view[:n] for view, n in zip(rooms, got, strict=True) if n]
    cause = stopped[0] if stopped else None
    error: BaseException | None = cause
    if isinstance(cause, TimeoutError):
        error = httpx.ReadTimeout(f"no data for {timeout:g}s")
    elif isinstance(cause, OSError):
        error = httpx.ReadError(str(cause) or "connection lost")
        error.__cause__ = cause  # what root_reason reports, as `raise ... from` kept it
    elif isinstance(cause, EOFError):
        error = httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body")
    return pieces, error


class _Body(httpx.AsyncByteStream):
    """The response body; the connection goes back to the pool only if read to the end."""

    def __init__(
        self,
        transport: BlobTransport,
        conn: _Connection,
        framing: _Framing,
        read_size: int,
        timeout: float,
        sink: Sink | None = None,
    ) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._framing = framing
        self._read_size = read_size
        self._timeout = timeout
        self._sink = sink

    # Pieces received into a Sink are memoryviews of the caller's buffers; httpx
    # hands them on untouched (identity decoding, no chunk size), though its stub says bytes.
    async def __aiter__(self) -> AsyncIterator[bytes | memoryview]:  # type: ignore[override]
        conn = self._conn
        if conn is None:
            return
        if self._framing.chunked:
            async for chunk in self._chunked(conn):
                yield chunk
            await self._done()
            return
        length = self._framing.length
        received = 0
        if conn.buffered:
            first = bytes(conn.buffered if length is None else conn.buffered[:length])
            del conn.buffered[: len(first)]
            received += len(first)
            if length is not None and received == length:
                await self._done()  # before the last yield: callers often stop right there
            if first:
                yield first
        sink = self._sink if isinstance(conn.stream, trio.SocketStream) else None
        while length is None or received < length:
            want = self._read_size if length is None else min(self._read_size, length - received)
            # Into the sink: the rest of its current buffer and whole ones after it, up to
            # _RECEIVE_BATCH, at once, not read_size.
            rooms = sink.rooms(length - received, _RECEIVE_BATCH) if (
                sink is not None and length) else []
            if rooms and sink is not None:
                pieces, error = await _receive_into_sink(
                    conn.stream, rooms, self._timeout  # type: ignore[arg-type]
                )
                for piece in pieces:
                    received += len(piece)
                    if received == length:
                        await self._done()
                    yield sink.received(piece)
                if error is not None:
                    raise error
                continue
            data: bytes | memoryview = await _receive(conn.stream, want, self._timeout)
            if not data:
                if length is None:
                    await self.aclose()
                    return
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    f"(received {received} bytes, expected {length})"
                )
            received += len(data)
            if received == length:
                await self._done()
            yield data

    async def _done(self) -> None:
        """The whole body arrived: the connection can serve another request."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._framing.keep_alive and not conn.buffered:
            await self._transport._release(conn)
        else:
            await trio.aclose_forcefully(conn.stream)

    async def _chunked(self, conn: _Connection) -> AsyncIterator[bytes]:
        while True:
            line = await self._line(conn)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx.RemoteProtocolError("malformed chunk header") from None
            if size == 0:
                while await self._line(conn):  # trailers, then the blank line
                    pass
                return
            async for piece in self._exact(conn, size):
                yield piece
            if await self._line(conn):
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")

    async def _exact(self, conn: _Connection, size: int) -> AsyncIterator[bytes]:
        received = 0
        if conn.buffered:
            first = bytes(conn.buffered[:size])
            del conn.buffered[: len(first)]
            received = len(first)
            yield first
        while received < size:
            data = await _receive(conn.stream, min(self._read_size, size - received), self._timeout)
            if not data:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            received += len(data)
            yield data

    async def _line(self, conn: _Connection) -> bytes:
        buf = conn.buffered
        while True:
            end = buf.find(b"\r\n")
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 2]
                return line
            if len(buf) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("chunk header too long")
            data = await _receive(conn.stream, 65536, self._timeout)
            if not data:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            buf += data

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await trio.aclose_forcefully(conn.stream)
