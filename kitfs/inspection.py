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
from typing import Literal, Protocol

import trio

from kitfs.errors import FormatError, IntegrityError, KitfsError
from kitfs.modelkit.decompress import StreamDecompressor
from kitfs.modelkit.filters import FilterSet
from kitfs.modelkit.kitfile import kitfile_to_yaml
from kitfs.modelkit.manifest import LayerInfo, ModelKitView, parse_modelkit
from kitfs.modelkit.tarindex import SequentialWalk, TarWalker
from kitfs.modelkit.toc import (
    TOC_ANNOTATION,
    LayerToc,
    ModelKitToc,
    TocEntry,
    layer_from_json,
    layer_to_json,
    load_toc,
    validate_layer_toc,
)
from kitfs.modelkit.tree import Placement, Tree, build_tree
from kitfs.oci.reference import Reference
from kitfs.oci.source import BlobSource

log = logging.getLogger(__name__)

MAX_CONFIG = 16 << 20
#: A table of contents of 64 MiB lists about two million files (a dataset of small
#: files); parsing one costs about 8x its size in memory, so larger ones are refused.
MAX_TOC = 64 << 20


@dataclass(frozen=True)
class Inspection:
    digest: str
    manifest: bytes
    config: bytes | None
    view: ModelKitView
    toc: ModelKitToc | None
    #: The ModelKits `model.path` names, nearest first (kitfs/parents.py finds them; empty
    #: when not followed): their model layers are part of this ModelKit's tree.
    parents: tuple[Parent, ...] = ()

    @property
    def manifest_json(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.manifest)
        return doc

    def placed_layers(self) -> list[tuple[Inspection, LayerInfo]]:
        """Every layer the tree may hold, with the ModelKit it belongs to, in the order
        `kit unpack` writes them: the parents' model layers, farthest ancestor first,
        then this ModelKit's own (pkg/cmd/unpack/unpack.go unpacks a parent before the
        layers of the ModelKit naming it)."""
        out = [(p.inspection, layer) for p in reversed(self.parents) for layer in p.model_layers]
        return out + [(self, layer) for layer in self.view.layers]


@dataclass(frozen=True)
class Parent:
    """A ModelKit another one's `model.path` names; it lends its model layers to it."""

    #: As the child's Kitfile names it (the digest it resolved to: `inspection.digest`).
    reference: Reference
    inspection: Inspection

    @property
    def model_layers(self) -> tuple[LayerInfo, ...]:
        """What a child takes from it: the model and model part layers (kit unpacks a
        parent with `--filter model`, which covers parts, and never its Kitfile)."""
        return tuple(layer for layer in self.inspection.view.layers
                     if layer.kind in ("model", "modelpart"))


async def inspect(
    source: BlobSource, *, toc: bool = True, resolved: tuple[bytes, str, str] | None = None
) -> Inspection:
    """The manifest, config and Kitfile of the ModelKit `source` names; its kitfs table of
    contents too unless `toc` is False (what only reads the Kitfile or compares layers,
    `info` and `diff`, need not fetch a blob that can run to megabytes). `resolved`: what
    `source.resolve()` already returned, so that a signature checked on that digest covers
    exactly what is read (no second resolve of a tag that may have moved)."""
    manifest, _media_type, digest = resolved if resolved is not None else await source.resolve()
    try:
        doc = json.loads(manifest)
        config_desc = doc.get("config") or {}
        config_digest = config_desc.get("digest")
    except (ValueError, AttributeError):
        raise FormatError(f"{source.reference}: manifest is not a JSON object") from None
    config = None
    if isinstance(config_digest, str):
        size = config_desc.get("size")
        config = await source.get_blob(config_digest, MAX_CONFIG,
                                       size=size if isinstance(size, int) else None)
    view = parse_modelkit(manifest, config)
    table = await load_kitfs_toc(source, view) if toc else None
    return Inspection(digest, manifest, config, view, table)


async def load_kitfs_toc(source: BlobSource, view: ModelKitView) -> ModelKitToc | None:
    """The kitfs table of contents pinned in the manifest, if there is one and it is sound."""
    toc_digest = view.annotations.get(TOC_ANNOTATION)
    if not toc_digest:
        return None
    try:
        data = await source.get_blob(toc_digest, MAX_TOC)
    except IntegrityError:
        raise  # served, but not the pinned bytes: a lie, not a missing blob
    except KitfsError as exc:
        # A copy made by a tool that copies layers but not referrers lacks it. Its layers
        # are then checked as layers `kit` wrote are: whole (in lazy mode after serving).
        log.warning("no kitfs table of contents (%s): layers are checked whole, not chunk by "
                    "chunk (%s)", toc_digest, exc)
        return None
    toc = load_toc(data)  # get_blob checked it against its digest
    for layer in view.layers:
        entry = toc.layer(layer.digest)
        if entry is not None:
            # Authentic (pinned) but written by whoever packed the kit: what can be
            # judged without the layer is judged here, the rest against its tar
            # headers before a file is served (engine: _check_layout).
            validate_layer_toc(entry, layer.size, layer.compression != "none")
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
        data = (await source.read_range(layer.digest, offset, length, size=layer.size)
                if length else b"")
        walker.feed(offset, data)
    return tuple(walker.entries)


async def stream_tar_headers(source: BlobSource, layer: LayerInfo) -> tuple[TocEntry, ...]:
    """Decompress a whole gzip/zstd layer once, keeping only a header's bytes in memory.

    Read to the end even after the archive's last entry: the blob's digest is
    checked only there, and a layout read from unchecked bytes could name
    files the layer does not hold (then it could not be cached either).
    """
    walk = SequentialWalk()
    decomp = StreamDecompressor(layer.compression)

    def sink(data: bytes) -> None:  # in the decompressing thread: no output is held
        if not walk.done:
            walk.feed(data)

    async with source.stream_blob(layer.digest, size=layer.size) as pieces:
        async for piece in pieces:
            await trio.to_thread.run_sync(decomp.decompress_to, piece, sink)
        decomp.finish()
    walk.finish()
    return tuple(walk.entries)


#: Where a layer's entries came from, which says what still binds them to its digest.
#: `toc`: a kitfs table of contents (pinned by the manifest, but written by whoever
#: packed it: checked against the tar's own headers before a file is served);
#: `walked`: tar headers read by range from an unverified registry (checked when the
#: layer is hashed end to end); `raw`, `stream`, `cached`: already bound (a raw layer
#: is its one file; a stream was hashed as it was walked; a cached layout was stored
#: only after its layer verified).
LayoutOrigin = Literal["toc", "walked", "raw", "stream", "cached"]

#: The key a cached layout carries once its layer was verified end to end; layouts
#: cached without it (older kitfs cached walked headers unchecked) are walked again.
CHECKED_KEY = "checkedAgainstDigest"


@dataclass(frozen=True)
class LayerLayout:
    """A layer's tar entries and where they came from (see LayoutOrigin)."""

    entries: tuple[TocEntry, ...]
    origin: LayoutOrigin

    @property
    def bound(self) -> bool:
        """True when the entries already trace back to the layer digest."""
        return self.origin in ("raw", "stream", "cached")


class EntryCache(Protocol):
    """Where checked layouts are kept by layer digest (kitfs.cache.tocs.TocCache)."""

    def get(self, layer_digest: str) -> bytes | None: ...

    def put(self, layer_digest: str, data: bytes) -> None: ...


def layout_record(layer: LayerInfo, entries: tuple[TocEntry, ...]) -> bytes:
    """What is cached for a layout checked against its layer's digest."""
    walked = LayerToc(layer.digest, layer.diff_id or "", layer.media_type, layer.size,
                      -1, entries)
    doc = layer_to_json(walked)
    doc[CHECKED_KEY] = True
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_layout_record(data: bytes, layer: LayerInfo) -> tuple[TocEntry, ...] | None:
    """The entries of a cached layout record, or None if it is not a checked one of this layer."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get(CHECKED_KEY) is not True:
            return None
        toc = layer_from_json(doc)
    except (ValueError, KitfsError) as exc:
        log.warning("ignoring cached layout of %s: %s", layer.digest, exc)
        return None
    return toc.entries if toc.digest == layer.digest and toc.blob_size == layer.size else None


async def layer_layout(
    source: BlobSource, inspection: Inspection, layer: LayerInfo,
    cache: EntryCache | None = None,
) -> LayerLayout:
    """A layer's entries, cheapest first; a layout is cached only once it is bound to the digest."""
    if inspection.toc is not None:
        known = inspection.toc.layer(layer.digest)
        if known is not None:
            return LayerLayout(known.entries, "toc")
    if layer.fmt == "raw":
        return LayerLayout(raw_layer_entries(layer), "raw")
    if cache is not None:
        cached = await trio.to_thread.run_sync(cache.get, layer.digest)
        if cached is not None:
            entries = parse_layout_record(cached, layer)
            if entries is not None:
                return LayerLayout(entries, "cached")
    if layer.compression == "none":
        return LayerLayout(await walk_tar_headers(source, layer), "walked")
    entries = await stream_tar_headers(source, layer)
    if cache is not None:
        try:
            await trio.to_thread.run_sync(cache.put, layer.digest, layout_record(layer, entries))
        except KitfsError as exc:
            log.warning("cannot cache the layout of %s: %s", layer.digest, exc)
    return LayerLayout(entries, "stream")


def placement_prefix(layer: LayerInfo) -> str:
    root = layer.tar_root
    return "" if root in (".", "") else posixpath.normpath(root)


async def build_file_tree(
    source: BlobSource, inspection: Inspection, filters: FilterSet,
    cache: EntryCache | None = None,
) -> Tree:
    """The tree `kit unpack` (with these filters) would write, from metadata alone."""
    tree, _ = await file_tree_and_layouts(source, inspection, filters, cache)
    return tree


async def file_tree_and_layouts(
    source: BlobSource, inspection: Inspection, filters: FilterSet,
    cache: EntryCache | None = None,
) -> tuple[Tree, dict[str, LayerLayout]]:
    """The tree, and the layout of each layer it places (what a mount must still check).

    A parent's model layers are kept or dropped by the same filters (kit
    passes the `model` filters, ids included, on to the parent) and read
    through `source`, which must serve them (oci/source.py: RoutedSource).
    """
    chosen = [
        (owner, layer) for owner, layer in inspection.placed_layers()
        if filters.keeps_layer(layer.kind, layer.name, layer.path)
    ]
    results: dict[str, LayerLayout] = {}

    async def load(owner: Inspection, layer: LayerInfo) -> None:
        results[layer.digest] = await layer_layout(source, owner, layer, cache)

    async with trio.open_nursery() as nursery:
        for owner, layer in {layer.digest: (owner, layer) for owner, layer in chosen}.values():
            nursery.start_soon(load, owner, layer)
    placements = [
        Placement(
            layer.digest, results[layer.digest].entries,
            "" if layer.fmt == "raw" else placement_prefix(layer),
        )
        for _, layer in chosen
    ]
    kitfile = None
    if filters.keeps_kitfile():
        kitfile = kitfile_to_yaml(inspection.view.kitfile.without_layer_digests()).encode()
    return build_tree(placements, kitfile), results


def layout_mismatch(claimed: tuple[TocEntry, ...], found: tuple[TocEntry, ...]) -> str | None:
    """Why the entries a layer was listed with are not those its tar holds; None if they are.

    `found` is what walking the tar's own (verified) headers gave: names,
    kinds, modes, sizes and data offsets must all agree, so no file can be
    served from another's bytes, from bytes past the archive's end, or be
    hidden from (or added to) what `kit unpack` writes.
    """
    if claimed == found:
        return None
    theirs = {e.name: e for e in found}
    ours = {e.name: e for e in claimed}
    for entry in claimed:
        real = theirs.get(entry.name)
        if real is None:
            return f"lists {entry.name!r}, which the tar does not hold"
        if real != entry:
            return (f"says {entry.name!r} is {entry.kind} {entry.size} bytes at {entry.offset} "
                    f"(mode {entry.mode:o}), the tar has {real.kind} {real.size} bytes at "
                    f"{real.offset} (mode {real.mode:o})")
    for entry in found:
        if entry.name not in ours:
            return f"does not list {entry.name!r}, which the tar holds"
    return "lists the tar's entries in another order or more than once"
