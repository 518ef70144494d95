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

`Streams` runs such a stream as a reader or verification needs it: one
while readers wait for chunks it has yet to reach, and another from the
start for a chunk a running stream already passed that neither memory nor
disk kept (each counts its chunks from the start). Invariant: a stream that
ends, well or not, ends every flight of its layer still waiting (a chunk
past the end does not exist; a reader it failed that way asks again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from kitfs.engine.chunks import Chunks
from kitfs.engine.context import Context, foreign
from kitfs.engine.layerstate import LayerState
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


class Streams:
    def __init__(self, ctx: Context, chunks: Chunks,
                 verified: Callable[[LayerState, list[str]], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.chunks = chunks
        self.verified = verified

    async def get(self, layer: LayerState, index: int) -> bytes | bytearray | memoryview:
        """Chunk `index` of a streamed layer: from memory, from disk if this engine recorded
        its digest, or once the stream gets there."""
        ctx = self.ctx
        data = ctx.cached(layer, index)
        if data is not None:
            return data
        key = (layer.info.digest, index)
        if key not in ctx.flights:
            data = await self.chunks.from_disk(layer, index)
            if data is not None:
                return data
        flight = ctx.flights.get(key)
        if flight is None:
            ctx.counters.misses += 1
            flight = ctx.flights.start(key)
            self.start(layer, index)
        return await flight.result()

    def start(self, layer: LayerState, index: int = 0) -> None:
        """Stream the layer from its start unless a running stream will reach chunk `index`."""
        if layer.stream_running and index >= layer.stream_next:
            return
        layer.stream_running = True
        self.ctx.spawn(self._stream, layer)

    async def _stream(self, layer: LayerState) -> None:
        """Read a gzip/zstd layer from its start, its chunks handed out as they decompress."""
        ctx = self.ctx
        digest = layer.info.digest
        hashes: dict[int, str] = {}  # chunk index -> BLAKE3, in the order they came

        def emit(data: bytes, blake3: str) -> None:
            index = len(hashes)  # a stream started again counts from its start
            hashes[index] = layer.recorded[index] = blake3
            layer.stream_next = index + 1
            self.chunks.deliver(layer, index, layer.geo.position_key(index), data)

        def received(n: int) -> None:
            ctx.counters.bytes_fetched += n

        try:
            async with ctx.slots:
                ctx.counters.in_flight += 1
                ctx.counters.requests += 1
                try:
                    count = await cut_chunks(ctx.source, layer.info, layer.geo.chunk_size,
                                             emit, ctx.writes.backpressure, received)
                finally:
                    ctx.counters.in_flight -= 1
            layer.stream_chunks = count
            layer.stream_digests = hashes
            # stream_blob checked the blob digest at its end: the layer is verified.
            await self.verified(layer, [hashes[i] for i in range(count)])
        except Exception as exc:
            error = foreign(exc, f"streaming layer {digest[:19]}")
            if not isinstance(error, IntegrityError):
                layer.postponed(error)  # what was served is checked by a later stream
            self.chunks.verdicts.failed(layer, error)
            for (d, i) in ctx.flights.pending():
                if d == digest:
                    self.chunks.fail(layer, i, error)
        finally:
            layer.stream_running = False
        # Readers waiting for chunks past the end of the stream get nothing more.
        for (d, i) in ctx.flights.pending():
            if d == digest:
                self.chunks.fail(layer, i, IntegrityError(f"layer {digest} has no chunk {i}"))
