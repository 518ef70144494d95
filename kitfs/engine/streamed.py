"""Layers `kit` compressed (one gzip/zstd stream): no random access, so read once from the start.

`cut_chunks` decompresses a layer's blob as it streams in and hands out its
chunks in order, each with its BLAKE3, while readers wait for theirs. The
decompression runs in a worker thread and holds at most about a chunk of
output plus STREAM_HANDOFF bytes of finished chunks (plus one decompressed
piece, at most 1 MiB): those are handed to
the event loop from inside that thread (`trio.from_thread`), so a layer that
expands 30000-fold (zeros) is cut as it comes instead of piling up.

The blob's digest is checked by the source when the stream ends: only
then are the chunks handed out known to be the layer's. A stream that does
not decompress is a lie (the digest-pinned bytes `kit unpack` reads do), and
raises IntegrityError; anything else that ends it early is left to the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from kitfs.errors import FormatError, IntegrityError
from kitfs.modelkit.chunkdigest import chunk_digest
from kitfs.modelkit.decompress import StreamDecompressor
from kitfs.modelkit.manifest import LayerInfo
from kitfs.oci.source import BlobSource

#: Finished chunks waiting for the event loop at most this many bytes.
STREAM_HANDOFF = 8 << 20


async def cut_chunks(source: BlobSource, info: LayerInfo, chunk_size: int,
                     emit: Callable[[bytes, str], None],
                     between: Callable[[], Awaitable[None]],
                     received: Callable[[int], None]) -> int:
    """Stream the layer, `emit(chunk, blake3)` each chunk in order; the number of chunks.

    `between` runs on the event loop after each handover (write-back pressure);
    `received(n)` counts the blob's bytes as they arrive.
    """
    decomp = StreamDecompressor(info.compression)
    buf = bytearray()
    ready: list[tuple[bytes, str]] = []
    count = 0

    async def hand_over() -> None:
        nonlocal count
        while ready:
            emit(*ready.pop(0))
            count += 1
        await between()

    def sink(out: bytes) -> None:  # in the decompressing thread
        buf.extend(out)
        while len(buf) >= chunk_size:
            data = bytes(buf[:chunk_size])
            del buf[:chunk_size]
            ready.append((data, chunk_digest(data)))
        if len(ready) * chunk_size >= STREAM_HANDOFF:
            trio.from_thread.run(hand_over)

    try:
        async with source.stream_blob(info.digest, size=info.size) as pieces:
            async for piece in pieces:
                received(len(piece))
                await trio.to_thread.run_sync(decomp.decompress_to, piece, sink)
                await hand_over()
        decomp.finish()
    except FormatError as exc:
        raise IntegrityError(f"layer {info.digest} is not what its digest names: {exc}") from None
    if buf or count == 0:
        emit(bytes(buf), chunk_digest(buf))
        count += 1
    return count
