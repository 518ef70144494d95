"""Which proxy, if any, a connection to a host goes through: decided here, once, for all.

kit takes its proxy from two places (kitops pkg/lib/network/auth.go, DefaultClient):

- `--proxy URL` replaces the environment: kit sets `http.ProxyURL(url)`, so
  every request goes through that proxy, whatever its host, loopback
  included, and NO_PROXY is not consulted.
- Otherwise Go's `http.ProxyFromEnvironment` (kit clones
  `http.DefaultTransport`), which is golang.org/x/net/http/httpproxy
  (proxy.go): HTTP_PROXY for http:// URLs, HTTPS_PROXY for https:// URLs (no
  fallback from one to the other), each name also lowercase (the uppercase one
  wins when both are set and not empty), and NO_PROXY to exempt hosts. A host
  named `localhost` or written as a loopback address (127.0.0.0/8, ::1) is
  never proxied from the environment.

NO_PROXY as Go reads it: comma-separated entries, case-insensitive; `*`
alone exempts everything; `10.0.0.0/8` or `fd00::/8` exempts addresses in the
network; `1.2.3.4` or `[::1]:5000` an address (on that port only, with one);
`example.com` that domain and its subdomains, `.example.com` and
`*.example.com` only the subdomains, each optionally with `:port`. Addresses
are compared as addresses (the registry is named `10.1.2.3`, not resolved),
and domain entries never match an address. Entries Go cannot parse are
ignored, as Go ignores them.

A proxy URL may be `http://` (kitfs speaks HTTP to it) or `https://` (TLS to
the proxy first, checked like the registry's: system CAs, --ca-file,
--tls-verify); `host:port` alone means `http://host:port`, as in Go. A
`user:password@` in it is sent as `Proxy-Authorization: Basic`. What kitfs
prints or logs of a proxy URL has the password masked (`str(proxy)`).

This module is pure (no environment, no network): commands read the
environment and hand `Proxies.from_environment` what they found.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from kitfs.errors import UsageError

__all__ = ["NoProxy", "Proxies", "Proxy", "mask_url", "parse_proxy"]

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}
_SUPPORTED = ("http", "https")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Proxy:
    """One proxy server, and the credentials to give it."""

    scheme: str
    """How kitfs talks to the proxy itself: "http" or "https" (see `supported`)."""
    host: str
    """Name or address, without brackets."""
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def supported(self) -> bool:
        """Whether kitfs can use it: an http:// or https:// proxy, not socks5:// (which
        Go, and so kit, would use; kitfs refuses a request rather than go round it)."""
        return self.scheme in _SUPPORTED

    @property
    def unsupported(self) -> str:
        """Why it cannot be used, for a message."""
        return (f"proxy {self}: kitfs speaks to http:// and https:// proxies only, "
                f"not {self.scheme}://")

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The whole URL, credentials included: for the HTTP client, never for a message."""
        return f"{self.scheme}://{self._userinfo(masked=False)}{self.netloc}"

    @property
    def authorization(self) -> str | None:
        """The Proxy-Authorization header value, if the URL carries credentials."""
        if self.username is None and self.password is None:
            return None
        pair = f"{self.username or ''}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def __str__(self) -> str:
        """The URL as messages and logs show it: the password masked."""
        return f"{self.scheme}://{self._userinfo(masked=True)}{self.netloc}"

    def _userinfo(self, *, masked: bool) -> str:
        if self.username is None and self.password is None:
            return ""
        user = quote(self.username or "", safe="")
        if self.password is None:
            return f"{user}@"
        return f"{user}:{'***' if masked else quote(self.password, safe='')}@"


_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?([^/@:]*):([^/@]*)@")


def mask_url(text: str) -> str:
    """`text` (a proxy URL as given, even a malformed one) with its password masked."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}{m.group(2)}:***@", text, count=1)


def parse_proxy(text: str, source: str) -> Proxy:
    """A proxy URL as Go's httpproxy reads one: a bare `host[:port]` means http://.

    Raises UsageError naming `source` (`--proxy`, `HTTPS_PROXY`) and the URL with its
    password masked, for a URL that is not usable. A scheme kitfs does not speak is
    parsed all the same (`Proxy.supported` says so).
    """
    raw = text.strip()
    shown = f"{source} {mask_url(raw)!r}"
    try:
        parts = urlsplit(raw)
        if not parts.scheme or not parts.netloc:
            parts = urlsplit("http://" + raw)
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{shown} is not a proxy URL ({exc})") from None
    if not host:
        raise UsageError(f"{shown} is not a proxy URL (no host)")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(scheme, host, port or _DEFAULT_PORTS.get(scheme, 0), username, password)


# -- NO_PROXY ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Network:
    network: IPNetwork


@dataclass(frozen=True)
class _Address:
    address: IPAddress
    port: str


@dataclass(frozen=True)
class _Domain:
    suffix: str
    """Always with its leading dot."""
    port: str
    exact_too: bool
    """`example.com` also matches example.com itself; `.example.com` does not."""


_Entry = _Network | _Address | _Domain


@dataclass(frozen=True)
class NoProxy:
    """The hosts NO_PROXY exempts (see the module's docstring for the rules)."""

    everything: bool = False
    entries: tuple[_Entry, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        """Go's httpproxy `config.init`, entry by entry."""
        entries: list[_Entry] = []
        for item in text.split(","):
            p = item.strip().lower()
            if not p:
                continue
            if p == "*":
                return cls(everything=True)
            if "/" in p:
                try:
                    entries.append(_Network(ipaddress.ip_network(p, strict=False)))
                except ValueError:
                    pass  # Go's ParseCIDR failed: it goes on to treat it as a host
                else:
                    continue
            split = _split_host_port(p)
            if split is not None:
                host, port = split
                if not host:
                    continue  # ":80": no host part, malformed
                if host.startswith("[") and host.endswith("]"):
                    host = host[1:-1]
            else:
                host, port = p, ""
            address = _address(host)
            if address is not None:
                entries.append(_Address(address, port))
                continue
            if host.startswith("*."):
                host = host[1:]
            exact_too = not host.startswith(".")
            if exact_too:
                host = "." + host
            entries.append(_Domain(_ascii(host), port, exact_too))
        return cls(entries=tuple(entries))

    def exempts(self, host: str, port: str) -> bool:
        """Whether a request to `host` (lowercase, ASCII, no brackets) on `port` skips the proxy."""
        if self.everything:
            return True
        address = _address(host)
        for entry in self.entries:
            if isinstance(entry, _Network):
                if address is not None and address in entry.network:
                    return True
            elif isinstance(entry, _Address):
                if address is not None and address == entry.address and (
                        not entry.port or entry.port == port):
                    return True
            elif address is None and (
                    host.endswith(entry.suffix) or (entry.exact_too and host == entry.suffix[1:])
            ) and (not entry.port or entry.port == port):
                return True
        return False


def _split_host_port(text: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort: `host:port` or `[v6]:port`; None where Go fails."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            return None
        return text[1:end], text[end + 2 :]
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return None
    return host, port


def _address(host: str) -> IPAddress | None:
    """`host` as an address, if it is one; IPv4-mapped IPv6 as IPv4, as Go compares them."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _ascii(host: str) -> str:
    """A host name as Go compares it: IDNA (punycode) for non-ASCII names."""
    if host.isascii():
        return host
    try:  # label by label: ".bücher.example" has an empty first label the codec refuses
        return ".".join(label if label.isascii() else label.encode("idna").decode("ascii")
                        for label in host.split("."))
    except UnicodeError:
        return host


# -- the decision --------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxies:
    """Where kitfs's connections go: `select` answers for one scheme, host and port."""

    explicit: Proxy | None = None
    """`--proxy`: every request, NO_PROXY and loopback included (kit's http.ProxyURL)."""
    http: Proxy | None = None
    """HTTP_PROXY: http:// registries (and storage URLs), unless exempted."""
    https: Proxy | None = None
    """HTTPS_PROXY: https:// registries (and storage URLs), unless exempted."""
    no_proxy: NoProxy = NoProxy()

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str], explicit: str | None = None, source: str = "--proxy"
    ) -> Proxies:
        """kit's choice: `explicit` (--proxy, named `source` in errors) if given, else
        HTTP(S)_PROXY and NO_PROXY.

        An environment value Go could not parse is ignored, as Go ignores it (with a
        warning here). One naming a scheme kitfs does not speak (socks5://) is kept:
        a request it applies to fails, naming it (going round it silently could break
        a network's rules), while verbs that stay local, and hosts NO_PROXY exempts,
        work. Given explicitly, such a proxy is a usage error at once.
        """
        if explicit:
            proxy = parse_proxy(explicit, source)
            if not proxy.supported:
                raise UsageError(f"{source}: {proxy.unsupported}")
            return cls(explicit=proxy)

        def env(name: str) -> tuple[str, str]:
            for key in (name, name.lower()):
                value = environ.get(key, "")
                if value:
                    return key, value
            return name, ""

        found: dict[str, Proxy | None] = {}
        for name in ("HTTP_PROXY", "HTTPS_PROXY"):
            key, value = env(name)
            found[name] = None
            if value:
                try:
                    found[name] = parse_proxy(value, key)
                except UsageError as exc:
                    log.warning("%s; ignored, as kit ignores it", exc)
        return cls(http=found["HTTP_PROXY"], https=found["HTTPS_PROXY"],
                   no_proxy=NoProxy.parse(env("NO_PROXY")[1]))

    def select(self, scheme: str, host: str, port: int | None) -> Proxy | None:
        """The proxy for a connection to `host:port` for a `scheme` URL; None: go direct."""
        if self.explicit is not None:
            return self.explicit
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None:
            return None
        host = _ascii(host.strip().lower().removeprefix("[").removesuffix("]"))
        if host == "localhost":
            return None
        address = _address(host)
        if address is not None and address.is_loopback:
            return None
        if self.no_proxy.exempts(host, str(port or _DEFAULT_PORTS.get(scheme, 0))):
            return None
        return proxy

    def for_url(self, url: str) -> Proxy | None:
        """`select` for a whole URL (one that does not even parse goes nowhere: None)."""
        try:
            parts = urlsplit(url)
            return self.select(parts.scheme, parts.hostname or "", parts.port)
        except ValueError:
            return None

    @property
    def configured(self) -> bool:
        return any(p is not None for p in (self.explicit, self.http, self.https))
