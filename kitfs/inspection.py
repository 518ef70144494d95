"""What a ModelKit holds, read with as few bytes as possible: manifest, config, tables of contents.

`kitfs inspect` needs the manifest and config; `kitfs ls` (and the mount)
also need every layer's entries. Those come, cheapest first, from the
kitfs table of contents pinned in the manifest, from a raw layer's own
annotations, from walking an uncompressed tar's headers with range reads,
or, for gzip/zstd layers `kit` wrote, from streaming the layer once.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Protocol

import trio

from kitfs.errors import FormatError, IntegrityError, KitfsError
from kitfs.modelkit.decompress import StreamDecompressor
from kitfs.modelkit.filters import FilterSet
from kitfs.modelkit.kitfile import kitfile_to_yaml
from kitfs.modelkit.manifest import LayerInfo, ModelKitView, parse_modelkit, sha256_digest
from kitfs.modelkit.tarindex import TarWalker
from kitfs.modelkit.toc import (
    TOC_ANNOTATION,
    LayerToc,
    ModelKitToc,
    TocEntry,
    layer_from_json,
    layer_to_json,
    load_toc,
)
from kitfs.modelkit.tree import Placement, Tree, build_tree
from kitfs.oci.source import BlobSource

log = logging.getLogger(__name__)

MAX_CONFIG = 16 << 20
MAX_TOC = 256 << 20


@dataclass(frozen=True)
class Inspection:
    digest: str
    manifest: bytes
    config: bytes | None
    view: ModelKitView
    toc: ModelKitToc | None

    @property
    def manifest_json(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.manifest)
        return doc


async def inspect(source: BlobSource) -> Inspection:
    manifest, _media_type, digest = await source.resolve()
    try:
        doc = json.loads(manifest)
        config_desc = doc.get("config") or {}
        config_digest = config_desc.get("digest")
    except (ValueError, AttributeError):
        raise FormatError(f"{source.reference}: manifest is not a JSON object") from None
    config = None
    if isinstance(config_digest, str):
        config = await source.get_blob(config_digest, MAX_CONFIG)
    view = parse_modelkit(manifest, config)
    toc = await load_kitfs_toc(source, view)
    return Inspection(digest, manifest, config, view, toc)


async def load_kitfs_toc(source: BlobSource, view: ModelKitView) -> ModelKitToc | None:
    """The kitfs table of contents pinned in the manifest, if there is one and it is sound."""
    toc_digest = view.annotations.get(TOC_ANNOTATION)
    if not toc_digest:
        return None
    try:
        data = await source.get_blob(toc_digest, MAX_TOC)
    except KitfsError as exc:
        log.warning("ignoring the kitfs table of contents %s: %s", toc_digest, exc)
        return None
    if sha256_digest(data) != toc_digest:
        raise IntegrityError(f"table of contents {toc_digest} does not match its digest")
    toc = load_toc(data)
    for layer in view.layers:
        entry = toc.layer(layer.digest)
        if entry is not None and entry.blob_size != layer.size:
            raise FormatError(f"table of contents disagrees with the manifest on {layer.digest}")
    return toc


def raw_layer_entries(layer: LayerInfo) -> tuple[TocEntry, ...]:
    """A raw layer is one file: its name comes from the filepath annotation."""
    meta = layer.file_metadata
    name = layer.clean_path
    mode = meta.mode & 0o7777 if meta is not None else 0o644
    size = meta.size if meta is not None and meta.size == layer.size else layer.size
    parts = name.split("/")
    dirs = tuple(TocEntry("/".join(parts[:i]), "dir", 0o755) for i in range(1, len(parts)))
    return (*dirs, TocEntry(name, "file", mode, size, 0))


async def walk_tar_headers(source: BlobSource, layer: LayerInfo) -> tuple[TocEntry, ...]:
    """Range-read only the headers of an uncompressed tar layer."""
    walker = TarWalker(layer.size)
    while (request := walker.next_request()) is not None:
        offset, length = request
        data = await source.read_range(layer.digest, offset, length) if length else b""
        walker.feed(offset, data)
    return tuple(walker.entries)


async def stream_tar_headers(source: BlobSource, layer: LayerInfo) -> tuple[TocEntry, ...]:
    """Decompress a whole gzip/zstd layer once, keeping only a small window in memory."""
    walker = TarWalker()
    decomp = StreamDecompressor(layer.compression)
    buf = b""
    base = 0  # stream offset of buf[0]
    async with source.stream_blob(layer.digest) as pieces:
        async for piece in pieces:
            buf += await trio.to_thread.run_sync(decomp.decompress, piece)
            while (request := walker.next_request()) is not None:
                offset, length = request
                if offset >= base + len(buf):  # jump over file data not yet needed
                    base, buf = base + len(buf), b""
                    break
                if offset > base:
                    buf, base = buf[offset - base :], offset
                if len(buf) < length:
                    break
                walker.feed(offset, buf[:length])
            if walker.done:
                break
        else:
            decomp.finish()
            while (request := walker.next_request()) is not None:
                offset, length = request
                walker.feed(offset, buf[offset - base :][:length] if offset >= base else b"")
    return tuple(walker.entries)


class EntryCache(Protocol):
    """Where walked tables of contents are kept by layer digest (kitfs.cache.tocs.TocCache)."""

    def get(self, layer_digest: str) -> bytes | None: ...

    def put(self, layer_digest: str, data: bytes) -> None: ...


async def layer_entries(
    source: BlobSource, inspection: Inspection, layer: LayerInfo,
    cache: EntryCache | None = None,
) -> tuple[TocEntry, ...]:
    if inspection.toc is not None:
        known = inspection.toc.layer(layer.digest)
        if known is not None:
            return known.entries
    if layer.fmt == "raw":
        return raw_layer_entries(layer)
    if cache is not None:
        cached = await trio.to_thread.run_sync(cache.get, layer.digest)
        if cached is not None:
            try:
                return layer_from_json(json.loads(cached)).entries
            except (ValueError, KitfsError) as exc:
                log.warning("ignoring cached table of contents of %s: %s", layer.digest, exc)
    if layer.compression == "none":
        entries = await walk_tar_headers(source, layer)
    else:
        entries = await stream_tar_headers(source, layer)
    if cache is not None:
        walked = LayerToc(layer.digest, layer.diff_id or "", layer.media_type, layer.size,
                          -1, entries)
        data = json.dumps(layer_to_json(walked), separators=(",", ":")).encode()
        try:
            await trio.to_thread.run_sync(cache.put, layer.digest, data)
        except KitfsError as exc:
            log.warning("cannot cache the table of contents of %s: %s", layer.digest, exc)
    return entries


def placement_prefix(layer: LayerInfo) -> str:
    root = layer.tar_root
    return "" if root in (".", "") else posixpath.normpath(root)


async def build_file_tree(
    source: BlobSource, inspection: Inspection, filters: FilterSet,
    cache: EntryCache | None = None,
) -> Tree:
    """The tree `kit unpack` (with these filters) would write, from metadata alone."""
    chosen = [
        layer for layer in inspection.view.layers
        if filters.keeps_layer(layer.kind, layer.name, layer.path)
    ]
    results: dict[str, tuple[TocEntry, ...]] = {}

    async def load(layer: LayerInfo) -> None:
        results[layer.digest] = await layer_entries(source, inspection, layer, cache)

    async with trio.open_nursery() as nursery:
        for layer in chosen:
            nursery.start_soon(load, layer)
    placements = [
        Placement(
            layer.digest, results[layer.digest],
            "" if layer.fmt == "raw" else placement_prefix(layer),
        )
        for layer in chosen
    ]
    kitfile = None
    if filters.keeps_kitfile():
        kitfile = kitfile_to_yaml(inspection.view.kitfile.without_layer_digests()).encode()
    return build_tree(placements, kitfile)
