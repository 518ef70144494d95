"""Chunk buffers: bytearrays that are about to be overwritten whole, so not zeroed first.

`bytearray(n)` zero-fills, which on the cold path cost a tenth of the event
loop's time (py-spy, 1 GiB cold read): every chunk buffer is filled straight
from a socket or a file right after, and one that is not filled whole is
dropped unread (a failed fetch). CPython's C API makes the buffer without
touching its bytes; where that is unavailable the zeroing constructor is used.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TypeVar

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
