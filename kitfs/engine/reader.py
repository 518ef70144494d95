"""The read path: "file F, offset O, size S" to checked chunks from memory, disk or the registry.

The parts, each a small module with its invariants at its top:

- context.py: what they share (layers, caches, flights, request slots, nursery);
- chunks.py: one chunk from the memory tier, the disk cache, a flight or a
  range request, checked before it is handed out; readahead runs;
- gather.py (+ blocks.py): a random reader's blocks of a chunk, not the chunk;
- tensors.py: a random reader's whole safetensors tensor asked for at once;
- readahead.py: per open file handle, how far a sequential reader is ahead;
- prefetch.py: what model loaders read first, in order, paced;
- streamed.py: gzip/zstd layers `kit` wrote, read once from the start;
- integrity.py (+ layerstate.py, verify.py): layout checks, end-to-end
  verification, poisoning;
- writeback.py: fetched chunks to the disk cache, off the read path.

Besides `read` (what FUSE asks for), a reader that takes whole ranges and
writes them out (unpack) uses `views`, which asks for a range's chunks at
once instead of waiting for readahead to grow, and `verified`, to know when
a layer's bytes are bound to its digest.

A read, through them: `Engine.read` owns the one deadline of the read and
the handle's cursor; it starts readahead (`Chunks.ahead`), waits for the
layer's layout check the first time (`Integrity.layout_ready`), lets a
random reader's tensor be asked for whole (`TensorAhead.step`), then takes
each chunk the range covers from `Chunks.get` (or only its blocks,
`Gatherer.part`, or from the stream, `Streams.get`) and joins the slices.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import trio

from kitfs.cache.memory import ChunkData, MemoryTier
from kitfs.cache.store import ChunkStore
from kitfs.cache.tocs import TocCache
from kitfs.engine.chunks import Chunks
from kitfs.engine.context import Context, EngineConfig
from kitfs.engine.gather import Gatherer
from kitfs.engine.geometry import parse_verified, plan_layer
from kitfs.engine.integrity import Integrity
from kitfs.engine.layerstate import LayerState, State
from kitfs.engine.prefetch import Prefetcher
from kitfs.engine.readahead import Cursor
from kitfs.engine.streamed import Streams
from kitfs.engine.tensors import TensorAhead
from kitfs.engine.writeback import WriteBack
from kitfs.errors import UnreachableError
from kitfs.inspection import LayerLayout
from kitfs.modelkit.manifest import LayerInfo
from kitfs.modelkit.safetensors import SUFFIX as SAFETENSORS
from kitfs.modelkit.toc import LayerToc
from kitfs.modelkit.tree import Node, Tree
from kitfs.oci.source import BlobSource

__all__ = ["Engine", "EngineConfig"]


#: After a read of a chunk timed out, reads of it fail at once for this long: the
#: kernel asks again for the page it could not read ahead, and that second request
#: must not wait a whole deadline more (a read fails within --timeout, once).
FAILED_READ_MEMORY_S = 2.0


class Engine:
    """Implements kitfs.engine.api.FileReader over a BlobSource and the chunk caches.

    Built whole here; background work starts with `start(nursery)`.
    """

    def __init__(
        self,
        source: BlobSource,
        layers: Sequence[LayerInfo],
        tocs: Mapping[str, LayerToc],
        tree: Tree,
        store: ChunkStore,
        config: EngineConfig | None = None,
        *,
        toc_cache: TocCache | None = None,
        layouts: Mapping[str, LayerLayout] | None = None,
    ) -> None:
        config = config or EngineConfig()
        states: dict[str, LayerState] = {}
        for info in layers:
            verified = toc_cache.get_verified(info.digest) if toc_cache is not None else None
            toc = tocs.get(info.digest)
            geo = plan_layer(info, toc, config.chunk_size, verified)
            layout = layouts.get(info.digest) if layouts is not None else None
            layer = LayerState(info, geo, layout=layout)
            if geo.shape == "stream" and verified is not None:
                # Verified by an earlier mount or unpack: its chunks, kept by position,
                # are read back against the digests recorded then; streamed only if gone.
                digests = parse_verified(verified, geo.chunk_size, info.size)
                if digests:
                    layer.recorded.update(enumerate(digests))
                    layer.stream_chunks = len(digests)
                    layer.verified()
            # Chunk digests from a verified record were computed from the layer's own
            # bytes; a table of contents' are its author's word until this node hashed
            # the layer (they could be another layer's: shared cache keys would then
            # serve that layer's chunks here).
            if geo.verified_by_chunk and (toc is None or not toc.chunks or parse_verified(
                    verified or b"", geo.chunk_size, info.size) == [c.digest for c in geo.chunks]):
                layer.verified()
            # Walked headers of a layer not verified by chunk are checked with the
            # layer (Integrity._verify); everything else not yet bound is checked
            # before serving.
            layer.layout_ok = layout is None or layout.bound or (
                layout.origin == "walked" and not geo.verified_by_chunk)
            states[info.digest] = layer
        ctx = self.ctx = Context(source, store, config, tree, states, toc_cache)
        self.integrity = Integrity(ctx)
        self.chunks = Chunks(ctx, self.integrity)
        self.gatherer = Gatherer(ctx, self.chunks)
        self.streams = Streams(ctx, self.chunks, self.integrity.mark_verified)
        self.tensors = TensorAhead(ctx, self.chunks, self.gatherer, self._read_parts)
        self.prefetcher = Prefetcher(ctx, self._background_chunk, self.chunks.absent,
                                     self.integrity.ensure_verification)
        self.integrity.attach(self.chunks, self.streams, self._read_parts)
        # Readahead state of reads that come without a handle's cursor, per file.
        self._cursors: dict[str, Cursor] = {}
        self._open: dict[str, int] = {}
        self.started = time.time()

    # What callers and tests look at.
    @property
    def config(self) -> EngineConfig:
        return self.ctx.config

    @property
    def layers(self) -> dict[str, LayerState]:
        return self.ctx.layers

    @property
    def source(self) -> BlobSource:
        return self.ctx.source

    @property
    def store(self) -> ChunkStore:
        return self.ctx.store

    @property
    def memory(self) -> MemoryTier:
        return self.ctx.memory

    @property
    def writes(self) -> WriteBack:
        return self.ctx.writes

    @property
    def on_poison(self) -> Callable[[list[Node]], Awaitable[None]] | None:
        return self.ctx.on_poison

    @on_poison.setter
    def on_poison(self, hook: Callable[[list[Node]], Awaitable[None]] | None) -> None:
        self.ctx.on_poison = hook

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start background work (prefetch, verification) in the caller's nursery."""
        self.ctx.nursery = nursery
        self.prefetcher.start()

    async def flush(self) -> None:
        """Wait until every fetched chunk is on disk: call before cancelling the nursery."""
        await self.ctx.writes.flush()

    @property
    def longest_wait(self) -> float:
        """The longest a read may wait before the engine itself gives up with an error.

        Layers `kit` compressed are streamed from their start, so a reader near
        their end waits for the stream: those get the longer stream timeout.
        """
        streams = any(layer.geo.shape == "stream" for layer in self.layers.values())
        return self.config.stream_timeout if streams else self.config.read_timeout

    # -- FileReader -------------------------------------------------------------------

    def opened(self, node: Node) -> Cursor:
        count = self._open.get(node.path, 0)
        self._open[node.path] = count + 1
        if count == 0:
            for key in self._file_keys(node):
                self.store.pin(key)  # what an open file reads is evicted last
        return Cursor()

    def released(self, node: Node) -> None:
        left = self._open.get(node.path, 0) - 1
        if left > 0:
            self._open[node.path] = left
            return
        if self._open.pop(node.path, None) is not None:
            for key in self._file_keys(node):
                self.store.unpin(key)
        self._cursors.pop(node.path, None)

    def trusted(self, node: Node) -> bool:
        return node.layer is None or self.layers[node.layer].state is not State.POISONED

    def _file_keys(self, node: Node) -> list[str]:
        if node.layer is None or node.size == 0:
            return []
        layer = self.layers[node.layer]
        size = layer.geo.chunk_size
        first, last = node.offset // size, (node.offset + node.size - 1) // size
        return [self.ctx.key(layer, i) for i in range(first, last + 1)
                if not layer.geo.chunks or i < len(layer.geo.chunks)]

    async def read(self, node: Node, offset: int, size: int,
                   cursor: Cursor | None = None) -> bytes | memoryview:
        ctx = self.ctx
        ctx.counters.reads += 1
        if node.inline is not None:
            return node.inline[offset : offset + size]
        end = min(node.size, offset + size)
        if offset >= end or node.layer is None:
            return b""
        layer = self.layers[node.layer]
        chunks = range((node.offset + offset) // layer.geo.chunk_size,
                       (node.offset + end - 1) // layer.geo.chunk_size + 1)
        self._recently_failed(layer, chunks)
        # On arrival, not on completion: the kernel sends a sequential reader's
        # requests in order, but they finish in any order; judged on completion,
        # a streamed shard kept looking like random reads and got no readahead.
        if cursor is None:
            cursor = self._cursors.setdefault(node.path, Cursor())
        fresh = cursor.step(offset, end)
        if layer.geo.shape != "stream":
            ahead = cursor.window(node.offset, node.size, layer.geo.chunk_size,
                                  self.config.readahead_bytes, self.config.merge_limit)
            if ahead is not None:
                self.chunks.ahead(layer, ahead)
        # A run from the file's start is a stream (cp, a hash, a loader): it reads on,
        # so its chunks are fetched whole. Any other may be one tensor of a random reader.
        whole = cursor.from_start
        with self._deadline(node, layer, chunks):
            if not layer.layout_ok:
                await self.integrity.layout_ready(layer)
            if (not whole and node.path.endswith(SAFETENSORS)
                    and self.tensors.hinted(layer)):
                await self.tensors.step(node, layer, cursor, offset, end, fresh=fresh)
            data = await self._read_range(layer, node.offset + offset, end - offset, whole)
        ctx.counters.bytes_served += len(data)
        self.prefetcher.read(layer, node.offset + end)
        return data

    @contextlib.contextmanager
    def _deadline(self, node: Node, layer: LayerState, chunks: range) -> Iterator[None]:
        """The one deadline of a read of `chunks` of `node`: past it, UnreachableError, and
        reads of those chunks fail at once for a while (see FAILED_READ_MEMORY_S)."""
        limit = self.config.stream_timeout if layer.geo.shape == "stream" else (
            self.config.read_timeout)
        # A bare cancel scope, not trio.fail_after (a second context manager around
        # this one: a few percent of the event loop per 1 MiB read).
        with trio.CancelScope(deadline=trio.current_time() + limit) as scope:
            yield
        if scope.cancelled_caught:  # any other cancellation propagates through it
            msg = f"{node.path}: no data from the registry within {limit:.0f} s"
            self.ctx.note_error(msg)
            error = UnreachableError(msg)
            until = trio.current_time() + FAILED_READ_MEMORY_S
            for index in chunks:
                self.ctx.recent_failures[(layer.info.digest, index)] = (until, error)
            raise error from None

    async def views(self, node: Node, offset: int, length: int
                    ) -> AsyncGenerator[bytes | memoryview, None]:
        """Bytes [offset, offset + length) of `node` in order, one checked chunk's view at a time.

        For a reader that takes the whole range and writes it out (unpack):
        the chunks ahead of the one handed out are asked for at once, whole
        and merged as readahead merges them, up to `readahead_bytes` ahead,
        without waiting for a sequential run to build up. Each view passes
        the checks a `read` of it would (layout, poison, strict mode) within
        one read deadline. A view is only valid until the next is asked for
        (the chunk it shows may leave memory); use it, or copy it, at once.
        Chunks of a layer without digests are only as good as the layer's
        end-to-end check: a caller that must not use them before then waits
        for `verified`.
        """
        end = min(node.size, offset + length)
        if offset >= end:
            return
        if node.inline is not None or node.layer is None:
            yield (node.inline or b"")[offset:end]
            return
        layer = self.layers[node.layer]
        size = layer.geo.chunk_size
        first, last = (node.offset + offset) // size, (node.offset + end - 1) // size
        window = max(2, self.config.readahead_bytes // size)
        asked = first - 1  # the last chunk asked for ahead
        pos = offset
        for index in range(first, last + 1):
            if asked - index < window // 2 and asked < last:
                self.chunks.ahead(layer, range(max(index, asked + 1),
                                               min(last, index + window) + 1))
                asked = min(last, index + window)
            stop = min(end, (index + 1) * size - node.offset)
            one = range(index, index + 1)
            self._recently_failed(layer, one)
            with self._deadline(node, layer, one):
                if not layer.layout_ok:
                    await self.integrity.layout_ready(layer)
                data = await self._read_range(layer, node.offset + pos, stop - pos)
            self.ctx.counters.bytes_served += len(data)
            yield data
            pos = stop

    async def hashed_past(self, offset: int, digest: str) -> None:
        """Until the whole-layer hash under way of ranged layer `digest` has passed `offset`
        of its stream, or is over; at once where none runs.

        For a reader that fetches ahead of a hash it will wait for (unpack):
        kept within a memory tier's reach of it, the hash finds its chunks in
        memory instead of reading them all back from disk.
        """
        layer = self.layers[digest]
        while (layer.geo.shape == "ranged" and layer.verify_started and layer.hashed < offset
               and not layer.verified_event.is_set()):
            await layer.hash_moved.wait()

    async def verified(self, digest: str) -> None:
        """Until layer `digest` has matched its digest end to end, starting that if nothing has.

        IntegrityError if it did not (the layer is poisoned); the error that
        stopped the check otherwise (the registry failed bytes it still
        needed), after which a later call tries again.
        """
        layer = self.layers[digest]
        layer.check()
        if layer.verified_event.is_set():
            return
        attempt = layer.attempt_over
        self.integrity.ensure_verification(layer)
        await attempt.wait()
        layer.check()  # not poisoned: so the event is set if, and only if, it verified
        if not layer.verified_event.is_set():
            raise layer.postponed_by or UnreachableError(
                f"layer {digest[:19]} could not be verified")

    def _recently_failed(self, layer: LayerState, chunks: range) -> None:
        """Fail at once a read of a chunk whose read just timed out (see FAILED_READ_MEMORY_S)."""
        failures = self.ctx.recent_failures
        if not failures:
            return
        now = trio.current_time()
        for key in [k for k, (until, _) in failures.items() if until <= now]:
            del failures[key]
        for index in chunks:
            failed = failures.get((layer.info.digest, index))
            if failed is not None:
                raise failed[1]

    def status(self) -> dict[str, Any]:
        ctx = self.ctx
        c = ctx.counters
        lookups = c.memory_hits + c.disk_hits + c.misses
        return {
            "bytes_fetched": c.bytes_fetched,
            "bytes_served": c.bytes_served,
            "bytes_cached_memory": ctx.memory.nbytes,
            "reads": c.reads,
            "hit_rate": (c.memory_hits + c.disk_hits) / lookups if lookups else None,
            "memory_hits": c.memory_hits,
            "disk_hits": c.disk_hits,
            "misses": c.misses,
            "requests": c.requests,
            "requests_in_flight": c.in_flight,
            "pending_writes": ctx.writes.pending,
            "prefetch": {"mode": self.config.prefetch, "total_bytes": c.prefetch_total,
                         "done_bytes": c.prefetch_done},
            "layers": [
                {"digest": d, "kind": layer.info.kind, "path": layer.info.path,
                 "shape": layer.geo.shape, "state": layer.state.value, "reason": layer.reason,
                 "streamed_chunks": layer.stream_next if layer.geo.shape == "stream" else None}
                for d, layer in self.layers.items()
            ],
            "errors": list(c.errors),
            # One entry per registry client: requests by outcome, bytes, last failure.
            "registry": [client.stats.to_json() for client in ctx.source.clients()],
        }

    # -- reading ----------------------------------------------------------------------

    async def _read_range(self, layer: LayerState, start: int, length: int,
                          whole: bool = True) -> bytes | memoryview:
        """Bytes [start, start + length) of the layer's stream, each chunk checked.

        `whole`: fetch whole chunks (a sequential reader); else, where blocks
        have digests and no prefetch brings the layer whole, only the blocks
        the range falls in.
        """
        layer.check()
        if self.config.verify == "strict" and layer.state is not State.VERIFIED:
            self.integrity.ensure_verification(layer)
            await layer.verified_event.wait()
            layer.check()
        size = layer.geo.chunk_size
        first, last = start // size, (start + length - 1) // size
        by_part = (not whole and layer.geo.block_size > 0
                   and layer.info.digest not in self.ctx.planned)
        if first == last:
            lo = start - first * size
            if by_part:
                return await self.gatherer.part(layer, first, lo, lo + length)
            data = await self._chunk(layer, first)
            return memoryview(data)[lo : lo + length]
        if not by_part:
            self.chunks.ahead(layer, range(first + 1, last + 1))
        parts = []
        for index in range(first, last + 1):
            lo = max(start - index * size, 0)
            hi = min(start + length - index * size, self.ctx.chunk_bytes(layer, index))
            if by_part:
                parts.append(await self.gatherer.part(layer, index, lo, hi))
                continue
            data = await self._chunk(layer, index)
            parts.append(memoryview(data)[lo:hi])
        return b"".join(parts)

    async def _read_parts(self, layer: LayerState, start: int, length: int
                          ) -> bytes | memoryview:
        """A range read block by block where it can (headers: layout walks, tensor extents)."""
        return await self._read_range(layer, start, length, False)

    async def _chunk(self, layer: LayerState, index: int, *, background: bool = False
                     ) -> ChunkData:
        if layer.geo.shape == "stream":
            return await self.streams.get(layer, index)
        return await self.chunks.get(layer, index, background=background)

    async def _background_chunk(self, layer: LayerState, index: int) -> ChunkData:
        return await self._chunk(layer, index, background=True)
