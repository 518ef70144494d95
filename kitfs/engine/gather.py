"""A random reader's part of a chunk: only the blocks it needs, checked as they arrive.

For layers whose chunks carry block digests (`kitfs pack` writes one per
256 KiB) and that no prefetch brings whole. A reader waiting for part of a
chunk that no readahead will bring whole fetches just the blocks its read
falls in: a random reader's tensor costs its own bytes plus the blocks its
ends fall in, not the chunks. The blocks gather in a Partial
(engine/blocks.py, which holds the invariants); once all are there the chunk
is checked whole and becomes an ordinary chunk (`Chunks.accept`).

Claims are made before any request goes out and always released when their
fetch ends (`fetch_claim`), so a block is fetched by one request at a time
and nobody waits on a block nobody fetches. A lie fails just its block: the
read of it raises once, the next fetches it again.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from kitfs.cache.memory import ChunkData
from kitfs.engine.blocks import Claim, Partial, blocks_of
from kitfs.engine.chunks import Chunks, checked
from kitfs.engine.context import Context, foreign
from kitfs.engine.layerstate import LayerState
from kitfs.errors import IntegrityError, KitfsError
from kitfs.modelkit.chunkdigest import block_matches


def _bad_block(layer: LayerState, index: int, block: int) -> str:
    return (f"block {block} of chunk {index} of layer {layer.info.digest} "
            "does not match its digest")


class Gatherer:
    def __init__(self, ctx: Context, chunks: Chunks) -> None:
        self.ctx = ctx
        self.chunks = chunks

    async def part(self, layer: LayerState, index: int, lo: int, hi: int) -> memoryview:
        """Bytes [lo, hi) of a chunk, fetching only the blocks they fall in if it is nowhere.

        A readahead run still fetches whole chunks: its flight is joined.
        """
        ctx = self.ctx
        key = (layer.info.digest, index)
        blocks = blocks_of(layer.geo.block_size, lo, hi)
        while True:
            layer.check()
            data = ctx.cached(layer, index)
            if data is None and key not in ctx.flights:
                gathered = ctx.partials.used(key)
                if gathered is not None and gathered.bad:
                    for b in blocks:
                        if b in gathered.bad:
                            raise gathered.bad.pop(b)  # the next read fetches it again
                if gathered is not None and gathered.has(blocks):
                    return memoryview(gathered.buffer)[lo:hi]
                if gathered is None:  # a partial means the disk had no copy when it began
                    data = await self.chunks.from_disk(layer, index)
            if data is None and key in ctx.flights:
                data = await self.chunks.get(layer, index, background=False)
            if data is None:
                # All its blocks here: the chunk, checked whole (served from it even where
                # neither memory nor disk keeps it). None: look again.
                data = await self._gather(layer, index, lo, hi)
            if data is not None:
                return memoryview(data)[lo:hi]

    async def _gather(self, layer: LayerState, index: int, lo: int, hi: int
                      ) -> ChunkData | None:
        """Fetch the blocks of [lo, hi) nobody is fetching, wait for those others are.

        Returns once each block arrived or its fetch ended: the whole chunk if
        this completed it, else None and the caller looks again.
        """
        ctx = self.ctx
        key = (layer.info.digest, index)
        gathered = ctx.partials.get(key) or ctx.partials.new(key, ctx.chunk_bytes(layer, index))
        blocks = blocks_of(layer.geo.block_size, lo, hi)
        theirs = {gathered.flights[b] for b in blocks if b in gathered.flights}
        claim = Claim()
        claim.add(index, gathered, blocks)
        if claim.wanted:
            ctx.counters.misses += 1
            await self.fetch_claim(layer, claim)
        for event in theirs:
            await event.wait()
        if gathered.whole(layer.geo.block_size):
            return await self._complete(layer, index, gathered)
        return None

    async def claim(self, layer: LayerState, start: int, end: int) -> Claim | None:
        """Claim the blocks of bytes [start, end) of a layer that nobody has or fetches.

        Chunks in memory, on disk or being fetched whole are left alone. The
        claimed blocks are in flight from here on: `fetch_claim` must follow
        at once, and it ends every flight whatever happens.
        """
        ctx = self.ctx
        digest = layer.info.digest
        size = layer.geo.chunk_size
        chunks = layer.geo.chunks
        todo = [i for i in range(start // size, min(len(chunks), (end - 1) // size + 1))
                if (digest, i) not in ctx.flights and chunks[i].key not in ctx.memory]
        absent = await self.chunks.absent(layer, todo)
        claim = Claim()
        for index in todo:
            key = (digest, index)
            if index not in absent or key in ctx.flights or chunks[index].key in ctx.memory:
                continue
            gathered = ctx.partials.get(key)
            if gathered is None:
                gathered = ctx.partials.new(key, chunks[index].size)
            elif gathered.completing:
                continue
            lo, hi = max(start - index * size, 0), min(end - index * size, chunks[index].size)
            claim.add(index, gathered, blocks_of(layer.geo.block_size, lo, hi))
        return claim if claim.wanted else None

    async def fetch_claim(self, layer: LayerState, claim: Claim) -> None:
        """Fetch a claim's blocks, then end their flights whatever happened."""
        try:
            await self._fetch_blocks(layer, claim)
        finally:
            claim.release()

    async def _fetch_blocks(self, layer: LayerState, claim: Claim) -> None:
        """Fetch claimed (chunk, block) pairs into their partials, checking each block as it
        arrives.

        One range request per run of blocks adjacent in the blob, across chunk
        boundaries too. A chunk's event is set as soon as its last block here
        arrived, so a reader waiting for the start of a long run does not wait
        for its end; a chunk that became whole is checked and kept right away
        (also when the request fails after its last block).
        """
        ctx = self.ctx
        events, owners = claim.events, claim.owners
        chunks = layer.geo.chunks
        bs = layer.geo.block_size
        left = dict.fromkeys(events, 0)
        for index, _ in claim.wanted:
            left[index] += 1

        def arrived(index: int) -> None:
            left[index] -= 1
            if left[index] == 0:
                events[index].set()
                gathered = owners[index]
                if gathered.whole(bs) and not gathered.completing:
                    ctx.spawn(self._complete, layer, index, gathered)

        for run in claim.runs(chunks, bs):
            await self._fetch_run(layer, run, owners, arrived)

    async def _fetch_run(self, layer: LayerState, run: list[tuple[int, int]],
                         owners: dict[int, Partial], arrived: Callable[[int], None]) -> None:
        """One range request for blocks adjacent in the blob, each checked as it lands.

        The blocks each receiving hop completed are checked together in one
        thread hop (BLAKE3 of a 256 KiB block is ~70 us: on the event loop it
        held up every FUSE request). A block is in its partial's `have` only
        once it matched; one that did not is marked bad at once (its reader,
        woken with its chunk, must fail now, not look again until the request
        ends) and the request then fails with it.
        """
        ctx = self.ctx
        chunks = layer.geo.chunks
        bs = layer.geo.block_size
        digest = layer.info.digest
        partials = [owners[index] for index, _ in run]
        parts = [memoryview(p.buffer)[b * bs : min((b + 1) * bs, len(p.buffer))]
                 for p, (_, b) in zip(partials, run, strict=True)]
        bad: list[tuple[int, int]] = []
        waiting: list[int] = []  # filled, not yet checked
        checking = 0  # check hops spawned and not yet done
        checked_all = trio.Event()
        checked_all.set()

        def verdicts(ready: list[int]) -> list[bool]:
            return [block_matches(parts[i], chunks[run[i][0]].blocks, run[i][1])
                    for i in ready]

        def settle(ready: list[int], oks: list[bool]) -> None:
            for i, ok in zip(ready, oks, strict=True):
                index, b = run[i]
                if ok:
                    partials[i].have.add(b)
                else:
                    bad.append(run[i])
                    partials[i].bad[b] = IntegrityError(_bad_block(layer, index, b))
                arrived(index)

        async def check_hop() -> None:
            nonlocal checking
            try:
                ready = list(waiting)
                waiting.clear()
                settle(ready, await trio.to_thread.run_sync(verdicts, ready))
            finally:
                checking -= 1
                if checking == 0:
                    checked_all.set()

        def filled(i: int) -> None:
            nonlocal checking, checked_all
            ctx.counters.bytes_fetched += len(parts[i])
            if ctx.nursery is None:  # not started (tools, tests): checked right here
                settle([i], verdicts([i]))
                return
            waiting.append(i)
            if len(waiting) == 1:  # the first of this hop: one check for all it brought
                if checking == 0:
                    checked_all = trio.Event()
                checking += 1
                ctx.spawn(check_hop)

        try:
            async with ctx.slots:
                ctx.counters.in_flight += 1
                ctx.counters.requests += 1
                try:
                    await ctx.source.read_range_into(
                        digest, chunks[run[0][0]].blob_offset + run[0][1] * bs, parts,
                        filled, size=layer.info.size)
                finally:
                    ctx.counters.in_flight -= 1
            await checked_all.wait()
            if bad:
                raise IntegrityError(_bad_block(layer, *bad[0]))
        except Exception as exc:
            error = foreign(exc, f"fetching blocks of {digest[:19]}")
            self.chunks.verdicts.failed(layer, error)
            if error is exc:
                raise
            raise error from None

    async def _complete(self, layer: LayerState, index: int, gathered: Partial
                        ) -> ChunkData | None:
        """A chunk gathered whole from blocks: check it whole and keep it like a fetched one.

        The partial stays registered (and serving its blocks) until the check is
        done, so nobody fetches them again meanwhile. Returns the checked chunk,
        or None when it failed its digest; a task that finds another's check
        running waits for it and returns its outcome.
        """
        ctx = self.ctx
        key = (layer.info.digest, index)
        if gathered.completing:
            await gathered.completed.wait()
            return gathered.checked
        if ctx.partials.get(key) is not gathered:
            return None
        chunk = layer.geo.chunks[index]
        gathered.completing = True
        result: ChunkData | KitfsError | None = None
        try:
            result = await trio.to_thread.run_sync(checked, layer, chunk, gathered.buffer)
        finally:
            ctx.partials.discard(key, gathered)
            if result is not None and not isinstance(result, KitfsError):
                gathered.checked = memoryview(result)
            gathered.completed.set()
        if isinstance(result, KitfsError) or (
                chunk.key not in ctx.memory and key not in ctx.flights):
            self.chunks.accept(layer, chunk, result)  # a fetch claimed meanwhile settles its own
        return None if isinstance(result, KitfsError) else result
