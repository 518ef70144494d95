"""Registry hosts as containerd configures them: `<dir>/<registry>/hosts.toml`.

Why containerd's format: operators who run a pull-through cache for a cluster
already describe it there (`/etc/containerd/certs.d`), and kitfs should read
the same files rather than invent a second way to say "try this mirror
first". The rules follow containerd's parser (core/remotes/docker/config):

- the directory for `host:port` is `host_port_`, then `host:port`, then
  `_default`; the first that exists is used;
- `[host."URL"]` tables are mirrors, tried in file order, then `server` (the
  registry itself when absent) last; a host without `capabilities` may do
  everything (pull, resolve, push, referrers);
- a URL without a scheme is https; its path gets `/v2` unless it already ends
  in it or `override_path` is set (then the path is the API root as is);
- `ca` is a path or a list, `client` a path, a list of paths or of
  [cert, key] pairs; relative paths are relative to the hosts.toml's
  directory; `header` values are a string or a list of strings;
- a directory without hosts.toml uses Docker's certificate files in it
  (`*.crt` CAs, `*.cert` with `*.key` client pairs) for the registry.

Pure parsing: no network, no HTTP client. What the hosts are used for is
oci/mirrors.py's business.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kitfs.errors import UsageError

__all__ = [
    "CAPABILITIES",
    "DEFAULT_HOSTS_DIR",
    "HOSTS_DIR_ENV",
    "HostEntry",
    "HostsError",
    "host_directory",
    "hosts_root",
    "load_hosts",
    "parse_hosts",
]

DEFAULT_HOSTS_DIR = "/etc/kitfs/certs.d"
"""Read when it exists and no --hosts-dir is given (containerd's is /etc/containerd/certs.d)."""
HOSTS_DIR_ENV = "KITFS_HOSTS_DIR"
CAPABILITIES = frozenset({"pull", "resolve", "push", "referrers"})
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}


class HostsError(UsageError):
    """A hosts.toml kitfs cannot use: named with the file, one line."""


@dataclass(frozen=True)
class HostEntry:
    """One place to send a registry's requests to."""

    root: str | None
    """The API root (`https://mirror.example/v2`); None: the registry itself, reached as
    kitfs reaches it without a hosts file (https, or http for loopback / --plain-http)."""
    capabilities: frozenset[str] = CAPABILITIES
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    """(certificate, key) pairs; key "" means the key is in the certificate file."""
    skip_verify: bool | None = None
    header: tuple[tuple[str, str], ...] = ()
    """(name, value) in order; a name given a list appears once per value."""
    dial_timeout: float | None = None
    mirror: bool = False
    """A `[host."..."]` table, not the `server`."""

    @property
    def netloc(self) -> str | None:
        """`host[:port]` of the root (what credentials and `?ns=` are decided by)."""
        return urlsplit(self.root).netloc if self.root is not None else None

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def host_directory(registry: str) -> str:
    """containerd's directory name for a registry with a port: `host_port_`."""
    index = registry.rfind(":")
    if index > 0:
        return f"{registry[:index]}_{registry[index + 1:]}_"
    return registry


def hosts_root(flag: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The hosts directory to use: --hosts-dir, else $KITFS_HOSTS_DIR, else the default
    if it exists; None when there is none. A directory named but missing is an error."""
    env = os.environ if environ is None else environ
    named = flag or env.get(HOSTS_DIR_ENV) or None
    if named is not None:
        if not os.path.isdir(named):
            raise HostsError(f"hosts directory {named} does not exist (--hosts-dir, "
                             f"${HOSTS_DIR_ENV})")
        return os.path.abspath(named)
    return DEFAULT_HOSTS_DIR if os.path.isdir(DEFAULT_HOSTS_DIR) else None


def load_hosts(root: str, registry: str) -> list[HostEntry] | None:
    """The hosts to try for `registry`, mirrors first and the server last; None when
    `root` has no directory for it (then the registry is used as always)."""
    candidates = [host_directory(registry), registry, "_default"]
    for name in dict.fromkeys(candidates):
        directory = Path(root) / name
        if not directory.is_dir():
            continue
        path = directory / "hosts.toml"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [_cert_files(directory)]
        except (OSError, UnicodeDecodeError) as exc:
            raise HostsError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
                             ) from None
        if not text.strip():
            return [_cert_files(directory)]
        return parse_hosts(text, str(directory), where=str(path))
    return None


def parse_hosts(text: str, base_dir: str, *, where: str = "hosts.toml") -> list[HostEntry]:
    """hosts.toml's text as the hosts to try, in order (see the module's rules)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostsError(f"{where}: not valid TOML: {exc}") from None
    hosts_table = document.get("host", {})
    if not isinstance(hosts_table, dict):
        raise HostsError(f"{where}: 'host' must be a table of [host.\"URL\"] tables")
    entries: list[HostEntry] = []
    # tomllib keeps tables in the order the file first names them: containerd's order.
    for url, table in hosts_table.items():
        if not isinstance(table, dict):
            raise HostsError(f"{where}: host {url!r} must be a table")
        entries.append(_entry(url, table, base_dir, f"{where}: host {url!r}", mirror=True))
    server = document.get("server")
    if server is not None and not isinstance(server, str):
        raise HostsError(f"{where}: 'server' must be a string")
    top = {k: v for k, v in document.items() if k not in ("server", "host")}
    if server is None:
        # containerd: the implicit server (the registry itself) may pull, resolve and
        # push whatever top-level `capabilities` say; they only restrict a named server.
        top.pop("capabilities", None)
    entries.append(_entry(server or None, top, base_dir, f"{where}: server", mirror=False))
    return entries


def _entry(url: str | None, table: dict[str, Any], base_dir: str, where: str, *,
           mirror: bool) -> HostEntry:
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise HostsError(f"{where}: override_path must be true or false")
    skip = table.get("skip_verify")
    if skip is not None and not isinstance(skip, bool):
        raise HostsError(f"{where}: skip_verify must be true or false")
    return HostEntry(
        root=_root(url, override, where) if url else None,
        capabilities=_capabilities(table.get("capabilities"), where),
        ca=tuple(_absolute(p, base_dir) for p in _strings(table.get("ca"), f"{where}: ca")),
        client=_client(table.get("client"), base_dir, where),
        skip_verify=skip,
        header=_header(table.get("header"), where),
        dial_timeout=_duration(table.get("dial_timeout"), where),
        mirror=mirror,
    )


def _root(url: str, override_path: bool, where: str) -> str:
    if "://" not in url:
        url = "https://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise HostsError(f"{where}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HostsError(f"{where}: not an http(s) URL")
    path = os.path.normpath(parts.path).rstrip("/") if parts.path else ""
    if not override_path and not path.endswith("/v2"):
        path += "/v2"
    return f"{parts.scheme}://{parts.netloc}{path}"


def _capabilities(value: Any, where: str) -> frozenset[str]:
    names = _strings(value, f"{where}: capabilities", single=False)
    if not names:
        return CAPABILITIES
    unknown = sorted({n.lower() for n in names} - CAPABILITIES)
    if unknown:
        raise HostsError(f"{where}: unknown capability {unknown[0]!r} "
                         f"(known: {', '.join(sorted(CAPABILITIES))})")
    return frozenset(n.lower() for n in names)


def _strings(value: Any, where: str, *, single: bool = True) -> list[str]:
    if value is None:
        return []
    if single and isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsError(f"{where} must be {'a string or ' if single else ''}a list of strings")


def _absolute(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def _client(value: Any, base_dir: str, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsError(f"{where}: client must be a path, a list of paths or of pairs")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_absolute(item, base_dir), ""))
        elif (isinstance(item, list) and len(item) == 2
              and all(isinstance(p, str) for p in item)):
            pairs.append((_absolute(item[0], base_dir),
                          _absolute(item[1], base_dir) if item[1] else ""))
        else:
            raise HostsError(f"{where}: client entry {item!r} is not a path or a "
                             "[certificate, key] pair")
    return tuple(pairs)


#: RFC 9110 token: what a header name may be.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsError(f"{where}: header must be a table")
    out: list[tuple[str, str]] = []
    for name, values in value.items():
        if not _TOKEN.fullmatch(name):
            raise HostsError(f"{where}: header name {name!r} is not an HTTP token")
        for v in _strings(values, f"{where}: header {name!r}"):
            if "\n" in v or "\r" in v or not v.isascii():
                raise HostsError(f"{where}: header {name!r} holds a line break or a "
                                 "character that is not ASCII")
            out.append((name, v))
    return tuple(out)


def _duration(value: Any, where: str) -> float | None:
    """Go's time.ParseDuration for what hosts.toml uses ("1s", "500ms", "1m30s")."""
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else ""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise HostsError(f"{where}: dial_timeout {value!r} is not a duration like \"2s\"")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def _cert_files(directory: Path) -> HostEntry:
    """Docker's certificate files in a host directory without hosts.toml."""
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        raise HostsError(f"cannot read {directory}: {exc.strerror}") from None
    ca = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    client = tuple(
        (str(directory / n), str(directory / (n[:-5] + ".key"))
         if (directory / (n[:-5] + ".key")).exists() else "")
        for n in names if n.endswith(".cert"))
    return HostEntry(root=None, ca=ca, client=client)
