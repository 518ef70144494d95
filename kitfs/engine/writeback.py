"""Write-back: fetched chunks go to the shared disk cache off the read path, in bounded number.

A reader never waits for the disk: a chunk is handed out from memory as soon
as it is checked, and its write is queued here. What is bounded is the
backlog: background fetches (readahead, prefetch, verification, streamed
layers) wait in `backpressure()` while more than MAX_PENDING writes are
queued, so memory holds a bounded number of fetched chunks whatever the
model size, and `flush()` at unmount waits for every write to land.

Invariants:
- `pending` counts writes handed over by `later()` and not yet finished,
  started or not (so `flush()` also sees writes still waiting for a writer);
- at most WRITERS writes run at once, each in a worker thread;
- `_finished` is set and replaced only by a finishing write, never by a
  waiter: a waiter that replaced it would strand the waiters before it;
- a write that fails is noted (the chunk is fetched again when next
  needed), never raised: a full or broken cache disk must not fail a read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from kitfs.cache.fileformat import CacheError
from kitfs.cache.keys import is_position_key
from kitfs.cache.memory import ChunkData
from kitfs.cache.store import ChunkStore

#: Chunks fetched but not yet on disk before background fetching pauses (bounds memory).
MAX_PENDING = 16
#: Chunk writes running at once.
WRITERS = 2


class WriteBack:
    def __init__(self, store: ChunkStore, spawn: Callable[..., None],
                 note_error: Callable[[str], None]) -> None:
        self.store = store
        self._spawn = spawn
        self._note_error = note_error
        self._writers = trio.CapacityLimiter(WRITERS)
        self.pending = 0
        self._finished = trio.Event()

    def later(self, key: str, data: ChunkData) -> None:
        """Queue chunk `key` for the disk cache; returns at once. Only once the engine runs
        in its nursery: `spawn` must run the write, or `flush` would wait for it forever."""
        self.pending += 1  # counted now: flush() sees writes not started
        self._spawn(self._write, key, data)

    async def _write(self, key: str, data: ChunkData) -> None:
        try:
            async with self._writers:
                await trio.to_thread.run_sync(self._put, key, data)
        except CacheError as exc:
            self._note_error(str(exc))
        finally:
            self.pending -= 1
            self._finished.set()
            self._finished = trio.Event()

    def _put(self, key: str, data: ChunkData) -> None:
        """Store a chunk (in a thread). A file under a position key may be one nobody
        verified (another process's, or from before a crash): this chunk replaces it."""
        if is_position_key(key):
            self.store.remove(key)
        self.store.put(key, data)

    async def at_most(self, count: int) -> None:
        """Until no more than `count` writes are pending."""
        while self.pending > count:
            await self._finished.wait()

    async def backpressure(self) -> None:
        await self.at_most(MAX_PENDING)

    async def flush(self) -> None:
        await self.at_most(0)

    def status(self) -> dict[str, Any]:
        return {"pending_writes": self.pending}
