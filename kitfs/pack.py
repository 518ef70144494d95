"""`kitfs pack`: a directory with a Kitfile becomes a ModelKit that `kit` reads.

Layers are written exactly as `kit pack` writes them (modelkit/layers.py,
modelkit/tarwriter.py), each to a file, while its table of contents is
recorded; a layer is pushed as soon as it is written, so packing and
uploading overlap. Memory stays flat: file data streams through in pieces.

Where a ModelKit goes:
- a reference with a registry: layers are staged in a temporary directory
  (`--work-dir`, default $TMPDIR) and deleted once pushed;
- a reference without one: straight into `kit`'s local storage, where
  `kit list` and `kit push` see it.

The table of contents of every layer is stored as one blob whose digest is
pinned in the manifest annotation `dev.kitfs.toc.digest`, and attached as
an OCI referrer of the manifest (with the tag-schema fallback
`sha256-<hex>` for registries without the referrers API) so that registry
garbage collection keeps it and other tools can discover it. `kit` ignores
both. Uploading blobs, the manifest and the referrer is push.py's, shared
with `kitfs push`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from kitfs import __version__
from kitfs.errors import KitfileError, LocalStorageError, UsageError
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.kitfile import (
    KITFILE_NAMES,
    Kitfile,
    LayerEntry,
    config_json,
    load_kitfile,
)
from kitfs.modelkit.kitignore import KitIgnore
from kitfs.modelkit.layers import PlannedEntry, plan_layer
from kitfs.modelkit.manifest import (
    LayerDescriptorInput,
    build_manifest,
    created_timestamp,
    sha256_digest,
)
from kitfs.modelkit.tarwriter import Compression, write_layer
from kitfs.modelkit.toc import (
    DEFAULT_CHUNK_SIZE,
    TOC_ANNOTATION,
    LayerToc,
    ModelKitToc,
    dump_toc,
)
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.credentials import kitops_home
from kitfs.oci.layout import LocalStorage
from kitfs.oci.reference import Reference
from kitfs.parents import inherited_paths
from kitfs.progress import Progress
from kitfs.push import ANNOTATION_KITFS_VERSION, publish_manifest, upload_file

log = logging.getLogger(__name__)

#: Two writers keep both cores busy hashing; more only thrash the disk.
WRITE_JOBS = 2


@dataclass(frozen=True)
class PackRequest:
    context: Path
    reference: Reference
    kitfile: Path | None = None
    compression: Compression = "none"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    work_dir: Path | None = None
    jobs: int = 4


@dataclass(frozen=True)
class PackResult:
    reference: Reference
    digest: str
    manifest: bytes
    layers: tuple[LayerToc, ...]
    toc_digest: str
    bytes_uploaded: int


def find_kitfile(context: Path, explicit: Path | None) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise KitfileError(f"Kitfile {explicit} does not exist")
        return explicit
    if not context.is_dir():
        raise UsageError(f"pack directory {context} does not exist or is not a directory")
    for name in KITFILE_NAMES:
        candidate = context / name
        if candidate.is_file():
            return candidate
    raise KitfileError(f"no Kitfile in {context} (looked for {', '.join(KITFILE_NAMES)})")


def read_kitfile(path: Path) -> Kitfile:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise KitfileError(f"cannot read {path}: {exc.strerror}") from None
    kitfile = load_kitfile(text, source=str(path))
    if kitfile.mcp_servers:
        raise KitfileError(f"{path}: mcpServers are not supported by kitfs pack yet")
    return kitfile


def plan(context: Path, kitfile: Kitfile, inherited: Sequence[str] = ()
         ) -> list[tuple[LayerEntry, list[PlannedEntry]]]:
    """Every layer's entries; raises before anything is written if a path is missing.

    `inherited`: the paths a parent ModelKit's chain names (parents.inherited_paths),
    kept out of every layer as another layer's paths are (kit pack's extraLayerPaths).
    """
    entries = kitfile.layer_entries()
    ignore = KitIgnore.from_context(context)
    paths = [e.path for e in entries] + list(inherited)
    return [(e, plan_layer(context, e.path, paths, ignore)) for e in entries]


def layer_annotations(entry: LayerEntry) -> dict[str, str] | None:
    if entry.kind == "prompt":
        return {mt.ANNOTATION_LAYER_SUBTYPE: mt.LAYER_SUBTYPE_PROMPT}
    return None


def _write_layer_file(
    entries: list[PlannedEntry],
    out: BinaryIO,
    path: Path,
    entry: LayerEntry,
    req: PackRequest,
    progress: Callable[[int], None],
) -> LayerToc:
    media_type = mt.layer_media_type(entry.kind, "tar", req.compression)
    try:
        with out:
            toc = write_layer(entries, out, compression=req.compression, media_type=media_type,
                              chunk_size=req.chunk_size, progress=progress)
            out.flush()
            os.fsync(out.fileno())
            return toc
    except OSError as exc:
        raise LocalStorageError(
            f"cannot write the {entry.kind} layer for {entry.path!r} to {path.parent}: "
            f"{exc.strerror or exc}"
        ) from None


@contextlib.contextmanager
def _staging_dir(work_dir: Path | None) -> Iterator[Path]:
    try:
        if work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="kitfs-pack-", dir=work_dir) as tmp:
            yield Path(tmp)
    except OSError as exc:
        raise LocalStorageError(f"cannot stage layers in {work_dir or tempfile.gettempdir()}: "
                                f"{exc.strerror or exc}") from None


async def pack(req: PackRequest, options: ClientOptions) -> PackResult:
    ref = req.reference
    if ref.digest is not None or not ref.tags:
        raise UsageError(f"pack needs a tag to write, not a digest: {ref}")
    kitfile_path = find_kitfile(req.context, req.kitfile)
    kitfile = read_kitfile(kitfile_path)
    inherited: list[str] = []
    if kitfile.model_reference is not None:
        # As kit pack: the parent chain must be readable (local storage, then its
        # registry); no layer of it is copied, the config keeps the reference, and what
        # the chain provides is not packed again (kitfs/parents.py).
        inherited = await inherited_paths(ref, kitfile, options)
    plans = await trio.to_thread.run_sync(plan, req.context, kitfile, inherited)
    file_bytes = sum(e.size for _, entries in plans for e in entries if e.kind == "file")
    progress = Progress(f"packing {ref}", file_bytes)
    try:
        if ref.is_local:
            return await _pack_local(req, kitfile, plans, options, progress)
        return await _pack_remote(req, kitfile, plans, options, progress)
    finally:
        progress.close()


def _finish_manifest(
    kitfile: Kitfile, entries: list[LayerEntry], tocs: list[LayerToc]
) -> tuple[bytes, bytes, bytes, str]:
    config = config_json(kitfile.with_layer_digests([(t.digest, t.diff_id) for t in tocs]))
    toc_blob = dump_toc(ModelKitToc(tuple(tocs)))
    toc_digest = sha256_digest(toc_blob)
    layers = [
        LayerDescriptorInput(t.media_type, t.digest, t.blob_size, layer_annotations(e))
        for e, t in zip(entries, tocs, strict=True)
    ]
    annotations = {TOC_ANNOTATION: toc_digest, ANNOTATION_KITFS_VERSION: __version__}
    # A creation time only when the builder pins one: otherwise the same directory
    # would give a new manifest digest on every pack.
    if os.environ.get("SOURCE_DATE_EPOCH"):
        annotations[mt.ANNOTATION_CREATED] = created_timestamp()
    manifest = build_manifest(config, layers, annotations)
    return config, manifest, toc_blob, toc_digest


async def _write_layers(
    req: PackRequest,
    plans: list[tuple[LayerEntry, list[PlannedEntry]]],
    progress: Progress,
    open_staging: Callable[[int], tuple[BinaryIO, Path]],
    publish: Callable[[LayerToc, Path], Awaitable[None]],
) -> list[LayerToc]:
    """Write every layer (two at a time) and publish each as soon as it is complete.

    Publishing (a rename into kit's storage, or a push) overlaps with writing
    the next layer; the staging file is removed whatever happens.
    """
    tocs: list[LayerToc | None] = [None] * len(plans)
    limiter = trio.CapacityLimiter(WRITE_JOBS)

    async def one(i: int) -> None:
        entry, entries = plans[i]
        out, path = open_staging(i)
        try:
            async with limiter:
                toc = await trio.to_thread.run_sync(
                    _write_layer_file, entries, out, path, entry, req, progress.update)
            await publish(toc, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        tocs[i] = toc

    async with trio.open_nursery() as nursery:
        for i in range(len(plans)):
            nursery.start_soon(one, i)
    return [t for t in tocs if t is not None]


async def _pack_local(
    req: PackRequest,
    kitfile: Kitfile,
    plans: list[tuple[LayerEntry, list[PlannedEntry]]],
    options: ClientOptions,
    progress: Progress,
) -> PackResult:
    storage = LocalStorage.for_home(Path(kitops_home(options.kitops_home)))

    async def adopt(toc: LayerToc, path: Path) -> None:
        storage.adopt_blob(path, toc.digest)

    tocs = await _write_layers(req, plans, progress, lambda _: storage.staging_file(), adopt)
    config, manifest, toc_blob, toc_digest = _finish_manifest(
        kitfile, [e for e, _ in plans], tocs)
    storage.put_blob_bytes(config)
    storage.put_blob_bytes(toc_blob)
    digest = storage.add_manifest(req.reference.name, manifest, req.reference.tags)
    return PackResult(req.reference, digest, manifest, tuple(tocs), toc_digest, 0)


async def _pack_remote(
    req: PackRequest,
    kitfile: Kitfile,
    plans: list[tuple[LayerEntry, list[PlannedEntry]]],
    options: ClientOptions,
    progress: Progress,
) -> PackResult:
    ref = req.reference
    repo = ref.repository
    push_limit = trio.CapacityLimiter(max(1, req.jobs))
    uploaded = 0

    async with RegistryClient(ref.registry, options) as client:
        # Fail on a bad reference, registry or password before packing gigabytes.
        await client.ping()

        async def push(toc: LayerToc, path: Path) -> None:
            nonlocal uploaded
            progress.add_total(toc.blob_size)
            async with push_limit:
                sent = await upload_file(client, repo, toc.digest, toc.blob_size, path, progress)
            uploaded += sent  # after the await: tasks run this concurrently

        with _staging_dir(req.work_dir) as staging:

            def open_staging(i: int) -> tuple[BinaryIO, Path]:
                path = staging / f"layer-{i}"
                try:
                    return path.open("w+b"), path
                except OSError as exc:
                    raise LocalStorageError(f"cannot stage a layer in {staging}: {exc}") from None

            tocs = await _write_layers(req, plans, progress, open_staging, push)

        config, manifest, toc_blob, toc_digest = _finish_manifest(
            kitfile, [e for e, _ in plans], tocs)
        await client.push_blob_bytes(repo, sha256_digest(config), config)
        digest = await publish_manifest(client, repo, ref.tags, manifest, (toc_blob, toc_digest))
    return PackResult(ref.with_digest(digest), digest, manifest, tuple(tocs), toc_digest, uploaded)
