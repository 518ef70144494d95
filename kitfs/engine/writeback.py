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
- at most WRITERS writer tasks run, each writing up to WRITE_BATCH queued
  chunks per worker-thread hop (one hop per chunk cost more in thread
  wake-ups than the O_DIRECT write itself, benchmarks/TUNING.md); a writer
  ends when the queue is empty, and `later` starts one while fewer run;
- `_finished` is set and replaced only by a finishing write, never by a
  waiter: a waiter that replaced it would strand the waiters before it;
- a write that fails is noted (the chunk is fetched again when next
  needed), never raised: a full or broken cache disk must not fail a read.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from kitfs.cache.fileformat import CacheError
from kitfs.cache.keys import is_position_key
from kitfs.cache.memory import ChunkData
from kitfs.cache.store import ChunkStore

log = logging.getLogger(__name__)

#: Chunks fetched but not yet on disk before background fetching pauses (bounds memory).
MAX_PENDING = 16
#: Writer tasks (and so chunk writes) running at once.
WRITERS = 2
#: Chunks one writer writes per worker-thread hop, at most.
WRITE_BATCH = 8


class WriteBack:
    def __init__(self, store: ChunkStore, spawn: Callable[..., None],
                 note_error: Callable[[str], None]) -> None:
        self.store = store
        self._spawn = spawn
        self._note_error = note_error
        self._queue: deque[tuple[str, ChunkData]] = deque()
        self._writers = 0
        self.pending = 0
        self._finished = trio.Event()

    def later(self, key: str, data: ChunkData) -> None:
        """Queue chunk `key` for the disk cache; returns at once. Only once the engine runs
        in its nursery: `spawn` must run the write, or `flush` would wait for it forever."""
        self.pending += 1  # counted now: flush() sees writes not started
        self._queue.append((key, data))
        if self._writers < WRITERS:
            self._writers += 1
            self._spawn(self._writer)

    async def _writer(self) -> None:
        try:
            while self._queue:
                batch = [self._queue.popleft()
                         for _ in range(min(WRITE_BATCH, len(self._queue)))]
                try:
                    errors = await trio.to_thread.run_sync(self._put_all, batch)
                finally:
                    self.pending -= len(batch)
                    self._finished.set()
                    self._finished = trio.Event()
                for message in errors:
                    self._note_error(message)
        finally:  # only cancellation ends a writer early: _put_all raises nothing else
            self._writers -= 1

    def _put_all(self, batch: list[tuple[str, ChunkData]]) -> list[str]:
        """Store chunks (in a thread); why each that failed did. Every chunk is tried: one
        that fails, however, must not keep the others from the disk."""
        errors = []
        for key, data in batch:
            try:
                self._put(key, data)
            except CacheError as exc:
                errors.append(str(exc))
            except Exception as exc:  # a bug or a library's surprise: logged with its trace
                log.error("writing chunk %s to the cache", key, exc_info=exc)
                errors.append(f"writing chunk {key}: unexpected {type(exc).__name__}: {exc}")
        return errors

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
