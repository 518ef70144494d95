"""Where a ModelKit's bytes come from: a registry, or `kit`'s local storage.

Commands above this module (inspect, ls, mount) ask for manifests, blobs and
byte ranges without caring which; a reference without a registry means kit's
local storage, exactly as it does for `kit`.

Blob reads take the blob's size as its descriptor says (`size`, optional):
every source checks the blob it has against it, so a manifest that vouches
for a blob cannot be answered with a shorter or longer one, from either place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import trio

from kitfs.errors import IntegrityError, LocalStorageError, NotFoundError, UsageError
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.credentials import kitops_home
from kitfs.oci.digest import THREADED_HASH_MIN, DigestVerifier
from kitfs.oci.layout import LocalStorage
from kitfs.oci.reference import Reference

STREAM_PIECE = 1 << 20


class BlobSource(Protocol):
    """The read operations every consumer of a ModelKit needs."""

    reference: Reference

    async def resolve(self) -> tuple[bytes, str, str]:
        """(manifest bytes, media type, digest) of the ModelKit the reference names."""
        ...

    async def get_blob(
        self, digest: str, max_size: int = 64 << 20, *, size: int | None = None
    ) -> bytes:
        """The whole blob, checked against its digest (and `size`, where given)."""
        ...

    async def read_range(
        self, digest: str, offset: int, length: int, *, size: int | None = None
    ) -> bytes: ...

    async def read_range_into(
        self,
        digest: str,
        offset: int,
        buffers: Sequence[memoryview],
        filled: Callable[[int], None] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        """Fill `buffers` in order from `offset`; `filled(i)` as soon as buffer i is whole.

        `filled` runs on the event loop; no caller code runs in a thread that
        receives or reads. `size`, the blob's descriptor size: a blob of
        another size is an IntegrityError.
        """
        ...

    def stream_blob(
        self, digest: str, *, size: int | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """The blob in pieces; the iterator raises IntegrityError at its end unless the
        blob matched its digest (and `size`), so it is verified once iteration ends."""
        ...

    def clients(self) -> list[RegistryClient]:
        """The registry clients this source fetches through (none for local storage):
        whose request counts a mount reports, and whose registry its health checks."""
        ...

    async def aclose(self) -> None: ...


class RegistrySource:
    def __init__(self, reference: Reference, client: RegistryClient) -> None:
        self.reference = reference
        self.client = client

    async def resolve(self) -> tuple[bytes, str, str]:
        return await self.client.resolve_modelkit(self.reference.repository, self.reference.target)

    async def get_blob(
        self, digest: str, max_size: int = 64 << 20, *, size: int | None = None
    ) -> bytes:
        return await self.client.get_blob(self.reference.repository, digest, max_size, size=size)

    async def read_range(
        self, digest: str, offset: int, length: int, *, size: int | None = None
    ) -> bytes:
        return await self.client.read_range(
            self.reference.repository, digest, offset, length, size=size
        )

    async def read_range_into(
        self,
        digest: str,
        offset: int,
        buffers: Sequence[memoryview],
        filled: Callable[[int], None] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        await self.client.read_range_into(
            self.reference.repository, digest, offset, buffers, filled, size=size
        )

    def stream_blob(
        self, digest: str, *, size: int | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self.client.stream_blob(self.reference.repository, digest, size=size)

    def clients(self) -> list[RegistryClient]:
        return [self.client]

    async def aclose(self) -> None:
        await self.client.aclose()


class LocalSource:
    """kit's local storage; blob reads go to a thread so a big read never stalls the loop."""

    def __init__(self, reference: Reference, storage: LocalStorage) -> None:
        self.reference = reference
        self.storage = storage

    async def resolve(self) -> tuple[bytes, str, str]:
        return await trio.to_thread.run_sync(
            self.storage.resolve, self.reference.name, self.reference.target
        )

    async def get_blob(
        self, digest: str, max_size: int = 64 << 20, *, size: int | None = None
    ) -> bytes:
        def read() -> bytes:
            # Sizes first: a lying descriptor or a huge file is refused before it is read.
            with self.storage.open_blob(digest) as f:
                actual = os.fstat(f.fileno()).st_size
            _check_size(digest, actual, size)
            if actual > max_size:
                raise LocalStorageError(f"blob {digest} in kit's local storage is {actual} "
                                        f"bytes, more than the {max_size} expected here")
            return self.storage.read_blob(digest)

        try:
            return await trio.to_thread.run_sync(read)
        except OSError as exc:  # a KitfsError, like every other source's failures
            raise LocalStorageError(
                f"reading blob {digest} from kit's local storage: {exc.strerror or exc}"
            ) from None

    async def read_range(
        self, digest: str, offset: int, length: int, *, size: int | None = None
    ) -> bytes:
        if length < 0:
            raise UsageError(f"invalid blob range offset={offset} length={length}")
        buf = bytearray(length)
        await self.read_range_into(digest, offset, [memoryview(buf)], size=size)
        return bytes(buf)

    async def read_range_into(
        self,
        digest: str,
        offset: int,
        buffers: Sequence[memoryview],
        filled: Callable[[int], None] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        def read() -> None:
            with self.storage.open_blob(digest) as f:
                if size is not None:
                    _check_size(digest, os.fstat(f.fileno()).st_size, size)
                at = offset
                for buf in buffers:
                    done = 0
                    while done < len(buf):
                        n = os.preadv(f.fileno(), [buf[done:]], at)
                        if n <= 0:  # a regular file reads short only at its end
                            raise IntegrityError(
                                f"blob {digest} in kit's local storage is shorter than expected"
                            )
                        done += n
                        at += n

        try:
            await trio.to_thread.run_sync(read)
        except OSError as exc:  # a KitfsError, like every other source's failures
            raise LocalStorageError(
                f"reading blob {digest} from kit's local storage: {exc.strerror or exc}"
            ) from None
        if filled is not None:
            for i in range(len(buffers)):
                filled(i)

    @contextlib.asynccontextmanager
    async def stream_blob(
        self, digest: str, *, size: int | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        async with contextlib.aclosing(self._pieces(digest, size)) as pieces:
            yield pieces

    async def _pieces(self, digest: str, size: int | None) -> AsyncGenerator[bytes, None]:
        # Verified like a registry's stream: callers take a clean end as the blob's
        # verification (the engine marks a streamed layer verified), and a disk can lie.
        what = f"reading blob {digest} from kit's local storage"
        try:
            with self.storage.open_blob(digest) as f:
                actual = os.fstat(f.fileno()).st_size
                _check_size(digest, actual, size)
                verifier = DigestVerifier(
                    digest, actual, what, threaded=actual >= THREADED_HASH_MIN
                )
                try:
                    while True:
                        piece = await trio.to_thread.run_sync(f.read, STREAM_PIECE)
                        if not piece:
                            break
                        await verifier.update(piece)
                        yield piece
                    await verifier.verify()
                finally:
                    verifier.abort()
        except OSError as exc:  # a KitfsError, like every other source's failures
            raise LocalStorageError(f"{what}: {exc.strerror or exc}") from None

    def clients(self) -> list[RegistryClient]:
        return []

    async def aclose(self) -> None:
        return None


class RoutedSource:
    """One ModelKit's source that also serves blobs held elsewhere, each from its own source.

    A Kitfile whose `model.path` names a parent ModelKit (kitfs/parents.py)
    is served with the parent's model layers, which live in the parent's
    repository (or registry, or kit's local storage): `routes` maps each such
    layer digest to the source that holds it; every other blob, and the
    manifest, come from `primary`. Every source checks what it serves against
    the digest (and size) asked for, so routing changes where bytes come
    from, never what they must be. Closing it closes every source it routes to.
    """

    def __init__(self, primary: BlobSource, routes: Mapping[str, BlobSource]) -> None:
        self.reference = primary.reference
        self.primary = primary
        self.routes = dict(routes)

    def source_of(self, digest: str) -> BlobSource:
        return self.routes.get(digest, self.primary)

    async def resolve(self) -> tuple[bytes, str, str]:
        return await self.primary.resolve()

    async def get_blob(
        self, digest: str, max_size: int = 64 << 20, *, size: int | None = None
    ) -> bytes:
        return await self.source_of(digest).get_blob(digest, max_size, size=size)

    async def read_range(
        self, digest: str, offset: int, length: int, *, size: int | None = None
    ) -> bytes:
        return await self.source_of(digest).read_range(digest, offset, length, size=size)

    async def read_range_into(
        self,
        digest: str,
        offset: int,
        buffers: Sequence[memoryview],
        filled: Callable[[int], None] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        await self.source_of(digest).read_range_into(digest, offset, buffers, filled, size=size)

    def stream_blob(
        self, digest: str, *, size: int | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self.source_of(digest).stream_blob(digest, size=size)

    def clients(self) -> list[RegistryClient]:
        found: list[RegistryClient] = []
        for source in (self.primary, *self.routes.values()):
            found += [c for c in source.clients() if not any(c is f for f in found)]
        return found

    async def aclose(self) -> None:
        # Each once (a parent's source serves all its layers), and every one even if
        # another's close raises.
        seen: list[BlobSource] = []
        async with contextlib.AsyncExitStack() as stack:
            for source in (self.primary, *self.routes.values()):
                if not any(source is s for s in seen):
                    seen.append(source)
                    stack.push_async_callback(source.aclose)


def _check_size(digest: str, actual: int, size: int | None) -> None:
    if size is not None and actual != size:
        raise IntegrityError(
            f"blob {digest} in kit's local storage is {actual} bytes, its descriptor says {size}"
        )


#: Where to look for a reference: "reference" as the reference says (no registry: kit's
#: local storage; every command but the two below); "local": kit's local storage whatever
#: the reference names (a ModelKit pulled from `registry/repo` is kept there under that
#: name); "remote": its registry; "local-first": local storage if it holds the reference,
#: else its registry (`kit diff` without a `local://` or `remote://` prefix).
Where = Literal["reference", "local", "remote", "local-first"]


def open_source(
    reference: Reference, options: ClientOptions, *, where: Where = "reference"
) -> BlobSource:
    """The source for `reference`; the caller must `aclose()` it."""
    if where == "remote" and reference.is_local:
        raise UsageError(f"can not check remote: {reference.repository} does not contain a "
                         "registry (e.g. registry.example.com/repo:tag)")
    storage = LocalStorage.for_home(Path(kitops_home(options.kitops_home)))
    if where == "local-first":
        local = reference.is_local or _in_local_storage(storage, reference)
    else:
        local = where == "local" or (where == "reference" and reference.is_local)
    if local:
        return LocalSource(reference, storage)
    return RegistrySource(reference, RegistryClient(reference.registry, options))


def _in_local_storage(storage: LocalStorage, reference: Reference) -> bool:
    try:
        storage.resolve(reference.name, reference.target)
    except NotFoundError:
        return False
    return True
