"""The local chunk cache shared by every kitfs mount on a node.

Synchronous and free of network code: it knows keys and bytes on disk, and
callers run the big operations (puts, gc, verify) in threads.
"""

from kitfs.cache.fileformat import HEADER_SIZE, CacheError
from kitfs.cache.keys import (
    BadKeyError,
    chunk_key_for_digest,
    chunk_key_for_position,
    validate_key,
)
from kitfs.cache.memory import DEFAULT_MEMORY_TIER_BYTES, MemoryTier
from kitfs.cache.store import CacheStats, CacheUsage, ChunkStore, GcResult, VerifyResult
from kitfs.cache.tocs import TocCache

__all__ = [
    "DEFAULT_MEMORY_TIER_BYTES",
    "HEADER_SIZE",
    "BadKeyError",
    "CacheError",
    "CacheStats",
    "CacheUsage",
    "ChunkStore",
    "GcResult",
    "MemoryTier",
    "TocCache",
    "VerifyResult",
    "chunk_key_for_digest",
    "chunk_key_for_position",
    "validate_key",
]
