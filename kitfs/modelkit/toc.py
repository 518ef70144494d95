"""Tables of contents: where every file of a layer lives, and how to verify it chunk by chunk.

A table of contents lets a mount answer `ls` and map "file F, offset O" to a
byte range of a layer blob without reading the layer. `kitfs pack` writes one
for every layer (with per-chunk digests, and compressed offsets for seekable
gzip/zstd layers); for layers `kit` wrote, the same structure is built by
walking tar headers, without chunk digests.

The serialised form is compact JSON with sorted keys so that the same layers
always give the same blob digest (the digest is pinned in the manifest).
Pinned means authentic, not honest: `layer_from_json` checks only the shape
of what it reads, `validate_layer_toc` whatever can be judged without reading
the layer, and the rest (entries against tar headers, chunks against their
digests) is checked by the engine as it reads.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn

from kitfs.errors import FormatError
from kitfs.modelkit.chunkdigest import BLOCK_DIGEST_SIZE, parse_chunk_digest, toc_form
from kitfs.modelkit.mediatypes import parse_layer_media_type

TOC_MEDIA_TYPE = "application/vnd.kitfs.toc.v1+json"
TOC_ARTIFACT_TYPE = "application/vnd.kitfs.toc.v1"
TOC_ANNOTATION = "dev.kitfs.toc.digest"
TOC_VERSION = 1
DEFAULT_CHUNK_SIZE = 2 * 1024 * 1024
#: What `kitfs pack` cuts an uncompressed layer's chunks into for block digests
#: (see chunkdigest): a random reader fetches whole blocks, not whole chunks.
DEFAULT_BLOCK_SIZE = 256 * 1024
#: The largest chunk a table of contents may ask a mount to fetch and hold whole.
MAX_CHUNK_SIZE = 1 << 30
#: A block digest covers at least one tar block.
MIN_BLOCK_SIZE = 512
#: Tar's unit: every entry's data starts after a 512-byte header, on a block boundary.
TAR_BLOCK = 512

_INT64 = 1 << 63
_DIGEST = re.compile(r"[a-z0-9]+:[0-9a-f]{32,128}")

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
    """One layer of a table of contents, as `layer_to_json` writes it.

    Only the shape is checked here (every field present, of its JSON type,
    integers within int64); whether the values make sense for the layer is
    `validate_layer_toc`'s job. Anything else raises FormatError, never a
    Python error, whatever the JSON holds.
    """
    digest = "?"
    try:
        if not isinstance(obj, dict):
            raise ValueError("a layer is not a JSON object")
        digest = _str(obj.get("digest"), "digest")
        entries = tuple(_entry(e, i) for i, e in enumerate(_list(obj.get("entries"), "entries")))
        chunks = tuple(_chunk(c, i) for i, c in enumerate(_list(obj.get("chunks"), "chunks")))
        block_size = _int(obj.get("blockSize", 0), "blockSize")
        if block_size:
            chunks = _with_blocks(chunks, block_size, obj.get("blocks"))
        return LayerToc(
            digest=digest,
            diff_id=_str(obj.get("diffId"), "diffId"),
            media_type=_str(obj.get("mediaType"), "mediaType"),
            blob_size=_int(obj.get("blobSize"), "blobSize"),
            stream_size=_int(obj.get("streamSize"), "streamSize"),
            entries=entries,
            chunk_size=_int(obj.get("chunkSize"), "chunkSize"),
            chunks=chunks,
            block_size=block_size,
        )
    except ValueError as exc:  # binascii.Error is one
        raise FormatError(
            f"malformed kitfs table of contents (layer {_label(digest)}): {exc}") from None


def _entry(value: Any, i: int) -> TocEntry:
    n, k, m, s, o, t = _list(value, f"entry {i}", 6)
    return TocEntry(_str(n, f"entry {i} name"), _kind(k), _int(m, f"entry {i} mode"),
                    _int(s, f"entry {i} size"), _int(o, f"entry {i} offset"),
                    _int(t, f"entry {i} mtime"))


def _chunk(value: Any, i: int) -> TocChunk:
    o, s, h, bo, bs = _list(value, f"chunk {i}", 5)
    return TocChunk(_int(o, f"chunk {i} offset"), _int(s, f"chunk {i} size"),
                    parse_chunk_digest(_str(h, f"chunk {i} digest")),
                    _int(bo, f"chunk {i} blob offset"), _int(bs, f"chunk {i} blob size"))


def _int(value: Any, what: str) -> int:
    if type(value) is not int:  # not bool, not float: JSON numbers kitfs writes are integers
        raise ValueError(f"{what} is not an integer")
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"{what} is out of range")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


def _list(value: Any, what: str, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is not a list")
    if length is not None and len(value) != length:
        raise ValueError(f"{what} has {len(value)} fields, not {length}")
    return value


def _with_blocks(chunks: tuple[TocChunk, ...], block_size: int,
                 blocks: Any) -> tuple[TocChunk, ...]:
    if block_size < 0 or not isinstance(blocks, list) or len(blocks) != len(chunks):
        raise ValueError("block digests do not match the chunks")
    out = []
    for c, text in zip(chunks, blocks, strict=True):
        raw = base64.b64decode(_str(text, f"block digests of chunk at {c.offset}"),
                               validate=True)
        if c.size < 0 or len(raw) != -(-c.size // block_size) * BLOCK_DIGEST_SIZE:
            raise ValueError(f"chunk at {c.offset} has {len(raw)} bytes of block digests")
        out.append(replace(c, blocks=raw))
    return tuple(out)


def _kind(value: Any) -> EntryKind:
    if value == "file":
        return "file"
    if value == "dir":
        return "dir"
    raise ValueError(f"unknown entry kind {_shown(value)}")


def dump_toc(toc: ModelKitToc) -> bytes:
    """Serialise deterministically: same layers, same bytes, same digest."""
    doc = {"version": TOC_VERSION, "layers": [layer_to_json(layer) for layer in toc.layers]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def load_toc(data: bytes) -> ModelKitToc:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: also ints of 4300+ digits
        raise FormatError(f"kitfs table of contents is not JSON: {exc}") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if type(version) is not int or version != TOC_VERSION:
        raise FormatError("unsupported kitfs table of contents version")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError("kitfs table of contents has no layer list")
    return ModelKitToc(tuple(layer_from_json(layer) for layer in layers))


# --- validation -----------------------------------------------------------------------
#
# The table of contents is authentic (its digest is pinned in the manifest) but
# its author may lie. What can be judged without reading the layer is judged
# here, once, so that the engine can trust the arithmetic: chunks tile the
# stream, entries sit inside it in tar order, names stay inside the mount.
# Whether the entries match the tar headers, and the chunks the bytes, takes
# reading the layer (the engine's job).


def validate_layer_toc(toc: LayerToc, blob_size: int, compressed: bool) -> None:
    """Refuse a layer's table of contents that cannot describe this layer.

    `blob_size` is the size the manifest gives the layer and `compressed`
    whether its media type says gzip or zstd (both from the manifest, which
    is trusted). Raises FormatError with one line naming the layer and the
    first thing wrong:

    - the media type is not a tar layer of this compression; `blobSize` is
      not the manifest's; an uncompressed layer's diff id is not its digest;
    - chunks: `chunkSize` in 1..MAX_CHUNK_SIZE; chunk i at i * chunkSize,
      every chunk full but the last (1..chunkSize bytes), together exactly
      [0, streamSize); their blob ranges in order, not overlapping, inside
      the blob; uncompressed: blob range == stream range and streamSize ==
      blobSize; block digests only with chunks, `blockSize` a power of two
      in MIN_BLOCK_SIZE..chunkSize dividing it, one digest per block;
    - entries (a table with chunks has some): clean relative names (no `.`,
      `..` or empty components, no NUL), no name twice, kinds file/dir,
      mode in 0..0o7777, size >= 0 (0 for directories); data offsets on a
      block boundary after a header (>= 512), in increasing order, each
      entry's data and padding ending before the next entry's header, and
      inside the stream; no entry below a file (a missing parent directory
      is fine: `kit` layers need not hold every ancestor).

    A table without chunks may give streamSize -1 (unknown, as kitfs records
    tables it walked): entries of an uncompressed layer are then bounded by
    the blob, those of a compressed one only by their order.
    """
    where = f"table of contents of layer {_label(toc.digest)}"

    def fail(what: str) -> NoReturn:
        raise FormatError(f"{where}: {what}")

    if blob_size < 0 or toc.blob_size != blob_size:
        fail(f"blob size {toc.blob_size} is not the manifest's {blob_size}")
    try:
        layer_type = parse_layer_media_type(toc.media_type)
    except FormatError:
        layer_type = None
    if layer_type is None or layer_type.fmt != "tar":
        fail(f"media type {_shown(toc.media_type)} is not a tar layer")
    elif (layer_type.compression != "none") != compressed:
        fail(f"media type {_shown(toc.media_type)} disagrees with the manifest on compression")
    if not compressed and toc.diff_id not in ("", toc.digest):
        fail(f"diff id {_label(toc.diff_id)} of an uncompressed layer is not its digest")
    stream_end = _check_chunks(toc, blob_size, compressed, fail)
    _check_entries(toc, stream_end, fail)


def _check_chunks(toc: LayerToc, blob_size: int, compressed: bool,
                  fail: Callable[[str], NoReturn]) -> int | None:
    """Check the chunk table; return where entries must end (None: not known)."""
    chunks, size, stream = toc.chunks, toc.chunk_size, toc.stream_size
    if not chunks:
        if stream < -1:
            fail(f"stream size {stream} is negative")
        if not 0 <= size <= MAX_CHUNK_SIZE:
            fail(f"chunk size {size} is out of range")
        if toc.block_size:
            fail("block digests without chunks")
        if stream == -1:
            return None if compressed else blob_size
        if not compressed and stream != blob_size:
            fail(f"stream size {stream} of an uncompressed layer is not its blob size {blob_size}")
        return stream
    if not 0 < size <= MAX_CHUNK_SIZE:
        fail(f"chunk size {size} is out of range (1..{MAX_CHUNK_SIZE})")
    if not toc.entries:
        fail("chunks but no entries")
    bs = toc.block_size
    if bs and not (MIN_BLOCK_SIZE <= bs <= size and bs & (bs - 1) == 0 and size % bs == 0):
        fail(f"block size {bs} is not a power of two from {MIN_BLOCK_SIZE} dividing "
             f"chunk size {size}")
    last = len(chunks) - 1
    blob_end = 0
    for i, c in enumerate(chunks):
        if c.offset != i * size:
            fail(f"chunk {i} starts at {c.offset}, not {i * size}")
        if not (0 < c.size <= size and (c.size == size or i == last)):
            fail(f"chunk {i} has {c.size} bytes"
                 + ("" if i == last else f", not the chunk size {size}"))
        if c.blob_size <= 0:
            fail(f"chunk {i} has {c.blob_size} bytes in the blob")
        if compressed and c.blob_size > c.size + c.size // 64 + 4096:
            # More than gzip or zstd ever write for it (headers included): a fetch of it
            # would be a buffer the size of the blob range for a chunk of `size` bytes.
            fail(f"chunk {i} takes {c.blob_size} bytes of the blob for {c.size} bytes")
        if c.blob_offset != blob_end:
            # Back to back from the blob's start to its end: bytes of the blob no chunk
            # covers would be decompressed by `kit unpack` and never seen by a mount (a
            # benign tar in front, another behind, each side showing other files).
            fail(f"chunk {i} starts at {c.blob_offset} in the blob, not where the chunk "
                 f"before it ends ({blob_end})")
        if c.blob_offset + c.blob_size > blob_size:
            fail(f"chunk {i} ({c.blob_offset}+{c.blob_size}) runs past the end of the blob "
                 f"({blob_size})")
        if not compressed and (c.blob_offset != c.offset or c.blob_size != c.size):
            fail(f"chunk {i} of an uncompressed layer is at {c.blob_offset}+{c.blob_size} "
                 f"in the blob, not {c.offset}+{c.size}")
        _check_digest(c, i, bs, fail)
        blob_end = c.blob_offset + c.blob_size
    if blob_end != blob_size:
        fail(f"chunks end at {blob_end} in the blob, not at its end ({blob_size})")
    end = last * size + chunks[last].size
    if stream != end:
        fail(f"chunks cover {end} bytes of the stream, not the stream size {stream}")
    if not compressed and stream != blob_size:
        fail(f"stream size {stream} of an uncompressed layer is not its blob size {blob_size}")
    return stream


def _check_digest(c: TocChunk, i: int, block_size: int, fail: Callable[[str], NoReturn]) -> None:
    try:
        ok = parse_chunk_digest(c.digest) == c.digest  # in memory always `<algorithm>:<hex>`
    except FormatError:
        ok = False
    if not ok:
        fail(f"chunk {i} has an invalid digest {_shown(c.digest)}")
    want = -(-c.size // block_size) * BLOCK_DIGEST_SIZE if block_size else 0
    if len(c.blocks) != want:
        fail(f"chunk {i} has {len(c.blocks)} bytes of block digests, not {want}")


def _check_entries(toc: LayerToc, stream_end: int | None, fail: Callable[[str], NoReturn]) -> None:
    kinds: dict[str, str] = {}
    prev: TocEntry | None = None
    for e in toc.entries:
        shown = _shown(e.name)
        if not _clean(e.name):
            fail(f"entry name {shown} is not a clean relative path")
        if e.name in kinds:
            fail(f"entry {shown} is listed twice")
        if e.kind not in ("file", "dir"):
            fail(f"entry {shown} has kind {_shown(e.kind)}")
        kinds[e.name] = e.kind
        if not 0 <= e.mode <= 0o7777:
            fail(f"entry {shown} has mode {e.mode:#o}, outside 0..0o7777")
        if e.size < 0 or (e.kind == "dir" and e.size):
            fail(f"entry {shown} has size {e.size}")
        if e.offset < TAR_BLOCK or e.offset % TAR_BLOCK:
            fail(f"entry {shown} has data offset {e.offset}: not after a tar header "
                 "on a block boundary")
        if stream_end is not None and e.offset + e.size > stream_end:
            fail(f"entry {shown} ({e.offset}+{e.size}) runs past the end of the stream "
                 f"({stream_end})")
        if prev is not None and prev.offset + _padded(prev.size) > e.offset - TAR_BLOCK:
            fail(f"entry {shown} at {e.offset} overlaps {_shown(prev.name)} "
                 f"({prev.offset}+{prev.size}) or its own header")
        prev = e
    for name in kinds:
        cut = name.rfind("/")
        while cut > 0:
            parent = name[:cut]
            if kinds.get(parent) == "file":
                fail(f"entry {_shown(name)} is inside {_shown(parent)}, which is a file")
            cut = name.rfind("/", 0, cut)


def _clean(name: str) -> bool:
    return bool(name) and "\x00" not in name and all(
        part not in ("", ".", "..") for part in name.split("/"))


def _padded(n: int) -> int:
    return n + (-n % TAR_BLOCK)


def _shown(value: object) -> str:
    """A value from the table of contents, quoted, escaped and cut for a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _label(digest: str) -> str:
    return digest if _DIGEST.fullmatch(digest) else _shown(digest)
