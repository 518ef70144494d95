"""The read path: file ranges to chunk reads, cache lookups, fetches, verification, prefetch."""
