"""The read path: "file F, offset O, size S" to chunks from memory, disk or the registry.

Order of lookups for a chunk: the in-memory tier, the shared disk cache, a
fetch already in flight for it (single-flight), and only then a new range
request, which also takes the chunks right after it that nobody has yet
(adjacent misses merge into one request up to a cap). Requests in flight are
bounded; background work (readahead beyond the current read, prefetch,
verification) holds at most half of the slots, so a foreground read always
finds one soon.

A reader waiting for part of a chunk that no readahead or prefetch will bring
whole fetches only the blocks it needs, where the table of contents gives
block digests (`_part`): a random reader's tensor costs its own bytes plus
the blocks its ends fall in, not the chunks. The blocks gather in a partial
chunk; once all are there it is checked whole and becomes an ordinary chunk.
Where such a read is the kernel's first request for a safetensors tensor, the
whole tensor's blocks are asked for at once, bounded by its extent in the
shard's header (`_tensor_readahead`), instead of a round trip per 1 MiB.

Integrity (SECURITY.md): a chunk with a known digest (kitfs table of contents,
or a layer verified end to end by an earlier mount) is checked before anyone
sees it, and the tar headers of a table of contents' layer are walked over
checked chunks before its first file is served (`_check_layout`). Chunks of
layers without digests are served as fetched. Every layer is hashed end to
end once all of it has been here (`_verify`, engine/verify.py), which binds
those bytes, and a table's chunk digests, to the layer digest; a mismatch
poisons the layer: every later read fails with EIO, its records and
unverified chunks are purged, the kernel's pages of its files dropped,
`status` says why. In strict mode a layer serves nothing until it verified.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from kitfs.buffers import new_buffer
from kitfs.cache.fileformat import CacheError as _CacheErrorBase
from kitfs.cache.keys import chunk_key_for_digest
from kitfs.cache.memory import ChunkData, MemoryTier
from kitfs.cache.store import ChunkStore
from kitfs.cache.tocs import TocCache
from kitfs.engine.api import PrefetchMode, VerifyMode
from kitfs.engine.blocks import Claim, Partial, blocks_of
from kitfs.engine.flights import Flight, Flights
from kitfs.engine.geometry import (
    Chunk,
    parse_verified,
    plan_layer,
    verified_record,
)
from kitfs.engine.layerstate import LayerState, State
from kitfs.engine.prefetch import Pacer, prefetch_plan
from kitfs.engine.readahead import Cursor
from kitfs.engine.streamed import cut_chunks
from kitfs.engine.verify import hash_ranged, hash_seekable, walk_layout
from kitfs.engine.writeback import WriteBack
from kitfs.errors import IntegrityError, KitfsError, UnreachableError
from kitfs.inspection import LayerLayout, layout_record
from kitfs.modelkit.chunkdigest import block_matches, chunk_digest
from kitfs.modelkit.chunkdigest import matches as chunk_digest_matches
from kitfs.modelkit.decompress import StreamDecompressor
from kitfs.modelkit.manifest import LayerInfo
from kitfs.modelkit.safetensors import LENGTH_PREFIX, TensorExtents, header_length, tensor_extents
from kitfs.modelkit.safetensors import SUFFIX as SAFETENSORS
from kitfs.modelkit.toc import DEFAULT_CHUNK_SIZE, LayerToc
from kitfs.modelkit.tree import Node, Tree
from kitfs.oci.source import BlobSource

log = logging.getLogger(__name__)

#: Tasks walking the prefetch plan. Fetches among them are bounded by the background
#: request slots (taken before a run is claimed, so no claimed chunk waits for one);
#: the rest keep chunk-file reads in flight on a warm mount, where two workers read
#: one chunk each at a time. Four: faster warm than two, no better with eight, which
#: hold more memory (benchmarks/TUNING.md).
PREFETCH_WORKERS = 4
#: Fetched chunks are checked and handed out in batches of about this many bytes.
SETTLE_BATCH_BYTES = 1 << 20
#: Chunks being gathered block by block at once (a random reader's edges); beyond
#: this the least recently used one with nothing in flight is dropped.
MAX_PARTIALS = 16
#: A mid-file read that begins a safetensors tensor asks for this much more of it at
#: once (never past its end), topped up as the reader goes on.
TENSOR_AHEAD = 16 << 20
#: Only a kernel request this big (or reaching the tensor's end) starts one: what the
#: kernel sends first for a pread of a whole tensor. A peek at a tensor's start is smaller.
TENSOR_FULL_REQUEST = 1 << 20
#: Tensors asked for ahead at once; past this, reads fetch their own blocks. Bounds the
#: partial chunks (2 MiB each) and requests a reader of many small pieces can start.
MAX_TENSOR_FETCHES = 2
PAGE = 4096
#: After a read of a chunk timed out, reads of it fail at once for this long: the
#: kernel asks again for the page it could not read ahead, and that second request
#: must not wait a whole deadline more (a read fails within --timeout, once).
FAILED_READ_MEMORY_S = 2.0



@dataclass(frozen=True)
class EngineConfig:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_requests: int = 4
    merge_limit: int = 32 << 20
    readahead_bytes: int = 64 << 20
    memory_bytes: int = 256 << 20
    prefetch: PrefetchMode = "model"
    verify: VerifyMode = "lazy"
    read_timeout: float = 30.0
    stream_timeout: float = 600.0


@dataclass
class _Counters:
    bytes_fetched: int = 0
    bytes_served: int = 0
    reads: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    requests: int = 0
    in_flight: int = 0
    prefetch_total: int = 0
    prefetch_done: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=8))


class Engine:
    """Implements kitfs.engine.api.FileReader over a BlobSource and the chunk caches."""

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
        self.source = source
        self.store = store
        self.config = config
        self.tree = tree
        self.toc_cache = toc_cache
        self.memory = MemoryTier(config.memory_bytes)
        self.layers: dict[str, LayerState] = {}
        for info in layers:
            verified = toc_cache.get_verified(info.digest) if toc_cache is not None else None
            toc = tocs.get(info.digest)
            geo = plan_layer(info, toc, config.chunk_size, verified)
            layout = layouts.get(info.digest) if layouts is not None else None
            layer = LayerState(info, geo, layout=layout)
            # Chunk digests from a verified record were computed from the layer's own
            # bytes; a table of contents' are its author's word until this node hashed
            # the layer (they could be another layer's: shared cache keys would then
            # serve that layer's chunks here).
            if geo.verified_by_chunk and (toc is None or not toc.chunks or parse_verified(
                    verified or b"", geo.chunk_size, info.size) == [c.digest for c in geo.chunks]):
                layer.verified()
            # Walked headers of a layer not verified by chunk are checked with the
            # layer (_verify); everything else not yet bound is checked before serving.
            layer.layout_ok = layout is None or layout.bound or (
                layout.origin == "walked" and not geo.verified_by_chunk)
            self.layers[info.digest] = layer
        self._flights: Flights[tuple[str, int], ChunkData] = Flights()  # chunk fetches
        self._loads: Flights[tuple[str, int], ChunkData] = Flights()  # chunk-file reads
        self._partials: dict[tuple[str, int], Partial] = {}  # insertion order = LRU
        self._planned: set[str] = set()  # layers prefetch brings whole
        self._slots = trio.CapacityLimiter(max(1, config.max_requests))
        self.writes = WriteBack(store, self._spawn, self._note_error)
        self._disk_reads = trio.CapacityLimiter(4)  # chunks read ahead from disk
        self._background = trio.CapacityLimiter(max(1, config.max_requests // 2))
        self._nursery: trio.Nursery | None = None
        # Readahead state of reads that come without a handle's cursor, per file.
        self._cursors: dict[str, Cursor] = {}
        self._open: dict[str, int] = {}
        # safetensors files read mid-file: their tensors' extents (None: not safetensors)
        self._extents: dict[str, TensorExtents | None] = {}
        self._extent_loads: Flights[str, TensorExtents] = Flights()
        self._tensor_fetches = 0  # _fetch_claimed tasks running
        self._pacer = Pacer(0.0)  # prefetch pacing; made again by start(), on the trio clock
        # (layer, chunk) -> (until when, why): chunks whose read just timed out
        self._failed_reads: dict[tuple[str, int], tuple[float, KitfsError]] = {}
        #: Told which files of a poisoned layer the kernel may still hold pages of
        #: (fs/ drops them): wrong bytes must not stay readable from the page cache.
        self.on_poison: Callable[[list[Node]], Awaitable[None]] | None = None
        self.counters = _Counters()
        self.started = time.time()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start background work (prefetch, verification) in the caller's nursery."""
        self._nursery = nursery
        self._pacer = Pacer(trio.current_time())
        if self.config.prefetch != "none":
            plan = prefetch_plan(self.tree, {d: layer.info for d, layer in self.layers.items()},
                                 {d: layer.geo for d, layer in self.layers.items()},
                                 self.config.prefetch)
            self._planned = {d for d, _ in plan}
            self._spawn(self._prefetch, plan)

    def _spawn(self, fn: Any, *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn: Any, *args: Any) -> None:
        """Run a background task; nothing it raises but cancellation may reach the nursery.

        The nursery is the mount's root: an exception escaping it (a bug, or a
        foreign exception from a library) would end the daemon and leave every
        reader with ENOTCONN. Such a task's readers still wait only until their
        own deadline.
        """
        try:
            await fn(*args)
        except Exception as exc:
            self._note_error(str(self._foreign(exc, getattr(fn, "__name__", "background task"))))

    @staticmethod
    def _foreign(exc: Exception, where: str) -> KitfsError:
        """`exc` as the KitfsError its readers get: itself, or (a bug, or a library's own
        exception, logged with its traceback) one line saying where it came from."""
        if isinstance(exc, KitfsError):
            return exc
        log.error("unexpected error in %s", where, exc_info=exc)
        return KitfsError(f"{where}: unexpected {type(exc).__name__}: {exc}")

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
        return [self._key(layer, i) for i in range(first, last + 1)
                if not layer.geo.chunks or i < len(layer.geo.chunks)]

    async def read(self, node: Node, offset: int, size: int,
                   cursor: Cursor | None = None) -> bytes | memoryview:
        self.counters.reads += 1
        if node.inline is not None:
            return node.inline[offset : offset + size]
        end = min(node.size, offset + size)
        if offset >= end or node.layer is None:
            return b""
        layer = self.layers[node.layer]
        limit = self.config.stream_timeout if layer.geo.shape == "stream" else (
            self.config.read_timeout)
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
                self._prefetch_run(layer, ahead)
        # A run from the file's start is a stream (cp, a hash, a loader): it reads on,
        # so its chunks are fetched whole. Any other may be one tensor of a random reader.
        whole = cursor.from_start
        try:
            with trio.fail_after(limit):
                if not layer.layout_ok:
                    await self._layout_ready(layer)
                if not whole and node.path.endswith(SAFETENSORS) and self._hinted(layer):
                    await self._tensor_readahead(node, layer, cursor, offset, end,
                                                 fresh=fresh)
                data = await self._read_range(layer, node.offset + offset, end - offset, whole)
        except trio.TooSlowError:
            msg = f"{node.path}: no data from the registry within {limit:.0f} s"
            self._note_error(msg)
            error = UnreachableError(msg)
            until = trio.current_time() + FAILED_READ_MEMORY_S
            for index in chunks:
                self._failed_reads[(layer.info.digest, index)] = (until, error)
            raise error from None
        self.counters.bytes_served += len(data)
        self._note_read(layer, node.offset + offset, node.offset + end)
        return data

    def _recently_failed(self, layer: LayerState, chunks: range) -> None:
        """Fail at once a read of a chunk whose read just timed out (see FAILED_READ_MEMORY_S)."""
        if not self._failed_reads:
            return
        now = trio.current_time()
        for key in [k for k, (until, _) in self._failed_reads.items() if until <= now]:
            del self._failed_reads[key]
        for index in chunks:
            failed = self._failed_reads.get((layer.info.digest, index))
            if failed is not None:
                raise failed[1]

    def _note_read(self, layer: LayerState, start: int, end: int) -> None:
        """Tell prefetch pacing that a reader got to `end` of the layer's stream."""
        self._pacer.read(layer.info.digest, (end - 1) // layer.geo.chunk_size)

    def status(self) -> dict[str, Any]:
        c = self.counters
        lookups = c.memory_hits + c.disk_hits + c.misses
        return {
            "bytes_fetched": c.bytes_fetched,
            "bytes_served": c.bytes_served,
            "bytes_cached_memory": self.memory.nbytes,
            "reads": c.reads,
            "hit_rate": (c.memory_hits + c.disk_hits) / lookups if lookups else None,
            "memory_hits": c.memory_hits,
            "disk_hits": c.disk_hits,
            "misses": c.misses,
            "requests": c.requests,
            "requests_in_flight": c.in_flight,
            "pending_writes": self.writes.pending,
            "prefetch": {"mode": self.config.prefetch, "total_bytes": c.prefetch_total,
                         "done_bytes": c.prefetch_done},
            "layers": [
                {"digest": d, "kind": layer.info.kind, "path": layer.info.path,
                 "shape": layer.geo.shape, "state": layer.state.value, "reason": layer.reason,
                 "streamed_chunks": layer.stream_next if layer.geo.shape == "stream" else None}
                for d, layer in self.layers.items()
            ],
            "errors": list(c.errors),
        }

    # -- reading ----------------------------------------------------------------------

    async def _read_range(self, layer: LayerState, start: int, length: int,
                          whole: bool = True) -> bytes | memoryview:
        layer.check()
        if self.config.verify == "strict" and layer.state is not State.VERIFIED:
            self._ensure_verification(layer)
            await layer.verified_event.wait()
            layer.check()
        size = layer.geo.chunk_size
        first, last = start // size, (start + length - 1) // size
        by_part = not whole and layer.geo.block_size > 0 and layer.info.digest not in self._planned
        if first == last:
            lo = start - first * size
            if by_part:
                return await self._part(layer, first, lo, lo + length)
            data = await self._chunk(layer, first, background=False)
            return memoryview(data)[lo : lo + length]
        if not by_part:
            self._prefetch_run(layer, range(first + 1, last + 1))
        parts = []
        for index in range(first, last + 1):
            lo = max(start - index * size, 0)
            hi = min(start + length - index * size, self._chunk_bytes(layer, index))
            if by_part:
                parts.append(await self._part(layer, index, lo, hi))
                continue
            data = await self._chunk(layer, index, background=False)
            parts.append(memoryview(data)[lo:hi])
        return b"".join(parts)

    def _key(self, layer: LayerState, index: int) -> str:
        if layer.geo.chunks:
            return layer.geo.chunks[index].key
        return layer.geo.position_key(index)

    def _cached(self, layer: LayerState, index: int) -> ChunkData | None:
        # First in, first out: a reader's touch does not keep a chunk. Its bytes are in the
        # kernel's page cache by then, and with LRU the chunks a reader had passed outlived
        # the ones prefetch had brought for it, which then came back from disk again.
        data = self.memory.get(self._key(layer, index), touch=False)
        if data is not None:
            self.counters.memory_hits += 1
        return data

    async def _chunk(self, layer: LayerState, index: int, *, background: bool) -> ChunkData:
        """One chunk's verified bytes, from wherever they are cheapest."""
        data = self._cached(layer, index)
        if data is not None:
            return data
        flight = self._flights.get((layer.info.digest, index))
        if flight is None:
            data = await self._from_disk(layer, index)
            if data is not None:
                return data
            flight = self._flights.get((layer.info.digest, index))
        if flight is None:
            if layer.geo.shape == "stream":
                self.counters.misses += 1
                flight = self._flights.joined((layer.info.digest, index))
                self._ensure_stream(layer, index)
            elif background:
                # Prefetch and verification merge the chunks after this one that are
                # not on disk. The request slot comes first, the claim after: a worker
                # holding a claimed run while it waited for a slot made a reader that
                # needs one of those chunks wait behind other background fetches.
                async with self._background:
                    size = layer.geo.chunk_size
                    absent = await self._absent(layer, range(
                        index, index + max(1, self.config.merge_limit // size)))
                    # fetched by someone else while we waited or looked?
                    data = (self._cached(layer, index) if index in absent
                            else await self._from_disk(layer, index))
                    if data is not None:
                        return data
                    flight = self._flights.get((layer.info.digest, index))
                    if flight is None:  # nobody claimed it while we waited or looked
                        self.counters.misses += 1
                        run = self._claim_run(layer, index, absent)
                        flight = self._flights.get((layer.info.digest, index))
                        await self._fetch_run(layer, run, background=True)
            else:  # a reader waiting now gets just its chunk
                self.counters.misses += 1
                run = self._claim_run(layer, index, set())
                flight = self._flights.get((layer.info.digest, index))
                await self._fetch_run(layer, run, background=False)
        assert flight is not None  # claimed above, ended by the fetch (or its failure)
        return await flight.result()

    async def _part(self, layer: LayerState, index: int, lo: int, hi: int) -> memoryview:
        """Bytes [lo, hi) of a chunk, fetching only the blocks they fall in if it is nowhere.

        For layers whose chunks carry block digests and that no prefetch brings
        whole. A readahead run still fetches whole chunks: its flight is joined.
        """
        key = (layer.info.digest, index)
        while True:
            layer.check()
            data = self._cached(layer, index)
            if data is None and key not in self._flights:
                gathered = self._partials.get(key)
                if gathered is not None and gathered.bad:
                    for b in self._blocks_of(layer, lo, hi):
                        if b in gathered.bad:
                            raise gathered.bad.pop(b)  # the next read fetches it again
                if gathered is not None and gathered.has(self._blocks_of(layer, lo, hi)):
                    self._partials[key] = self._partials.pop(key)  # most recently used
                    return memoryview(gathered.buffer)[lo:hi]
                if gathered is None:  # a partial means the disk had no copy when it began
                    data = await self._from_disk(layer, index)
            if data is None and key in self._flights:
                data = await self._chunk(layer, index, background=False)
            if data is None:
                # All its blocks here: the chunk, checked whole (served from it even where
                # neither memory nor disk keeps it). None: look again.
                data = await self._gather(layer, index, lo, hi)
            if data is not None:
                return memoryview(data)[lo:hi]

    @staticmethod
    def _blocks_of(layer: LayerState, lo: int, hi: int) -> range:
        return blocks_of(layer.geo.block_size, lo, hi)

    async def _gather(self, layer: LayerState, index: int, lo: int, hi: int) -> ChunkData | None:
        """Fetch the blocks of [lo, hi) nobody is fetching, wait for those others are.

        Returns once each block arrived or its fetch ended: the whole chunk if
        this completed it, else None and the caller looks again.
        """
        key = (layer.info.digest, index)
        gathered = self._partials.get(key)
        if gathered is None:
            gathered = self._partials[key] = Partial(self._chunk_bytes(layer, index))
            self._drop_partials(keep=key)
        blocks = self._blocks_of(layer, lo, hi)
        theirs = {gathered.flights[b] for b in blocks if b in gathered.flights}
        claim = Claim()
        claim.add(index, gathered, blocks)
        if claim.wanted:
            self.counters.misses += 1
            await self._fetch_claim(layer, claim)
        for event in theirs:
            await event.wait()
        if gathered.whole(layer.geo.block_size):
            return await self._complete(layer, index, gathered)
        return None

    async def _fetch_claim(self, layer: LayerState, claim: Claim) -> None:
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
        wanted, events, owners = claim.wanted, claim.events, claim.owners
        chunks = layer.geo.chunks
        bs = layer.geo.block_size
        digest = layer.info.digest
        runs = claim.runs(chunks, bs)
        left = dict.fromkeys(events, 0)
        for index, _ in wanted:
            left[index] += 1

        def arrived(index: int) -> None:
            left[index] -= 1
            if left[index] == 0:
                events[index].set()
                gathered = owners[index]
                if gathered.whole(layer.geo.block_size) and not gathered.completing:
                    self._spawn(self._complete_soon, layer, index, gathered)

        for run in runs:
            partials = [owners[index] for index, _ in run]
            parts = [memoryview(p.buffer)[b * bs : min((b + 1) * bs, len(p.buffer))]
                     for p, (_, b) in zip(partials, run, strict=True)]
            good: dict[int, bool] = {}
            bad: list[tuple[int, int]] = []

            def prepare(i: int, parts: list[memoryview] = parts,
                        run: list[tuple[int, int]] = run, good: dict[int, bool] = good) -> None:
                index, b = run[i]
                good[i] = block_matches(parts[i], chunks[index].blocks, b)

            def filled(i: int, parts: list[memoryview] = parts,
                       run: list[tuple[int, int]] = run, good: dict[int, bool] = good,
                       bad: list[tuple[int, int]] = bad,
                       partials: list[Partial] = partials) -> None:
                index, b = run[i]
                self.counters.bytes_fetched += len(parts[i])
                ok = good.pop(i) if i in good else block_matches(
                    parts[i], chunks[index].blocks, b)
                if ok:
                    partials[i].have.add(b)
                else:
                    # Marked now, raised after the request (not from inside the
                    # transport): a reader of this block, woken with its chunk, must
                    # fail at once, not look again until the request ends.
                    bad.append(run[i])
                    partials[i].bad[b] = IntegrityError(self._bad_block(layer, *run[i]))
                arrived(index)

            try:
                async with self._slots:
                    self.counters.in_flight += 1
                    self.counters.requests += 1
                    try:
                        await self.source.read_range_into(
                            digest, chunks[run[0][0]].blob_offset + run[0][1] * bs, parts,
                            filled, prepare, size=layer.info.size)
                    finally:
                        self.counters.in_flight -= 1
                if bad:
                    raise IntegrityError(self._bad_block(layer, *bad[0]))
            except Exception as exc:
                error = self._foreign(exc, f"fetching blocks of {digest[:19]}")
                self._failed(layer, error)
                if error is exc:
                    raise
                raise error from None

    @staticmethod
    def _bad_block(layer: LayerState, index: int, block: int) -> str:
        return (f"block {block} of chunk {index} of layer {layer.info.digest} "
                "does not match its digest")

    async def _complete(self, layer: LayerState, index: int, gathered: Partial
                        ) -> ChunkData | None:
        """A chunk gathered whole from blocks: check it whole and keep it like a fetched one.

        The partial stays registered (and serving its blocks) until the check is
        done, so nobody fetches them again meanwhile. Returns the checked chunk,
        or None when another task is completing it or it failed its digest.
        """
        key = (layer.info.digest, index)
        if gathered.completing or self._partials.get(key) is not gathered:
            return None
        chunk = layer.geo.chunks[index]
        gathered.completing = True
        try:
            result = await trio.to_thread.run_sync(self._checked, layer, chunk, gathered.buffer)
        finally:
            if self._partials.get(key) is gathered:
                del self._partials[key]
        if isinstance(result, KitfsError) or (
                chunk.key not in self.memory and key not in self._flights):
            self._accept(layer, chunk, result)  # a fetch claimed meanwhile settles its own
        return None if isinstance(result, KitfsError) else result

    async def _complete_soon(self, layer: LayerState, index: int, gathered: Partial) -> None:
        await self._complete(layer, index, gathered)

    def _drop_partials(self, keep: tuple[str, int]) -> None:
        """Keep at most MAX_PARTIALS partial chunks, dropping the least recently used idle ones."""
        excess = len(self._partials) - MAX_PARTIALS
        idle = [k for k, p in self._partials.items()
                if not p.flights and not p.completing and k != keep]
        for key in idle[:max(0, excess)]:
            del self._partials[key]

    async def _from_disk(self, layer: LayerState, index: int) -> ChunkData | None:
        """The chunk from the disk cache, else from memory if a fetch delivered it meanwhile.

        One load per chunk at a time: the kernel asks for a chunk's two 1 MiB
        halves at once and a prefetch worker may want it too; each used to read
        the chunk file itself. Those who come while it loads get its answer.
        """
        where = (layer.info.digest, index)
        load = self._loads.get(where)
        if load is not None:
            data = await load.wait()
            return data if data is not None else self._cached(layer, index)
        self._loads.start(where)
        data = None
        try:
            data = await self._load(layer, index)
            return data
        finally:
            self._loads.land(where, data)

    async def _load(self, layer: LayerState, index: int) -> ChunkData | None:
        """One read of the chunk file (for `_from_disk`), kept in memory if good.

        Straight to a thread, no stat first on the event loop: after a dropped
        page cache that stat reads the disk while every FUSE request waits. A
        fetch may start and finish during that lookup (seen under CPU load);
        answering None then made the caller fetch the chunk a second time.
        """
        key = self._key(layer, index)
        chunk = layer.geo.chunks[index] if layer.geo.chunks else None
        digest = chunk.digest if chunk is not None else None
        if digest is None:
            digest = layer.recorded.get(index)
            if digest is None:  # never verified by anyone: fetched again
                return self._cached(layer, index)
        try:
            data = await trio.to_thread.run_sync(self.store.get, key, digest)
        except _CacheErrorBase as exc:
            self._note_error(str(exc))
            return self._cached(layer, index)
        if data is None:
            return self._cached(layer, index)
        if chunk is not None and len(data) != chunk.size:
            log.warning("cached chunk %s has the wrong size: dropped", key)
            await trio.to_thread.run_sync(self.store.remove, key)
            return None
        self.counters.disk_hits += 1
        self.memory.put(key, data)
        self._got(layer, index)
        return data

    def _claim_run(self, layer: LayerState, index: int, absent: set[int],
                   last: int | None = None) -> list[Chunk]:
        """Chunk `index` and the chunks after it known to be `absent` from disk, up to the
        merge limit (and `last`, the end of a readahead window).

        A reader waiting now passes no `absent`: merging would make it wait for
        bytes it may never read (random tensor access). Which chunks are on
        disk is asked beforehand in a thread (`_absent`), never here on the
        event loop.
        """
        chunks = layer.geo.chunks
        run = [chunks[index]]
        self._flights.start((layer.info.digest, index))
        total = chunks[index].blob_size
        nxt = index + 1
        end = len(chunks) if last is None else min(len(chunks), last + 1)
        while (nxt < end and nxt in absent
               and total + chunks[nxt].blob_size <= self.config.merge_limit):
            if self._coming(layer, nxt):
                break
            self._flights.start((layer.info.digest, nxt))
            run.append(chunks[nxt])
            total += chunks[nxt].blob_size
            nxt += 1
        return run

    async def _fetch_run(self, layer: LayerState, run: list[Chunk], *, background: bool) -> None:
        """Fetch consecutive chunks with one range request and settle their flights.

        The response is received straight into one buffer per chunk, and each
        batch of chunks is checked and handed out as soon as it is complete,
        while the rest of the range still arrives: a reader waiting for the
        first chunk of a long readahead run does not wait for the whole run.

        Background fetches (readahead, prefetch, verification) first wait for the
        disk writes behind them to drain, so memory holds a bounded backlog of
        fetched chunks whatever the model size; a reader waiting now never waits
        for the disk.
        """
        digest = layer.info.digest
        start = run[0].blob_offset
        buffers: list[bytearray] = []
        pending = {c.index for c in run}
        batch: list[int] = []
        batch_bytes = 0

        def settle_batch() -> None:
            nonlocal batch, batch_bytes
            if batch:
                chunks = [run[i] for i in batch]
                pending.difference_update(c.index for c in chunks)
                self._spawn(self._settle, layer, chunks, [buffers[i] for i in batch])
                batch, batch_bytes = [], 0

        # Chunks the receiving thread already checked (see prepare).
        prepared: dict[int, ChunkData | KitfsError] = {}

        def prepare(i: int) -> None:
            """In the thread that received chunk i, right away: check it.

            Saves the event loop a thread hop per chunk. Storing it stays a
            separate job: done here too, the disk write (which may wait for
            writeback) held up draining the socket, and cold reads got slower.
            """
            prepared[i] = self._checked(layer, run[i], buffers[i])

        def filled(i: int) -> None:
            nonlocal batch_bytes
            self.counters.bytes_fetched += len(buffers[i])
            if i in prepared:
                pending.discard(run[i].index)
                self._accept(layer, run[i], prepared.pop(i))
                return
            batch.append(i)  # arrived another way: check it in a batch
            batch_bytes += len(buffers[i])
            if batch_bytes >= SETTLE_BATCH_BYTES:
                settle_batch()

        try:
            if background:  # inside the try: cancelled here, the claimed flights still settle
                await self.writes.backpressure()
            async with self._slots:
                # Allocated only now: runs queued for a slot must not hold memory.
                buffers.extend(new_buffer(c.blob_size) for c in run)
                self.counters.in_flight += 1
                self.counters.requests += 1
                try:
                    await self.source.read_range_into(
                        digest, start, [memoryview(b) for b in buffers], filled, prepare,
                        size=layer.info.size)
                finally:
                    self.counters.in_flight -= 1
                    settle_batch()  # what arrived whole is good whatever happens next
        except Exception as exc:
            error = self._foreign(exc, f"fetching layer {digest[:19]}")
            self._failed(layer, error)
            for index in pending:
                self._fail(layer, index, error)
        except BaseException:
            err = UnreachableError(f"fetch of layer {digest[:19]} was cancelled")
            for index in pending:
                self._fail(layer, index, err)
            raise

    async def _settle(self, layer: LayerState, chunks: list[Chunk], raws: list[bytearray]) -> None:
        """Check fetched chunks (one thread hop for the batch), then accept each.

        One hop per batch, not per chunk: hashing small chunks one hop each spent
        more time switching threads than hashing.
        """
        try:
            results = await trio.to_thread.run_sync(
                lambda: [self._checked(layer, c, r) for c, r in zip(chunks, raws, strict=True)])
        except BaseException:
            err = UnreachableError(f"checking chunks of layer {layer.info.digest[:19]} "
                                   "was cancelled")
            for chunk in chunks:
                self._fail(layer, chunk.index, err)
            raise
        for chunk, result in zip(chunks, results, strict=True):
            self._accept(layer, chunk, result)

    def _checked(self, layer: LayerState, chunk: Chunk, raw: bytearray) -> ChunkData | KitfsError:
        """`_decode`, with a bad chunk as a value: it fails that chunk, not its neighbours."""
        try:
            return self._decode(layer, chunk, raw)
        except KitfsError as exc:
            return exc

    def _failed(self, layer: LayerState, error: KitfsError) -> None:
        """A fetch or a check went wrong: noted, and a lie (IntegrityError) poisons a layer
        checked only as a whole.

        Where every chunk carries its own digest, a lie fails just the chunk it
        was in: nothing wrong was served, and the next read fetches it again
        (one bad response from a flaky proxy must not take a model away until
        remount).
        """
        if isinstance(error, IntegrityError) and not layer.geo.verified_by_chunk:
            self._poison(layer, str(error))
        self._note_error(str(error))

    def _accept(self, layer: LayerState, chunk: Chunk, result: ChunkData | KitfsError) -> None:
        """Hand out and store a checked chunk, or fail its readers (see `_failed`)."""
        if isinstance(result, KitfsError):
            self._failed(layer, result)
            self._fail(layer, chunk.index, result)
            return
        self._deliver(layer, chunk.index, chunk.key, result)

    def _got(self, layer: LayerState, index: int) -> None:
        """Chunk `index` is here; once all are, the layer is hashed against its digest."""
        layer.fetched.add(index)
        if layer.state is State.UNVERIFIED and len(layer.fetched) == len(layer.geo.chunks):
            self._ensure_verification(layer)

    def _decode(self, layer: LayerState, chunk: Chunk, raw: bytearray) -> ChunkData:
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

    def _deliver(self, layer: LayerState, index: int, key: str, data: ChunkData) -> None:
        self._partials.pop((layer.info.digest, index), None)  # whole now
        self._failed_reads.pop((layer.info.digest, index), None)
        self.memory.put(key, data)
        if layer.geo.chunks:
            self._got(layer, index)
        else:  # streamed: verified when the stream ends
            layer.fetched.add(index)
        self._flights.land((layer.info.digest, index), data)
        if self._nursery is not None:
            self.writes.later(key, data)

    def _fail(self, layer: LayerState, index: int, error: KitfsError) -> None:
        self._flights.abort((layer.info.digest, index), error)

    async def flush(self) -> None:
        """Wait until every fetched chunk is on disk: call before cancelling the nursery."""
        await self.writes.flush()

    def _note_error(self, message: str) -> None:
        if not self.counters.errors or self.counters.errors[-1] != message:
            log.warning("%s", message)
            self.counters.errors.append(message)

    # -- readahead and prefetch -------------------------------------------------------

    def _hinted(self, layer: LayerState) -> bool:
        """Whether tensor extents may steer reads of this layer: not if prefetch brings it
        whole anyway or it can only be streamed."""
        return (layer.geo.shape != "stream" and layer.info.digest not in self._planned
                and self._nursery is not None)

    async def _tensor_readahead(self, node: Node, layer: LayerState, cursor: Cursor, offset: int,
                                end: int, *, fresh: bool) -> None:
        """A read that begins a tensor asks for the rest of it at once, up to its end.

        The kernel splits a reader's pread of a tensor into 1 MiB requests, and
        answered one by one each is a registry round trip. Asked as one, the rest
        arrives while the kernel's requests for it wait on its blocks. Its end
        bounds the fetch, so the bytes fetched per byte read stay what they were.
        Only a read that starts
        a run (`fresh`) near a tensor's start begins one: a read in a tensor's
        middle may be a slice of it, and one that continues a run is the
        kernel's readahead running on past the tensor before (what each rule
        bought: benchmarks/TUNING.md, random tensor reads).
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
        if by_block and self._tensor_fetches >= MAX_TENSOR_FETCHES:
            return
        cursor.tensor_stop, cursor.tensor_front = stop, front
        if not by_block:
            size = layer.geo.chunk_size
            self._prefetch_run(layer, range((node.offset + end) // size,
                                            (node.offset + front - 1) // size + 1))
            return
        # Claimed before this read goes on, so it and the kernel's next requests find
        # their blocks on their way instead of asking for them themselves. The slot
        # is taken now and given back by _fetch_claimed (or here, if nothing to fetch).
        self._tensor_fetches += 1
        claim = None
        try:
            claim = await self._claim_blocks(layer, node.offset + begin, node.offset + front)
        finally:
            if claim is None:
                self._tensor_fetches -= 1
        if claim is not None:
            self._spawn(self._fetch_claimed, layer, claim)

    async def _extents_of(self, node: Node, layer: LayerState) -> TensorExtents | None:
        """The file's tensor extents, read once from its header (one read at a time)."""
        if node.path in self._extents:
            return self._extents[node.path]
        loading = self._extent_loads.get(node.path)
        if loading is not None:
            await loading.wait()
            return self._extents.get(node.path)
        self._extent_loads.start(node.path)
        try:
            found = None
            prefix = await self._read_range(layer, node.offset, min(LENGTH_PREFIX, node.size),
                                            False)
            length = header_length(bytes(prefix), node.size)
            if length is not None:
                header = await self._read_range(layer, node.offset + LENGTH_PREFIX, length, False)
                found = tensor_extents(bytes(header), node.size)
            self._extents[node.path] = found
            return found
        except KitfsError:
            return None  # the read itself says what is wrong
        finally:
            self._extent_loads.land(node.path, self._extents.get(node.path))

    async def _claim_blocks(self, layer: LayerState, start: int, end: int) -> Claim | None:
        """Claim the blocks of bytes [start, end) of a layer that nobody has or fetches.

        Chunks in memory, on disk or being fetched whole are left alone. The
        claimed blocks are in flight from here on: `_fetch_claimed` must follow
        at once, and it ends every flight whatever happens.
        """
        digest = layer.info.digest
        size = layer.geo.chunk_size
        chunks = layer.geo.chunks
        todo = [i for i in range(start // size, min(len(chunks), (end - 1) // size + 1))
                if (digest, i) not in self._flights and chunks[i].key not in self.memory]
        absent = await self._absent(layer, todo)
        claim = Claim()
        for index in todo:
            key = (digest, index)
            if index not in absent or key in self._flights or chunks[index].key in self.memory:
                continue
            gathered = self._partials.get(key)
            if gathered is None:
                gathered = self._partials[key] = Partial(chunks[index].size)
                self._drop_partials(keep=key)
            elif gathered.completing:
                continue
            lo, hi = max(start - index * size, 0), min(end - index * size, chunks[index].size)
            claim.add(index, gathered, self._blocks_of(layer, lo, hi))
        return claim if claim.wanted else None

    async def _fetch_claimed(self, layer: LayerState, claim: Claim) -> None:
        """Fetch claimed blocks in as few requests as can be, then end their flights.

        Failures are left to the readers, who fetch what they still need themselves.
        """
        self.counters.misses += len(claim.events)
        try:
            await self._fetch_claim(layer, claim)
        except KitfsError:
            pass  # noted by _fetch_blocks
        finally:
            self._tensor_fetches -= 1

    def _prefetch_run(self, layer: LayerState, indexes: range) -> None:
        """Start fetching chunks not yet here, without waiting for them."""
        if layer.geo.shape == "stream" or self._nursery is None or not indexes:
            return
        todo = [i for i in indexes if i < len(layer.geo.chunks) and not self._coming(layer, i)]
        if todo:
            self._spawn(self._ahead, layer, todo, indexes[-1])

    def _coming(self, layer: LayerState, index: int) -> bool:
        """In memory, or on its way whole or block by block: not worth another request.

        Blocks count too: a tensor longer than the mid-file readahead threshold
        had its chunks fetched both ways, by blocks and whole.
        """
        key = (layer.info.digest, index)
        gathered = self._partials.get(key)
        return (key in self._flights or layer.geo.chunks[index].key in self.memory
                or (gathered is not None and bool(gathered.flights)))

    async def _ahead(self, layer: LayerState, todo: list[int], last: int) -> None:
        """Bring chunks `todo` in ahead of their reader: from disk where they are, else fetch."""
        absent = await self._absent(layer, todo)
        for index in todo:
            if self._coming(layer, index):
                continue  # someone else got to it while we looked
            if index not in absent:
                # On disk: load it into memory ahead of the reader, as a flight others join.
                flight = self._flights.start((layer.info.digest, index))
                self._spawn(self._load_ahead, layer, index, flight)
                continue
            self._spawn(partial(self._fetch_run, background=True), layer,
                        self._claim_run(layer, index, absent, last))

    async def _absent(self, layer: LayerState, indexes: Sequence[int]) -> set[int]:
        """Which of these chunks have no file in the disk cache, asked in one thread hop.

        Not on the event loop: after the page cache was dropped each stat may
        read the disk, and the loop serving every FUSE request must not wait.
        A cache that cannot be looked into counts as empty (the chunks are fetched).
        """
        chunks = layer.geo.chunks
        wanted = [i for i in indexes if i < len(chunks)
                  and (chunks[i].digest is not None or i in layer.recorded)]
        try:
            present = await trio.to_thread.run_sync(
                lambda: [self.store.contains(chunks[i].key) for i in wanted])
        except _CacheErrorBase as exc:
            self._note_error(str(exc))
            return set(wanted)
        absent = {i for i in indexes if i < len(chunks)} - set(wanted)
        return absent | {i for i, here in zip(wanted, present, strict=True) if not here}

    async def _load_ahead(self, layer: LayerState, index: int, flight: Flight[ChunkData]
                          ) -> None:
        """Bring a disk-cached chunk into memory ahead of its reader (a flight others join)."""
        key = (layer.info.digest, index)
        try:
            async with self._disk_reads:
                data = await self._from_disk(layer, index)
            if data is None:
                # Vanished or corrupt since contains(): fetch it for those waiting; the
                # flight stays registered so the fetch settles it.
                await self._fetch_run(layer, [layer.geo.chunks[index]], background=True)
                return
            self._flights.land(key, data)
        finally:
            self._flights.drop(key, flight)
            if not flight.ended:  # cancelled: waiting readers must not hang
                flight.end(None, UnreachableError("reading a cached chunk was interrupted"))

    async def _prefetch(self, plan: list[tuple[str, int]]) -> None:
        """Load what model loaders read first, in the order they read it, in the background."""
        self.counters.prefetch_total = sum(
            self._chunk_bytes(self.layers[d], i) for d, i in plan)
        # Only the weight stream is paced: a chunk right after the plan's previous
        # one. Headers and small files are single jumps ahead of any reader; pacing
        # them held the whole plan behind the header of a shard far ahead (the reader
        # then fetched on its own and prefetch came in behind it).
        todo = iter([(d, i, k > 0 and plan[k - 1] == (d, i - 1))
                     for k, (d, i) in enumerate(plan)])

        async def worker() -> None:
            for digest, index, streaming in todo:
                layer = self.layers[digest]
                if streaming:
                    await self._prefetch_pace(layer, index)
                if layer.state is not State.POISONED:
                    try:
                        await self._chunk(layer, index, background=True)
                    except Exception as exc:
                        self._note_error(f"prefetch: {self._foreign(exc, 'prefetch')}")
                        await trio.sleep(1)
                self.counters.prefetch_done += self._chunk_bytes(layer, index)

        async with trio.open_nursery() as workers:
            for _ in range(PREFETCH_WORKERS):
                workers.start_soon(worker)
        for layer in self.layers.values():
            if self.config.prefetch == "all" or layer.info.kind in ("model", "modelpart"):
                self._ensure_verification(layer)

    async def _prefetch_pace(self, layer: LayerState, index: int) -> None:
        """At most half a memory tier ahead of a reader of this layer (see Pacer)."""
        lead = max(1, self.config.memory_bytes // 2 // layer.geo.chunk_size)

        async def on_disk(i: int) -> bool:
            return not await self._absent(layer, [i])

        await self._pacer.pace(layer.info.digest, index, lead, on_disk)

    def _chunk_bytes(self, layer: LayerState, index: int) -> int:
        if layer.geo.chunks:
            return layer.geo.chunks[index].size
        return layer.geo.chunk_size

    # -- streamed (non-seekable) layers -------------------------------------------------

    def _ensure_stream(self, layer: LayerState, index: int) -> None:
        if layer.stream_running and index >= layer.stream_next:
            return
        layer.stream_running = True
        self._spawn(self._stream, layer)

    async def _stream(self, layer: LayerState) -> None:
        """Read a gzip/zstd layer from its start, its chunks handed out as they decompress."""
        digest = layer.info.digest
        hashes: dict[int, str] = {}  # chunk index -> BLAKE3, in the order they came

        def emit(data: bytes, blake3: str) -> None:
            index = len(hashes)  # a stream started again counts from its start
            hashes[index] = layer.recorded[index] = blake3
            layer.stream_next = index + 1
            self._deliver(layer, index, layer.geo.position_key(index), data)

        def received(n: int) -> None:
            self.counters.bytes_fetched += n

        try:
            async with self._slots:
                self.counters.in_flight += 1
                self.counters.requests += 1
                try:
                    count = await cut_chunks(self.source, layer.info, layer.geo.chunk_size,
                                             emit, self.writes.backpressure, received)
                finally:
                    self.counters.in_flight -= 1
            layer.stream_chunks = count
            layer.stream_digests = hashes
            # stream_blob checked the blob digest at its end: the layer is verified.
            await self._mark_verified(layer, [hashes[i] for i in range(count)])
        except Exception as exc:
            error = self._foreign(exc, f"streaming layer {digest[:19]}")
            if not isinstance(error, IntegrityError):
                layer.verify_started = False  # what was served is checked by a later stream
            self._failed(layer, error)
            for (d, i) in self._flights.pending():
                if d == digest:
                    self._fail(layer, i, error)
        finally:
            layer.stream_running = False
        # Readers waiting for chunks past the end of the stream get nothing more.
        for (d, i) in self._flights.pending():
            if d == digest:
                self._fail(layer, i, IntegrityError(f"layer {digest} has no chunk {i}"))

    # -- the layer's layout ------------------------------------------------------------

    async def _layout_ready(self, layer: LayerState) -> None:
        """Wait until the layer's entries are known to be its tar's (one check, many waiters).

        A check that could not finish (the registry failed it) fails the reads
        waiting for it; the next read starts another.
        """
        while not layer.layout_ok:
            layer.check()
            event = layer.layout_check
            if event is None:
                event = layer.layout_check = trio.Event()
                layer.layout_error = None
                if self._nursery is None:
                    await self._check_layout(layer, event)
                else:
                    self._spawn(self._check_layout, layer, event)
            await event.wait()
            layer.check()
            if not layer.layout_ok and layer.layout_error is not None:
                raise layer.layout_error

    async def _check_layout(self, layer: LayerState, event: trio.Event) -> None:
        """Walk the tar headers over verified chunks and hold the listed entries to them.

        Only headers are read (a block or chunk per big file, one window per
        run of small ones), each checked like any chunk. A table of contents
        that disagrees poisons the layer: its author tried to show other files
        than `kit unpack` writes.
        """
        assert layer.layout is not None
        size = layer.geo.stream_size if layer.geo.stream_size is not None else layer.info.size
        try:
            problem = await walk_layout(
                layer.layout, size,
                lambda offset, length: self._read_range(layer, offset, length, False))
            if problem is not None:
                self._poison(layer, problem)
                return
            layer.layout_ok = True
            if layer.layout.origin == "walked":
                await self._keep_layout(layer)
        except Exception as exc:
            layer.layout_error = self._foreign(exc, "checking a layer's layout")
            self._note_error(f"checking the files of layer {layer.info.digest[:19]}: "
                             f"{layer.layout_error}")
        finally:
            layer.layout_check = None
            event.set()

    async def _keep_layout(self, layer: LayerState) -> None:
        """Cache a layout now bound to the layer digest, so later mounts skip the walk."""
        if self.toc_cache is None or layer.layout is None:
            return
        await self._record(self.toc_cache.put, layer.info.digest,
                           layout_record(layer.info, layer.layout.entries))

    async def _record(self, put: Callable[[str, bytes], None], digest: str, data: bytes
                      ) -> None:
        """Write a per-layer record in a thread: it is synced, and the event loop serves
        every FUSE request meanwhile. A record that cannot be written is only noted."""
        try:
            await trio.to_thread.run_sync(put, digest, data)
        except _CacheErrorBase as exc:
            self._note_error(str(exc))

    # -- verification -----------------------------------------------------------------

    def _ensure_verification(self, layer: LayerState) -> None:
        if layer.state in (State.VERIFIED, State.POISONED) or layer.verify_started:
            return
        layer.verify_started = True
        if layer.geo.shape == "stream":
            if not layer.stream_running:
                layer.stream_running = True
                self._spawn(self._stream, layer)
            return
        self._spawn(self._verify, layer)

    async def _verify(self, layer: LayerState) -> None:
        """Hash the whole layer against its digest (fetching what is missing), in order.

        Until then nothing binds what was served to the layer digest: neither
        the bytes of a layer without chunk digests, nor the chunk digests a
        table of contents claims. The tar headers of a layer listed by range
        are walked over the same bytes and must give the entries it was
        listed with.
        """
        layer.verifying()
        try:
            if layer.geo.shape == "seekable":
                problem = await hash_seekable(layer.info, layer.geo.chunks, self.source,
                                              partial(self._checked, layer))
                digests = [c.digest or "" for c in layer.geo.chunks]
            else:
                problem, digests = await hash_ranged(
                    layer.info, layer.geo.chunks, layer.layout,
                    partial(self._chunk, layer, background=True))
        except Exception as exc:
            layer.postponed()
            self._note_error(f"verification of {layer.info.digest[:19]} postponed: "
                             f"{self._foreign(exc, 'verification')}")
            return
        if problem is not None:
            self._poison(layer, problem)
            return
        if layer.state is State.POISONED:  # by a reader while this hashed: stays so
            return
        if layer.layout is not None and layer.layout.origin == "walked":
            await self._keep_layout(layer)
        await self._mark_verified(layer, digests)
        if any(c.digest is None for c in layer.geo.chunks):
            await self._adopt(layer, digests)

    async def _adopt(self, layer: LayerState, digests: list[str]) -> None:
        """Give a verified layer's chunk files the digest keys later mounts look them up by."""
        await self.writes.flush()  # a chunk still being written would keep its old key
        geo = layer.geo
        moves = [(geo.position_key(i), chunk_key_for_digest(d))
                 for i, d in enumerate(digests) if geo.chunks[i].digest is None]
        try:
            await trio.to_thread.run_sync(
                lambda: [self.store.adopt(old, new) for old, new in moves])
        except _CacheErrorBase as exc:
            self._note_error(str(exc))

    async def _mark_verified(self, layer: LayerState, digests: list[str]) -> None:
        if not layer.verified():  # poisoned meanwhile: that is final
            return
        log.info("layer %s verified end to end", layer.info.digest)
        if self.toc_cache is not None and layer.geo.shape != "stream":
            await self._record(self.toc_cache.put_verified, layer.info.digest,
                               verified_record(layer.geo.chunk_size, layer.info.size, digests))

    def _poison(self, layer: LayerState, reason: str) -> None:
        """The layer lied: fail every read of it from now on and forget what it left."""
        if not layer.poisoned(reason):
            return
        log.error("layer %s poisoned: %s; every read of it fails from now on",
                  layer.info.digest, reason)
        self.counters.errors.append(f"layer {layer.info.digest[:19]} poisoned: {reason}")
        for gathering in [k for k in self._partials if k[0] == layer.info.digest]:
            del self._partials[gathering]
        keys = [c.key for c in layer.geo.chunks if c.digest is None]
        for key in keys:
            self.memory.discard(key)
        if layer.geo.shape == "stream":
            for i in range(layer.stream_next):
                self.memory.discard(layer.geo.position_key(i))
        if self.on_poison is not None:
            nodes = [n for n in self.tree.files() if n.layer == layer.info.digest]
            self._spawn(self.on_poison, nodes)
        self._spawn(self._purge, layer)

    async def _purge(self, layer: LayerState) -> None:
        try:
            await trio.to_thread.run_sync(self.store.remove_layer, layer.info.digest)
            if self.toc_cache is not None:
                await trio.to_thread.run_sync(self.toc_cache.remove_verified, layer.info.digest)
                await trio.to_thread.run_sync(self.toc_cache.remove, layer.info.digest)
        except _CacheErrorBase as exc:
            self._note_error(str(exc))

