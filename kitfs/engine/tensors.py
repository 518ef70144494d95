"""A random reader's whole tensor asked for at once, bounded by the tensor's extent.

The kernel splits a reader's pread of a tensor into 1 MiB requests, and
answered one by one each is a registry round trip. Where such a read is the
kernel's first request for a safetensors tensor, the rest of the tensor is
asked for at once, up to its end as the shard's header gives it (never
past: the bytes fetched per byte read stay what they were), and topped up as
the reader goes on. What each rule bought: benchmarks/TUNING.md, random
tensor reads.

Invariants: at most MAX_TENSOR_FETCHES block fetches started here run at
once (`fetches`, given back when each ends); a file's tensor extents are read
once, by one task, and kept while the engine lives (None: not safetensors).
"""

from __future__ import annotations

import mmap

from kitfs.engine.blocks import Claim
from kitfs.engine.chunks import Chunks
from kitfs.engine.context import Context, LayerRead
from kitfs.engine.flights import Flights
from kitfs.engine.gather import Gatherer
from kitfs.engine.layerstate import LayerState
from kitfs.engine.readahead import Cursor
from kitfs.errors import KitfsError
from kitfs.modelkit.safetensors import LENGTH_PREFIX, TensorExtents, header_length, tensor_extents
from kitfs.modelkit.tree import Node

#: A mid-file read that begins a safetensors tensor asks for this much more of it at
#: once (never past its end), topped up as the reader goes on.
TENSOR_AHEAD = 16 << 20
#: Only a kernel request this big (or reaching the tensor's end) starts one: what the
#: kernel sends first for a pread of a whole tensor. A peek at a tensor's start is smaller.
TENSOR_FULL_REQUEST = 1 << 20
#: Tensors asked for ahead at once; past this, reads fetch their own blocks. Bounds the
#: partial chunks (2 MiB each) and requests a reader of many small pieces can start.
MAX_TENSOR_FETCHES = 2
PAGE = mmap.PAGESIZE



class TensorAhead:
    def __init__(self, ctx: Context, chunks: Chunks, gatherer: Gatherer,
                 read: LayerRead) -> None:
        self.ctx = ctx
        self.chunks = chunks
        self.gatherer = gatherer
        self.read = read
        self.extents: dict[str, TensorExtents | None] = {}
        self._extent_loads: Flights[str, TensorExtents] = Flights()
        self.fetches = 0

    def hinted(self, layer: LayerState) -> bool:
        """Whether tensor extents may steer reads of this layer: not if prefetch brings it
        whole anyway or it can only be streamed."""
        return (layer.geo.shape != "stream" and layer.info.digest not in self.ctx.planned
                and self.ctx.nursery is not None)

    async def step(self, node: Node, layer: LayerState, cursor: Cursor, offset: int,
                   end: int, *, fresh: bool) -> None:
        """Before a mid-file read of [offset, end): ask for the rest of its tensor if it
        begins one.

        Only a read that starts a run (`fresh`) near a tensor's start begins
        one: a read in a tensor's middle may be a slice of it, and one that
        continues a run is the kernel's readahead running on past the tensor
        before.
        """
        layer.check()
        extents = await self._extents_of(node, layer)
        span = extents.at(end - 1) if extents is not None else None
        if span is None:
            return
        start, stop = span
        if cursor.tensor_stop == stop:
            begin = cursor.tensor_front
            # Topped up only for a read inside what was asked for, near its front: a
            # read past it jumped (a slice further on), and gets nothing ahead.
            if begin >= stop or offset > begin or end + TENSOR_AHEAD // 2 < begin:
                return
        elif (not fresh or not start - PAGE < offset <= start
              or end - offset < min(TENSOR_FULL_REQUEST, stop - offset)):
            # a slice of it, a peek at its start, or the kernel reading on past the
            # tensor before
            return
        else:
            begin = offset  # this read's own bytes too: one request, not two
        front = min(stop, max(begin, end) + TENSOR_AHEAD)
        by_block = layer.geo.block_size > 0
        if by_block and self.fetches >= MAX_TENSOR_FETCHES:
            return
        cursor.tensor_stop, cursor.tensor_front = stop, front
        if not by_block:
            size = layer.geo.chunk_size
            self.chunks.ahead(layer, range((node.offset + end) // size,
                                           (node.offset + front - 1) // size + 1))
            return
        # Claimed before this read goes on, so it and the kernel's next requests find
        # their blocks on their way instead of asking for them themselves. The slot
        # is taken now and given back by _fetch (or here, if nothing to fetch).
        self.fetches += 1
        claim = None
        try:
            claim = await self.gatherer.claim(layer, node.offset + begin, node.offset + front)
        finally:
            if claim is None:
                self.fetches -= 1
        if claim is not None:
            self.ctx.spawn(self._fetch, layer, claim)

    async def _fetch(self, layer: LayerState, claim: Claim) -> None:
        """Fetch claimed blocks in as few requests as can be, then end their flights.

        Failures are left to the readers, who fetch what they still need themselves.
        """
        self.ctx.counters.misses += len(claim.events)
        try:
            await self.gatherer.fetch_claim(layer, claim)
        except KitfsError:
            pass  # noted by the gatherer
        finally:
            self.fetches -= 1

    async def _extents_of(self, node: Node, layer: LayerState) -> TensorExtents | None:
        """The file's tensor extents, read once from its header (one read at a time)."""
        if node.path in self.extents:
            return self.extents[node.path]
        loading = self._extent_loads.get(node.path)
        if loading is not None:
            await loading.wait()
            return self.extents.get(node.path)
        self._extent_loads.start(node.path)
        try:
            found = None
            prefix = await self.read(layer, node.offset, min(LENGTH_PREFIX, node.size))
            length = header_length(bytes(prefix), node.size)
            if length is not None:
                header = await self.read(layer, node.offset + LENGTH_PREFIX, length)
                found = tensor_extents(bytes(header), node.size)
            self.extents[node.path] = found
            return found
        except KitfsError:
            return None  # the read itself says what is wrong
        finally:
            self._extent_loads.land(node.path, self.extents.get(node.path))
