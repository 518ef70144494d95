"""`kitfs pull`: a ModelKit from a registry into kit's local storage, as `kit pull` stores it.

What kit does (pkg/cmd/pull/pull.go, pkg/lib/repo/local/pull.go), and so
kitfs: the reference must name a registry and one tag (or a digest); it must
resolve to an OCI image manifest of a ModelKit. The config, every layer and
the manifest go to `storage/blobs/sha256/<hex>`, each downloaded into
`storage/ingest/<hex>`, checked against its digest while it streams, and
renamed into place (mode 0600) only once it matched: a blob under its final
name is always whole, whatever kills the pull. A blob already in storage is
not fetched again; an ingest file left by an interrupted pull (kit's or
kitfs') is resumed from where it stopped with a range request. Then the
manifest is listed in the repository's index and in the layout's
`index.json`, and tagged unless it was pulled by digest. A Kitfile whose
`model.path` names another ModelKit has that parent pulled too (cycles and
chains past 10 refused, as kit does).

Beyond kit: an ingest file is locked while it is written, so two pulls of
one blob wait for each other instead of interleaving; resumed bytes that do
not hash to the digest are thrown away and the blob fetched whole once more;
and the kitfs table of contents the manifest pins comes along when the
registry has it, so a mount of the pulled ModelKit starts without reading
tar headers. A reference naming an index is resolved to the ModelKit in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from kitfs.errors import (
    FormatError,
    IntegrityError,
    KitfsError,
    LocalStorageError,
    MirrorDataError,
    UsageError,
)
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.manifest import manifest_blobs, parse_modelkit
from kitfs.modelkit.toc import TOC_ANNOTATION
from kitfs.oci.client import (
    MODELKIT_ARTIFACT_TYPES,
    MODELKIT_CONFIG_TYPES,
    ClientOptions,
    RegistryClient,
)
from kitfs.oci.credentials import kitops_home
from kitfs.oci.layout import LocalStorage, display_name
from kitfs.oci.reference import Reference, parse_reference
from kitfs.parents import MAX_PARENTS, Chain
from kitfs.progress import Progress

log = logging.getLogger(__name__)

#: kit's --concurrency default: blobs downloaded at once.
DEFAULT_JOBS = 5
#: Bytes gathered before one write to the ingest file (a thread hop per write).
WRITE_BATCH = 4 << 20
HASH_PIECE = 1 << 20
#: kit's mode for the blobs it pulls (pkg/lib/repo/local/pull.go: os.Chmod(blobPath, 0600)).
BLOB_MODE = 0o600
LOCK_POLL = 0.2


@dataclass(frozen=True)
class PullResult:
    reference: Reference
    digest: str
    blobs: int
    bytes_fetched: int
    bytes_present: int
    #: The parents pulled with it (`model.path` references), nearest first.
    parents: tuple[Reference, ...] = ()


async def pull(ref: Reference, options: ClientOptions, *, jobs: int = DEFAULT_JOBS) -> PullResult:
    """Pull `ref` and its parent ModelKits into kit's local storage."""
    if ref.is_local:
        raise UsageError(f"registry is required when pulling: {display_name(str(ref))} names "
                         "kit's local storage (e.g. registry.example.com/repo:tag)")
    if ref.extra_tags:
        raise UsageError("reference cannot include multiple tags")
    if jobs < 1:
        raise UsageError(f"invalid argument for concurrency ({jobs}): must be at least 1")
    storage = LocalStorage.for_home(Path(kitops_home(options.kitops_home)))
    # kit pull counts the ModelKit itself among its MaxModelRefChain (parents.py).
    chain = Chain(limit=MAX_PARENTS)
    first: PullResult | None = None
    parents: list[Reference] = []
    current: Reference | None = ref
    while current is not None:
        chain.enter(current)
        if current.is_local:
            # A parent named without a registry can only come from local storage.
            await trio.to_thread.run_sync(storage.resolve, current.name, current.target)
            break
        result, parent = await _pull_one(current, storage, options, jobs)
        if first is None:
            first = result
        else:
            parents.append(current)
        current = parse_reference(parent) if parent is not None else None
    assert first is not None
    return PullResult(first.reference, first.digest, first.blobs, first.bytes_fetched,
                      first.bytes_present, tuple(parents))


async def _pull_one(
    ref: Reference, storage: LocalStorage, options: ClientOptions, jobs: int
) -> tuple[PullResult, str | None]:
    """Pull one ModelKit; with the parent its Kitfile names, if any."""
    repo = ref.repository
    async with RegistryClient(ref.registry, options) as client:
        manifest, media_type, digest = await client.resolve_modelkit(repo, ref.target)
        if media_type != mt.OCI_MANIFEST:
            raise FormatError(f"{ref}: expected an OCI image manifest for pull but got "
                              f"{media_type}")
        descs, annotations = manifest_blobs(manifest)
        _check_is_modelkit(ref, manifest, descs[0].media_type)
        await trio.to_thread.run_sync(storage.ensure_layout)
        wanted = {d.digest: d.size for d in descs}
        missing = await trio.to_thread.run_sync(_missing, storage, wanted)
        present = sum(wanted.values()) - sum(missing.values())
        progress = Progress(f"pulling {ref}", sum(missing.values()))
        limiter = trio.CapacityLimiter(jobs)
        fetched = 0

        async def one(blob: str, size: int | None, optional: bool = False) -> None:
            nonlocal fetched
            async with limiter:
                try:
                    got = await _fetch(client, repo, storage, blob, size, progress)
                    fetched += got  # after the await: tasks run this concurrently
                except KitfsError as exc:
                    if not optional:
                        raise
                    log.info("not pulling the kitfs table of contents %s: %s", blob, exc)

        try:
            async with trio.open_nursery() as nursery:
                for blob, size in missing.items():
                    nursery.start_soon(one, blob, size)
                toc = annotations.get(TOC_ANNOTATION)
                if toc is not None and toc not in wanted and not storage.has_blob(toc):
                    nursery.start_soon(one, toc, None, True)
        finally:
            progress.close()
        # The config is whole and checked now: read the Kitfile for a parent reference.
        config = await trio.to_thread.run_sync(storage.read_blob, descs[0].digest)
        try:
            parent = parse_modelkit(manifest, config).model_reference
        except FormatError as exc:
            # kit stores what its config media type calls a ModelKit; so does kitfs,
            # though it could not read this one (inspect and mount will say why).
            log.warning("%s: %s", ref, exc)
            parent = None
        tags = ref.tags if ref.digest is None else ()
        await trio.to_thread.run_sync(storage.put_blob_bytes, manifest, BLOB_MODE)
        stored = await trio.to_thread.run_sync(storage.add_manifest, ref.name, manifest, tags)
    if stored != digest:  # pragma: no cover - both hash the same bytes
        raise IntegrityError(f"{ref}: stored manifest as {stored}, expected {digest}")
    result = PullResult(ref.with_digest(digest), digest, len(wanted), fetched, present)
    return result, parent


def _check_is_modelkit(ref: Reference, manifest: bytes, config_type: str) -> None:
    """kit refuses what is not a ModelKit before fetching a blob; kitfs reads ModelPacks too."""
    try:
        artifact_type = json.loads(manifest).get("artifactType")
    except (ValueError, AttributeError):  # pragma: no cover - manifest_blobs parsed it
        artifact_type = None
    if config_type not in MODELKIT_CONFIG_TYPES and artifact_type not in MODELKIT_ARTIFACT_TYPES:
        raise FormatError(f"reference {ref} does not refer to a model (config media type "
                          f"{config_type})")


def _missing(storage: LocalStorage, wanted: dict[str, int]) -> dict[str, int]:
    """The blobs storage lacks. A blob under its final name was checked before it got
    there (by kit or kitfs); one of the wrong size was damaged since, and is replaced."""
    missing = {}
    for digest, size in wanted.items():
        path = storage.blob_path(digest)
        try:
            if path.stat().st_size == size:
                continue
            log.warning("blob %s in %s has the wrong size: fetching it again", digest,
                        storage.root)
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LocalStorageError(f"cannot read kit storage at {storage.root}: "
                                    f"{exc.strerror or exc}") from None
        missing[digest] = size
    return missing


async def _fetch(
    client: RegistryClient,
    repo: str,
    storage: LocalStorage,
    digest: str,
    size: int | None,
    progress: Progress,
) -> int:
    """Download one blob through its ingest file into storage; the bytes fetched."""
    ingest = storage.ingest_path(digest)
    with _ingest_file(ingest) as f:
        await _lock(f)
        if storage.has_blob(digest):  # another pull finished it while we waited
            return 0
        prefix = await trio.to_thread.run_sync(_hash_prefix, f, digest, size)
        fetched = 0
        if prefix is not None:
            progress.update(prefix[0])
        try:
            fetched = await _download(client, repo, digest, size, f, prefix, progress)
        except IntegrityError as exc:
            if prefix is None or prefix[0] == 0:
                await trio.to_thread.run_sync(f.truncate, 0)
                if not isinstance(exc, MirrorDataError):
                    raise
                # A mirror's bytes were refused: the next host serves them (once more).
                log.warning("%s", exc)
                fetched = await _download(client, repo, digest, size, f, None, progress)
                await trio.to_thread.run_sync(_sync, f, ingest)
                await trio.to_thread.run_sync(storage.adopt_blob, ingest, digest, BLOB_MODE)
                return fetched
            # What an interrupted download left does not fit the rest: start over, once.
            log.warning("discarding %d bytes of %s left by an earlier pull", prefix[0], digest)
            await trio.to_thread.run_sync(f.truncate, 0)
            fetched = await _download(client, repo, digest, size, f, None, progress)
        await trio.to_thread.run_sync(_sync, f, ingest)
        await trio.to_thread.run_sync(storage.adopt_blob, ingest, digest, BLOB_MODE)
    return fetched


async def _lock(f: BinaryIO) -> None:
    """Hold the ingest file alone (released when it is closed); polled, so a pull waiting
    on another stays cancellable."""
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await trio.sleep(LOCK_POLL)
        except OSError as exc:  # pragma: no cover - flock on a regular file
            raise LocalStorageError(f"cannot lock an ingest file: {exc.strerror}") from None


@contextlib.contextmanager
def _ingest_file(path: Path) -> Iterator[BinaryIO]:
    """The ingest file, unbuffered: every write reaches the file (or fails) at once, so
    nothing is left to fail when it is closed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LocalStorageError(f"cannot write to kit storage at {path.parent.parent}: "
                                f"{exc.strerror or exc}") from None
    with os.fdopen(fd, "r+b", buffering=0) as f:
        yield f


def _hash_prefix(
    f: BinaryIO, digest: str, size: int | None
) -> tuple[int, hashlib._Hash] | None:
    """(bytes an earlier pull left in the ingest file, their hash), or None for none."""
    have = os.fstat(f.fileno()).st_size
    if have == 0:
        return None
    if size is not None and have > size:
        f.truncate(0)
        return None
    h = hashlib.new(digest.split(":", 1)[0])
    f.seek(0)
    done = 0
    while done < have:
        piece = f.read(min(HASH_PIECE, have - done))
        if not piece:
            break
        h.update(piece)
        done += len(piece)
    return done, h


async def _download(
    client: RegistryClient,
    repo: str,
    digest: str,
    size: int | None,
    f: BinaryIO,
    prefix: tuple[int, hashlib._Hash] | None,
    progress: Progress,
) -> int:
    """Stream the blob (from `prefix`'s end) into `f`; raises unless it matched its digest."""
    start = prefix[0] if prefix is not None else 0
    if size is not None and start == size and prefix is not None:
        # Whole already: only its hash is left to check.
        if f"{prefix[1].name}:{prefix[1].hexdigest()}" != digest:
            raise IntegrityError(f"blob {digest} left by an earlier pull does not match it")
        return 0
    await trio.to_thread.run_sync(f.seek, start)
    pending: list[bytes] = []
    pending_bytes = 0
    written = 0

    async def flush() -> None:
        nonlocal pending_bytes
        data = b"".join(pending)
        pending.clear()
        pending_bytes = 0
        await trio.to_thread.run_sync(_write, f, data)

    async with client.stream_blob(repo, digest, size=size, prefix=prefix) as pieces:
        async for piece in pieces:
            pending.append(piece)
            pending_bytes += len(piece)
            written += len(piece)
            progress.update(len(piece))
            if pending_bytes >= WRITE_BATCH:
                await flush()
        # The stream ended cleanly: the bytes matched the digest (and size).
    await flush()
    return written


def _write(f: BinaryIO, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(f.fileno(), view):]
    except OSError as exc:
        raise LocalStorageError(f"cannot write to kit storage: {exc.strerror or exc}") from None


def _sync(f: BinaryIO, path: Path) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    except OSError as exc:
        raise LocalStorageError(f"cannot write {path}: {exc.strerror or exc}") from None
