"""The OCI distribution API as kitfs uses it: manifests, blobs, ranges, uploads, tags.

Every byte that leaves this module either was checked against its digest
(manifests, whole blobs, streams) or is a range the caller asked for and will
check itself (`read_range`). Given the size a descriptor vouches for, blob
reads also check the registry's idea of the blob's size against it, so a range
that a short (or padded) blob could still serve is not served from it.
Failures come out as kitfs errors with one-line messages that name the
registry, the repository and what was being done: every public method raises
KitfsError (or trio.Cancelled) and nothing else; httpx's and the OS's
exceptions are caught as `session.TRANSPORT_FAILURES` and mapped by
`describe_transport_error`, here and in the session, nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import trio

from kitfs.errors import (
    FormatError,
    IntegrityError,
    KitfsError,
    LocalStorageError,
    MirrorDataError,
    NotFoundError,
    RegistryError,
    UnreachableError,
    UsageError,
)
from kitfs.oci.auth import Credential, delete_scope, pull_scope, push_scope
from kitfs.oci.blobtransport import Sink
from kitfs.oci.credentials import lookup_credential
from kitfs.oci.digest import THREADED_HASH_MIN, DigestVerifier, digest_of, short, split_digest
from kitfs.oci.hosts import load_hosts
from kitfs.oci.mirrors import Host, Route
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import is_digest
from kitfs.oci.retry import RetryBudget
from kitfs.oci.session import (
    TRANSPORT_FAILURES,
    RegistrySession,
    describe_transport_error,
    resolve_url,
    retryable_transport_error,
)
from kitfs.oci.stats import RequestStats, outcome_of

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_MEDIA_TYPES",
    "MODELKIT_ARTIFACT_TYPES",
    "MODELKIT_CONFIG_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "ClientOptions",
    "RegistryClient",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MODELKIT_ARTIFACT_TYPES = (
    "application/vnd.kitops.modelkit.manifest.v1+json",
    "application/vnd.cncf.model.manifest.v1+json",
)
MODELKIT_CONFIG_TYPES = (
    "application/vnd.kitops.modelkit.config.v1+json",
    "application/vnd.cncf.model.config.v1+json",
)

MAX_MANIFEST_SIZE = 4 << 20
"""Registries cap manifests at 4 MiB; a bigger answer is not a manifest."""
MONOLITHIC_UPLOAD_LIMIT = 8 << 20
"""Blobs up to this size go up in one PUT; bigger ones in PATCH chunks."""
UPLOAD_CHUNK_SIZE = 64 << 20
"""One PATCH: big enough to amortise a request, small enough to resume cheaply."""
FILE_READ_SIZE = 1 << 20
LOCATION_TTL = 300.0
"""Seconds a blob's storage redirect is reused; presigned URLs live longer (S3: 20 min)
and a stale one is re-resolved on the first error anyway."""
_ACCEPT_MANIFESTS = ", ".join((*MANIFEST_MEDIA_TYPES, *INDEX_MEDIA_TYPES))
_IDENTITY = {"Accept-Encoding": "identity"}
_BLOB_ANSWERS = (200, 206, 416)
"""416 included: a range past the blob's end is told apart from other failures (see
_BlobBody), which needs its Content-Range; its body is not read (Distribution sends the
blob's Content-Length with a few bytes of text, then hangs up)."""


@dataclass
class _Location:
    url: str
    expires: float


class _Progress:
    """Reports bytes sent once each, even when a retry sends some of them again."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self._callback = callback
        self._high = 0

    def at(self, position: int) -> None:
        if self._callback is not None and position > self._high:
            self._callback(position - self._high)
            self._high = position


class RegistryClient:
    """A connection to one registry, shared by every concurrent fetch of a mount.

    Use as an async context manager (or call `aclose`). All methods are safe
    to call concurrently from many tasks.
    """

    def __init__(
        self,
        registry: str,
        options: ClientOptions = ClientOptions(),  # noqa: B008 - frozen, so sharing is safe
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        credential: Credential | None = None,
    ) -> None:
        self.registry = registry
        self.options = options

        async def credentials() -> Credential | None:
            if credential is not None:
                return credential
            return await lookup_credential(registry, options.kitops_home)

        # hosts.toml's mirrors (none with a transport given: that is a test's own wire).
        entries = (load_hosts(options.hosts_dir, registry)
                   if options.hosts_dir is not None and transport is None else None)
        self._route = Route(registry, options, entries, transport, credentials)
        self._session = self._route.origin.session
        """The registry itself (hosts.toml's `server`): pushes, deletes, referrers, login."""
        self._locations: dict[tuple[int, str], _Location] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._route.aclose()

    @property
    def stats(self) -> RequestStats:
        """Requests by outcome and bytes received so far (see oci/stats.py)."""
        return self._route.stats

    def _url(self, repo: str, tail: str, session: RegistrySession | None = None) -> str:
        return (session or self._session).url(f"/v2/{repo}/{tail}")

    def _name(self, repo: str, ref: str | None = None) -> str:
        text = f"{self.registry}/{repo}"
        if ref is not None:
            text += ("@" if is_digest(ref) else ":") + ref
        return text

    # -- registry --------------------------------------------------------------------

    async def ping(self) -> None:
        """Check the registry answers and accepts our credentials (what `login` needs)."""
        await self._session.send(
            "GET", self._session.url("/v2/"), what=f"contacting registry {self.registry}"
        )

    # -- manifests -------------------------------------------------------------------

    async def get_manifest(
        self, repo: str, ref: str, *, origin: bool = False
    ) -> tuple[bytes, str, str]:
        """(body, media type, digest); the digest is always computed from the body.

        Asked of the hosts allowed to `resolve` only (hosts.toml), tags and digests alike:
        a mirror trusted with blobs alone is never asked what a name means. `origin` asks
        the registry itself: a read before a write (a cache may be stale)."""
        if origin:
            return await self._get_manifest(self._session, repo, ref)
        return await self._route.first(
            "resolve", lambda host: self._get_manifest(host.session, repo, ref))

    async def _get_manifest(
        self, session: RegistrySession, repo: str, ref: str
    ) -> tuple[bytes, str, str]:
        what = f"fetching manifest {self._name(repo, ref)}"
        response = await session.send(
            "GET",
            self._url(repo, f"manifests/{ref}", session),
            what=what,
            scopes=(pull_scope(repo),),
            headers={"Accept": _ACCEPT_MANIFESTS},
            stream=True,
        )
        body = await self._read_limited(response, MAX_MANIFEST_SIZE, what)
        algorithm = split_digest(ref)[0] if is_digest(ref) else "sha256"
        digest = digest_of(body, algorithm)
        if is_digest(ref) and digest != ref:
            raise IntegrityError(
                f"{what}: content does not match the digest asked for (got {short(digest)})"
            )
        claimed = response.headers.get("docker-content-digest", "")
        if claimed.startswith(algorithm + ":") and claimed != digest:
            raise IntegrityError(
                f"{what}: registry says digest {short(claimed)} but the content is {short(digest)}"
            )
        return body, _manifest_media_type(response, body), digest

    async def resolve_modelkit(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """Like get_manifest, but an index is resolved to the ModelKit manifest it holds."""
        body, media_type, digest = await self.get_manifest(repo, ref)
        if media_type not in INDEX_MEDIA_TYPES:
            return body, media_type, digest
        what = f"resolving ModelKit in index {self._name(repo, ref)}"
        descriptors = _descriptors(body, what)
        for d in descriptors:
            if d.get("artifactType") in MODELKIT_ARTIFACT_TYPES:
                return await self._child(repo, d, what)
        seen: list[str] = []
        for d in descriptors:
            child_type = d.get("mediaType")
            if child_type is not None and child_type not in MANIFEST_MEDIA_TYPES:
                seen.append(str(child_type))
                continue
            child = await self._child(repo, d, what)
            parsed = _json_object(child[0], what)
            config = parsed.get("config")
            config_type = config.get("mediaType") if isinstance(config, dict) else None
            if (
                parsed.get("artifactType") in MODELKIT_ARTIFACT_TYPES
                or config_type in MODELKIT_CONFIG_TYPES
            ):
                return child
            seen.append(str(parsed.get("artifactType") or config_type or child[1]))
        kinds = ", ".join(sorted(set(seen))) or "none"
        raise NotFoundError(
            f"{what}: no ModelKit manifest among its {len(descriptors)} entries (found: {kinds})"
        )

    async def _child(self, repo: str, d: dict[str, Any], what: str) -> tuple[bytes, str, str]:
        digest = d.get("digest")
        if not isinstance(digest, str) or not is_digest(digest):
            raise RegistryError(f"{what}: index entry has no valid digest")
        body, media_type, got = await self.get_manifest(repo, digest)
        size = d.get("size")
        if isinstance(size, int) and size != len(body):
            raise IntegrityError(
                f"{what}: manifest {short(digest)} is {len(body)} bytes, the index says {size}"
            )
        return body, media_type, got

    async def put_manifest(
        self, repo: str, ref: str, body: bytes, media_type: str
    ) -> tuple[str, bool]:
        """(digest, whether the registry processed a `subject`, i.e. sent OCI-Subject)."""
        what = f"pushing manifest {self._name(repo, ref)}"
        algorithm = split_digest(ref)[0] if is_digest(ref) else "sha256"
        digest = digest_of(body, algorithm)
        if is_digest(ref) and ref != digest:
            raise IntegrityError(f"{what}: manifest content has digest {short(digest)}")
        response = await self._session.send(
            "PUT",
            self._url(repo, f"manifests/{ref}"),
            what=what,
            scopes=(push_scope(repo),),
            headers={"Content-Type": media_type},
            content=body,
            ok=(200, 201, 202, 204),
        )
        claimed = response.headers.get("docker-content-digest", "")
        if claimed.startswith(algorithm + ":") and claimed != digest:
            raise IntegrityError(
                f"{what}: registry stored it as {short(claimed)}, expected {short(digest)}"
            )
        return digest, "oci-subject" in response.headers

    async def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete a manifest by digest (the registry drops every tag naming it).

        A registry that does not allow deletion (405, Distribution's default, or
        UNSUPPORTED) is a RegistryError saying so.
        """
        split_digest(digest)
        what = f"deleting manifest {self._name(repo, digest)}"
        response = await self._session.send(
            "DELETE",
            self._url(repo, f"manifests/{digest}"),
            what=what,
            scopes=(delete_scope(repo),),
            ok=(200, 202, 204, 405),
        )
        if response.status_code == 405:
            raise RegistryError(f"{what}: removing models is unsupported by registry "
                                f"{self.registry} (HTTP 405)")

    # -- blobs -----------------------------------------------------------------------

    async def head_blob(self, repo: str, digest: str) -> int | None:
        """The blob's size, or None when the repository does not have it (a mirror that
        lacks it passes the question on to the next host)."""
        split_digest(digest)
        last = self._route.candidates("pull", digest)[-1]

        async def at(host: Host) -> int | None:
            found = await self._head_blob(host.session, repo, digest)
            if found is None and host is not last:
                raise NotFoundError(f"{host.name} lacks blob {short(digest)}")
            return found

        return await self._route.first("pull", at, digest)

    async def _head_blob(self, session: RegistrySession, repo: str, digest: str) -> int | None:
        response = await session.send(
            "HEAD",
            self._url(repo, f"blobs/{digest}", session),
            what=f"checking blob {short(digest)} in {self._name(repo)}",
            scopes=(pull_scope(repo),),
            ok=(200, 404),
        )
        if response.status_code == 404:
            return None
        length = response.headers.get("content-length")
        try:
            return _number(length) if length is not None else None
        except ValueError:
            raise RegistryError(
                f"checking blob {short(digest)} in {self._name(repo)}: bad Content-Length"
            ) from None

    async def get_blob(
        self, repo: str, digest: str, max_size: int = 64 << 20, *, size: int | None = None
    ) -> bytes:
        """The whole blob, verified; refuses blobs over `max_size` before reading them.

        `size`, the descriptor's, is checked like the digest (see stream_blob).
        """
        # Held whole, so a mirror's bad bytes are simply dropped: the mirrors that sent
        # them are skipped now, the next try goes further down. Each try distrusts at
        # least one host, so there are never more tries than hosts.
        tries = len(self._route.hosts)
        for attempt in range(tries):
            parts: list[bytes] = []
            try:
                async with self._stream(repo, digest, max_size=max_size, size=size) as chunks:
                    async for chunk in chunks:
                        parts.append(chunk)
                return b"".join(parts)
            except MirrorDataError as exc:
                if attempt + 1 == tries:
                    raise IntegrityError(str(exc)) from exc
        raise AssertionError("unreachable: the last try returns or raises")

    def stream_blob(
        self,
        repo: str,
        digest: str,
        *,
        size: int | None = None,
        prefix: tuple[int, hashlib._Hash] | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """The blob as a stream of chunks, never held whole in memory.

        The iterator raises IntegrityError at its end if the length or digest
        is wrong, so data is trustworthy only once iteration finished cleanly.
        The length expected is `size` (the descriptor's) where given, else what
        the registry announced: a registry announcing another size fails at
        once, and one sending more bytes than `size` fails when they come.
        A connection that drops midway is resumed with a range request.

        `prefix` (n, hash of the blob's first n bytes, which the caller has)
        streams the blob from byte n on, and the digest checked at the end is
        that of the prefix and the stream together.
        """
        return self._stream(repo, digest, max_size=None, size=size, prefix=prefix)

    @asynccontextmanager
    async def _stream(
        self,
        repo: str,
        digest: str,
        *,
        max_size: int | None,
        size: int | None,
        prefix: tuple[int, hashlib._Hash] | None = None,
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        split_digest(digest)
        what = f"fetching blob {short(digest)} from {self._name(repo)}"
        start = prefix[0] if prefix is not None else 0
        body = _BlobBody(self, repo, digest, start, None, what, size=size)

        def blame(exc: IntegrityError) -> IntegrityError:
            """The blob's own check failed: a mirror's lie if one sent any of it."""
            if self._route.distrust(body.served, digest):
                return MirrorDataError(
                    f"{exc} (served by a mirror, which is now skipped for this blob; "
                    "reading it again takes it from the next host)")
            return exc

        try:
            try:
                await body.open()
            except IntegrityError as exc:
                blamed = blame(exc)
                if blamed is exc:
                    raise
                raise blamed from exc
            expected = size if size is not None else body.total
            if max_size is not None and expected is not None and expected > max_size:
                raise RegistryError(
                    f"{what}: blob is {expected} bytes, more than the {max_size} expected here"
                )
            verifier = DigestVerifier(
                digest, expected, what,
                threaded=expected is None or expected - start >= THREADED_HASH_MIN,
                prefix=prefix,
            )
            try:
                async with aclosing(_verified(body, verifier, max_size, what, blame)) as chunks:
                    yield chunks
            finally:
                verifier.abort()
        finally:
            await body.aclose()

    async def read_range(
        self, repo: str, digest: str, offset: int, length: int, *, size: int | None = None
    ) -> bytes:
        """Exactly `length` bytes at `offset`, or an error; never short data.

        Works whether the registry answers 206 or ignores Range and sends the
        whole blob (then the bytes before `offset` are skipped as they stream).
        `size` is the blob's size as its descriptor says (see read_range_into).
        """
        if length < 0:
            raise UsageError(f"invalid blob range offset={offset} length={length}")
        buf = bytearray(length)
        await self.read_range_into(repo, digest, offset, [memoryview(buf)], size=size)
        return bytes(buf)

    async def read_range_into(
        self,
        repo: str,
        digest: str,
        offset: int,
        buffers: Sequence[memoryview],
        filled: Callable[[int], None] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        """Fill `buffers` in order with the blob's bytes from `offset`; never short data.

        The body is received straight into the buffers (see blobtransport.Sink),
        so a range costs one copy, kernel to buffer. `filled(i)` is called as
        soon as buffer i is complete, so its consumer can start on it while the
        rest of the range arrives. On an error, buffers not reported filled
        hold unspecified bytes.

        `size`, the blob's size as its descriptor says, is checked against the
        size the registry reports (Content-Range's total, or a whole body's
        length): a blob shorter or longer than its descriptor is an
        IntegrityError even where the range itself could be served. A range
        past the blob's end is a RegistryError saying so.
        """
        length = sum(len(b) for b in buffers)
        if offset < 0:
            raise UsageError(f"invalid blob range offset={offset}")
        if length == 0:
            return
        sink = Sink(buffers, filled)
        split_digest(digest)
        what = (
            f"reading bytes {offset}-{offset + length - 1} of blob {short(digest)} "
            f"from {self._name(repo)}"
        )
        body = _BlobBody(self, repo, digest, offset, offset + length, what, sink, size=size)
        try:
            await body.open()
            async for chunk in body:
                sink.place(chunk)
            complete = sink.full
        finally:
            await body.aclose()
            sink.release()
        if not complete:  # pragma: no cover - _BlobBody raises first
            raise RegistryError(f"{what}: the body ended early")

    async def _open_blob(
        self, repo: str, digest: str, headers: dict[str, str], what: str,
        sink: Sink | None = None, served: set[int] | None = None,
    ) -> tuple[httpx.Response, Host, float]:
        """GET a blob (or a range of it) from the first host that serves it as asked.

        A mirror that fails, or answers a range with the whole blob, is passed over (that
        answer closed unread: see oci/mirrors.py); the last host's answer is taken as it
        comes. `served` collects the hosts whose answer was taken; the host that answered
        comes with the answer, and with when its attempt must be over (a mirror's share of
        the caller's deadline, see Route.attempt_deadline; inf for the last host).
        """
        ranged = "Range" in headers
        hosts = self._route.candidates("pull", digest, ranged=ranged)
        for host in hosts[:-1]:
            deadline = self._route.attempt_deadline()
            try:
                with trio.move_on_at(deadline) as scope:
                    response = await self._open_blob_at(host, repo, digest, headers, what,
                                                        sink)
                if scope.cancelled_caught:
                    raise UnreachableError(f"{what}: {host.name} did not answer in time")
            except KitfsError as exc:
                self._route.failed(host, exc)
                continue
            whole = ranged and (response.status_code != 206
                                or not response.headers.get("content-range"))
            if whole or response.status_code not in (200, 206):
                await response.aclose()  # unread: closes the connection
                if whole and response.status_code == 200:
                    self._route.whole_for_range(host, digest)
                else:
                    self._route.failed(host, RegistryError(
                        f"{what}: {host.name} answered HTTP {response.status_code}"))
                continue
            if served is not None:
                served.add(host.index)
            self._route.served(host, digest)
            return response, host, deadline
        if served is not None:
            served.add(hosts[-1].index)
        response = await self._open_blob_at(hosts[-1], repo, digest, headers, what, sink)
        return response, hosts[-1], math.inf

    def refuse_mirror_bytes(self, digest: str) -> bool:
        """Bytes of `digest` that the caller checked itself (a range, against a chunk's
        digest) did not match: the mirrors that sent bytes of it lately are skipped for
        it from now on. True if there were any, so reading again takes the next host."""
        return self._route.refuse(digest)

    async def _open_blob_at(
        self, host: Host, repo: str, digest: str, headers: dict[str, str], what: str,
        sink: Sink | None,
    ) -> httpx.Response:
        """GET a blob from one host, reusing its storage redirect while it is fresh."""
        session = host.session
        headers = {**_IDENTITY, **headers}
        key = (host.index, digest)
        cached = self._locations.get(key)
        if cached is not None and trio.current_time() < cached.expires:
            try:
                return await session.send(
                    "GET",
                    cached.url,
                    what=what,
                    headers=headers,
                    ok=_BLOB_ANSWERS,
                    stream=True,
                    retry=False,
                    authenticate=False,
                    blob=sink or True,
                )
            except RegistryError:
                # Expired or revoked presigned URL: ask the registry again.
                self._locations.pop(key, None)
        response = await session.send(
            "GET",
            self._url(repo, f"blobs/{digest}", session),
            what=what,
            scopes=(pull_scope(repo),),
            headers=headers,
            ok=_BLOB_ANSWERS,
            stream=True,
            blob=sink or True,
        )
        final = response.request.url
        if (final.scheme, final.host, final.port) != _origin(session.base):
            self._locations[key] = _Location(str(final), trio.current_time() + LOCATION_TTL)
        return response

    async def _read_limited(self, response: httpx.Response, limit: int, what: str) -> bytes:
        try:
            length = _int_header(response, "content-length")
            if length is not None and length > limit:
                raise RegistryError(f"{what}: answer is {length} bytes, over the {limit} limit")
            parts: list[bytes] = []
            total = 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                self.stats.received(len(chunk))
                if total > limit:
                    raise RegistryError(f"{what}: answer is over the {limit} byte limit")
                parts.append(chunk)
            body = b"".join(parts)
            if length is not None and length != len(body):
                raise IntegrityError(f"{what}: truncated, got {len(body)} of {length} bytes")
            return body
        except TRANSPORT_FAILURES as exc:
            raise self._failed(_transport(exc, response, self.options, what), exc) from exc
        finally:
            await response.aclose()

    def _failed(self, error: KitfsError, cause: Exception | None) -> KitfsError:
        """Count a body that failed after its request was answered (and counted ok)."""
        self._session.stats.failed(outcome_of(cause or error, None), str(error))
        return error

    # -- uploads ---------------------------------------------------------------------

    async def push_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        path: str,
        *,
        progress: Callable[[int], None] | None = None,
        mount_from: str | None = None,
    ) -> bool:
        """Upload a file as a blob; False when the registry already had it (or mounted it).

        The file streams from disk (memory stays flat for any size); small blobs
        go in one PUT, big ones in PATCH chunks that resume after a dropped
        connection. The registry checks the digest when the upload completes.
        """
        split_digest(digest)
        what = f"pushing blob {short(digest)} to {self._name(repo)}"
        try:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        except OSError as exc:
            raise LocalStorageError(f"{what}: cannot open {path}: {exc.strerror}") from exc
        try:
            try:
                actual = os.fstat(fd).st_size
            except OSError as exc:
                raise LocalStorageError(f"{what}: cannot stat {path}: {exc.strerror}") from exc
            if actual != size:
                raise LocalStorageError(f"{what}: {path} is {actual} bytes, expected {size}")
            if await self._head_blob(self._session, repo, digest) is not None:
                return False
            location = await self._start_upload(repo, digest, what, mount_from)
            if location is None:
                return False
            tracker = _Progress(progress)
            if size <= MONOLITHIC_UPLOAD_LIMIT:
                await self._finish_upload(
                    repo, digest, location, what, _file_body(fd, 0, size, tracker), size
                )
            else:
                location = await self._upload_chunks(repo, fd, size, location, tracker, what)
                await self._finish_upload(repo, digest, location, what, None, 0)
            return True
        finally:
            os.close(fd)

    async def push_blob_bytes(self, repo: str, digest: str, data: bytes) -> bool:
        """Upload bytes held in memory (configs, small manifests' blobs)."""
        algorithm, _ = split_digest(digest)
        what = f"pushing blob {short(digest)} to {self._name(repo)}"
        if digest_of(data, algorithm) != digest:
            raise IntegrityError(f"{what}: the data does not match its digest")
        if await self._head_blob(self._session, repo, digest) is not None:
            return False
        location = await self._start_upload(repo, digest, what, None)
        if location is None:
            return False
        await self._finish_upload(repo, digest, location, what, data, len(data))
        return True

    async def _start_upload(
        self, repo: str, digest: str, what: str, mount_from: str | None
    ) -> str | None:
        """The upload session URL, or None when a cross-repository mount did the job."""
        url = self._url(repo, "blobs/uploads/")
        scopes: tuple[str, ...] = (push_scope(repo),)
        if mount_from and mount_from != repo:
            url += f"?mount={quote(digest)}&from={quote(mount_from, safe='/')}"
            scopes += (pull_scope(mount_from),)
        response = await self._session.send(
            "POST",
            url,
            what=what,
            scopes=scopes,
            ok=(201, 202),
            headers={"Content-Length": "0"},
        )
        if response.status_code == 201 and mount_from:
            return None
        return self._location(response, url, what)

    def _location(self, response: httpx.Response, base: str, what: str) -> str:
        location = str(response.headers.get("location") or "")
        if not location:
            raise RegistryError(f"{what}: registry sent no upload Location")
        return resolve_url(str(response.request.url) or base, location, what)

    async def _upload_chunks(
        self, repo: str, fd: int, size: int, location: str, tracker: _Progress, what: str
    ) -> str:
        budget = self._session.budget()
        pos = 0
        while pos < size:
            n = min(UPLOAD_CHUNK_SIZE, size - pos)
            try:
                response = await self._session.send(
                    "PATCH",
                    location,
                    what=what,
                    scopes=(push_scope(repo),),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{pos}-{pos + n - 1}",
                        "Content-Length": str(n),
                    },
                    content=_file_body(fd, pos, n, tracker),
                    ok=(202, 204),
                    retry=False,
                )
            except RegistryError as exc:
                # The chunk may have landed partly: ask where the upload stands and go on.
                if not await budget.wait():
                    raise
                pos, location = await self._upload_status(repo, location, what, exc)
                continue
            location = self._location(response, location, what)
            pos += n
        return location

    async def _upload_status(
        self, repo: str, location: str, what: str, cause: KitfsError
    ) -> tuple[int, str]:
        try:
            response = await self._session.send(
                "GET", location, what=what, scopes=(push_scope(repo),), ok=(204,)
            )
        except KitfsError:
            raise cause from None
        got = str(response.headers.get("range", "")).removeprefix("bytes=")
        try:
            last = int(got.rsplit("-", 1)[1]) if got else 0
        except (IndexError, ValueError):
            raise cause from None
        # Distribution says "0-0" for an empty upload as well as a 1-byte one;
        # chunks are far bigger than a byte, so "0-0" means nothing landed.
        end = last + 1 if last > 0 else 0
        return end, self._location(response, location, what)

    async def _finish_upload(
        self,
        repo: str,
        digest: str,
        location: str,
        what: str,
        content: bytes | Callable[[], AsyncIterator[bytes]] | None,
        size: int,
    ) -> None:
        url = location + ("&" if "?" in location else "?") + "digest=" + quote(digest)
        try:
            response = await self._session.send(
                "PUT",
                url,
                what=what,
                scopes=(push_scope(repo),),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                content=content if size else b"",
                ok=(201, 204),
            )
        except RegistryError as exc:
            if "DIGEST_INVALID" in str(exc) or "SIZE_INVALID" in str(exc):
                raise IntegrityError(
                    f"{what}: the registry rejected the upload: content does not match the digest"
                ) from exc
            raise
        claimed = response.headers.get("docker-content-digest", "")
        if claimed and claimed != digest:
            raise IntegrityError(f"{what}: registry stored it as {short(claimed)}")

    # -- listing ---------------------------------------------------------------------

    async def list_tags(self, repo: str) -> list[str]:
        """Every tag of the repository, following Link pagination."""
        return await self._route.first(
            "resolve", lambda host: self._list_tags(host.session, repo))

    async def _list_tags(self, session: RegistrySession, repo: str) -> list[str]:
        what = f"listing tags of {self._name(repo)}"
        url: str | None = self._url(repo, "tags/list?n=1000", session)
        tags: list[str] = []
        seen: set[str] = set()
        while url is not None and url not in seen:
            seen.add(url)
            response = await session.send("GET", url, what=what, scopes=(pull_scope(repo),))
            body = _json_object(response.content, what)
            page = body.get("tags") or []
            if not isinstance(page, list):
                raise RegistryError(f"{what}: malformed tag list")
            tags.extend(str(t) for t in page)
            url = _next_link(response.headers.get("link"), url, what)
        return tags

    async def referrers(
        self, repo: str, digest: str, artifact_type: str | None = None
    ) -> list[dict[str, Any]]:
        """Descriptors of manifests whose subject is `digest` (signatures, attestations).

        Uses the referrers API, falling back to the `sha256-<hex>` tag schema on
        registries that lack it; [] when neither has anything.
        """
        algorithm, hexpart = split_digest(digest)
        what = f"listing referrers of {short(digest)} in {self._name(repo)}"
        url = self._url(repo, f"referrers/{digest}")
        if artifact_type:
            url += f"?artifactType={quote(artifact_type, safe='')}"
        response = await self._session.send(
            "GET",
            url,
            what=what,
            scopes=(pull_scope(repo),),
            headers={"Accept": OCI_INDEX},
            ok=(200, 400, 404, 405, 501),
        )
        if response.status_code == 200:
            manifests = _descriptors(response.content, what)
        else:
            try:
                body, media_type, _ = await self.get_manifest(
                    repo, f"{algorithm}-{hexpart}", origin=True)
            except NotFoundError:
                return []
            if media_type not in INDEX_MEDIA_TYPES:
                return []
            manifests = _descriptors(body, what)
        if artifact_type:
            manifests = [m for m in manifests if m.get("artifactType") == artifact_type]
        return manifests


    async def attach_referrer(
        self, repo: str, subject_digest: str, referrer: bytes, artifact_type: str
    ) -> str:
        """Push `referrer` (an OCI manifest whose subject is `subject_digest`; its blobs
        are already there) and make `referrers` find it: registries with the referrers
        API index it themselves, for the others the `sha256-<hex>` tag index gets an
        entry (OCI 1.1 fallback; an entry already there is not added twice).
        Returns the referrer's digest."""
        digest, has_referrers_api = await self.put_manifest(
            repo, digest_of(referrer, "sha256"), referrer, OCI_MANIFEST)
        if has_referrers_api:
            return digest
        algorithm, hexpart = split_digest(subject_digest)
        fallback_tag = f"{algorithm}-{hexpart}"
        try:
            body, media_type, _ = await self.get_manifest(repo, fallback_tag, origin=True)
            index = json.loads(body) if media_type == OCI_INDEX else None
        except NotFoundError:
            index = None
        except ValueError:
            raise FormatError(f"referrers tag {fallback_tag} in {repo} is not JSON") from None
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        if any(m.get("digest") == digest for m in index["manifests"] if isinstance(m, dict)):
            return digest
        index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": digest,
                                   "size": len(referrer), "artifactType": artifact_type})
        body = json.dumps(index, separators=(",", ":")).encode()
        await self.put_manifest(repo, fallback_tag, body, OCI_INDEX)
        return digest


class _BlobBody:
    """Bytes [start, end) of a blob as a stream that survives dropped connections.

    A response that ignored Range (200 with the whole blob) is skipped forward
    as it streams; a body that ends early or a connection that drops is
    re-requested from where it stopped, within the retry budget; a blob that
    ends before `end` is an error, so callers never get short data. With
    `size` (the descriptor's), a registry reporting another size for the
    blob is an IntegrityError before any byte is handed out.
    """

    def __init__(
        self,
        client: RegistryClient,
        repo: str,
        digest: str,
        start: int,
        end: int | None,
        what: str,
        sink: Sink | None = None,
        *,
        size: int | None = None,
    ) -> None:
        self._client = client
        self._sink = sink
        self._size = size
        self._repo = repo
        self._digest = digest
        self._pos = start
        self._end = end
        self._what = what
        self._response: httpx.Response | None = None
        self._skip = 0
        self._expected_end: int | None = None
        self._budget: RetryBudget | None = None
        self.total: int | None = None
        """The blob's size, when the registry told it."""
        self.served: set[int] = set()
        """The hosts (mirrors.Route indices) whose answers the body was taken from."""
        self._host: Host | None = None
        self._deadline = math.inf
        """When the current answer's host must have sent it all (a mirror's share)."""

    async def open(self) -> None:
        await self._request()

    async def aclose(self) -> None:
        if self._response is not None:
            response, self._response = self._response, None
            await response.aclose()

    async def _request(self) -> None:
        headers: dict[str, str] = {}
        if self._pos > 0 or self._end is not None:
            last = "" if self._end is None else str(self._end - 1)
            headers["Range"] = f"bytes={self._pos}-{last}"
        if self._sink is not None:
            self._sink.enabled = False  # an error body must not land in the caller's buffers
        route = self._client._route
        while True:
            response, host, self._deadline = await self._client._open_blob(
                self._repo, self._digest, headers, self._what, self._sink, self.served
            )
            self._response, self._host = response, host
            try:
                self._take_answer(response)
                return
            except KitfsError as exc:
                await self.aclose()
                if not host.mirror or host is route.candidates("pull", self._digest)[-1]:
                    raise
                # A mirror's malformed answer (wrong range, wrong size) is the mirror's
                # fault, not the blob's: skip it for this blob, ask the next host.
                self.served.discard(host.index)
                route.bad_answer(host, self._digest, exc)

    def _take_answer(self, response: httpx.Response) -> None:
        """Where this answer's body starts and ends, and what it says of the blob's size."""
        what = self._what
        length = _int_header(response, "content-length")
        if response.status_code == 416:
            # Only the range's own start can be unsatisfiable: nothing of the blob is there.
            total = _content_range_total(response.headers.get("content-range"))
            self._check_size(total)
            where = f" ({total} bytes)" if total is not None else ""
            raise RegistryError(
                f"{what}: past the end of the blob{where}: the registry answered HTTP 416"
            )
        # Nothing is kept from an answer until it passed every check: a mirror's claims
        # must not outlive its refusal (the next host's answer is judged afresh).
        expected_end: int | None
        claimed: int | None
        if response.status_code == 206:
            start, stop, claimed = _content_range(response.headers.get("content-range"), what)
            if start != self._pos:
                raise RegistryError(f"{what}: registry sent a range starting at {start}")
            skip, expected_end = 0, stop
        else:
            skip, expected_end, claimed = self._pos, length, length
        total = claimed if claimed is not None else self.total
        self._check_size(total)
        if total is not None and self._end is not None and self._end > total:
            raise RegistryError(f"{what}: past the end of the blob ({total} bytes)")
        self._skip, self._expected_end, self.total = skip, expected_end, total
        if self._sink is not None:
            # The body starts exactly where the sink's cursor is: receive in place.
            self._sink.enabled = self._skip == 0

    def _check_size(self, total: int | None) -> None:
        if self._size is not None and total is not None and total != self._size:
            raise IntegrityError(
                f"{self._what}: the registry has {total} bytes of the blob, "
                f"its descriptor says {self._size}"
            )

    def _retry_budget(self) -> RetryBudget:
        if self._budget is None:
            self._budget = self._client._session.budget()
        return self._budget

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        while True:
            response = self._response
            if response is None:
                await self._request()
                continue
            received = 0
            failure: Exception | None = None
            late = False
            try:
                async with aclosing(_raw(response)) as raws:
                    while True:
                        if self._deadline == math.inf:
                            raw = await anext(raws, None)
                        else:
                            # A mirror's share of the read's deadline: trickling or
                            # stalled, it gives way to the next host in time.
                            with trio.move_on_at(self._deadline) as scope:
                                raw = await anext(raws, None)
                            late = scope.cancelled_caught
                        if raw is None or late:
                            break
                        chunk = raw
                        received += len(chunk)
                        self._client.stats.received(len(chunk))
                        if self._skip:
                            if len(chunk) <= self._skip:
                                self._skip -= len(chunk)
                                continue
                            chunk = chunk[self._skip :]
                            self._skip = 0
                        if self._end is not None and self._pos + len(chunk) > self._end:
                            chunk = chunk[: self._end - self._pos]
                        if chunk:
                            self._pos += len(chunk)
                            yield chunk
                        if self._end is not None and self._pos >= self._end:
                            await self.aclose()
                            return
            except TRANSPORT_FAILURES as exc:
                failure = exc
            await self.aclose()
            body_end = self._expected_end
            if failure is None and not late:
                if self._end is None and (body_end is None or self._pos >= body_end):
                    return  # the whole blob arrived (the digest check judges it)
                if self._end is not None and body_end is not None and body_end <= self._pos:
                    raise RegistryError(f"{self._what}: past the end of the blob")
            # Dropped connection, a body shorter than announced or a mirror past its
            # share: resume from here (a mirror that did this is left alone for a while:
            # the next host resumes).
            host, route = self._host, self._client._route
            if host is not None and host is not route.candidates("pull", self._digest)[-1]:
                self._client._route.failed(host, UnreachableError(
                    f"{self._what}: {host.name} "
                    + ("too slow for its share of the deadline" if late else "stopped sending")))
                await self._request()
                continue
            if failure is not None and not retryable_transport_error(failure):
                raise self._client._failed(
                    _transport(failure, response, self._client.options, self._what), failure)
            if not await self._retry_budget().wait():
                if failure is not None:
                    raise self._client._failed(
                        _transport(failure, response, self._client.options, self._what),
                        failure)
                # A connection that kept dropping is the network, not a lie: the
                # digest check judges the bytes, and a later try may get them all.
                raise self._client._failed(UnreachableError(
                    f"{self._what}: truncated, the registry sent {received} bytes and stopped"
                ), None)
            await self._request()


async def _verified(
    body: _BlobBody, verifier: DigestVerifier, max_size: int | None, what: str,
    blame: Callable[[IntegrityError], IntegrityError],
) -> AsyncGenerator[bytes, None]:
    """The body's chunks, checked; a failed check (size or digest) is `blame(error)`."""
    try:
        async for chunk in body:
            if max_size is not None and verifier.received + len(chunk) > max_size:
                raise RegistryError(
                    f"{what}: blob is more than the {max_size} bytes expected here")
            await verifier.update(chunk)
            yield chunk
        await verifier.verify()
    except IntegrityError as exc:
        blamed = blame(exc)
        if blamed is exc:
            raise
        raise blamed from exc


def _file_body(
    fd: int, start: int, length: int, tracker: _Progress
) -> Callable[[], AsyncIterator[bytes]]:
    """A fresh stream of file bytes [start, start+length) for each attempt."""

    async def chunks() -> AsyncIterator[bytes]:
        pos = start
        end = start + length
        while pos < end:
            n = min(FILE_READ_SIZE, end - pos)
            try:
                data = await trio.to_thread.run_sync(os.pread, fd, n, pos)
            except OSError as exc:
                raise LocalStorageError(f"cannot read blob file: {exc.strerror}") from exc
            if not data:
                raise LocalStorageError("blob file shrank while it was being pushed")
            pos += len(data)
            yield data
            tracker.at(pos)

    return chunks


def _transport(
    exc: Exception, response: httpx.Response, options: ClientOptions, what: str
) -> KitfsError:
    url = response.request.url
    err = describe_transport_error(exc, url.netloc.decode(), options, url)
    return type(err)(f"{what}: {err}")


async def _raw(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """Response bytes (blobs are requested with identity encoding, so as sent)."""
    async for chunk in response.aiter_bytes():
        yield chunk


def _origin(url: str) -> tuple[str, str, int | None]:
    u = httpx.URL(url)
    return u.scheme, u.host, u.port


def _number(text: str) -> int:
    """A non-negative decimal as HTTP writes it (ASCII digits only: int() takes others)."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


def _int_header(response: httpx.Response, name: str) -> int | None:
    try:
        return _number(response.headers.get(name) or "")
    except ValueError:
        return None


def _content_range(value: str | None, what: str) -> tuple[int, int, int | None]:
    """(start, end exclusive, total or None) of `bytes start-end/total`."""
    if not value:
        raise RegistryError(f"{what}: registry sent 206 without Content-Range")
    try:
        unit, _, spec = value.strip().partition(" ")
        span, _, total = spec.partition("/")
        first, _, last = span.partition("-")
        if unit != "bytes":
            raise ValueError(unit)
        start, end = _number(first), _number(last) + 1
        if end <= start:
            raise ValueError(span)
        return start, end, None if total in ("", "*") else _number(total)
    except ValueError:
        raise RegistryError(
            f"{what}: registry sent a malformed Content-Range {value[:100]!r}"
        ) from None


def _content_range_total(value: str | None) -> int | None:
    """N of a 416's `bytes */N`, if the registry sent it."""
    unit, _, spec = (value or "").strip().partition(" ")
    try:
        return _number(spec.removeprefix("*/")) if unit == "bytes" else None
    except ValueError:
        return None


def _manifest_media_type(response: httpx.Response, body: bytes) -> str:
    header = str(response.headers.get("content-type", "")).split(";")[0].strip()
    if header in MANIFEST_MEDIA_TYPES or header in INDEX_MEDIA_TYPES:
        return header
    try:
        parsed = json.loads(body)
    except ValueError:
        return header
    if isinstance(parsed, dict):
        declared = parsed.get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
        # Old kit writes no mediaType; an index is recognisable by its manifests list.
        return OCI_INDEX if "manifests" in parsed else OCI_MANIFEST
    return header


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise RegistryError(f"{what}: registry sent malformed JSON") from exc
    if not isinstance(parsed, dict):
        raise RegistryError(f"{what}: registry sent JSON that is not an object")
    return parsed


def _descriptors(body: bytes, what: str) -> list[dict[str, Any]]:
    manifests = _json_object(body, what).get("manifests") or []
    if not isinstance(manifests, list):
        raise RegistryError(f"{what}: malformed index")
    return [m for m in manifests if isinstance(m, dict)]


def _next_link(header: str | None, current: str, what: str) -> str | None:
    """The rel="next" target of a Link header, resolved against the current URL."""
    if not header:
        return None
    for part in header.split(","):
        target, _, params = part.partition(";")
        target = target.strip()
        if target.startswith("<") and target.endswith(">") and "next" in params:
            return resolve_url(current, target[1:-1], what)
    return None
