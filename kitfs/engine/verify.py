"""Checks that bind what a mount serves to the layer digest, as functions of what they read.

Each takes the reads it needs as callables and touches no engine state, so
what decides "this layer is what its digest names" sits in one place:

- `walk_layout`: the tar's own headers, read over checked chunks, against
  the entries the layer was listed with (a kitfs table of contents, or
  headers read by range from an unchecked registry);
- `hash_ranged`: an uncompressed layer hashed in order against its digest,
  its headers walked over exactly the hashed bytes, and the per-chunk
  digests a verified record keeps;
- `hash_seekable`: a kitfs-packed gzip/zstd blob streamed (the client checks
  its digest at the end) and cut where the table of contents says, each
  chunk checked as if it had been fetched alone.

Each returns what is wrong (one line, for the poisoned layer's reason) or None.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from kitfs.cache.memory import ChunkData
from kitfs.engine.geometry import Chunk
from kitfs.errors import FormatError, KitfsError
from kitfs.inspection import LayerLayout, layout_mismatch
from kitfs.modelkit.chunkdigest import chunk_digest
from kitfs.modelkit.manifest import LayerInfo
from kitfs.modelkit.tarindex import SequentialWalk, TarWalker
from kitfs.oci.source import BlobSource

ReadRange = Callable[[int, int], Awaitable[bytes | memoryview]]
#: A whole-layer hash takes this much to a worker thread at a time.
HASH_BATCH = 8 << 20


async def walk_layout(layout: LayerLayout, size: int, read: ReadRange) -> str | None:
    """Whether `layout` is what the tar's headers say, reading them with `read` (which
    must check what it returns). Only headers are read: a block or chunk per big
    file, one window per run of small ones."""
    walker = TarWalker(size)
    try:
        while (request := walker.next_request()) is not None:
            offset, length = request
            data = await read(offset, length) if length else b""
            walker.feed(offset, bytes(data))
    except FormatError as exc:  # checked bytes that are no tar kit could unpack
        return f"its tar is malformed: {exc}"
    problem = layout_mismatch(layout.entries, tuple(walker.entries))
    if problem is None:
        return None
    what = "table of contents" if layout.origin == "toc" else "tar headers read when it was listed"
    return f"its {what} {problem}"


async def hash_ranged(info: LayerInfo, chunks: Sequence[Chunk], layout: LayerLayout | None,
                      recorded: Callable[[int], Awaitable[ChunkData]],
                      known: Mapping[int, str] | None = None,
                      progress: Callable[[int], None] | None = None,
                      ) -> tuple[str | None, list[str]]:
    """(what is wrong or None, each chunk's digest) for an uncompressed layer whose chunk i
    `recorded(i)` returns, in order. A chunk's digest is its table of contents' where it
    has one, else its BLAKE3 (what a verified record keeps): taken from `known` where
    the chunk's bytes were hashed as they arrived (the whole-layer hash then binds it).
    `progress(n)` is told the bytes hashed so far, batch by batch."""
    whole = hashlib.sha256()
    own = [c.digest for c in chunks]
    digests: list[str] = []
    walked = layout is not None and layout.origin == "walked"
    walk = SequentialWalk(info.size) if walked else None
    known = known or {}

    def update(data: ChunkData, index: int) -> None:
        whole.update(data)
        digests.append(own[index] or known.get(index) or chunk_digest(data))
        if walk is not None and not walk.done:
            walk.feed(data)

    def update_all(batch: list[tuple[ChunkData, int]]) -> None:
        for data, index in batch:
            update(data, index)

    # The chunks are fetched (or read back) while the ones before them are hashed: a
    # hash that waited for each chunk, then for a thread to hash it, fell behind its
    # readers on a busy machine, and then read every chunk back from disk.
    send, receive = trio.open_memory_channel[list[tuple[ChunkData, int]]](1)

    async def hasher() -> None:
        done = 0
        async with receive:
            async for batch in receive:
                await trio.to_thread.run_sync(update_all, batch)
                done += sum(len(data) for data, _ in batch)
                if progress is not None:
                    progress(done)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hasher)
        async with send:
            batch: list[tuple[ChunkData, int]] = []
            held = 0
            for chunk in chunks:
                data = await recorded(chunk.index)
                batch.append((data, chunk.index))
                held += len(data)
                if held >= HASH_BATCH:
                    await send.send(batch)
                    batch, held = [], 0
            if batch:
                await send.send(batch)
    if "sha256:" + whole.hexdigest() != info.digest:
        what = "bytes" if any(d is None for d in own) else (
            "table of contents' chunks (each matched its own digest)")
        return f"the layer's {what} do not match its digest", digests
    if walk is not None and layout is not None:
        try:
            walk.finish()
            problem = layout_mismatch(layout.entries, tuple(walk.entries))
        except (FormatError, ValueError) as exc:
            problem = f"are not a tar kit could unpack ({exc})"
        if problem is not None:
            return f"its tar headers read when it was listed {problem}", digests
    return None, digests


async def hash_seekable(info: LayerInfo, chunks: Sequence[Chunk], source: BlobSource,
                        check: Callable[[Chunk, bytearray], ChunkData | KitfsError],
                        ) -> str | None:
    """What is wrong with a kitfs-packed gzip/zstd layer, or None. `check` decompresses
    and checks one chunk (in a worker thread)."""
    i = 0
    held = bytearray()
    async with source.stream_blob(info.digest, size=info.size) as pieces:
        async for piece in pieces:
            held += piece
            while i < len(chunks) and len(held) >= chunks[i].blob_size:
                raw = bytearray(held[: chunks[i].blob_size])
                del held[: chunks[i].blob_size]
                result = await trio.to_thread.run_sync(check, chunks[i], raw)
                if isinstance(result, KitfsError):
                    return str(result)
                i += 1
    if i != len(chunks) or held:
        return "the table of contents' chunks do not make up the layer's blob"
    return None
