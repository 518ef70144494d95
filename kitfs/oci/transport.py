"""How kitfs talks HTTP to a registry: options, TLS, timeouts and the httpx client.

Everything here is about the connection, nothing about OCI: the scheme a
registry is reached with, the TLS context built from `kit`'s flags
(`--plain-http`, `--tls-verify`, `--cert/--key`), the proxy each request goes
through (`--proxy`, HTTP_PROXY and friends, as proxy.py decides), the
timeouts that keep a dead registry from hanging a FUSE reader, and the socket
read size that decides how fast one blob stream can go.
"""

from __future__ import annotations

import ipaddress
import ssl

import httpcore
import httpx

from kitfs.errors import UsageError
from kitfs.oci.blobtransport import BlobTransport
from kitfs.oci.options import ClientOptions
from kitfs.oci.proxy import Proxy

# httpcore reads a socket 64 KiB at a time (AsyncHTTP11Connection.READ_NUM_BYTES),
# which caps one blob stream near 0.45 GB/s on these machines because every read
# pays the same fixed cost through h11, httpcore and httpx. Larger reads amortise
# it; the socket hands back whatever is buffered, so a big value costs nothing on
# small responses. benchmarks/blob_download.py measured the choice.
SOCKET_READ_SIZE = 1 << 20

BLOB_READ_SIZE = 1 << 20
"""Socket read size on the blob path (blobtransport), where each read is handed on as is."""


def host_of(registry: str) -> str:
    """The host part of `registry` (`host[:port]` or `[v6]:port`), without brackets."""
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def is_loopback(registry: str) -> bool:
    """True for registries on this machine, which `kit` and Docker reach over plain http."""
    host = host_of(registry).lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url(registry: str, options: ClientOptions) -> str:
    scheme = "http" if options.plain_http or is_loopback(registry) else "https"
    return f"{scheme}://{registry}"


def ssl_context(options: ClientOptions) -> ssl.SSLContext:
    """The TLS context `kit` would use: system CAs, plus --cert/--key, or no verification."""
    try:
        ctx = ssl.create_default_context()
        if options.ca_file:
            ctx.load_verify_locations(cafile=options.ca_file)
        if not options.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if options.cert_file or options.key_file:
            if not options.cert_file:
                raise UsageError("a client key needs a client certificate (--cert)")
            ctx.load_cert_chain(options.cert_file, options.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load TLS files: {exc}") from exc
    return ctx


def host_ssl_context(
    options: ClientOptions,
    ca: tuple[str, ...],
    client: tuple[tuple[str, str], ...],
    skip_verify: bool | None,
) -> ssl.SSLContext:
    """A hosts.toml host's TLS, as containerd builds it: the command's own (flags), with
    the host's CAs added, its client certificates added and `skip_verify` deciding."""
    ctx = ssl_context(options)
    path = ""
    try:
        for path in ca:
            ctx.load_verify_locations(cafile=path)
        for path, key in client:
            ctx.load_cert_chain(path, key or None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise UsageError(f"cannot load {path} (named in hosts.toml): {reason}") from exc
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif skip_verify is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
    return ctx


def timeouts(options: ClientOptions) -> httpx.Timeout:
    return httpx.Timeout(
        connect=options.connect_timeout,
        read=options.read_timeout,
        write=options.read_timeout,
        pool=options.connect_timeout + options.read_timeout,
    )


class _BigReadHTTP11:
    """Holds the one process-wide setting httpx offers no per-client hook for.

    httpcore builds its `AsyncHTTP11Connection` objects itself, and the read size
    is a class attribute it reads on every socket read. Raising it is the
    documented intent of that attribute (it is not private), is safe for any
    other httpx user in the process (a read returns what is buffered, never
    waits for more), and is done once, here, rather than by copying httpcore's
    connection classes.
    """

    done = False

    @classmethod
    def ensure(cls) -> None:
        if not cls.done:
            if httpcore.AsyncHTTP11Connection.READ_NUM_BYTES < SOCKET_READ_SIZE:
                httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = SOCKET_READ_SIZE
            cls.done = True


class ProxyRouter(httpx.AsyncBaseTransport):
    """Sends each request direct or through its proxy, as `Proxies.select` decides.

    httpx's own proxy routing (`mounts`, `trust_env`) knows neither kit's rule
    that --proxy covers every host nor Go's NO_PROXY; so kitfs asks the one
    place that decides (proxy.py) for every request, and keeps one httpx
    transport per destination: direct, or per proxy (http:// registries through
    it with absolute request URIs, https:// ones through a CONNECT tunnel).
    """

    def __init__(self, options: ClientOptions, tls: ssl.SSLContext) -> None:
        self._options = options
        self._tls = tls
        self._direct = self._transport(None)
        self._through: dict[Proxy, httpx.AsyncHTTPTransport] = {}

    def _transport(self, proxy: Proxy | None) -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport(
            verify=self._tls,
            http1=True,
            http2=False,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            trust_env=False,
            proxy=_httpx_proxy(proxy, self._tls) if proxy is not None else None,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        proxy = self._options.proxies.select(url.scheme, url.raw_host.decode("ascii"), url.port)
        if proxy is None:
            return await self._direct.handle_async_request(request)
        if not proxy.supported:
            raise httpx.UnsupportedProtocol(proxy.unsupported)
        transport = self._through.get(proxy)
        if transport is None:
            transport = self._through[proxy] = self._transport(proxy)
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        through, self._through = self._through, {}
        for transport in [self._direct, *through.values()]:
            await transport.aclose()


def _httpx_proxy(proxy: Proxy, tls: ssl.SSLContext) -> httpx.Proxy:
    # An https:// proxy's own certificate is checked as the registry's is (as Go does).
    return httpx.Proxy(proxy.url, ssl_context=tls if proxy.scheme == "https" else None)


def make_transport(
    options: ClientOptions, tls: ssl.SSLContext | None = None
) -> httpx.AsyncBaseTransport:
    """The real network transport: HTTP/1.1, TLS per options (or `tls`), proxies, big
    socket reads.

    Blob bodies take the lean path in `blobtransport`; everything else is httpx's.
    Both ask `options.proxies` where each connection goes.
    """
    _BigReadHTTP11.ensure()
    tls = tls if tls is not None else ssl_context(options)
    return BlobTransport(
        ProxyRouter(options, tls),
        tls,
        proxies=options.proxies,
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        read_size=BLOB_READ_SIZE,
    )


def make_http_client(
    options: ClientOptions, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    """The httpx client: redirects are followed by hand so credentials never leave the registry."""
    return httpx.AsyncClient(
        transport=transport if transport is not None else make_transport(options),
        timeout=timeouts(options),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": "kitfs/0.1"},
    )
