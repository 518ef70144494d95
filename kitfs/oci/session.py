"""One registry's request engine: auth, retries, redirects and error mapping.

`RegistryClient` says what to ask for; this module makes sure the asking
survives what registries do: 401 challenges, 429 and 503 with Retry-After,
connections that drop, 307s to object storage (followed by hand so the
Authorization header stays with the registry), and turns every httpx failure
into a one-line kitfs error that names the registry and what was being done.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable
from typing import NoReturn
from urllib.parse import urlencode, urljoin

import httpx
import trio

from kitfs.errors import (
    AccessDeniedError,
    AuthError,
    BlockedError,
    KitfsError,
    NotFoundError,
    RegistryBusyError,
    RegistryError,
    UnreachableError,
    UsageError,
)
from kitfs.oci.auth import Authenticator, Credential, CredentialSource
from kitfs.oci.blobtransport import BLOB_EXTENSION, Sink
from kitfs.oci.options import ClientOptions
from kitfs.oci.proxy import Proxy
from kitfs.oci.retry import RETRY_STATUSES, RetryBudget, parse_retry_after
from kitfs.oci.stats import RequestStats, outcome_of
from kitfs.oci.transport import base_url, make_http_client

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ERROR_BODY_LIMIT = 64 << 10
_ERROR_BODY_WAIT = 2.0
"""Seconds an error answer's body may take: the status already says what went wrong."""

TRANSPORT_FAILURES: tuple[type[Exception], ...] = (
    httpx.HTTPError,
    httpx.InvalidURL,
    httpx.StreamError,
    OSError,
)
"""Everything sending a request or reading an answer can raise, and the only exceptions
this package maps into kitfs errors (with `describe_transport_error`): httpx's own of
every kind, and OS and TLS errors (ssl.SSLError is an OSError). The blob transport
raises only httpx's; URLs a registry sends are checked by `resolve_url` first."""

Content = bytes | Callable[[], AsyncIterator[bytes]] | None
"""A request body: bytes, or a factory giving a fresh stream for every attempt."""


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def root_reason(exc: BaseException) -> str:
    """The most specific message in an exception chain ("Connection refused", not
    "all attempts to connect failed"); TLS and socket errors hide in the chain."""
    best = one_line(str(exc))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
            continue
        if isinstance(current, ssl.SSLError):
            best = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", one_line(str(current)))
        elif isinstance(current, OSError) and current.strerror:
            # trio says "Error connecting to ('h', p): Connection refused"
            best = current.strerror.rsplit("): ", 1)[-1]
        elif str(current).strip():
            best = one_line(str(current))
        current = current.__cause__ or current.__context__
    return best or type(exc).__name__


def describe_transport_error(
    exc: Exception, host: str, options: ClientOptions, url: httpx.URL | str | None = None
) -> KitfsError:
    """The kitfs error for any of TRANSPORT_FAILURES while talking to `host` (for `url`,
    which says whether a proxy was asked: then it is named, its password masked)."""
    proxy = proxy_for(url, options) if url is not None else None
    if proxy is not None:
        return _through_proxy(exc, host, options, proxy, tunnel=str(url).startswith("https:"))
    reason = root_reason(exc)
    if isinstance(exc, httpx.InvalidURL):
        return RegistryError(f"unusable URL for {host}: {reason}")
    if isinstance(exc, httpx.ConnectTimeout):
        return UnreachableError(f"no connection to {host} within {options.connect_timeout:g}s")
    if isinstance(exc, httpx.ConnectError):
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate verify failed" in reason:
            return BlockedError(
                f"TLS certificate of {host} not trusted ({reason}); pass a CA file, "
                "or --tls-verify=false"
            )
        if "WRONG_VERSION_NUMBER" in reason or "record layer failure" in reason:
            return BlockedError(
                f"{host} does not speak TLS; use --plain-http for a plain HTTP registry"
            )
        if _tls_handshake_failed(exc):
            return BlockedError(f"TLS handshake with {host} failed: {reason}")
        return UnreachableError(f"cannot connect to {host}: {reason}")
    if isinstance(exc, httpx.ReadTimeout):
        return UnreachableError(f"{host} sent nothing for {options.read_timeout:g}s")
    if isinstance(exc, httpx.WriteTimeout):
        return UnreachableError(f"{host} accepted nothing for {options.read_timeout:g}s")
    if isinstance(exc, httpx.PoolTimeout):
        return BlockedError(f"no free connection to {host} (too many requests in flight)")
    if isinstance(exc, httpx.RemoteProtocolError):
        if "peer closed connection" in reason:
            return UnreachableError(f"connection to {host} lost: {reason}")
        return RegistryError(f"{host} broke the HTTP exchange: {reason}")
    if isinstance(exc, httpx.NetworkError | OSError):
        return UnreachableError(f"connection to {host} lost: {reason}")
    return RegistryError(f"request to {host} failed: {reason}")


def _through_proxy(
    exc: Exception, host: str, options: ClientOptions, proxy: Proxy, *, tunnel: bool
) -> KitfsError:
    """What failed, naming the proxy: kitfs reaches only the proxy, which reaches `host`
    (through a CONNECT `tunnel` for https://, with TLS to `host` inside it)."""
    if not proxy.supported:
        return UsageError(proxy.unsupported)
    reason = root_reason(exc)
    if proxy.scheme == "https" and _tls_reason(reason):
        # TLS to the proxy comes first; without a tunnel it is the only TLS there is.
        whose = f"proxy {proxy}" + (f" or {host}" if tunnel else "")
        if "WRONG_VERSION_NUMBER" in reason or "record layer failure" in reason:
            return BlockedError(f"{whose} does not speak TLS ({reason}); use an http:// "
                                "proxy URL" + (", or --plain-http" if tunnel else ""))
        return BlockedError(f"TLS certificate of {whose} not trusted ({reason}); "
                                "pass a CA file (--ca-file), or --tls-verify=false")
    if isinstance(exc, httpx.ProxyError):  # it answered CONNECT with something but 2xx
        if reason.startswith(("407", "401")):  # tinyproxy answers a CONNECT with 401
            return proxy_auth_error(proxy, f"HTTP {reason}")
        return BlockedError(f"proxy {proxy} refused a tunnel to {host}: {reason}")
    if isinstance(exc, httpx.ConnectTimeout):
        return UnreachableError(
            f"no connection to {host} through proxy {proxy} within {options.connect_timeout:g}s")
    if isinstance(exc, httpx.ConnectError) and not _tls_reason(reason):
        return UnreachableError(f"cannot connect to proxy {proxy} (for {host}): {reason}")
    if isinstance(exc, httpx.ReadTimeout):
        return UnreachableError(
            f"no answer from {host} through proxy {proxy} for {options.read_timeout:g}s")
    direct = describe_transport_error(exc, host, options)
    return type(direct)(f"{direct} (through proxy {proxy})")


def proxy_auth_error(proxy: Proxy, answer: str) -> BlockedError:
    """A proxy that asked for credentials (`answer`: "HTTP 407 Proxy Authentication Required")."""
    if proxy.authorization is None:
        return BlockedError(
            f"proxy {proxy} wants credentials ({answer}); give them in its URL: "
            "http://USER:PASSWORD@HOST:PORT")
    return BlockedError(f"proxy {proxy} refused the credentials in its URL ({answer})")


def proxy_for(url: httpx.URL | str, options: ClientOptions) -> Proxy | None:
    """The proxy a request to `url` went through, if any (for messages)."""
    return options.proxies.for_url(str(url))


def _tls_handshake_failed(exc: BaseException) -> bool:
    """Whether an ssl error is among the causes of `exc` (a failed connect: the handshake;
    a connection dropped mid-body can also end in an ssl error, and is the network)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _tls_reason(reason: str) -> bool:
    return any(s in reason for s in (
        "CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "WRONG_VERSION_NUMBER",
        "record layer failure"))


def retryable_transport_error(exc: Exception) -> bool:
    """A failure the next attempt may well not meet: a lost connection, not a request
    that cannot be sent (a bad scheme, a line break in a header) or a refused certificate."""
    if isinstance(exc, httpx.ConnectError):
        text = root_reason(exc)
        return not any(s in text for s in ("CERTIFICATE", "certificate", "WRONG_VERSION_NUMBER"))
    return isinstance(exc, httpx.TransportError | OSError) and not isinstance(
        exc, httpx.UnsupportedProtocol | httpx.ProxyError | httpx.LocalProtocolError
    )


async def error_body(response: httpx.Response) -> bytes:
    """What there is of an error answer's body (at most 64 KiB, within 2 s); closes it.

    Only a nicety on top of the status, so a body that breaks off, stalls or
    lies about its length costs nothing: Distribution answers a range past a
    blob's end with 416, the blob's Content-Length and a few bytes of text.
    """
    body = bytearray()
    try:
        with trio.move_on_after(_ERROR_BODY_WAIT):
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= _ERROR_BODY_LIMIT:
                    break
    except TRANSPORT_FAILURES:
        pass
    finally:
        await response.aclose()
    return bytes(body[:_ERROR_BODY_LIMIT])


def registry_error_text(body: bytes) -> str:
    """The registry's own words from an OCI error body, if it sent any."""
    try:
        errors = json.loads(body).get("errors") or []
        parts = []
        for e in errors[:3]:
            code, message = e.get("code", ""), e.get("message", "")
            parts.append(f"{code}: {message}" if code and message else code or message)
        text = "; ".join(p for p in parts if p)
    except (ValueError, AttributeError, TypeError):
        text = ""
    return one_line(text)[:300]


def resolve_url(base: str, ref: str, what: str) -> str:
    """A URL a registry sent (Location, Link) resolved against `base`, checked for use.

    urljoin raises ValueError for a bad IPv6 host and httpx raises InvalidURL
    for a bad port; either would otherwise escape as a foreign exception.
    """
    try:
        url = urljoin(base, ref)
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise RegistryError(
            f"{what}: registry sent an unusable URL {ref[:200]!r} ({exc})"
        ) from None
    return url


class RegistrySession:
    """Sends requests to one registry; safe to share between concurrent tasks."""

    def __init__(
        self,
        registry: str,
        options: ClientOptions,
        transport: httpx.AsyncBaseTransport | None,
        credentials: CredentialSource,
        *,
        root: str | None = None,
        namespace: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """`root`, the API root (`https://mirror/v2`, or another path with override_path),
        defaults to the registry's own; `namespace` adds `ns=` to every URL this session
        builds, as containerd does for a host that is not the registry; `headers` (a
        hosts.toml's) go with every request to this host."""
        self.registry = registry
        self.options = options
        self.root = root if root is not None else base_url(registry, options) + "/v2"
        self._origin = httpx.URL(self.root)
        self.base = f"{self._origin.scheme}://{self._origin.netloc.decode()}"
        self.namespace = namespace
        self.headers = headers
        self.http = make_http_client(options, transport)
        self.auth = Authenticator(self._origin.netloc.decode() if root is not None
                                  else registry, credentials, self._send_token_request)
        self.stats = RequestStats(registry)

    async def aclose(self) -> None:
        await self.http.aclose()

    def url(self, path: str) -> str:
        """The URL of an API `path` ("/v2/..."), under this session's root."""
        url = self.root + path.removeprefix("/v2")
        if self.namespace is not None:
            url += ("&" if "?" in url else "?") + urlencode({"ns": self.namespace})
        return url

    def _same_origin(self, url: httpx.URL) -> bool:
        o = self._origin
        return (url.scheme, url.host, url.port) == (o.scheme, o.host, o.port)

    async def _send_token_request(self, request: httpx.Request, what: str) -> httpx.Response:
        # Built outside the client: give it the client's deadlines and User-Agent.
        request.extensions.setdefault("timeout", self.http.timeout.as_dict())
        request.headers.setdefault("User-Agent", self.http.headers["User-Agent"])
        budget = self.budget()
        host = request.url.netloc.decode()
        while True:
            try:
                response = await self.http.send(request)
            except TRANSPORT_FAILURES as exc:
                if retryable_transport_error(exc) and await budget.wait(
                    connect_error=_is_connect_error(exc)
                ):
                    continue
                raise _with_context(
                    describe_transport_error(exc, host, self.options, request.url),
                    what,
                ) from exc
            if response.status_code in RETRY_STATUSES and await budget.wait(
                retry_after=parse_retry_after(response.headers.get("retry-after")),
                server_error=response.status_code != 429,
            ):
                continue
            return response

    def budget(self) -> RetryBudget:
        """A fresh retry budget for one call, as the options say.

        Server errors get at most half the budget: a mount gives its readers
        the budget as their deadline too, and its fetches run in tasks of their
        own, out of reach of that deadline; retried to the end, a failing
        registry was reported to the reader only as its own timeout.
        """
        opts = self.options
        server = min(opts.server_error_retry, opts.retry_budget / 2)
        return RetryBudget(opts.retry_budget, opts.connect_retry, server)

    async def send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        scopes: tuple[str, ...] = (),
        headers: dict[str, str] | None = None,
        content: Content = None,
        ok: tuple[int, ...] = (200,),
        stream: bool = False,
        retry: bool = True,
        authenticate: bool = True,
        blob: bool | Sink = False,
    ) -> httpx.Response:
        """Send with auth, retries and redirects; raise a kitfs error unless status is in `ok`.

        With `stream`, the caller must close the returned response. `authenticate`
        False sends to `url` (a cached storage URL) without registry credentials.
        `blob` sends a GET down the lean blob-body path (see blobtransport); a
        `Sink` there also receives the body into the sink's buffers.

        Each call counts once in `stats`, by its final outcome.
        """
        last = _LastStatus()
        try:
            response = await self._send(
                method, url, what=what, scopes=scopes, headers=headers, content=content, ok=ok,
                stream=stream, retry=retry, authenticate=authenticate, blob=blob, last=last,
            )
        except KitfsError as exc:
            self.stats.failed(outcome_of(exc, last.status), str(exc))
            raise
        self.stats.succeeded()
        if not stream:
            self.stats.received(len(response.content))
        return response

    async def _send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None,
        content: Content,
        ok: tuple[int, ...],
        stream: bool,
        retry: bool,
        authenticate: bool,
        blob: bool | Sink,
        last: _LastStatus,
    ) -> httpx.Response:
        budget = self.budget()
        challenged = False
        while True:
            try:
                response = await self._send_following(
                    method, url, headers or {}, content, scopes, authenticate, blob, what
                )
            except TRANSPORT_FAILURES as exc:
                if (
                    retry
                    and retryable_transport_error(exc)
                    and await budget.wait(connect_error=_is_connect_error(exc))
                ):
                    log.debug("retrying %s after %r", what, exc)
                    continue
                host = _host(url, self.registry)
                raise _with_context(
                    describe_transport_error(exc, host, self.options, url),
                    what,
                ) from exc
            status = last.status = response.status_code
            from_registry = self._same_origin(response.request.url)
            if status == 401 and from_registry and authenticate and not challenged:
                challenged = True
                await response.aclose()
                try:
                    await self.auth.challenged(response, scopes)
                except KitfsError as exc:
                    raise self._forwarded(_with_context(exc, what), response) from None
                continue
            if (
                retry
                and status in RETRY_STATUSES
                and await budget.wait(
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                    server_error=status != 429,
                )
            ):
                await response.aclose()
                log.debug("retrying %s after HTTP %d", what, status)
                continue
            if status in ok:
                if not stream:
                    try:
                        await response.aread()
                    except TRANSPORT_FAILURES as exc:
                        await response.aclose()
                        if retry and retryable_transport_error(exc) and await budget.wait():
                            continue
                        request_url = response.request.url
                        raise _with_context(
                            describe_transport_error(
                                exc, request_url.netloc.decode(), self.options, request_url),
                            what,
                        ) from exc
                return response
            await self._raise_for(response, what, scopes, budget.retries)

    async def _send_following(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: Content,
        scopes: tuple[str, ...],
        authenticate: bool,
        blob: bool | Sink,
        what: str,
    ) -> httpx.Response:
        target = httpx.URL(url)
        extensions = {BLOB_EXTENSION: blob} if blob is not False else None
        for _ in range(MAX_REDIRECTS + 1):
            sent_headers = self._host_headers(target)
            sent_headers.update(headers)  # the request's own win, as in containerd
            if authenticate and self._same_origin(target):
                value = await self.auth.authorization(scopes)
                if value is not None:
                    sent_headers["Authorization"] = value
            body: bytes | AsyncIterator[bytes] | None
            body = content() if callable(content) else content
            request = self.http.build_request(
                method, target, headers=sent_headers, content=body, extensions=extensions
            )
            response = await self.http.send(request, stream=True)
            location = response.headers.get("location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            await response.aclose()
            target = httpx.URL(resolve_url(str(target), location, what))
            if response.status_code == 303:
                method, content = "GET", None
        raise RegistryError(f"{self.registry}: more than {MAX_REDIRECTS} redirects for {url}")

    def _host_headers(self, target: httpx.URL) -> dict[str, str]:
        """hosts.toml's headers for a request to this host (not to storage it redirects to)."""
        out: dict[str, str] = {}
        if self.headers and self._same_origin(target):
            for name, value in self.headers:
                out[name] = f"{out[name]}, {value}" if name in out else value
        return out

    async def _raise_for(
        self, response: httpx.Response, what: str, scopes: tuple[str, ...], retries: int
    ) -> NoReturn:
        proxy = proxy_for(response.request.url, self.options)
        if proxy is not None and response.status_code == 407:
            await response.aclose()
            answer = f"HTTP 407 {response.reason_phrase}".rstrip()
            raise _with_context(proxy_auth_error(proxy, answer), what)
        raise self._forwarded(await self._status_error(response, what, retries), response)

    def _forwarded(self, error: KitfsError, response: httpx.Response) -> KitfsError:
        """`error` about `response`, naming the proxy if one forwarded the request: the
        answer may be the proxy's own (tinyproxy answers wrong credentials with 401), while
        through a CONNECT tunnel only the registry can answer."""
        url = response.request.url
        proxy = proxy_for(url, self.options)
        if proxy is None or url.scheme != "http":
            return error
        error.args = (f"{error} (through proxy {proxy})",)  # keeps its type and fields
        return error

    async def _status_error(
        self, response: httpx.Response, what: str, retries: int
    ) -> KitfsError:
        status = response.status_code
        detail = registry_error_text(await error_body(response))
        suffix = f" ({detail})" if detail else ""
        if status == 404:
            return NotFoundError(f"{what}: not found{suffix}")
        if status in (401, 403):
            cred: Credential | None = await self.auth.credential()
            if cred is None:
                # The host asked (a mirror's own name where it is one), not the registry.
                return AuthError(
                    f"{what}: access denied (HTTP {status}){suffix}; the registry may need "
                    f"`kit login {self.auth.registry}`"
                )
            if status == 401 and self.auth.scheme == "basic":
                return AuthError(f"wrong username or password for {self.auth.registry}")
            denied = AccessDeniedError if status == 403 else AuthError
            return denied(
                f"{what}: access denied (HTTP {status}) for the stored credentials{suffix}"
            )
        after = f" after retrying {retries} times" if retries else ""
        if status == 429:
            return RegistryBusyError(
                f"{what}: rate limited by {self.registry} (HTTP 429){after}", status)
        reason = response.reason_phrase or httpx.codes.get_reason_phrase(status)
        host = response.request.url.netloc.decode()
        message = f"{what}: {host} answered HTTP {status} {reason}".rstrip() + f"{suffix}{after}"
        if status >= 500:
            return RegistryBusyError(message, status)
        return RegistryError(message)


class _LastStatus:
    """The HTTP status of a call's latest answer: what its failure is counted as."""

    status: int | None = None


def _host(url: str, fallback: str) -> str:
    """`host[:port]` of `url` for a message, whatever `url` holds."""
    try:
        return httpx.URL(url).netloc.decode() or fallback
    except httpx.InvalidURL:
        return fallback


def _is_connect_error(exc: Exception) -> bool:
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def _with_context(exc: KitfsError, what: str) -> KitfsError:
    """Prefix the message with what was being done, keeping the error's class."""
    message = str(exc)
    if message.startswith(what):
        return exc
    return type(exc)(f"{what}: {message}")
