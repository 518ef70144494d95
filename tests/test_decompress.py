"""Whole-stream decompression across gzip members and zstd frames, fed in awkward pieces."""

from __future__ import annotations

import gzip
import os

import pytest
import zstandard

from kitfs.errors import FormatError
from kitfs.modelkit.decompress import StreamDecompressor

PARTS = [os.urandom(1000) + b"a" * 5000, b"", b"hello" * 999, os.urandom(77)]


def _members(compression: str) -> bytes:
    if compression == "gzip":
        return b"".join(gzip.compress(p, mtime=0) for p in PARTS)
    return b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(p) for p in PARTS)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_multi_member_streams(compression: str, piece: int) -> None:
    blob = _members(compression)
    d = StreamDecompressor(compression)
    out = b"".join(d.decompress(blob[i : i + piece]) for i in range(0, len(blob), piece))
    d.finish()
    assert out == b"".join(PARTS)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_truncated_and_corrupt(compression: str) -> None:
    blob = _members(compression)
    d = StreamDecompressor(compression)
    d.decompress(blob[:-3])
    with pytest.raises(FormatError, match="middle"):
        d.finish()
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    bad[len(bad) // 2 + 1] ^= 0xFF
    with pytest.raises(FormatError, match="corrupt"):
        d2 = StreamDecompressor(compression)
        d2.decompress(bytes(bad))
        d2.finish()
