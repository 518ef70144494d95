"""How a layer's uncompressed stream is cut into chunks, and where each chunk's bytes are.

Three shapes, decided once per layer when the mount starts:

- `ranged`: uncompressed tar or raw layers; chunk i is bytes
  [i*C, (i+1)*C) of the blob itself, fetched with one range request.
- `seekable`: kitfs-packed gzip/zstd layers; the table of contents says
  where each chunk's independent member or frame sits in the blob.
- `stream`: gzip/zstd layers `kit` wrote; no random access, so the layer is
  streamed once from its start and cut into chunks as it decompresses.

A chunk carries its digest when a table of contents (or an earlier,
verified mount) gives one. Its cache key is that digest, scoped by the layer
where the digest is a table of contents' claim (see cache.keys), so every
ModelKit holding the layer shares its cached chunks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from kitfs.cache.keys import chunk_key_for_digest, chunk_key_for_position, chunk_key_in_layer
from kitfs.errors import FormatError
from kitfs.modelkit.manifest import LayerInfo
from kitfs.modelkit.toc import LayerToc, TocChunk

Shape = Literal["ranged", "seekable", "stream"]
_DIGEST = re.compile(r"(?:sha256|blake3):[0-9a-f]{64}")


@dataclass(frozen=True)
class Chunk:
    index: int
    offset: int  # in the uncompressed stream
    size: int
    blob_offset: int
    blob_size: int
    digest: str | None  # `<algorithm>:<hex>`; None: only the whole layer's digest checks it
    key: str
    blocks: bytes = b""  # block digests (chunkdigest.block_digests); empty: fetched whole


@dataclass(frozen=True)
class LayerGeometry:
    digest: str
    shape: Shape
    compression: str
    chunk_size: int
    stream_size: int | None  # None until a streamed layer has been read to its end
    chunks: tuple[Chunk, ...]  # empty for `stream` layers: their chunks are found as they come
    block_size: int = 0  # > 0 only for a `ranged` layer whose chunks can be fetched in part

    @cached_property  # asked for every chunk a mount accepts: O(chunks) each time was O(n^2)
    def verified_by_chunk(self) -> bool:
        """True when every chunk can be checked on its own as it arrives."""
        return bool(self.chunks) and all(c.digest is not None for c in self.chunks)

    def chunk_index(self, stream_offset: int) -> int:
        return stream_offset // self.chunk_size

    def position_key(self, index: int) -> str:
        return chunk_key_for_position(self.digest, self.chunk_size, index)


def _from_toc_chunks(layer: LayerInfo, toc_chunks: tuple[TocChunk, ...], chunk_size: int,
                     shape: Shape, stream_size: int, block_size: int) -> LayerGeometry:
    chunks = []
    for i, c in enumerate(toc_chunks):
        if c.offset != i * chunk_size:
            raise FormatError(f"table of contents of {layer.digest}: chunk {i} is misplaced")
        chunks.append(Chunk(i, c.offset, c.size, c.blob_offset, c.blob_size, c.digest,
                            chunk_key_in_layer(layer.digest, c.digest), c.blocks))
    if shape != "ranged" or not all(c.blocks for c in chunks):
        block_size = 0
    return LayerGeometry(layer.digest, shape, layer.compression, chunk_size, stream_size,
                         tuple(chunks), block_size)


#: No layer is planned past this: its chunk table alone would fill memory (a manifest
#: may claim any size; 4 TiB is 2M chunks of 2 MiB).
MAX_LAYER_SIZE = 4 << 40


def plan_layer(layer: LayerInfo, toc: LayerToc | None, chunk_size: int,
               verified: bytes | None = None) -> LayerGeometry:
    """The geometry of one layer, from the best information there is.

    `verified` is the record an earlier mount wrote after checking the whole
    layer against its digest: per-chunk digests for the same chunk size.
    """
    if layer.size > MAX_LAYER_SIZE:
        raise FormatError(f"layer {layer.digest} claims {layer.size} bytes, more than kitfs "
                          f"mounts ({MAX_LAYER_SIZE})")
    if toc is not None and toc.chunks:
        shape: Shape = "ranged" if layer.compression == "none" else "seekable"
        return _from_toc_chunks(layer, toc.chunks, toc.chunk_size, shape, toc.stream_size,
                                toc.block_size)
    if layer.compression != "none":
        return LayerGeometry(layer.digest, "stream", layer.compression, chunk_size, None, ())
    digests = parse_verified(verified, chunk_size, layer.size) if verified is not None else None
    count = (layer.size + chunk_size - 1) // chunk_size
    if digests is not None and len(digests) != count:
        digests = None
    chunks = []
    for i in range(count):
        offset = i * chunk_size
        size = min(chunk_size, layer.size - offset)
        known = digests[i] if digests is not None else None
        key = chunk_key_for_digest(known) if known else chunk_key_for_position(
            layer.digest, chunk_size, i)
        chunks.append(Chunk(i, offset, size, offset, size, known, key))
    return LayerGeometry(layer.digest, "ranged", "none", chunk_size, layer.size, tuple(chunks))


def verified_record(chunk_size: int, blob_size: int, digests: list[str]) -> bytes:
    """The record of a layer verified end to end: its chunks' digests (`<algorithm>:<hex>`).

    For a layer without chunk digests of its own these are the BLAKE3 this
    node computed (5.7 GB/s per core here, sha256 1.4: later mounts check every
    chunk they read against them); for a kitfs table of contents, its own
    chunk digests, now known to make up the layer. The blob size is the
    manifest's: a manifest that claims another size for the same digest
    does not get to use (or purge) this record.
    """
    return json.dumps({"chunkSize": chunk_size, "blobSize": blob_size, "chunks": digests},
                      separators=(",", ":")).encode()


def parse_verified(data: bytes, chunk_size: int, blob_size: int) -> list[str] | None:
    """The per-chunk digests of a verified record for this chunk and blob size, or None.

    Records older kitfs wrote (no blob size) are not used: the layer is verified again.
    """
    try:
        doc = json.loads(data)
        if doc.get("chunkSize") != chunk_size or doc.get("blobSize") != blob_size:
            return None
        digests = doc.get("chunks")
        if isinstance(digests, list) and all(
                isinstance(d, str) and _DIGEST.fullmatch(d) for d in digests):
            return digests
    except (ValueError, AttributeError, TypeError):
        pass
    return None
