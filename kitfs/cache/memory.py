"""A small in-process LRU of the chunks being served right now.

FUSE read requests are 128 KiB-1 MiB while chunks are several MiB, so one
chunk answers many consecutive requests; keeping it in memory saves a
checked disk read (open + read + xxh3) per request. Bounded by bytes, not
entries, because chunk sizes differ (a layer's last chunk is short).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

DEFAULT_MEMORY_TIER_BYTES = 256 * 1024 * 1024

#: A chunk's bytes. A bytearray is the buffer the chunk was received into from
#: the network, a memoryview the part of a disk read that is the payload (no
#: copy either way); nobody writes to it once it is handed out.
ChunkData = bytes | bytearray | memoryview


class MemoryTier:
    """LRU of chunk payloads, O(1) get/put, thread-safe; never holds more than `capacity` bytes.

    A payload larger than the whole capacity is not kept (it would evict
    everything else and then itself).
    """

    def __init__(self, capacity: int = DEFAULT_MEMORY_TIER_BYTES) -> None:
        if capacity < 0:
            raise ValueError(f"memory tier capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, ChunkData] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, *, touch: bool = True) -> ChunkData | None:
        """The payload, if kept; `touch=False` leaves its place in the eviction order."""
        with self._lock:
            data = self._items.get(key)
            if data is not None and touch:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: ChunkData) -> None:
        """Keep `data`; the caller must not change it afterwards (it is served as is)."""
        size = len(data)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            if size > self.capacity:
                return
            self._items[key] = data
            self._bytes += size
            while self._bytes > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
