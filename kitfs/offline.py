"""A warmed ModelKit mounts with its registry down: the manifest as resolved when warmed.

Every registry source a mount, unpack or `kitfs cache warm` opens (through
`open_source` here) keeps, in the chunk cache's directory (cache/tocs.py), the
small blobs it read (manifest, config, kitfs table of contents), by digest,
and a record of what the reference resolved to and when. When the registry
then does not answer at all (connection refused, no connection or no answer
within the timeout: `UnreachableError`), `resolve` falls back to that record,
says so in a warning naming the time it was resolved, and serves the kept
blobs; chunks come from the chunk cache as always, and whatever is not there
fails at once instead of waiting for a registry known to be down. Not
`kitfs cache warm` (ClientOptions.offline_fallback): it keeps, but exists to
fetch what the tag means now, so it fails instead.

Never on any other error: a registry that answers "not found" or "denied"
is telling the truth about the tag now (a deleted tag must not mount an old
model), and a TLS failure is a registry that cannot be told from an
impostor. Kept blobs are hashed against their digest when read back, so a
cache that rotted or was tampered with reads as "not kept".

Where it sits: below `parents.open_modelkit` and `inspection.inspect`, so
whatever those check after resolving (a signature gate) sees the digest the
fallback resolved to, exactly as if the registry had answered with it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from kitfs.cache.fileformat import CacheError
from kitfs.cache.tocs import TocCache
from kitfs.errors import BlockedError, IntegrityError, KitfsError, UnreachableError
from kitfs.oci.client import RegistryClient
from kitfs.oci.digest import digest_of, short, split_digest
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import Reference
from kitfs.oci.source import BlobSource, RegistrySource, RoutedSource, Where
from kitfs.oci.source import open_source as open_plain_source

log = logging.getLogger(__name__)

#: Metadata blobs larger than this are not kept (a table of contents may reach 64 MiB).
MAX_KEPT_BLOB = 64 << 20


@dataclass(frozen=True)
class Resolved:
    """What a reference resolved to, and when (Unix time)."""

    reference: str
    digest: str
    media_type: str
    at: float

    def to_json(self) -> bytes:
        return json.dumps({"reference": self.reference, "digest": self.digest,
                           "mediaType": self.media_type, "resolvedAt": self.at},
                          separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Resolved | None:
        try:
            doc = json.loads(data)
            found = cls(str(doc["reference"]), str(doc["digest"]), str(doc["mediaType"]),
                        float(doc["resolvedAt"]))
            split_digest(found.digest)
            if not (math.isfinite(found.at) and 0 <= found.at < 1e11):
                return None  # not a time: the warning naming it could not be written
        except (ValueError, KeyError, TypeError, KitfsError):
            return None
        return found

    @property
    def when(self) -> str:
        stamp = datetime.datetime.fromtimestamp(self.at, datetime.UTC)
        return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


def record_key(reference: Reference) -> str:
    """The record's name: the registry, repository and tag (or digest) asked for."""
    return digest_of(f"{reference.name}@{reference.target}".encode())


def falls_back(exc: KitfsError) -> bool:
    """Whether `exc` means the registry is not there, rather than that it said no, or that
    something on the way would not let us through (BlockedError: TLS, a proxy, our pool)."""
    return isinstance(exc, UnreachableError) and not isinstance(exc, BlockedError)


class KeptMetadata:
    """The blobs and records `OfflineSource` keeps; calls block on the disk (use a thread)."""

    def __init__(self, cache_dir: Path) -> None:
        self.records = TocCache(cache_dir)

    def blob(self, digest: str) -> bytes | None:
        """The kept blob, if it is there and still hashes to `digest`."""
        try:
            data = self.records.get_blob(digest)
            if data is None:
                return None
            algorithm, _ = split_digest(digest)
        except KitfsError as exc:
            log.warning("cannot read the kept blob %s: %s", short(digest), exc)
            return None
        if digest_of(data, algorithm) != digest:
            log.warning("the kept blob %s does not match its digest: ignored", short(digest))
            return None
        return data

    def keep_blob(self, digest: str, data: bytes) -> None:
        if len(data) > MAX_KEPT_BLOB:
            return
        try:
            if self.records.get_blob(digest) != data:
                self.records.put_blob(digest, data)
            else:  # used again: gc keeps it (cache/tocs.py KEPT_MAX_AGE_S)
                self.records.touch_blob(digest)
        except KitfsError as exc:  # a cache we cannot write costs the fallback, not the mount
            log.warning("cannot keep blob %s for offline use: %s", short(digest), exc)

    def resolved(self, reference: Reference) -> Resolved | None:
        try:
            data = self.records.get_resolved(record_key(reference))
        except CacheError as exc:
            log.warning("cannot read what %s resolved to: %s", reference, exc)
            return None
        found = Resolved.from_json(data) if data is not None else None
        return found if found is not None and found.reference == _shown(reference) else None

    def keep_resolved(self, found: Resolved, reference: Reference) -> None:
        try:
            self.records.put_resolved(record_key(reference), found.to_json())
        except CacheError as exc:
            log.warning("cannot record what %s resolved to: %s", reference, exc)


def _shown(reference: Reference) -> str:
    return f"{reference.name}@{reference.target}" if reference.digest else (
        f"{reference.name}:{reference.target}")


class OfflineSource:
    """A registry source that keeps what it resolved, and falls back on it when the
    registry is unreachable (the module docstring says when, and why only then)."""

    def __init__(self, inner: RegistrySource, cache_dir: Path, *,
                 fall_back: bool = True) -> None:
        self.reference = inner.reference
        self.inner = inner
        self.fall_back = fall_back  # False: keep what resolved, but never serve it back
        self.kept = KeptMetadata(cache_dir)
        #: Set once resolve fell back: what it fell back to (None: the registry answered).
        self.offline: Resolved | None = None
        self._why: UnreachableError | None = None

    async def resolve(self) -> tuple[bytes, str, str]:
        try:
            manifest, media_type, digest = await self.inner.resolve()
        except KitfsError as exc:
            if not (self.fall_back and falls_back(exc)):
                raise
            assert isinstance(exc, UnreachableError)
            return await self._fall_back(exc)
        found = Resolved(_shown(self.reference), digest, media_type, time.time())
        await trio.to_thread.run_sync(self._keep_resolved, found, manifest)
        return manifest, media_type, digest

    def _keep_resolved(self, found: Resolved, manifest: bytes) -> None:
        self.kept.keep_blob(found.digest, manifest)
        self.kept.keep_resolved(found, self.reference)

    async def _fall_back(self, exc: UnreachableError) -> tuple[bytes, str, str]:
        found = await trio.to_thread.run_sync(self.kept.resolved, self.reference)
        manifest = (await trio.to_thread.run_sync(self.kept.blob, found.digest)
                    if found is not None else None)
        if found is None or manifest is None:
            raise type(exc)(f"{exc} (and this node keeps no usable record of what "
                            f"{_shown(self.reference)} resolved to: `kitfs cache warm` it "
                            "while the registry answers)") from None
        self.offline, self._why = found, exc
        if self.reference.digest:
            log.warning("registry unreachable (%s): %s served from the cache", exc,
                        _shown(self.reference))
        else:
            log.warning("registry unreachable (%s): %s is the tag as resolved on %s (%s), "
                        "kept in the cache; it may point elsewhere now", exc,
                        _shown(self.reference), found.when, short(found.digest))
        return manifest, found.media_type, found.digest

    def _down(self) -> bool:
        """Opened from the cache, and the registry has not answered since (a mount's daemon
        asks it again in the background: once it answers, chunks missing from the cache
        are fetched from it again, checked against the same digests)."""
        return self.offline is not None and self.inner.client.stats.failing

    def _unreachable(self, what: str) -> UnreachableError:
        return UnreachableError(f"{what} is not in the cache, and the registry was "
                                f"unreachable when this was opened ({self._why})")

    async def get_blob(
        self, digest: str, max_size: int = 64 << 20, *, size: int | None = None
    ) -> bytes:
        if self.offline is not None:
            data = await trio.to_thread.run_sync(self.kept.blob, digest)
            if data is None:
                if not self._down():
                    return await self.inner.get_blob(digest, max_size, size=size)
                raise self._unreachable(f"blob {short(digest)}")
            if (size is not None and len(data) != size) or len(data) > max_size:
                raise IntegrityError(f"kept blob {short(digest)} is {len(data)} bytes, "
                                     f"expected {size if size is not None else max_size}")
            return data
        data = await self.inner.get_blob(digest, max_size, size=size)
        await trio.to_thread.run_sync(self.kept.keep_blob, digest, data)
        return data

    async def read_range(
        self, digest: str, offset: int, length: int, *, size: int | None = None
    ) -> bytes:
        if self._down():
            raise self._unreachable(f"bytes {offset}+{length} of blob {short(digest)}")
        return await self.inner.read_range(digest, offset, length, size=size)

    async def read_range_into(
        self,
        digest: str,
        offset: int,
        buffers: Sequence[memoryview],
        filled: Callable[[int], None] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        if self._down():
            raise self._unreachable(f"bytes from {offset} of blob {short(digest)}")
        await self.inner.read_range_into(digest, offset, buffers, filled, size=size)

    @contextlib.asynccontextmanager
    async def stream_blob(
        self, digest: str, *, size: int | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        if self._down():
            raise self._unreachable(f"blob {short(digest)}")
        async with self.inner.stream_blob(digest, size=size) as pieces:
            yield pieces

    def clients(self) -> list[RegistryClient]:
        return self.inner.clients()

    async def aclose(self) -> None:
        await self.inner.aclose()


def open_source(
    reference: Reference, options: ClientOptions, *, where: Where = "reference"
) -> BlobSource:
    """oci/source.py's open_source, a registry's source kept and falling back as above
    where `options.metadata_cache` names the cache directory (open_kit sets it)."""
    source = open_plain_source(reference, options, where=where)
    if options.metadata_cache is None or not isinstance(source, RegistrySource):
        return source
    return OfflineSource(source, Path(options.metadata_cache),
                         fall_back=options.offline_fallback)


def offline_note(source: BlobSource) -> str | None:
    """What a mount of `source` should tell its user if it was opened from the cache."""
    primary = source.primary if isinstance(source, RoutedSource) else source
    if isinstance(primary, OfflineSource) and primary.offline is not None:
        found = primary.offline
        return (f"registry unreachable: {found.reference} as resolved on {found.when} "
                f"({short(found.digest)}), served from the cache")
    return None
