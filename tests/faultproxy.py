"""A fault-injecting HTTP/1.1 reverse proxy in front of a real registry.

Why it exists: the in-process fake (fakeregistry.py) only sees what httpx's
MockTransport hands it, so it can never exercise kitfs's own raw-socket blob
receiver (kitfs/oci/blobtransport.py), real keep-alive pools, real timeouts or
a connection that dies half-way through a body. This proxy is a real TCP
server on a free loopback port that forwards every request, unchanged, to a
real CNCF Distribution registry (tests/registry.py) and sends its answer back
byte for byte, so the registry stays the source of truth: the proxy adds
faults on top of it, it never stands in for it. A test points kitfs at
"127.0.0.1:PROXYPORT/repo:tag" and adds rules that make chosen requests fail:
an error status, a hang, a truncated, corrupted, rewritten or slow body, a
reset connection, a Range that is ignored.

It is deliberately plain: one thread per client connection
(ThreadingHTTPServer), one http.client connection upstream per client
connection, bodies streamed through in pieces (a 100 MiB blob is never held in
memory), HTTP/1.1 framing kept faithful (Content-Length, keep-alive, HEAD
without a body, 206/Content-Range, redirects passed through untouched, a
chunked upstream body re-framed as chunked). The Host header is passed through,
so the Locations the registry builds (uploads, redirects) point back at the
proxy. It listens on 127.0.0.1 only and refuses any other peer.

    with FaultProxy(registry.host) as proxy:
        proxy.add(Status(503), path=r"/blobs/sha256:", count=1)
        ...  # kitfs against proxy.host
        assert proxy.blob_requests() == 2
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import ipaddress
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Corrupt",
    "Fault",
    "FaultProxy",
    "Hang",
    "IgnoreRange",
    "Replace",
    "Reset",
    "Rule",
    "Seen",
    "Slow",
    "Status",
    "Truncate",
]

# Headers that describe one hop, not the message; never forwarded as they came.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "expect",
})


# -- faults ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """Answer with this status instead of forwarding; the request never reaches the registry.

    Content-Length is len(body) unless `headers` names one; when that differs
    from len(body) (say a 416 that declares N bytes and sends none, as
    Distribution's own does) the connection is closed after the body, as a
    server that broke its framing would.
    """

    code: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hang:
    """Stall for `seconds`, then close the connection.

    after_bytes None: send nothing at all (the request is not forwarded).
    0: forward, send the registry's status and headers, then nothing.
    N: send the headers and N body bytes, then nothing (a stall mid-body).
    close() ends every hang at once.
    """

    seconds: float
    after_bytes: int | None = None


@dataclass(frozen=True)
class Truncate:
    """Forward the headers unchanged, send only `after_bytes` body bytes, close the connection."""

    after_bytes: int


@dataclass(frozen=True)
class Corrupt:
    """Flip (xor 0xff) the bytes at these absolute blob offsets, wherever they fall.

    Offsets count from the start of the blob: a 206's Content-Range start is
    added to the body position, so the same offset is corrupted whichever range
    carries it. Applied to 200 and 206 bodies only.
    """

    offsets: frozenset[int]

    def __init__(self, offsets: Iterable[int]) -> None:
        object.__setattr__(self, "offsets", frozenset(offsets))


@dataclass(frozen=True)
class Replace:
    """Rewrite each piece of a 200/206 body: fn(blob_offset, data) -> bytes of the same length.

    For lying in exactly chosen places (a tar header, a tensor's bytes). A
    result of another length is an error: the connection is closed there.
    """

    fn: Callable[[int, bytes], bytes]


@dataclass(frozen=True)
class Slow:
    """Dribble the body at about `bytes_per_s`."""

    bytes_per_s: float


@dataclass(frozen=True)
class Reset:
    """Close the connection without answering: a TCP RST, or with rst=False a plain FIN."""

    rst: bool = True


@dataclass(frozen=True)
class IgnoreRange:
    """Forward without Range/If-Range, so the registry answers 200 with the whole blob."""


Fault = Status | Hang | Truncate | Corrupt | Replace | Slow | Reset | IgnoreRange


# -- rules and the log -----------------------------------------------------------------


def parse_range(value: str | None) -> list[tuple[int | None, int | None]] | None:
    """The byte ranges of a Range header as [start, end) pairs, None where open.

    A suffix range ("bytes=-N") has no known start without the blob's size:
    it is (None, None), which overlaps everything. No header: None.
    """
    if value is None:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes":
        return []
    out: list[tuple[int | None, int | None]] = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        if not dash:
            continue
        try:
            if not first.strip():
                out.append((None, None))
            else:
                out.append((int(first), int(last) + 1 if last.strip() else None))
        except ValueError:
            continue
    return out


def _overlaps(value: str | None, lo: int, hi: int) -> bool:
    ranges = parse_range(value)
    if ranges is None:
        return True  # no Range: the whole blob
    return any((a is None or a < hi) and (b is None or b > lo) for a, b in ranges)


@dataclass(eq=False)
class Rule:
    """Which requests get `faults`: method (None: any), a regex searched in the
    request target, whether the Range overlaps [lo, hi) of the blob, and how
    many matching requests it applies to (None: all). `hits` counts them."""

    faults: tuple[Fault, ...]
    method: str | None = None
    path: str = ""
    overlaps: tuple[int, int] | None = None
    count: int | None = None
    hits: int = 0

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.path)

    @property
    def spent(self) -> bool:
        return self.count is not None and self.hits >= self.count

    def matches(self, method: str, target: str, range_header: str | None) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if not self._pattern.search(target):
            return False
        return self.overlaps is None or _overlaps(range_header, *self.overlaps)


@dataclass(eq=False)
class Seen:
    """One request as the proxy handled it.

    Appended when the request arrives; `status` is set just before the
    response head is sent, `sent` (body bytes, without chunk framing) grows as
    the body goes out, and `done` is set at the end: call FaultProxy.settle()
    before asserting on `sent`. `status` stays None where nothing was answered.
    """

    method: str
    path: str
    range: str | None
    rule: Rule | None = None
    status: int | None = None
    sent: int = 0
    error: str | None = None
    done: bool = False

    @property
    def faults(self) -> tuple[Fault, ...]:
        return self.rule.faults if self.rule is not None else ()


class _Stop(Exception):
    """The response ends here and the connection is closed (a fault, or a dead peer)."""


# -- the proxy -------------------------------------------------------------------------


class FaultProxy:
    """A loopback reverse proxy to `upstream` ("host:port") that can misbehave on request.

    Starts serving in the constructor; close() (or leaving the `with` block)
    stops it within a second, ending hangs and idle keep-alive connections.
    """

    def __init__(
        self,
        upstream: str,
        *,
        piece_size: int = 64 << 10,
        upstream_timeout: float = 30.0,
        idle_timeout: float = 60.0,
    ) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host.strip("[]"), int(port))
        self.piece_size = piece_size
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._rules: list[Rule] = []
        self._log: list[Seen] = []
        self._handlers: set[_Handler] = set()
        self.stopping = threading.Event()
        handler = type("Handler", (_Handler,), {"proxy": self, "timeout": idle_timeout})
        self._server = _Server(("127.0.0.1", 0), handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"faultproxy:{self.port}", daemon=True,
        )
        self._thread.start()

    @property
    def host(self) -> str:
        """Where clients connect: "127.0.0.1:PORT" (a registry host for kitfs references)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # rules

    def add(
        self,
        *faults: Fault,
        method: str | None = None,
        path: str = "",
        overlaps: tuple[int, int] | None = None,
        count: int | None = None,
    ) -> Rule:
        """Apply `faults` (together) to matching requests; the first unspent matching rule wins."""
        if not faults:
            raise ValueError("a rule needs at least one fault")
        rule = Rule(tuple(faults), method, path, overlaps, count)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        """Drop every rule; requests in flight keep the faults they already have."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def _claim(self, method: str, target: str, range_header: str | None) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.spent and rule.matches(method, target, range_header):
                    rule.hits += 1
                    return rule
        return None

    # the log

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        """The requests seen so far, oldest first; filtered by method and a regex on the target."""
        with self._lock:
            seen = list(self._log)
        return [s for s in seen
                if (method is None or s.method == method.upper())
                and (path is None or re.search(path, s.path))]

    def blob_requests(self, digest: str | None = None, method: str | None = "GET") -> int:
        """How many requests went to /blobs/<digest> (any blob when None); uploads not counted."""
        pattern = r"/blobs/" + (re.escape(digest) if digest else r"[a-z0-9]+:")
        return len(self.requests(method, pattern))

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until every logged request is done (so `sent` is final); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(s.done for s in self._log):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._log.append(seen)

    def _finish(self, seen: Seen) -> None:
        with self._changed:
            seen.done = True
            self._changed.notify_all()

    # lifetime

    def close(self) -> None:
        """Stop accepting, end hangs, and cut every open connection (both sides)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            handlers = list(self._handlers)
        for h in handlers:
            h.cut()
        deadline = time.monotonic() + 0.8
        for h in handlers:
            h.thread.join(max(0.0, deadline - time.monotonic()))
        self._thread.join(0.2)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.host} -> {self.upstream[0]}:{self.upstream[1]})"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False
    request_queue_size = 128  # a pool opening many connections at once is not made to wait

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Loopback peers only, even though the socket is bound to 127.0.0.1."""
        try:
            return ipaddress.ip_address(client_address[0]).is_loopback
        except ValueError:
            return False


class _Handler(BaseHTTPRequestHandler):
    """One client connection: each request forwarded upstream, faults applied on the way."""

    proxy: FaultProxy
    protocol_version = "HTTP/1.1"
    _upstream: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        self.thread = threading.current_thread()
        with self.proxy._lock:
            self.proxy._handlers.add(self)

    def finish(self) -> None:
        self._drop_upstream()
        with contextlib.suppress(OSError):
            super().finish()
        with self.proxy._lock:
            self.proxy._handlers.discard(self)

    def cut(self) -> None:
        """From close(): wake this thread wherever it blocks, on either socket."""
        for sock in (self.connection, getattr(self._upstream, "sock", None)):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_one_request(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle_one_request()
            return
        self.close_connection = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method is proxied alike
            return self._proxy
        raise AttributeError(name)

    # -- one request ------------------------------------------------------------------

    def _proxy(self) -> None:
        proxy = self.proxy
        range_header = self.headers.get("Range")
        seen = Seen(self.command, self.path, range_header)
        proxy._record(seen)
        rule = proxy._claim(self.command, self.path, range_header)
        seen.rule = rule
        faults = rule.faults if rule is not None else ()
        try:
            self._answer(seen, faults)
        except _Stop as stop:
            if str(stop):
                seen.error = str(stop)
            self.close_connection = True
        except Exception as exc:  # a dead peer, a bad body, a rewrite that raised
            seen.error = f"{type(exc).__name__}: {exc}"
            self.close_connection = True
        finally:
            if self.close_connection:
                self._drop_upstream()
            proxy._finish(seen)

    def _answer(self, seen: Seen, faults: tuple[Fault, ...]) -> None:
        for fault in faults:
            if isinstance(fault, Reset):
                self._abort(fault.rst)
                raise _Stop
            if isinstance(fault, Hang) and fault.after_bytes is None:
                self.proxy.stopping.wait(fault.seconds)
                raise _Stop
            if isinstance(fault, Status):
                self._read_request_body(None)
                self._send_status(seen, fault)
                return
        ignore_range = any(isinstance(f, IgnoreRange) for f in faults)
        try:
            response = self._forward(ignore_range)
        except (OSError, http.client.HTTPException) as exc:
            seen.error = f"upstream: {type(exc).__name__}: {exc}"
            self._bad_gateway(seen, seen.error)
            raise _Stop from None
        self._relay(seen, response, faults)

    def _bad_gateway(self, seen: Seen, why: str) -> None:
        """The registry could not be reached: a 502, then the connection is closed."""
        body = why.encode("utf-8", "replace") + b"\n"
        with contextlib.suppress(OSError):
            self._write_head(502, "Bad Gateway", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))), ("Connection", "close")])
            self.wfile.write(body)
            seen.status, seen.sent = 502, len(body)

    def _abort(self, rst: bool) -> None:
        """Close the client socket now; with rst, SO_LINGER 0 turns the close into a RST."""
        if rst:
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.rfile.close()  # its reference would keep the descriptor open
        with contextlib.suppress(OSError):
            self.connection.close()

    def _send_status(self, seen: Seen, fault: Status) -> None:
        headers = dict(fault.headers)
        declared = next((v for k, v in headers.items() if k.lower() == "content-length"), None)
        if declared is None:
            headers["Content-Length"] = str(len(fault.body))
        body = b"" if self.command == "HEAD" else fault.body
        broken = self.command != "HEAD" and declared is not None and int(declared) != len(body)
        if self.close_connection and not broken:
            headers["Connection"] = "close"
        seen.status = fault.code
        self._write_head(fault.code, self.responses.get(fault.code, ("",))[0],
                         list(headers.items()))
        if body:
            self.wfile.write(body)
            seen.sent = len(body)
        if broken:
            raise _Stop

    # -- upstream ---------------------------------------------------------------------

    def _drop_upstream(self) -> None:
        conn, self._upstream = self._upstream, None
        if conn is not None:
            conn.close()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """The kept upstream connection if the registry has not closed it, else a new one."""
        conn = self._upstream
        if conn is not None and conn.sock is not None:
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if not readable:  # idle and open: nothing to read but its next answer
                return conn, True
            self._drop_upstream()
        self._upstream = conn = http.client.HTTPConnection(
            *self.proxy.upstream, timeout=self.proxy.upstream_timeout)
        return conn, False

    def _forward(self, ignore_range: bool) -> http.client.HTTPResponse:
        """Send the request upstream (body streamed, hop-by-hop headers dropped)."""
        dropped = set(_HOP_BY_HOP)
        for value in self.headers.get_all("Connection") or ():
            dropped.update(t.strip().lower() for t in value.split(","))
        if ignore_range:
            dropped.update(("range", "if-range"))
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in dropped]
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        has_body = chunked or self.headers.get("Content-Length") not in (None, "0")
        for attempt in range(2):
            conn, reused = self._connection()
            try:
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders()
                if has_body:
                    self._read_request_body(conn)
                return conn.getresponse()
            except ConnectionError:  # RemoteDisconnected included
                self._drop_upstream()
                if not reused or has_body or attempt:
                    raise
            except BaseException:
                self._drop_upstream()
                raise
        raise AssertionError("unreachable")

    def _read_request_body(self, conn: http.client.HTTPConnection | None) -> None:
        """Read the client's body in pieces, sending each upstream (or dropping it)."""
        piece = self.proxy.piece_size
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    if conn is not None:
                        conn.send(b"0\r\n\r\n")
                    return
                if conn is not None:
                    conn.send(b"%x\r\n" % size)
                self._copy_request(conn, size, piece)
                self.rfile.readline(3)
                if conn is not None:
                    conn.send(b"\r\n")
        length = int(self.headers.get("Content-Length") or 0)
        self._copy_request(conn, length, piece)

    def _copy_request(self, conn: http.client.HTTPConnection | None, n: int, piece: int) -> None:
        while n > 0:
            data = self.rfile.read(min(piece, n))
            if not data:
                raise _Stop("client closed while sending its body")
            n -= len(data)
            if conn is not None:
                conn.send(data)

    # -- the response -----------------------------------------------------------------

    def _write_head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _relay(self, seen: Seen, response: http.client.HTTPResponse,
               faults: tuple[Fault, ...]) -> None:
        status = response.status
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        length_header = response.getheader("Content-Length")
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        chunked = bool(response.chunked) and not no_body
        until_close = not no_body and not chunked and length_header is None
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        if until_close or self.close_connection:
            headers.append(("Connection", "close"))
            self.close_connection = True

        plan = _BodyPlan(faults, self._blob_start(response) if status in (200, 206) else None)
        seen.status = status
        self._write_head(status, response.reason, headers)
        if no_body:
            response.close()
            if plan.limit is not None:
                self._stall(plan)
            return

        remaining = int(length_header) if length_header and not chunked else None
        piece = plan.piece_size(self.proxy.piece_size)
        started = time.monotonic()
        while True:
            if plan.limit is not None and seen.sent >= plan.limit:
                self._stall(plan)
            want = piece if plan.limit is None else min(piece, plan.limit - seen.sent)
            data = response.read1(want)
            if not data:
                break
            if remaining is not None:
                remaining -= len(data)
            data = plan.rewrite(seen.sent, data)
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
            seen.sent += len(data)
            plan.pace(seen.sent, started, self.proxy.stopping)
        if plan.limit is not None:  # the body was shorter than the limit
            self._stall(plan)
        if remaining:
            raise _Stop(f"upstream ended {remaining} bytes early")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        response.close()
        if response.will_close:
            self._drop_upstream()

    def _stall(self, plan: _BodyPlan) -> None:
        if plan.stall:
            self.proxy.stopping.wait(plan.stall)
        raise _Stop

    @staticmethod
    def _blob_start(response: http.client.HTTPResponse) -> int:
        """Where the body starts in the blob: a 206's Content-Range start, else 0."""
        if response.status == 206:
            match = re.match(r"\s*bytes\s+(\d+)-", response.getheader("Content-Range") or "")
            if match:
                return int(match.group(1))
        return 0


class _BodyPlan:
    """The body faults of one response, folded into limits, rewrites and a pace."""

    def __init__(self, faults: tuple[Fault, ...], blob_start: int | None) -> None:
        self.limit: int | None = None
        self.stall = 0.0
        self.rate: float | None = None
        self.blob_start = blob_start
        self.rewrites: list[Callable[[int, bytes], bytes]] = []
        for f in faults:
            if isinstance(f, Truncate):
                self._cap(f.after_bytes)
            elif isinstance(f, Hang) and f.after_bytes is not None:
                self._cap(f.after_bytes)
                self.stall = max(self.stall, f.seconds)
            elif isinstance(f, Slow):
                self.rate = f.bytes_per_s
            elif isinstance(f, Corrupt) and blob_start is not None:
                self.rewrites.append(_flipper(sorted(f.offsets)))
            elif isinstance(f, Replace) and blob_start is not None:
                self.rewrites.append(f.fn)

    def _cap(self, n: int) -> None:
        self.limit = n if self.limit is None else min(self.limit, n)

    def piece_size(self, default: int) -> int:
        if self.rate is None:
            return default
        return max(1, min(default, int(self.rate / 20)))

    def rewrite(self, position: int, data: bytes) -> bytes:
        if not self.rewrites or self.blob_start is None:
            return data
        offset = self.blob_start + position
        for fn in self.rewrites:
            out = fn(offset, bytes(data))
            if len(out) != len(data):
                raise _Stop(f"rewrite at {offset} changed {len(data)} bytes into {len(out)}")
            data = out
        return data

    def pace(self, sent: int, started: float, stopping: threading.Event) -> None:
        if self.rate:
            delay = started + sent / self.rate - time.monotonic()
            if delay > 0 and stopping.wait(delay):
                raise _Stop("proxy closed")


def _flipper(offsets: list[int]) -> Callable[[int, bytes], bytes]:
    def flip(offset: int, data: bytes) -> bytes:
        i = bisect.bisect_left(offsets, offset)
        end = offset + len(data)
        if i == len(offsets) or offsets[i] >= end:
            return data
        out = bytearray(data)
        while i < len(offsets) and offsets[i] < end:
            out[offsets[i] - offset] ^= 0xFF
            i += 1
        return bytes(out)

    return flip
