"""What every part of the read path shares: the mounted layers, the caches, the tables of
work in flight, the request slots and the nursery background work runs in.

The parts (engine/chunks.py, blocks.py, tensors.py, prefetch.py, streamed.py,
integrity.py) each own their logic and keep no second copy of this state, so
"is chunk i of layer L here, coming, or failed?" has one answer wherever it
is asked. Everything here lives on the Trio event loop: from worker threads
only the MemoryTier (which locks) and a layer's `recorded` digests (one
chunk's entry per check, read on the loop only after that check returned)
are touched.

Invariants of a Context:
- `flights` holds a (layer, chunk) exactly while one fetch or chunk-file load
  is bringing that whole chunk (engine/flights.py says how flights end);
- `partials` holds the chunks being gathered block by block, never one that
  is in memory (a delivered chunk's partial is dropped the moment it lands);
- background fetches (readahead beyond a read, prefetch, verification) hold
  at most `background` of the `slots` at once, so a foreground read always
  finds a request slot soon;
- `spawn` starts nothing before the engine is started, and nothing it starts
  can end the nursery with an exception (see `guarded`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from kitfs.cache.fileformat import CacheError
from kitfs.cache.memory import ChunkData, MemoryTier
from kitfs.cache.store import ChunkStore
from kitfs.cache.tocs import TocCache
from kitfs.engine.api import PrefetchMode, VerifyMode
from kitfs.engine.blocks import Partials
from kitfs.engine.flights import Flights
from kitfs.engine.layerstate import LayerState
from kitfs.engine.writeback import WriteBack
from kitfs.errors import KitfsError
from kitfs.modelkit.toc import DEFAULT_CHUNK_SIZE
from kitfs.modelkit.tree import Node, Tree
from kitfs.oci.source import BlobSource

log = logging.getLogger(__name__)

#: Reads bytes [offset, offset + length) of a layer's stream, each chunk checked, block by
#: block where it can (the engine's `_read_parts`): what header walks and tensor extents use.
LayerRead = Callable[[LayerState, int, int], Awaitable[bytes | memoryview]]


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
    #: Read back chunks of uncompressed layers without digests that another process
    #: fetched and never verified (one killed mid-unpack), their frame's xxh3 checked:
    #: only for a caller that uses nothing of such a layer before `Engine.verified`
    #: says it matched its digest end to end (unpack). A mount serves bytes before
    #: that, so it keeps to the chunks it fetched itself.
    reuse_unverified: bool = False
    #: Hash each layer end to end as soon as all of it has been here (a mount: that binds
    #: what it served to the digest and records the layer for later mounts). Off, a layer
    #: is hashed only when `Engine.verified` asks (unpack: a layer whose chunks carry
    #: digests needs no more, and the hash would read it all back from disk).
    verify_when_whole: bool = True


@dataclass
class Counters:
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


class Context:
    def __init__(self, source: BlobSource, store: ChunkStore, config: EngineConfig, tree: Tree,
                 layers: dict[str, LayerState], toc_cache: TocCache | None) -> None:
        self.source = source
        self.store = store
        self.config = config
        self.tree = tree
        self.layers = layers
        self.toc_cache = toc_cache
        self.memory = MemoryTier(config.memory_bytes)
        self.counters = Counters()
        self.flights: Flights[tuple[str, int], ChunkData] = Flights()
        self.partials = Partials()
        #: (layer, chunk) -> (until when, why): chunks whose read just timed out. The
        #: kernel asks again for the page it could not read ahead, and that second
        #: request must fail at once, not wait a whole deadline more; a chunk that
        #: arrives after all is forgotten here when delivered.
        self.recent_failures: dict[tuple[str, int], tuple[float, KitfsError]] = {}
        #: Layers the prefetch plan brings whole: their reads never go block by block.
        self.planned: set[str] = set()
        self.slots = trio.CapacityLimiter(max(1, config.max_requests))
        self.background = trio.CapacityLimiter(max(1, config.max_requests // 2))
        self.writes = WriteBack(store, self.spawn, self.note_error)
        self.nursery: trio.Nursery | None = None
        #: Told which files of a poisoned layer the kernel may still hold pages of
        #: (fs/ drops them): wrong bytes must not stay readable from the page cache.
        self.on_poison: Callable[[list[Node]], Awaitable[None]] | None = None

    # -- background work --------------------------------------------------------------

    def spawn(self, fn: Any, *args: Any) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(self.guarded, fn, *args)

    async def guarded(self, fn: Any, *args: Any) -> None:
        """Run a background task; nothing it raises but cancellation may reach the nursery.

        The nursery is the mount's root: an exception escaping it (a bug, or a
        foreign exception from a library) would end the daemon and leave every
        reader with ENOTCONN. Such a task's readers still wait only until their
        own deadline.
        """
        try:
            await fn(*args)
        except Exception as exc:
            self.note_error(str(foreign(exc, getattr(fn, "__name__", "background task"))))

    def note_error(self, message: str) -> None:
        if not self.counters.errors or self.counters.errors[-1] != message:
            log.warning("%s", message)
            self.counters.errors.append(message)

    async def record(self, put: Callable[[str, bytes], None], digest: str, data: bytes
                     ) -> None:
        """Write a per-layer record in a thread: it is synced, and the event loop serves
        every FUSE request meanwhile. A record that cannot be written is only noted."""
        try:
            await trio.to_thread.run_sync(put, digest, data)
        except CacheError as exc:
            self.note_error(str(exc))

    # -- chunks of a layer --------------------------------------------------------------

    @staticmethod
    def key(layer: LayerState, index: int) -> str:
        """The chunk's key in the memory tier and the disk cache."""
        if layer.geo.chunks:
            return layer.geo.chunks[index].key
        return layer.geo.position_key(index)

    @staticmethod
    def chunk_bytes(layer: LayerState, index: int) -> int:
        if layer.geo.chunks:
            return layer.geo.chunks[index].size
        return layer.geo.chunk_size

    def cached(self, layer: LayerState, index: int) -> ChunkData | None:
        """The chunk from the memory tier, if there.

        First in, first out: a reader's touch does not keep a chunk. Its bytes
        are in the kernel's page cache by then, and with LRU the chunks a reader
        had passed outlived the ones prefetch had brought for it, which then
        came back from disk again.
        """
        data = self.memory.get(self.key(layer, index), touch=False)
        if data is not None:
            self.counters.memory_hits += 1
        return data

    def coming(self, layer: LayerState, index: int) -> bool:
        """In memory, or on its way whole or block by block: not worth another request.

        Blocks count too: a tensor longer than the mid-file readahead threshold
        had its chunks fetched both ways, by blocks and whole.
        """
        key = (layer.info.digest, index)
        return (key in self.flights or layer.geo.chunks[index].key in self.memory
                or self.partials.busy(key))


def foreign(exc: Exception, where: str) -> KitfsError:
    """`exc` as the KitfsError its readers get: itself, or (a bug, or a library's own
    exception, logged with its traceback) one line saying where it came from."""
    if isinstance(exc, KitfsError):
        return exc
    log.error("unexpected error in %s", where, exc_info=exc)
    return KitfsError(f"{where}: unexpected {type(exc).__name__}: {exc}")
