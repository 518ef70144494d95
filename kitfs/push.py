"""Pushing a ModelKit to a registry: `kitfs push` from kit's local storage, and what
`kitfs pack` shares with it.

The order is what `kit push` (oras.Copy, pkg/cmd/push/push.go) and every OCI
client keep: blobs first, each skipped when the registry already has it
(HEAD) or can mount it from another repository of the same registry; the
manifest last, so a registry never holds a manifest whose blobs it lacks.
The manifest is pushed as the bytes stored locally, so its digest is the
local one. A kitfs table of contents (pinned in the manifest annotation
`dev.kitfs.toc.digest`) goes with it when local storage has it, and is
attached as an OCI referrer; `kit` ignores both.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from kitfs import __version__
from kitfs.errors import IntegrityError, NotFoundError, UsageError
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.manifest import manifest_blobs, sha256_digest
from kitfs.modelkit.toc import TOC_ANNOTATION, TOC_ARTIFACT_TYPE, TOC_MEDIA_TYPE
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.credentials import kitops_home
from kitfs.oci.layout import LocalStorage, display_name
from kitfs.oci.reference import Reference, is_digest
from kitfs.progress import Progress

log = logging.getLogger(__name__)

EMPTY_JSON = b"{}"
ANNOTATION_KITFS_VERSION = "dev.kitfs.version"
#: Blobs uploaded at once (kit's --concurrency defaults to 5; a few streams fill a link).
PUSH_JOBS = 4


@dataclass(frozen=True)
class PushResult:
    source: Reference
    destination: Reference
    digest: str
    #: The tags (or the digest) the manifest was pushed under.
    targets: tuple[str, ...]
    blobs: int
    bytes_uploaded: int
    bytes_skipped: int


async def upload_file(
    client: RegistryClient,
    repo: str,
    digest: str,
    size: int,
    path: Path,
    progress: Progress,
    *,
    mount_from: str | None = None,
) -> int:
    """Push one blob from a file unless the registry has it; the bytes uploaded."""
    if await client.push_blob(repo, digest, size, str(path), progress=progress.update,
                              mount_from=mount_from):
        return size
    progress.update(size)
    return 0


async def publish_manifest(
    client: RegistryClient,
    repo: str,
    targets: tuple[str, ...],
    manifest: bytes,
    toc: tuple[bytes, str] | None,
) -> str:
    """Push the table of contents blob (if any), the manifest under every tag (or digest)
    in `targets`, then attach the table of contents as a referrer; the manifest digest."""
    if toc is not None:
        await client.push_blob_bytes(repo, toc[1], toc[0])
    digest = sha256_digest(manifest)
    for target in targets:
        pushed, _ = await client.put_manifest(repo, target, manifest, mt.OCI_MANIFEST)
        if pushed != digest:  # pragma: no cover - put_manifest checks the registry's answer
            raise IntegrityError(f"pushing manifest to {repo}: digest {pushed}, expected {digest}")
    if toc is not None:
        await attach_toc(client, repo, manifest, digest, *toc)
    return digest


def toc_referrer(manifest: bytes, manifest_digest: str, toc: bytes, toc_digest: str) -> bytes:
    """An OCI 1.1 artifact manifest whose subject is the ModelKit and whose layer is the TOC."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": TOC_ARTIFACT_TYPE,
        "config": {
            "mediaType": mt.OCI_EMPTY_JSON,
            "digest": sha256_digest(EMPTY_JSON),
            "size": len(EMPTY_JSON),
            "data": base64.b64encode(EMPTY_JSON).decode(),
        },
        "layers": [{"mediaType": TOC_MEDIA_TYPE, "digest": toc_digest, "size": len(toc)}],
        "subject": {"mediaType": mt.OCI_MANIFEST, "digest": manifest_digest,
                    "size": len(manifest)},
        "annotations": {ANNOTATION_KITFS_VERSION: __version__},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


async def attach_toc(
    client: RegistryClient, repo: str, manifest: bytes, digest: str, toc: bytes, toc_digest: str
) -> None:
    """Push the TOC referrer; fall back to the `sha256-<hex>` tag schema where needed."""
    await client.push_blob_bytes(repo, sha256_digest(EMPTY_JSON), EMPTY_JSON)
    referrer = toc_referrer(manifest, digest, toc, toc_digest)
    await client.attach_referrer(repo, digest, referrer, TOC_ARTIFACT_TYPE)


def push_targets(source: Reference, destination: Reference | None) -> tuple[Reference, Reference]:
    """kit's rules for `push SOURCE [DESTINATION]` (pkg/cmd/push/cmd.go): one tag in the
    source; the destination (the source itself when absent) names a registry."""
    if source.extra_tags:
        raise UsageError("reference cannot include multiple tags")
    dest = destination or source
    if dest.is_local:
        raise UsageError(f"registry is required when pushing: {display_name(str(dest))} names "
                         "kit's local storage (e.g. registry.example.com/repo:tag)")
    return source, dest


async def push(
    source: Reference, destination: Reference | None, options: ClientOptions, *,
    jobs: int = PUSH_JOBS,
) -> PushResult:
    """Push a ModelKit from kit's local storage, as `kit push` does."""
    source, dest = push_targets(source, destination)
    storage = LocalStorage.for_home(Path(kitops_home(options.kitops_home)))
    manifest, _, local_digest = await trio.to_thread.run_sync(
        storage.resolve, source.name, source.target)
    descs, annotations = manifest_blobs(manifest)
    blobs = {d.digest: d.size for d in descs}
    for digest, size in blobs.items():
        if not storage.has_blob(digest):
            raise NotFoundError(f"{display_name(str(source))}: blob {digest} ({size} bytes) is "
                                f"missing from kit's local storage {storage.root}")
    toc = await trio.to_thread.run_sync(_local_toc, storage, annotations)
    # Blobs of a ModelKit pulled from (or pushed to) another repository of the same
    # registry are mounted there, not uploaded again.
    mount_from = source.repository if source.registry == dest.registry else None
    targets = (dest.digest,) if dest.digest is not None else dest.tags
    if dest.digest is not None and dest.digest != local_digest:
        raise UsageError(f"{dest}: the ModelKit's manifest digest is {local_digest}")
    progress = Progress(f"pushing {dest}", sum(blobs.values()))
    uploaded = 0
    limiter = trio.CapacityLimiter(jobs)
    try:
        async with RegistryClient(dest.registry, options) as client:

            async def one(digest: str, size: int) -> None:
                nonlocal uploaded
                async with limiter:
                    sent = await upload_file(client, dest.repository, digest, size,
                                             storage.blob_path(digest), progress,
                                             mount_from=mount_from)
                uploaded += sent  # after the await: tasks run this concurrently

            async with trio.open_nursery() as nursery:
                for digest, size in blobs.items():
                    nursery.start_soon(one, digest, size)
            digest = await publish_manifest(client, dest.repository, targets, manifest, toc)
    finally:
        progress.close()
    total = sum(blobs.values())
    return PushResult(source, dest, digest, targets, len(blobs), uploaded, total - uploaded)


def _local_toc(storage: LocalStorage, annotations: dict[str, str]) -> tuple[bytes, str] | None:
    """The kitfs table of contents the manifest pins, when local storage holds it."""
    toc_digest = annotations.get(TOC_ANNOTATION)
    if toc_digest is None or not is_digest(toc_digest) or not storage.has_blob(toc_digest):
        return None
    return storage.read_blob(toc_digest), toc_digest
