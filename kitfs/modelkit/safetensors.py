"""Where each tensor of a safetensors file lies, from its header.

A reader that jumps into a shard (one tensor of a lazy loader, a random
reader) asks the kernel for the tensor's bytes, and the kernel hands them
to the daemon 1 MiB at a time, each request a round trip to the registry.
Knowing the tensor's extent at its first request lets the engine ask for
the rest of it at once, and stop exactly at its end.

The layout (https://github.com/huggingface/safetensors): 8 bytes of
little-endian header length N, N bytes of JSON mapping each tensor name to
`data_offsets` [begin, end) counted from byte 8 + N, and an optional
`__metadata__` entry. This is a hint, never a source of bytes: anything
malformed means "no extents", not an error.
"""

from __future__ import annotations

import bisect
import json

SUFFIX = ".safetensors"
LENGTH_PREFIX = 8
#: The safetensors library accepts headers up to 100 MB; real ones are well under
#: 1 MiB even for thousands of tensors. A hint is not worth fetching more for.
MAX_HEADER = 8 << 20


def header_length(prefix: bytes, file_size: int) -> int | None:
    """N from the first 8 bytes of a file of `file_size` bytes, None if it cannot be one."""
    if len(prefix) < LENGTH_PREFIX:
        return None
    n = int.from_bytes(prefix[:LENGTH_PREFIX], "little")
    if n < 2 or n > MAX_HEADER or LENGTH_PREFIX + n > file_size:
        return None
    return n


class TensorExtents:
    """The [start, end) file offsets of every tensor, sorted, searchable by offset."""

    __slots__ = ("ends", "starts")

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        spans.sort()
        self.starts = [s for s, _ in spans]
        self.ends = [e for _, e in spans]

    def __len__(self) -> int:
        return len(self.starts)

    def at(self, offset: int) -> tuple[int, int] | None:
        """The tensor holding byte `offset` of the file, if one does."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and offset < self.ends[i]:
            return self.starts[i], self.ends[i]
        return None


def tensor_extents(header: bytes, file_size: int) -> TensorExtents | None:
    """Parse the JSON header (the N bytes after the length); None if it is not one."""
    try:
        table = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(table, dict):
        return None
    base = LENGTH_PREFIX + len(header)
    spans: list[tuple[int, int]] = []
    for name, info in table.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            return None
        begin, end = offsets
        if not 0 <= begin <= end or base + end > file_size:
            return None
        if end > begin:
            spans.append((base + begin, base + end))
    return TensorExtents(spans)
