"""Which host a registry read goes to: mirrors from hosts.toml first, then the registry.

Why this is more than "try each URL": mirrors are caches that operators run,
and they behave as caches do. A mirror may be down, or accept connections and
never answer; a read must still finish within its deadline, so a mirror gets
a short share of it (connect and read timeouts, no retries of its own) and,
once it failed, is left alone for a while instead of costing every read its
timeout again. A pull-through cache (Distribution's, Harbor's) answers a
Range request for a blob it has not cached with 200 and the whole blob:
kitfs must not read gigabytes it did not ask for, so the caller closes that
answer unread, the range comes from the next host, and that mirror is not
asked for ranges of the blob for a while (each such request makes it start
fetching the whole blob from the origin again). A mirror whose bytes did not
match their digest is not asked for that blob again for a while.

Credentials: each host's session looks up credentials for the host it
contacts (a mirror's, or a `server` elsewhere), never the registry's, as
containerd does per host; Docker Hub's API host counts as docker.io.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import trio

from kitfs.errors import (
    AuthError,
    IntegrityError,
    KitfsError,
    NotFoundError,
    UsageError,
)
from kitfs.oci.auth import Credential, CredentialSource
from kitfs.oci.credentials import lookup_credential
from kitfs.oci.hosts import HostEntry
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import DOCKER_HUB_HOSTS
from kitfs.oci.session import RegistrySession
from kitfs.oci.stats import RequestStats
from kitfs.oci.transport import host_ssl_context, make_transport

log = logging.getLogger(__name__)

T = TypeVar("T")

MIRROR_CONNECT_TIMEOUT = 1.0
"""Seconds a mirror gets to accept a connection (hosts.toml's dial_timeout overrides):
a dead mirror costs a read this much, not the registry's connect timeout."""
MIRROR_SHARE = 0.25
"""The share of the read timeout a mirror may stay silent before the next host is tried,
and of what is left of a read's deadline that one mirror attempt may take in all."""
MIRROR_MIN_READ = 1.0
DOWN_FOR = 30.0
"""Seconds a mirror that failed (unreachable, silent, 5xx) is skipped."""
DISTRUST_FOR = 600.0
"""Seconds a mirror is not asked for a blob whose bytes it got wrong."""
_SERVED_LIMIT = 4096
NO_RANGES_FOR = 10.0
"""Seconds a mirror that answered a range with the whole blob is not asked for its ranges."""


@dataclasses.dataclass
class Host:
    """One host of a registry and its session."""

    index: int
    entry: HostEntry
    session: RegistrySession
    name: str
    """`host[:port]`, for messages."""
    down_until: float = 0.0

    @property
    def mirror(self) -> bool:
        return self.entry.mirror


class Route:
    """The hosts of one registry client, in the order hosts.toml gives, and what each has
    shown lately. Without a hosts file it is the registry alone."""

    def __init__(
        self,
        registry: str,
        options: ClientOptions,
        entries: list[HostEntry] | None,
        transport: httpx.AsyncBaseTransport | None,
        credentials: CredentialSource,
    ) -> None:
        self.registry = registry
        entries = entries or [HostEntry(root=None)]
        self.hosts: list[Host] = []
        for index, entry in enumerate(entries):
            opts = _host_options(options, entry)
            contacted = entry.netloc or registry
            own = _same_registry(contacted, registry)
            host_transport = transport
            if transport is None and (entry.ca or entry.client or entry.skip_verify is not None):
                host_transport = make_transport(opts, host_ssl_context(
                    opts, entry.ca, entry.client, entry.skip_verify))
            session = RegistrySession(
                registry, opts, host_transport,
                credentials if own else _credentials_of(contacted, options),
                root=entry.root,
                namespace=None if own else registry,
                headers=entry.header,
            )
            self.hosts.append(Host(index, entry, session, contacted))
        self.origin = self.hosts[-1]
        for host in self.hosts[:-1]:
            host.session.stats.registry = host.name
            self.origin.session.stats.mirrors.append(host.session.stats)
        self._distrusted: dict[tuple[int, str], float] = {}
        self._no_ranges: dict[tuple[int, str], float] = {}
        self._served: dict[str, set[int]] = {}
        """The mirrors whose blob bytes went out unchecked (ranges), by blob: the ones to
        blame if the caller's own check of them fails (see `refuse`)."""

    async def aclose(self) -> None:
        for host in self.hosts:
            await host.session.aclose()

    @property
    def stats(self) -> RequestStats:
        """The registry's numbers: the last host's session, plus what mirrors did (counted
        there too, so metrics and status read one place)."""
        return self.origin.session.stats

    def candidates(self, capability: str, digest: str | None = None, *,
                   ranged: bool = False) -> list[Host]:
        """Hosts to try for `capability`, in order; the last one able to is always there."""
        able = [h for h in self.hosts if h.entry.can(capability)]
        if not able:
            raise UsageError(f"hosts.toml for {self.registry} names no host that may "
                             f"{capability} (capabilities)")
        now = trio.current_time()
        last = able[-1]
        out = []
        for host in able[:-1]:
            key = (host.index, digest or "")
            if (host.down_until > now or self._distrusted.get(key, 0.0) > now
                    or (ranged and self._no_ranges.get(key, 0.0) > now)):
                continue
            out.append(host)
        out.append(last)
        return out

    async def first(self, capability: str, call: Callable[[Host], Awaitable[T]],
                    digest: str | None = None) -> T:
        """`call` on each host able to do `capability` until one answers; the last
        host's error is the one raised."""
        hosts = self.candidates(capability, digest)
        for host in hosts[:-1]:
            try:
                return await call(host)
            except KitfsError as exc:
                self.failed(host, exc)
        return await call(hosts[-1])

    def failed(self, host: Host, exc: KitfsError) -> None:
        """A mirror that did not serve: the next host is tried; one that is down, broken or
        refusing us (no credentials stored under its name: asking again will not change
        that) is skipped for a while; one merely missing the item is not."""
        self.stats.mirror_fallbacks += 1
        if isinstance(exc, IntegrityError):
            log.warning("mirror %s sent bad data (%s); using the next host", host.name, exc)
            return
        if isinstance(exc, NotFoundError):
            log.debug("mirror %s: %s; trying the next host", host.name, exc)
            return
        host.down_until = trio.current_time() + DOWN_FOR
        why = "refused us" if isinstance(exc, AuthError) else "failed"
        log.warning("mirror %s %s (%s); skipping it for %gs", host.name, why, exc, DOWN_FOR)

    def attempt_deadline(self) -> float:
        """When a mirror attempt starting now must have finished (answer and body): a share
        of what is left of the caller's deadline, so a trickling mirror, or several
        silent ones in a row, leave the registry most of it (inf without a deadline)."""
        now = trio.current_time()
        return now + (trio.current_effective_deadline() - now) * MIRROR_SHARE

    def whole_for_range(self, host: Host, digest: str) -> None:
        """`host` answered a range of `digest` with the whole blob (see the module)."""
        self.stats.mirror_full_answers += 1
        self.stats.mirror_fallbacks += 1
        self._no_ranges[(host.index, digest)] = trio.current_time() + NO_RANGES_FOR
        log.info("mirror %s answered a range of %s with the whole blob; taking the range "
                 "from the next host", host.name, digest[:19])

    def bad_answer(self, host: Host, digest: str, exc: KitfsError) -> None:
        """`host`, a mirror, answered for `digest` in a way the registry must not (a range
        that starts elsewhere, a size the descriptor denies): closed unread, the next
        host asked, and that mirror not asked for the blob for a while."""
        self.stats.mirror_fallbacks += 1
        self._distrusted[(host.index, digest)] = trio.current_time() + DISTRUST_FOR
        log.warning("mirror %s answered wrongly (%s); not using it for %s for %gs",
                    host.name, exc, digest[:19], DISTRUST_FOR)

    def distrust(self, hosts: set[int], digest: str) -> bool:
        """Mirrors among `hosts` that sent bytes of `digest` which did not match it are not
        asked for it again for a while. True only if a new try would go to a host that
        sent none of them: a liar that is the last host able to pull is still asked (there
        is nobody else), so saying "try again" then would loop forever."""
        until = trio.current_time() + DISTRUST_FOR
        marked: set[int] = set()
        for index in hosts:
            host = self.hosts[index]
            if host.mirror and host is not self.origin:
                self._distrusted[(index, digest)] = until
                self.stats.mirror_bad_blobs += 1
                log.warning("mirror %s sent bytes of %s that do not match it; not using "
                            "it for that blob for %gs", host.name, digest[:19], DISTRUST_FOR)
                marked.add(index)
        return bool(marked) and self.candidates("pull", digest)[-1].index not in marked

    def served(self, host: Host, digest: str) -> None:
        """`host` is sending bytes of `digest` (noted for mirrors only; bounded)."""
        if host.mirror and host is not self.origin:
            if len(self._served) >= _SERVED_LIMIT and digest not in self._served:
                self._served.clear()
            self._served.setdefault(digest, set()).add(host.index)

    def refuse(self, digest: str) -> bool:
        """The caller found bytes of `digest` wrong: distrust the mirrors that sent any."""
        return self.distrust(self._served.pop(digest, set()), digest)


def _host_options(options: ClientOptions, entry: HostEntry) -> ClientOptions:
    """A mirror gets a share of the deadline, no retries of its own (the next host is its
    retry) and no client certificate but its own; the last host gets the command's
    options, dial_timeout aside."""
    if not entry.mirror:
        if entry.dial_timeout is None:
            return options
        return dataclasses.replace(options, connect_timeout=entry.dial_timeout)
    read = max(MIRROR_MIN_READ, options.read_timeout * MIRROR_SHARE)
    # The registry's client certificate (--cert/--key) is the registry's business: a
    # mirror gets only its own hosts.toml `client` entries.
    return dataclasses.replace(
        options,
        cert_file=None,
        key_file=None,
        connect_timeout=entry.dial_timeout or min(options.connect_timeout,
                                                  MIRROR_CONNECT_TIMEOUT),
        read_timeout=min(options.read_timeout, read),
        retry_budget=min(options.retry_budget, read),
        connect_retry=0.0,
        server_error_retry=0.0,
    )


def _same_registry(host: str, registry: str) -> bool:
    """Whether `host` is the registry under another name (Docker Hub's API host serves
    docker.io): its credentials, and no `?ns=` (containerd's isProxy)."""
    return host == registry or (host in DOCKER_HUB_HOSTS and registry in DOCKER_HUB_HOSTS)


def _credentials_of(host: str, options: ClientOptions) -> CredentialSource:
    async def credentials() -> Credential | None:
        return await lookup_credential(host, options.kitops_home)

    return credentials
