"""Chunk buffers: bytearrays that are about to be overwritten whole, so not zeroed first;
and the heap they come from, tuned so memory stays flat however many pass through.

`bytearray(n)` zero-fills, which on the cold path cost a tenth of the event
loop's time (py-spy, 1 GiB cold read): every chunk buffer is filled straight
from a socket or a file right after, and one that is not filled whole is
dropped unread (a failed fetch). CPython's C API makes the buffer without
touching its bytes; where that is unavailable the zeroing constructor is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import TypeVar

import trio

log = logging.getLogger(__name__)

_raw: Callable[[None, int], bytearray] | None
_resize: Callable[[bytearray, int], int] | None
try:
    _api = ctypes.pythonapi.PyByteArray_FromStringAndSize
    _api.restype = ctypes.py_object
    _api.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    _raw = _api
    _resize_api = ctypes.pythonapi.PyByteArray_Resize
    _resize_api.restype = ctypes.c_int
    _resize_api.argtypes = [ctypes.py_object, ctypes.c_ssize_t]
    _resize = _resize_api
except (AttributeError, OSError):  # not CPython
    _raw = _resize = None

B = TypeVar("B", bound=bytearray)


def new_buffer(size: int, kind: type[B] = bytearray) -> B:  # type: ignore[assignment]
    """A bytearray (or subclass `kind`) of `size` bytes with unspecified contents: fill
    all of it before use."""
    if size < 0:
        raise ValueError(f"buffer size must be >= 0, got {size}")
    if kind is bytearray:
        if _raw is None or size == 0:
            return kind(size)
        return _raw(None, size)  # type: ignore[return-value]
    buffer = kind()
    if _resize is None:
        buffer.extend(bytes(size))
    elif _resize(buffer, size) != 0:
        raise MemoryError(f"cannot allocate {size} bytes")
    return buffer


#: Alignment O_DIRECT asks of a buffer, an offset and a length (the page size covers
#: 512-byte and 4 KiB sector devices alike).
DIRECT_ALIGN = 4096


def address_of(buffer: bytearray | memoryview) -> int:
    """The address of the first byte of a writable, non-empty buffer (for alignment checks)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def new_aligned_buffer(size: int, kind: type[bytearray] = bytearray) -> memoryview:
    """`size` uninitialized bytes starting at a DIRECT_ALIGN boundary (for O_DIRECT I/O).

    Carved out of a slightly larger heap bytearray rather than a fresh mmap:
    a new mapping page-faults and zeroes every 4 KiB on first touch (measured
    0.7 vs 0.2 ms per 2 MiB chunk). The bytearray (the view's `obj`) is of
    type `kind`, for a caller that must know its buffers again
    (`fileformat.new_frame_buffer`).
    """
    raw = new_buffer(size + DIRECT_ALIGN, kind)
    if not raw:
        return memoryview(raw)
    start = -address_of(raw) % DIRECT_ALIGN
    return memoryview(raw)[start : start + size]


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: How often freed heap memory is handed back to the system (see tune_malloc).
TRIM_INTERVAL_S = 2.0


def tune_malloc() -> Callable[[], None] | None:
    """Keep a process that moves chunks (a mount's daemon, an unpack) bounded in memory
    without paying a page fault per chunk byte.

    Returns the trim to run every few seconds (`trim_memory`), or None
    where the C library is not glibc. Measured on this project's harness:

    - glibc's defaults (an arena per thread, an mmap threshold that rises as
      big blocks are freed) let RSS grow with the model: 313 MiB at 256 MiB,
      822 MiB at 8 GiB (ee0b44d).
    - A fixed 1 MiB mmap threshold maps every chunk afresh: flat, but every
      chunk byte is a page fault and a zeroing (2 GiB cold read 0.27 instead of
      0.45 GB/s, 9.4 instead of 5.3 CPU s).
    - So chunk buffers come from the heap (threshold 64 MiB, 64 MiB kept free
      at its top), from one arena (chunks are allocated on the event loop and
      in worker threads; with two arenas a block freed into one could not serve
      the other: 8 GiB peak 905 -> 763 MiB), and the free pages inside the heap
      are handed back every few seconds (8 GiB peak 938 -> 760 MiB).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        libc.mallopt(_M_ARENA_MAX, 1)
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError) as exc:  # not glibc: nothing to tune
        log.debug("mallopt unavailable: %s", exc)
        return None
    malloc_trim.argtypes = [ctypes.c_size_t]

    def trim() -> None:
        malloc_trim(0)

    return trim


async def trim_memory(trim: Callable[[], None]) -> None:
    """Hand the free pages inside the heaps back to the system, every TRIM_INTERVAL_S
    (runs until cancelled, in the nursery of whoever tuned the heap)."""
    while True:
        await trio.sleep(TRIM_INTERVAL_S)
        await trio.to_thread.run_sync(trim)
