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

_raw: Callable[[None, int], bytearray] | None
try:
    _api = ctypes.pythonapi.PyByteArray_FromStringAndSize
    _api.restype = ctypes.py_object
    _api.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    _raw = _api
except (AttributeError, OSError):  # not CPython
    _raw = None


def new_buffer(size: int) -> bytearray:
    """A bytearray of `size` bytes with unspecified contents: fill all of it before use."""
    if size < 0:
        raise ValueError(f"buffer size must be >= 0, got {size}")
    if _raw is None or size == 0:
        return bytearray(size)
    return _raw(None, size)
