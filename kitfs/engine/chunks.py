"""One chunk's checked bytes: from the memory tier, the disk cache, a flight, or a fetch.

Order of lookups (`Chunks.get`): the in-memory tier, a fetch or load already
in flight for it (single flight, engine/flights.py), the shared disk cache,
and only then a new range request. A reader waiting now fetches just its
chunk; background work (readahead, prefetch, verification) merges the
chunks after it that are on no disk and that nobody fetches into one
request, up to the merge limit, and waits for the disk writes behind it
first, so memory holds a bounded backlog of fetched chunks.

The data flows down and back without engine code in `oci/`: `fetch_run`
hands the client one buffer per chunk and is told as each is filled; the
chunks are then checked in batches in a worker thread of the engine's own
(`_settle`) and handed out. A chunk is handed out only after its check:
decompressed (seekable layers), its size, and its digest where one is known;
a chunk without a digest gets its BLAKE3 recorded so the disk copy can be
checked on its way back (integrity.py binds those to the layer digest).

A chunk without a digest that this engine did not fetch is not read back
from disk (nobody checked it), unless the engine was told that nothing of
such a layer counts before it is verified whole (`reuse_unverified`).

Invariants:
- a (layer, chunk) is fetched by at most one request at a time: a run is
  claimed (its flights started) before its request is made, and every
  claimed flight ends, with the chunk or an error, whatever happens to the
  request: a chunk that arrived is checked in a task `fetch_run` spawns
  (which may end its flight after `fetch_run` returned), one that did not is
  failed by `fetch_run`'s except clauses;
- a chunk file is read by at most one task at a time (`loads`), and a read
  of one never runs on the event loop;
- what `get` returns matched its digest, if it has one, and has its size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Protocol

import trio

from kitfs.cache.fileformat import CacheError, new_frame_buffer
from kitfs.cache.memory import ChunkData
from kitfs.engine.context import Context, foreign
from kitfs.engine.flights import Flight, Flights
from kitfs.engine.geometry import Chunk
from kitfs.engine.layerstate import LayerState
from kitfs.errors import IntegrityError, KitfsError, UnreachableError
from kitfs.modelkit.chunkdigest import chunk_digest
from kitfs.modelkit.chunkdigest import matches as chunk_digest_matches
from kitfs.modelkit.decompress import StreamDecompressor

log = logging.getLogger(__name__)

#: Chunk files read ahead of a reader at once.
DISK_READS_AHEAD = 4


class Verdicts(Protocol):
    """What the chunks tell integrity (engine/integrity.py)."""

    def got(self, layer: LayerState, index: int) -> None:
        """Chunk `index` arrived whole and checked."""

    def failed(self, layer: LayerState, error: KitfsError) -> None:
        """A fetch or a check went wrong."""


def decode(layer: LayerState, chunk: Chunk, raw: bytearray | memoryview) -> ChunkData:
    """Decompress (seekable layers) and check the chunk's digest; runs in a thread."""
    data: ChunkData = raw
    if layer.geo.shape == "seekable":
        d = StreamDecompressor(layer.geo.compression)
        data = d.decompress(bytes(raw), limit=chunk.size)  # a bomb stops here
        d.finish()
    if len(data) != chunk.size:
        raise IntegrityError(
            f"chunk {chunk.index} of layer {layer.info.digest} is {len(data)} bytes, "
            f"expected {chunk.size}")
    if chunk.digest is not None and not chunk_digest_matches(data, chunk.digest):
        algorithm = chunk.digest.partition(":")[0]
        raise IntegrityError(
            f"chunk {chunk.index} of layer {layer.info.digest} does not match its {algorithm}")
    if chunk.digest is None:
        layer.recorded[chunk.index] = chunk_digest(data)
    return data


def checked(layer: LayerState, chunk: Chunk, raw: bytearray | memoryview
            ) -> ChunkData | KitfsError:
    """`decode`, with a bad chunk as a value: it fails that chunk, not its neighbours."""
    try:
        return decode(layer, chunk, raw)
    except KitfsError as exc:
        return exc


class Chunks:
    def __init__(self, ctx: Context, verdicts: Verdicts) -> None:
        self.ctx = ctx
        self.verdicts = verdicts
        self._loads: Flights[tuple[str, int], ChunkData] = Flights()
        self._disk_reads = trio.CapacityLimiter(DISK_READS_AHEAD)

    async def get(self, layer: LayerState, index: int, *, background: bool) -> ChunkData:
        """One chunk's checked bytes, from wherever they are cheapest (not for streamed
        layers: engine/streamed.py reads those)."""
        ctx = self.ctx
        data = ctx.cached(layer, index)
        if data is not None:
            return data
        key = (layer.info.digest, index)
        flight = ctx.flights.get(key)
        if flight is None:
            data = await self.from_disk(layer, index)
            if data is not None:
                return data
            flight = ctx.flights.get(key)
        if flight is None:
            if background:
                # Prefetch and verification merge the chunks after this one that are
                # not on disk. The request slot comes first, the claim after: a worker
                # holding a claimed run while it waited for a slot made a reader that
                # needs one of those chunks wait behind other background fetches.
                async with ctx.background:
                    size = layer.geo.chunk_size
                    absent = await self.absent(layer, range(
                        index, index + max(1, ctx.config.merge_limit // size)))
                    # fetched by someone else while we waited or looked?
                    data = (ctx.cached(layer, index) if index in absent
                            else await self.from_disk(layer, index))
                    if data is not None:
                        return data
                    flight = ctx.flights.get(key)
                    if flight is None:  # nobody claimed it while we waited or looked
                        ctx.counters.misses += 1
                        run = self.claim_run(layer, index, absent)
                        flight = ctx.flights.get(key)
                        await self.fetch_run(layer, run, background=True)
            else:  # a reader waiting now gets just its chunk
                ctx.counters.misses += 1
                run = self.claim_run(layer, index, set())
                flight = ctx.flights.get(key)
                await self.fetch_run(layer, run, background=False)
        assert flight is not None  # claimed above, ended by the fetch (or its failure)
        return await flight.result()

    # -- the disk cache ---------------------------------------------------------------

    async def from_disk(self, layer: LayerState, index: int) -> ChunkData | None:
        """The chunk from the disk cache, else from memory if a fetch delivered it meanwhile.

        One load per chunk at a time: the kernel asks for a chunk's two 1 MiB
        halves at once and a prefetch worker may want it too; each used to read
        the chunk file itself. Those who come while it loads get its answer.
        """
        where = (layer.info.digest, index)
        load = self._loads.get(where)
        if load is not None:
            data = await load.wait()
            return data if data is not None else self.ctx.cached(layer, index)
        self._loads.start(where)
        data = None
        try:
            data = await self._load(layer, index)
            return data
        finally:
            self._loads.land(where, data)

    async def _load(self, layer: LayerState, index: int) -> ChunkData | None:
        """One read of the chunk file (for `from_disk`), kept in memory if good.

        Straight to a thread, no stat first on the event loop: after a dropped
        page cache that stat reads the disk while every FUSE request waits. A
        fetch may start and finish during that lookup (seen under CPU load);
        answering None then made the caller fetch the chunk a second time.
        """
        ctx = self.ctx
        key = ctx.key(layer, index)
        chunk = layer.geo.chunks[index] if layer.geo.chunks else None
        digest = chunk.digest if chunk is not None else None
        if digest is None:
            digest = layer.recorded.get(index)
            if digest is None and not self.reuses(layer):  # never verified: fetched again
                return ctx.cached(layer, index)
        try:
            data = await trio.to_thread.run_sync(ctx.store.get, key, digest)
        except CacheError as exc:
            ctx.note_error(str(exc))
            return ctx.cached(layer, index)
        if data is None:
            return ctx.cached(layer, index)
        if chunk is not None and len(data) != chunk.size:
            log.warning("cached chunk %s has the wrong size: dropped", key)
            await trio.to_thread.run_sync(ctx.store.remove, key)
            return None
        ctx.counters.disk_hits += 1
        ctx.memory.put(key, data)
        self.verdicts.got(layer, index)
        return data

    async def absent(self, layer: LayerState, indexes: Sequence[int]) -> set[int]:
        """Which of these chunks have no file in the disk cache, asked in one thread hop.

        Not on the event loop: after the page cache was dropped each stat may
        read the disk, and the loop serving every FUSE request must not wait.
        A cache that cannot be looked into counts as empty (the chunks are fetched).
        """
        chunks = layer.geo.chunks
        reuse = self.reuses(layer)
        wanted = [i for i in indexes if i < len(chunks)
                  and (reuse or chunks[i].digest is not None or i in layer.recorded)]
        try:
            present = await trio.to_thread.run_sync(
                lambda: [self.ctx.store.contains(chunks[i].key) for i in wanted])
        except CacheError as exc:
            self.ctx.note_error(str(exc))
            return set(wanted)
        absent = {i for i in indexes if i < len(chunks)} - set(wanted)
        return absent | {i for i, here in zip(wanted, present, strict=True) if not here}

    def reuses(self, layer: LayerState) -> bool:
        """Whether this layer's chunks without a digest may be read back from disk though
        nobody recorded one (EngineConfig.reuse_unverified; ranged layers only: a stream
        is read from its start whatever is on disk)."""
        return self.ctx.config.reuse_unverified and layer.geo.shape == "ranged"

    # -- ahead of a reader ------------------------------------------------------------

    def ahead(self, layer: LayerState, indexes: range) -> None:
        """Start bringing chunks not yet here, without waiting for them."""
        if layer.geo.shape == "stream" or self.ctx.nursery is None or not indexes:
            return
        todo = [i for i in indexes
                if i < len(layer.geo.chunks) and not self.ctx.coming(layer, i)]
        if todo:
            self.ctx.spawn(self._ahead, layer, todo, indexes[-1])

    async def _ahead(self, layer: LayerState, todo: list[int], last: int) -> None:
        """Bring chunks `todo` in ahead of their reader: from disk where they are, else fetch."""
        absent = await self.absent(layer, todo)
        for index in todo:
            if self.ctx.coming(layer, index):
                continue  # someone else got to it while we looked
            if index not in absent:
                # On disk: load it into memory ahead of the reader, as a flight others join.
                flight = self.ctx.flights.start((layer.info.digest, index))
                self.ctx.spawn(self._load_ahead, layer, index, flight)
                continue
            self.ctx.spawn(partial(self.fetch_run, background=True), layer,
                           self.claim_run(layer, index, absent, last))

    async def _load_ahead(self, layer: LayerState, index: int, flight: Flight[ChunkData]
                          ) -> None:
        """Bring a disk-cached chunk into memory ahead of its reader (a flight others join)."""
        key = (layer.info.digest, index)
        fetching = False
        try:
            async with self._disk_reads:
                data = await self.from_disk(layer, index)
            if data is None:
                # Vanished or corrupt since contains(): fetch it for those waiting. The
                # flight is the fetch's from here on: it ends it, maybe after returning
                # (its chunks are checked in a task of their own).
                fetching = True
                await self.fetch_run(layer, [layer.geo.chunks[index]], background=True)
                return
            self.ctx.flights.land(key, data)
        finally:
            if not fetching:
                self.ctx.flights.drop(key, flight)
                if not flight.ended:  # cancelled: waiting readers must not hang
                    flight.end(None, UnreachableError("reading a cached chunk was interrupted"))

    # -- fetching ---------------------------------------------------------------------

    def claim_run(self, layer: LayerState, index: int, absent: set[int],
                  last: int | None = None) -> list[Chunk]:
        """Chunk `index` and the chunks after it known to be `absent` from disk, up to the
        merge limit (and `last`, the end of a readahead window), their flights started.

        A reader waiting now passes no `absent`: merging would make it wait for
        bytes it may never read (random tensor access). Which chunks are on
        disk is asked beforehand in a thread (`absent`), never here on the
        event loop. `fetch_run` must follow.
        """
        ctx = self.ctx
        chunks = layer.geo.chunks
        run = [chunks[index]]
        ctx.flights.start((layer.info.digest, index))
        total = chunks[index].blob_size
        nxt = index + 1
        end = len(chunks) if last is None else min(len(chunks), last + 1)
        while (nxt < end and nxt in absent
               and total + chunks[nxt].blob_size <= ctx.config.merge_limit):
            if ctx.coming(layer, nxt):
                break
            ctx.flights.start((layer.info.digest, nxt))
            run.append(chunks[nxt])
            total += chunks[nxt].blob_size
            nxt += 1
        return run

    async def fetch_run(self, layer: LayerState, run: list[Chunk], *, background: bool
                        ) -> None:
        """Fetch consecutive claimed chunks with one range request and settle their flights.

        The response is received straight into one buffer per chunk; the chunks
        each receiving hop completed are checked together in one thread hop and
        handed out while the rest of the range still arrives: a reader waiting
        for the first chunk of a long readahead run does not wait for the whole
        run.

        Background fetches (readahead, prefetch, verification) first wait for the
        disk writes behind them to drain, so memory holds a bounded backlog of
        fetched chunks whatever the model size; a reader waiting now never waits
        for the disk.
        """
        ctx = self.ctx
        digest = layer.info.digest
        buffers: list[memoryview] = []
        pending = {c.index for c in run}
        batch: list[int] = []  # filled, not yet being checked
        settling = False

        def take() -> tuple[list[Chunk], list[memoryview]]:
            """What arrived so far and is not being checked yet."""
            nonlocal batch
            chunks = [run[i] for i in batch]
            raws = [buffers[i] for i in batch]
            pending.difference_update(c.index for c in chunks)
            batch = []
            return chunks, raws

        def filled(i: int) -> None:
            nonlocal settling
            ctx.counters.bytes_fetched += len(buffers[i])
            if ctx.nursery is None:  # not started (tools, tests): checked right here
                pending.discard(run[i].index)
                self.accept(layer, run[i], checked(layer, run[i], buffers[i]))
                return
            batch.append(i)
            if not settling:
                # One check per receiving hop, not per chunk: the client reports every
                # buffer a hop filled in one go, before this task runs.
                settling = True
                ctx.spawn(settle_soon)

        async def settle_soon() -> None:
            # Takes the batch only once it runs: a spawn that fails (the nursery is
            # closing) leaves the chunks in `pending`, which the except clauses fail.
            nonlocal settling
            settling = False
            chunks, raws = take()
            if chunks:
                await self._settle(layer, chunks, raws)

        try:
            if background:  # inside the try: cancelled here, the claimed flights still settle
                await ctx.writes.backpressure()
            async with ctx.slots:
                # Allocated only now: runs queued for a slot must not hold memory. Frame
                # buffers: the disk cache writes them with O_DIRECT, no second copy.
                buffers.extend(new_frame_buffer(c.blob_size) for c in run)
                ctx.counters.in_flight += 1
                ctx.counters.requests += 1
                try:
                    await ctx.source.read_range_into(
                        digest, run[0].blob_offset, buffers, filled,
                        size=layer.info.size)
                finally:
                    ctx.counters.in_flight -= 1
                    if batch:  # what arrived whole is good, whatever happens next
                        self._settle_later(layer, *take())
        except Exception as exc:
            error = foreign(exc, f"fetching layer {digest[:19]}")
            self.verdicts.failed(layer, error)
            for index in pending:
                self.fail(layer, index, error)
        except BaseException:
            err = UnreachableError(f"fetch of layer {digest[:19]} was cancelled")
            for index in pending:
                self.fail(layer, index, err)
            raise

    def _settle_later(self, layer: LayerState, chunks: list[Chunk], raws: list[memoryview]
                      ) -> None:
        """`_settle` in a task of its own; if none can start (the nursery is closing),
        the chunks' flights end at once, so nobody waits on them."""
        try:
            self.ctx.spawn(self._settle, layer, chunks, raws)
        except RuntimeError:
            err = UnreachableError(f"layer {layer.info.digest[:19]}: the mount is stopping")
            for chunk in chunks:
                self.fail(layer, chunk.index, err)

    async def _settle(self, layer: LayerState, chunks: list[Chunk], raws: list[memoryview]
                      ) -> None:
        """Check fetched chunks (one thread hop for the batch), then accept each.

        One hop per batch, not per chunk: hashing small chunks one hop each spent
        more time switching threads than hashing.
        """
        try:
            results = await trio.to_thread.run_sync(
                lambda: [checked(layer, c, r) for c, r in zip(chunks, raws, strict=True)])
        except BaseException:
            err = UnreachableError(f"checking chunks of layer {layer.info.digest[:19]} "
                                   "was cancelled")
            for chunk in chunks:
                self.fail(layer, chunk.index, err)
            raise
        for chunk, result in zip(chunks, results, strict=True):
            self.accept(layer, chunk, result)

    def accept(self, layer: LayerState, chunk: Chunk, result: ChunkData | KitfsError) -> None:
        """Hand out and store a checked chunk, or fail its readers."""
        if isinstance(result, KitfsError):
            self.verdicts.failed(layer, result)
            self.fail(layer, chunk.index, result)
            return
        self.deliver(layer, chunk.index, chunk.key, result)

    def deliver(self, layer: LayerState, index: int, key: str, data: ChunkData) -> None:
        """A checked chunk: into memory, to its waiters, and to the disk cache later."""
        ctx = self.ctx
        where = (layer.info.digest, index)
        ctx.partials.discard(where)  # whole now
        ctx.recent_failures.pop(where, None)
        ctx.memory.put(key, data)
        if layer.geo.chunks:
            self.verdicts.got(layer, index)
        else:  # streamed: verified when the stream ends
            layer.fetched.add(index)
        ctx.flights.land(where, data)
        if ctx.nursery is not None:
            ctx.writes.later(key, data)

    def fail(self, layer: LayerState, index: int, error: KitfsError) -> None:
        self.ctx.flights.abort((layer.info.digest, index), error)
