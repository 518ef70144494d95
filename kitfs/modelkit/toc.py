"""Tables of contents: where every file of a layer lives, and how to verify it chunk by chunk.

A table of contents lets a mount answer `ls` and map "file F, offset O" to a
byte range of a layer blob without reading the layer. `kitfs pack` writes one
for every layer (with per-chunk digests, and compressed offsets for seekable
gzip/zstd layers); for layers `kit` wrote, the same structure is built by
walking tar headers, without chunk digests.

The serialised form is compact JSON with sorted keys so that the same layers
always give the same blob digest (the digest is pinned in the manifest).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kitfs.errors import FormatError
from kitfs.modelkit.chunkdigest import BLOCK_DIGEST_SIZE, parse_chunk_digest, toc_form

TOC_MEDIA_TYPE = "application/vnd.kitfs.toc.v1+json"
TOC_ARTIFACT_TYPE = "application/vnd.kitfs.toc.v1"
TOC_ANNOTATION = "dev.kitfs.toc.digest"
TOC_VERSION = 1
DEFAULT_CHUNK_SIZE = 2 * 1024 * 1024
#: What `kitfs pack` cuts an uncompressed layer's chunks into for block digests
#: (see chunkdigest): a random reader fetches whole blocks, not whole chunks.
DEFAULT_BLOCK_SIZE = 256 * 1024

EntryKind = Literal["file", "dir"]


@dataclass(frozen=True)
class TocEntry:
    """One tar entry: `offset` is where its data starts in the layer's uncompressed stream."""

    name: str
    kind: EntryKind
    mode: int
    size: int = 0
    offset: int = 0
    mtime: int = 0


@dataclass(frozen=True)
class TocChunk:
    """A fixed-size slice of the uncompressed stream and where its bytes sit in the blob.

    For uncompressed layers `blob_offset == offset` and `blob_size == size`; for
    kitfs-packed gzip/zstd layers each chunk is one independent gzip member or
    zstd frame, so it can be fetched and decompressed alone.
    """

    offset: int
    size: int
    digest: str  # `<algorithm>:<hex>` (see chunkdigest)
    blob_offset: int
    blob_size: int
    blocks: bytes = b""  # block digests (chunkdigest.block_digests); empty: none


@dataclass(frozen=True)
class LayerToc:
    digest: str
    diff_id: str
    media_type: str
    blob_size: int
    stream_size: int
    entries: tuple[TocEntry, ...]
    chunk_size: int = 0
    chunks: tuple[TocChunk, ...] = field(default=())
    block_size: int = 0  # 0: chunks carry no block digests

    @property
    def seekable(self) -> bool:
        """True when any chunk can be fetched and checked on its own."""
        return bool(self.chunks)


@dataclass(frozen=True)
class ModelKitToc:
    layers: tuple[LayerToc, ...]

    def layer(self, digest: str) -> LayerToc | None:
        for layer in self.layers:
            if layer.digest == digest:
                return layer
        return None


def _entry_to_json(e: TocEntry) -> list[Any]:
    return [e.name, e.kind, e.mode, e.size, e.offset, e.mtime]


def _chunk_to_json(c: TocChunk) -> list[Any]:
    return [c.offset, c.size, toc_form(c.digest), c.blob_offset, c.blob_size]


def layer_to_json(layer: LayerToc) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "digest": layer.digest,
        "diffId": layer.diff_id,
        "mediaType": layer.media_type,
        "blobSize": layer.blob_size,
        "streamSize": layer.stream_size,
        "chunkSize": layer.chunk_size,
        "entries": [_entry_to_json(e) for e in layer.entries],
        "chunks": [_chunk_to_json(c) for c in layer.chunks],
    }
    if layer.block_size:  # absent otherwise: tables written before keep their bytes
        doc["blockSize"] = layer.block_size
        doc["blocks"] = [base64.b64encode(c.blocks).decode() for c in layer.chunks]
    return doc


def layer_from_json(obj: Any) -> LayerToc:
    try:
        entries = tuple(
            TocEntry(str(n), _kind(k), int(m), int(s), int(o), int(t))
            for n, k, m, s, o, t in obj["entries"]
        )
        chunks = tuple(
            TocChunk(int(o), int(s), parse_chunk_digest(str(h)), int(bo), int(bs))
            for o, s, h, bo, bs in obj["chunks"]
        )
        block_size = int(obj.get("blockSize", 0))
        if block_size:
            chunks = _with_blocks(chunks, block_size, obj["blocks"])
        return LayerToc(
            digest=str(obj["digest"]),
            diff_id=str(obj["diffId"]),
            media_type=str(obj["mediaType"]),
            blob_size=int(obj["blobSize"]),
            stream_size=int(obj["streamSize"]),
            entries=entries,
            chunk_size=int(obj["chunkSize"]),
            chunks=chunks,
            block_size=block_size,
        )
    except (KeyError, TypeError, ValueError, OverflowError, binascii.Error) as exc:
        raise FormatError(f"malformed kitfs table of contents: {exc!r}") from None


def _with_blocks(chunks: tuple[TocChunk, ...], block_size: int,
                 blocks: Any) -> tuple[TocChunk, ...]:
    if block_size < 0 or not isinstance(blocks, list) or len(blocks) != len(chunks):
        raise ValueError("block digests do not match the chunks")
    out = []
    for c, text in zip(chunks, blocks, strict=True):
        raw = base64.b64decode(str(text), validate=True)
        if len(raw) != -(-c.size // block_size) * BLOCK_DIGEST_SIZE:
            raise ValueError(f"chunk at {c.offset} has {len(raw)} bytes of block digests")
        out.append(replace(c, blocks=raw))
    return tuple(out)


def _kind(value: Any) -> EntryKind:
    if value == "file":
        return "file"
    if value == "dir":
        return "dir"
    raise ValueError(f"unknown entry kind {value!r}")


def dump_toc(toc: ModelKitToc) -> bytes:
    """Serialise deterministically: same layers, same bytes, same digest."""
    doc = {"version": TOC_VERSION, "layers": [layer_to_json(layer) for layer in toc.layers]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def load_toc(data: bytes) -> ModelKitToc:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"kitfs table of contents is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != TOC_VERSION:
        raise FormatError("unsupported kitfs table of contents version")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError("kitfs table of contents has no layer list")
    return ModelKitToc(tuple(layer_from_json(layer) for layer in layers))
