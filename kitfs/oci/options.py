"""How to reach a registry, as `kit`'s network flags say it.

Kept apart from the HTTP machinery (transport.py, which imports httpx) so
that commands which only parse options, such as `kitfs mount` before it
starts its daemon, do not pay for importing an HTTP client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kitfs.oci.proxy import Proxies

__all__ = ["ClientOptions"]


@dataclass(frozen=True)
class ClientOptions:
    """How to reach one registry; mirrors `kit`'s network flags."""

    plain_http: bool = False
    """Force http://. Loopback registries (localhost, 127.x, ::1) use http without it."""
    tls_verify: bool = True
    ca_file: str | None = None
    """Extra CA bundle, trusted in addition to the system CAs."""
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    """Seconds one socket read may wait: a stalled stream errors within this."""
    retry_budget: float = 30.0
    """Total seconds spent retrying 429, 5xx and dropped connections for one call."""
    connect_retry: float = 2.0
    """Seconds to keep retrying a registry that refuses connections (capped by
    retry_budget): long enough to ride out a restart, short enough that a dead
    registry is reported within seconds rather than after the whole budget."""
    server_error_retry: float = 5.0
    """Seconds to keep retrying 5xx (and 408) answers, at most half of retry_budget:
    a registry that keeps failing is reported by its status well before a reader's
    deadline (a mount gives its readers `--timeout` too), not by that deadline."""
    proxies: Proxies = field(default_factory=Proxies)
    """Which proxy each connection goes through (--proxy, HTTP_PROXY, ...; see proxy.py).
    None by default: commands read the environment (commands/common.py), a library
    caller says what it wants."""
    hosts_dir: str | None = None
    """A containerd-style hosts directory (`<dir>/<registry>/hosts.toml`: mirrors, per-host
    TLS); None: none. Commands resolve --hosts-dir / $KITFS_HOSTS_DIR / the default."""
    kitops_home: str | None = None
    """Overrides $KITOPS_HOME when looking up credentials."""
    metadata_cache: str | None = None
    """A kitfs cache directory that keeps what each reference resolved to, to fall back
    on when the registry is unreachable (kitfs/offline.py; open_kit sets it)."""
    offline_fallback: bool = True
    """Whether an unreachable registry may be answered from `metadata_cache`. False for
    `kitfs cache warm`: it exists to fetch what the tag means now, so an old record
    would warm (and report) the wrong ModelKit; it still keeps what it resolved."""
