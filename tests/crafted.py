"""Hand-made (and malicious) ModelKits for tests, published to a real registry.

Four parts, used together:

- tar bytes: `build_tar` writes members with the headers `kit pack` writes
  (kitfs's own `encode_header`), adding ancestor directories as kit does;
  `append_hidden` puts bytes after the end-of-archive marker, where a tar
  reader never looks but a table of contents can point.
- layers and kits: `craft_layer` turns a tar stream into a layer blob cut
  into chunks exactly as `kitfs pack` cuts it (the same `_ChunkedOutput`,
  so the same gzip members / zstd frames, chunk digests and block digests)
  and keeps the honest table of contents `toc_for` returns; `publish_kit`
  (async) pushes any layers, Kitfile and table of contents as a ModelKit.
- lies in the table of contents: `swap_files`, `point_at`, `hide_entry`,
  `add_phantom` return a `LayerToc` that still passes
  `validate_layer_toc` (entries kept in offset order, in slots a tar could
  have), so only reading the layer can expose them; `hidden_file_lie`
  builds a layer whose chunks really hold the hidden bytes; `NONSENSE`
  holds lies that `validate_layer_toc` must refuse without reading.
- lies in tar headers, for layers without a table of contents:
  `header_spans` says where each header lies in the blob, `rewrite_header`
  edits one header block keeping its checksum valid, and `lie_in_headers`
  gives the patches a fault-injecting proxy applies to the ranges it serves.

Everything is synchronous except `publish_kit` and `published_toc`, which
run in the test's Trio loop (the tests are trio tests).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import zstandard

from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.manifest import LayerDescriptorInput, build_manifest
from kitfs.modelkit.tarindex import TarWalker, index_tar_stream, parse_numeric
from kitfs.modelkit.tarwriter import (
    Compression,
    _ChunkedOutput,  # what write_layer cuts, hashes and compresses a layer's stream with
    encode_header,
    split_ustar_path,
)
from kitfs.modelkit.toc import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    TOC_ANNOTATION,
    EntryKind,
    LayerToc,
    ModelKitToc,
    TocChunk,
    TocEntry,
    dump_toc,
    load_toc,
)
from kitfs.oci.client import ClientOptions, RegistryClient

BLOCK = 512
TIB = 1 << 40
MODEL_TAR = mt.layer_media_type("model", "tar")
CLI_VERSION = "1.7.0"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _padded(n: int) -> int:
    return n + (-n % BLOCK)


# --- tar bytes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One tar entry to write: a file with `data`, or a directory."""

    name: str
    data: bytes = b""
    kind: EntryKind = "file"
    mode: int | None = None  # default 0o644 for files, 0o755 for directories


def build_tar(members: Iterable[Member | tuple[str, bytes]], *, parents: bool = True,
              end: bool = True) -> bytes:
    """A tar stream as `kit pack` writes it: Go's headers, data padded to 512, two zero blocks.

    `(name, data)` pairs are files. With `parents`, every ancestor directory
    not listed gets an entry (mode 0o755) just before the first member below
    it, as kit writes them; without, the tar holds only what is given. Names
    are written as given (not cleaned), so a test can write odd ones.
    `end=False` leaves out the end-of-archive marker.
    """
    out = bytearray()
    seen: set[str] = set()
    for item in members:
        m = item if isinstance(item, Member) else Member(item[0], item[1])
        if parents:
            parts = m.name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d and d not in seen:
                    seen.add(d)
                    out += encode_header(os.fsencode(d), "dir", 0o755, 0)
        seen.add(m.name)
        mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
        size = len(m.data) if m.kind == "file" else 0
        out += encode_header(os.fsencode(m.name), m.kind, mode, size)
        if m.kind == "file":
            out += m.data + bytes(-size % BLOCK)
    if end:
        out += bytes(2 * BLOCK)
    return bytes(out)


def end_of_archive(tar: bytes) -> int:
    """Where a tar reader stops: the offset just past the end-of-archive marker."""
    walker = TarWalker(len(tar))
    while (req := walker.next_request()) is not None:
        walker.feed(req[0], tar[req[0] : req[0] + req[1]])
    assert walker.archive_end is not None
    return walker.archive_end


def append_hidden(tar: bytes, hidden: bytes) -> tuple[bytes, int]:
    """`tar` with `hidden` after its end-of-archive marker: (new stream, offset of `hidden`).

    The offset is on a block boundary at least one block past the last entry's
    data, so a table of contents pointing a file there passes every check that
    does not read the tar headers.
    """
    base = tar + bytes(-len(tar) % BLOCK)
    return base + hidden, len(base)


# --- layers and kits ------------------------------------------------------------------


@dataclass(frozen=True)
class CraftLayer:
    """One layer to publish: its blob as stored, and where the Kitfile puts it.

    `diff_id` defaults to sha256 of the blob decompressed; `toc` is the honest
    table of contents (`craft_layer` fills it; None: this blob has none, e.g.
    a single gzip stream as `kit` writes it); `stream` the uncompressed tar.
    """

    blob: bytes
    media_type: str = MODEL_TAR
    path: str = "./model"
    diff_id: str | None = None
    annotations: Mapping[str, str] | None = None
    toc: LayerToc | None = field(default=None, repr=False)
    stream: bytes | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        return sha256(self.blob)

    @property
    def kind(self) -> str:
        return mt.parse_layer_media_type(self.media_type).kind

    @property
    def compression(self) -> str:
        return mt.parse_layer_media_type(self.media_type).compression

    def uncompressed_digest(self) -> str:
        if self.diff_id is not None:
            return self.diff_id
        if self.stream is not None:
            return sha256(self.stream)
        if self.compression == "gzip":
            return sha256(gzip.decompress(self.blob))
        if self.compression == "zstd":
            return sha256(zstandard.ZstdDecompressor().decompressobj().decompress(self.blob))
        return self.digest


def craft_layer(
    stream: bytes,
    *,
    kind: str = "model",
    path: str = "./model",
    compression: Compression = "none",
    chunked: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    entries: Sequence[TocEntry] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> CraftLayer:
    """A layer holding the tar `stream`, written as `kitfs pack` writes it, with its honest TOC.

    The blob and chunks come from the code `write_layer` uses, so for a
    stream `build_tar` wrote they are byte for byte what `kitfs pack` gives
    for the same files. `entries` default to walking the stream's headers
    (which is what pack records); give them for a stream that is not a tar.
    `chunked=False` with gzip/zstd writes one stream as `kit` does: such a
    layer has no honest kitfs table of contents (`toc` None).
    """
    media_type = mt.layer_media_type(kind, "tar", compression)
    if compression != "none" and not chunked:
        if compression == "gzip":
            blob = gzip.compress(stream, mtime=0)
        else:
            blob = zstandard.ZstdCompressor(write_content_size=True).compress(stream)
        return CraftLayer(blob, media_type, path, sha256(stream), annotations, None, stream)
    if compression != "none" or block_size <= 0 or block_size >= chunk_size or (
            chunk_size % block_size):
        block_size = 0  # write_layer's rule
    out = io.BytesIO()
    sink = _ChunkedOutput(out, compression, chunk_size, 0, block_size)
    try:
        sink.write(stream)
        digest, diff_id, blob_size = sink.finish()
    finally:
        sink.close()
    if entries is None:
        entries = index_tar_stream(io.BytesIO(stream))
    toc = LayerToc(digest, diff_id, media_type, blob_size, len(stream), tuple(entries),
                   chunk_size, tuple(sink.chunks), block_size)
    return CraftLayer(out.getvalue(), media_type, path, diff_id, annotations, toc, stream)


def toc_for(*layers: CraftLayer, strict: bool = True) -> ModelKitToc:
    """The table of contents `kitfs pack` writes for these layers (as made by `craft_layer`).

    A layer without one (a single gzip/zstd stream, or a `CraftLayer` built
    by hand) is an error, or with `strict=False` simply left out, as if
    kitfs had never seen it (a mount then walks its headers).
    """
    tocs = []
    for layer in layers:
        if layer.toc is not None:
            tocs.append(layer.toc)
        elif strict:
            raise ValueError(f"layer {layer.digest} was not cut into chunks: it has no kitfs "
                             "table of contents (make it with craft_layer(chunked=True))")
    return ModelKitToc(tuple(tocs))


def kitfile_for(layers: Sequence[CraftLayer]) -> dict[str, Any]:
    """A Kitfile naming each layer's path in the section its media type says, in layer order."""
    doc: dict[str, Any] = {"manifestVersion": "1.0.0", "package": {"name": "crafted"}}
    model: dict[str, Any] = {}
    lists: dict[str, list[dict[str, Any]]] = {"code": [], "datasets": [], "docs": [],
                                              "prompts": []}
    for i, layer in enumerate(layers):
        kind = layer.kind
        if kind == "model":
            model.update({"name": "crafted-model", "path": layer.path})
        elif kind == "modelpart":
            model.setdefault("parts", []).append({"name": f"part{i}", "path": layer.path})
        elif kind == "dataset":
            lists["datasets"].append({"name": f"data{i}", "path": layer.path})
        elif kind == "code" and (layer.annotations or {}).get(
                mt.ANNOTATION_LAYER_SUBTYPE) == mt.LAYER_SUBTYPE_PROMPT:
            lists["prompts"].append({"name": f"prompt{i}", "path": layer.path})
        elif kind in ("code", "docs"):
            lists[kind].append({"path": layer.path})
        else:
            raise ValueError(f"no Kitfile section for a {kind} layer")
    if model:
        doc["model"] = model
    doc.update({k: v for k, v in lists.items() if v})
    return doc


def _fill_digests(kitfile: dict[str, Any], layers: Sequence[CraftLayer]) -> dict[str, Any]:
    """A copy with `digest` and `diffId` set (where absent) on the entry whose path each
    layer has; entries that already carry a digest keep it (a test may want them to lie)."""
    doc: dict[str, Any] = json.loads(json.dumps(kitfile))
    slots: list[dict[str, Any]] = []
    model = doc.get("model")
    if isinstance(model, dict):
        if "path" in model:
            slots.append(model)
        slots += [p for p in model.get("parts") or [] if isinstance(p, dict)]
    for key in ("code", "datasets", "docs", "prompts"):
        slots += [e for e in doc.get(key) or [] if isinstance(e, dict)]
    used: set[int] = set()
    for layer in layers:
        for i, slot in enumerate(slots):
            if i not in used and slot.get("path") == layer.path:
                used.add(i)
                if "digest" not in slot:
                    slot["digest"] = layer.digest
                    slot["diffId"] = layer.uncompressed_digest()
                break
    return doc


TocArg = bytes | ModelKitToc | Sequence[LayerToc] | Literal["auto"] | None


def kit_blobs(layers: Sequence[CraftLayer], kitfile: dict[str, Any] | bytes | None = None,
              toc: TocArg = "auto", annotations: Mapping[str, str] | None = None,
              ) -> tuple[bytes, bytes, bytes | None]:
    """(manifest, config, TOC blob or None) of the ModelKit `publish_kit` pushes."""
    if isinstance(kitfile, bytes):
        config = kitfile
    else:
        doc = kitfile_for(layers) if kitfile is None else kitfile
        config = json.dumps(_fill_digests(doc, layers), separators=(",", ":"),
                            ensure_ascii=False).encode()
    toc_blob: bytes | None
    if toc == "auto":
        auto = toc_for(*layers, strict=False)
        toc_blob = dump_toc(auto) if auto.layers else None
    elif toc is None or isinstance(toc, bytes):
        toc_blob = toc
    elif isinstance(toc, ModelKitToc):
        toc_blob = dump_toc(toc)
    else:
        toc_blob = dump_toc(ModelKitToc(tuple(toc)))
    notes = {mt.ANNOTATION_CLI_VERSION: CLI_VERSION, **(annotations or {})}
    if toc_blob is not None:
        notes[TOC_ANNOTATION] = sha256(toc_blob)
    manifest = build_manifest(
        config,
        [LayerDescriptorInput(lay.media_type, lay.digest, len(lay.blob), lay.annotations)
         for lay in layers],
        notes,
        newer_style=True,
    )
    return manifest, config, toc_blob


async def publish_kit(
    registry_host: str,
    repo: str,
    tag: str,
    layers: Sequence[CraftLayer],
    kitfile: dict[str, Any] | bytes | None = None,
    toc: TocArg = "auto",
    *,
    annotations: Mapping[str, str] | None = None,
    referrer: bool = False,
) -> str:
    """Push a ModelKit made of exactly these layers; return `host/repo:tag`.

    - `kitfile`: a dict (JSON-shaped Kitfile; each layer's `digest`/`diffId`
      is filled into the entry with the layer's path unless it has one),
      raw config bytes used as they are, or None (one entry per layer, in
      the section its media type names).
    - `toc`: "auto" (the honest one, `toc_for(layers, strict=False)`; none
      when no layer has one), a `ModelKitToc`, a
      list of `LayerToc`, raw bytes (pushed as they are), or None (no
      table of contents, like a kit-made ModelKit). Its sha256 is pinned in
      the manifest annotation `dev.kitfs.toc.digest`.
    - the manifest: OCI image manifest with `artifactType` (newer kit),
      `ml.kitops.modelkit.cli-version` and any `annotations` given.
    - `referrer`: also attach the TOC as an OCI referrer, as `kitfs pack` does.
    """
    manifest, config, toc_blob = kit_blobs(layers, kitfile, toc, annotations)
    async with RegistryClient(registry_host, ClientOptions()) as client:
        await client.push_blob_bytes(repo, sha256(config), config)
        for layer in layers:
            await client.push_blob_bytes(repo, layer.digest, layer.blob)
        if toc_blob is not None:
            await client.push_blob_bytes(repo, sha256(toc_blob), toc_blob)
        digest, _ = await client.put_manifest(repo, tag, manifest, mt.OCI_MANIFEST)
        if referrer and toc_blob is not None:
            from kitfs.push import attach_toc

            await attach_toc(client, repo, manifest, digest, toc_blob, sha256(toc_blob))
    return f"{registry_host}/{repo}:{tag}"


async def published_toc(registry_host: str, repo: str, tag: str
                        ) -> tuple[dict[str, Any], ModelKitToc | None]:
    """The manifest (parsed) and the table of contents its annotation pins, if any."""
    async with RegistryClient(registry_host, ClientOptions()) as client:
        body, _, _ = await client.get_manifest(repo, tag)
        manifest = json.loads(body)
        digest = (manifest.get("annotations") or {}).get(TOC_ANNOTATION)
        if digest is None:
            return manifest, None
        return manifest, load_toc(await client.get_blob(repo, digest))


# --- lies in the table of contents ----------------------------------------------------
#
# Each returns a new LayerToc; entries stay sorted by offset, so the lie keeps
# the shape of a real table of contents and passes validate_layer_toc.


def _by_offset(entries: Iterable[TocEntry]) -> tuple[TocEntry, ...]:
    return tuple(sorted(entries, key=lambda e: e.offset))


def _entry(toc: LayerToc, name: str) -> TocEntry:
    for e in toc.entries:
        if e.name == name:
            return e
    raise KeyError(f"no entry {name!r} in the table of contents")


def swap_files(toc: LayerToc, a: str, b: str) -> LayerToc:
    """Files `a` and `b` trade (offset, size): each name now shows the other's bytes."""
    ea, eb = _entry(toc, a), _entry(toc, b)
    swapped = {a: replace(ea, offset=eb.offset, size=eb.size),
               b: replace(eb, offset=ea.offset, size=ea.size)}
    return replace(toc, entries=_by_offset(swapped.get(e.name, e) for e in toc.entries))


def point_at(toc: LayerToc, name: str, offset: int, size: int) -> LayerToc:
    """File `name` claims the stream bytes [offset, offset + size)."""
    moved = replace(_entry(toc, name), offset=offset, size=size)
    return replace(toc, entries=_by_offset(moved if e.name == name else e for e in toc.entries))


def hide_entry(toc: LayerToc, name: str) -> LayerToc:
    """Leave out an entry the tar holds (a directory's children stay, with an implicit parent)."""
    _entry(toc, name)
    return replace(toc, entries=tuple(e for e in toc.entries if e.name != name))


def add_phantom(toc: LayerToc, name: str, *, offset: int | None = None,
                size: int | None = None, mode: int = 0o644) -> LayerToc:
    """List a file the tar does not hold.

    By default it claims the second block of the end-of-archive marker (512
    zero bytes, or `size` of them): the one slot past the last entry a table
    of contents can name without overlapping a header or leaving the stream.
    """
    if offset is None:
        last = max(toc.entries, key=lambda e: e.offset)
        offset = last.offset + _padded(last.size) + BLOCK
    if size is None:
        size = max(0, min(BLOCK, toc.stream_size - offset))
    ghost = TocEntry(name, "file", mode, size, offset)
    return replace(toc, entries=_by_offset((*toc.entries, ghost)))


def hidden_file_lie(tar: bytes, name: str, hidden: bytes, **craft: Any
                    ) -> tuple[CraftLayer, LayerToc]:
    """A layer whose stream is `tar` plus `hidden` after its end-of-archive marker, and a
    table of contents in which file `name` is `hidden`.

    The layer's blob, chunks and chunk digests really hold the hidden bytes
    (its honest TOC lists only what the tar headers show), so every chunk
    check passes; only the tar headers say `name` is something else.
    `craft` goes to `craft_layer` (compression, chunk_size, ...).
    """
    stream, at = append_hidden(tar, hidden)
    layer = craft_layer(stream, **craft)
    assert layer.toc is not None
    return layer, point_at(layer.toc, name, at, len(hidden))


def with_entry(toc: LayerToc, name: str, /, **changes: Any) -> LayerToc:
    """Entry `name` with fields replaced (`name=` renames it), left where it is."""
    return replace(toc, entries=tuple(replace(e, **changes) if e.name == name else e
                                      for e in toc.entries))


def _first_file(toc: LayerToc) -> str:
    return next(e.name for e in toc.entries if e.kind == "file")


def _last_file(toc: LayerToc) -> str:
    return max((e for e in toc.entries if e.kind == "file"), key=lambda e: e.offset).name


def _with_chunk(toc: LayerToc, i: int, **changes: Any) -> LayerToc:
    chunks = list(toc.chunks)
    chunks[i] = replace(chunks[i], **changes)
    return replace(toc, chunks=tuple(chunks))


#: Lies `validate_layer_toc` refuses without reading the layer: name -> mutation of an
#: honest table of contents (with at least one file; "chunk_gap" wants two chunks).
NONSENSE: dict[str, Callable[[LayerToc], LayerToc]] = {
    "entry_past_blob_end": lambda t: point_at(t, _last_file(t), t.stream_size + BLOCK, 1),
    "size_1tib": lambda t: with_entry(t, _last_file(t), size=TIB),
    "negative_offset": lambda t: with_entry(t, _first_file(t), offset=-BLOCK),
    "chunk_size_zero": lambda t: replace(t, chunk_size=0),
    "chunk_size_huge": lambda t: replace(t, chunk_size=TIB),
    "stream_size_lie": lambda t: replace(t, stream_size=t.stream_size + BLOCK),
    "blob_size_lie": lambda t: replace(t, blob_size=t.blob_size + 1),
    "chunk_misplaced": lambda t: _with_chunk(t, 0, offset=BLOCK),
    "chunk_gap": lambda t: replace(t, chunks=(t.chunks[0], *t.chunks[2:])),
    "chunk_past_blob_end": lambda t: _with_chunk(
        t, len(t.chunks) - 1, blob_offset=t.blob_size),
    "offset_in_header": lambda t: with_entry(t, _first_file(t), offset=0),
    "offset_unaligned": lambda t: with_entry(
        t, _first_file(t), offset=_entry(t, _first_file(t)).offset + 1),
    "overlapping_entries": lambda t: _overlap(t),
    "dotdot_name": lambda t: with_entry(t, _first_file(t), name="../escape"),
    "absolute_name": lambda t: with_entry(t, _first_file(t), name="/etc/passwd"),
    "double_slash_name": lambda t: with_entry(t, _first_file(t), name="a//b"),
    "nul_name": lambda t: with_entry(t, _first_file(t), name="a\0b"),
    "duplicate_name": lambda t: _duplicate(t),
    "file_under_file": lambda t: _under_file(t),
    "dir_with_size": lambda t: replace(t, entries=tuple(
        replace(e, size=1) if e.kind == "dir" else e for e in t.entries)),
    "mode_too_big": lambda t: with_entry(t, _first_file(t), mode=0o170644),
    "no_entries": lambda t: replace(t, entries=()),
}


def _overlap(t: LayerToc) -> LayerToc:
    files = [e for e in t.entries if e.kind == "file"]
    first = files[0]
    return with_entry(t, first.name, size=first.size + 2 * BLOCK)


def _duplicate(t: LayerToc) -> LayerToc:
    a, b = [e for e in t.entries][:2]
    return replace(t, entries=(a, replace(b, name=a.name), *t.entries[2:]))


def _under_file(t: LayerToc) -> LayerToc:
    first, last = _first_file(t), _last_file(t)
    return with_entry(t, last, name=f"{first}/inside")


# --- lies in tar headers --------------------------------------------------------------


@dataclass(frozen=True)
class HeaderSpan:
    """Where one entry's header blocks lie in an uncompressed tar layer.

    `start..data` are header bytes only: `start` is the first extension
    header (PAX `x`, GNU `L`/`K`) or the main header; `main` the main
    (USTAR) header block, 512 bytes; `data` where the entry's data starts
    (`TocEntry.offset`). `extended`: the name or size is in an extension
    header, which `rewrite_header` cannot change in place.
    """

    name: str
    kind: EntryKind
    size: int
    start: int
    main: int
    data: int
    extended: bool


def header_spans(tar: bytes) -> list[HeaderSpan]:
    """The header byte ranges of every entry, in order (the archive root entry left out)."""
    entries = {e.offset: e for e in index_tar_stream(io.BytesIO(tar))}
    spans: list[HeaderSpan] = []
    pos = 0
    start: int | None = None
    while pos + BLOCK <= len(tar):
        block = tar[pos : pos + BLOCK]
        if block == bytes(BLOCK):
            break
        size = parse_numeric(block[124:136])
        if block[156] in b"xLKg":
            start = pos if start is None else start
            pos += BLOCK + _padded(size)
            continue
        data = pos + BLOCK
        e = entries.get(data)
        if e is not None:
            spans.append(HeaderSpan(e.name, e.kind, e.size, pos if start is None else start,
                                    pos, data, start is not None))
        start = None
        pos = data + _padded(e.size if e is not None else size)
    return spans


def header_checksum(block: bytes) -> bytes:
    """The checksum field Go writes for `block`: six octal digits, NUL, space."""
    total = sum(block[:148]) + 8 * ord(" ") + sum(block[156:BLOCK])
    return b"%06o\x00 " % total


def rewrite_header(block: bytes, *, name: str | bytes | None = None, size: int | None = None,
                   mode: int | None = None, kind: EntryKind | None = None) -> bytes:
    """A USTAR header block with some fields replaced and a valid checksum.

    A name over 100 bytes goes into the prefix field where it can be split at
    a `/` (as Go does); otherwise ValueError (a PAX record would change the
    layer's length).
    """
    if len(block) != BLOCK:
        raise ValueError("a tar header is one 512-byte block")
    out = bytearray(block)
    if name is not None:
        raw = os.fsencode(name) if isinstance(name, str) else name
        prefix, short = b"", raw
        if len(raw) > 100:
            split = split_ustar_path(raw)
            if split is None:
                raise ValueError(f"{name!r} does not fit a USTAR header")
            prefix, short = split
        out[0:100] = short.ljust(100, b"\0")
        out[345:500] = prefix.ljust(155, b"\0")
    if size is not None:
        out[124:136] = b"%011o\0" % size
    if mode is not None:
        out[100:108] = b"%07o\0" % mode
    if kind is not None:
        out[156] = ord("5") if kind == "dir" else ord("0")
    out[148:156] = header_checksum(bytes(out))
    return bytes(out)


@dataclass(frozen=True)
class HeaderLie:
    """Replacement header blocks for an uncompressed layer: offset in the blob -> 512 bytes.

    Callable as `lie(blob_offset, data)`, the signature of faultproxy's
    `Replace`: `proxy.add(Replace(lie), path=layer_digest)` makes every
    response carrying the layer (whole or a range) lie in those headers.
    """

    spans: tuple[HeaderSpan, ...]
    patches: Mapping[int, bytes]

    def __call__(self, offset: int, data: bytes) -> bytes:
        """`data`, the blob's bytes from `offset` on, with every patch that overlaps it."""
        out = bytearray(data)
        end = offset + len(data)
        for at, block in self.patches.items():
            lo, hi = max(at, offset), min(at + len(block), end)
            if lo < hi:
                out[lo - offset : hi - offset] = block[lo - at : hi - at]
        return bytes(out)

    def touches(self, offset: int, length: int) -> bool:
        """Whether a range read of the blob sees any patched byte."""
        return any(at < offset + length and offset < at + len(b)
                   for at, b in self.patches.items())


def lie_in_headers(tar: bytes, *, swap: tuple[str, str] | None = None,
                   rename: Mapping[str, str] | None = None,
                   modes: Mapping[str, int] | None = None) -> HeaderLie:
    """Patches that make `tar`'s headers lie, checksums intact, length unchanged.

    `swap=(a, b)`: the headers of a and b trade names (a's data now comes out
    as b; with files of the same size nothing else differs). `rename`: entry
    -> new name. `modes`: entry -> new permission bits. Only entries whose
    name sits in the main header can be changed (ValueError otherwise).
    """
    spans = tuple(header_spans(tar))
    by_name = {s.name: s for s in spans}
    names: dict[str, str] = dict(rename or {})
    if swap is not None:
        a, b = swap
        names[a], names[b] = b, a
    patches: dict[int, bytes] = {}
    for entry in {*names, *(modes or {})}:
        span = by_name.get(entry)
        if span is None:
            raise KeyError(f"no entry {entry!r} in the tar")
        if span.extended and entry in names:
            raise ValueError(f"{entry!r} is named by an extension header")
        block = patches.get(span.main, tar[span.main : span.main + BLOCK])
        patches[span.main] = rewrite_header(block, name=names.get(entry),
                                            mode=(modes or {}).get(entry))
    return HeaderLie(spans, patches)


def chunk_of(toc: LayerToc, blob: bytes, index: int) -> bytes:
    """Chunk `index`'s bytes as stored in the blob (compressed for gzip/zstd layers)."""
    c: TocChunk = toc.chunks[index]
    return blob[c.blob_offset : c.blob_offset + c.blob_size]
