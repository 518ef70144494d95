"""Incremental decompression of whole gzip / zstd layer streams.

Layers `kit` compressed are one stream of many members (gzip) or frames
(zstd) as far as a reader knows; both must be read across member and frame
boundaries, which neither zlib's nor zstandard's one-shot objects do alone.
"""

from __future__ import annotations

import zlib

import zstandard

from kitfs.errors import FormatError


class StreamDecompressor:
    """Feed compressed bytes in order, get uncompressed bytes out; `finish()` checks the end."""

    def __init__(self, compression: str) -> None:
        if compression not in ("none", "gzip", "zstd"):
            raise FormatError(f"unsupported layer compression {compression!r}")
        self.compression = compression
        self._gzip: zlib._Decompress | None = None
        self._zstd: zstandard.ZstdDecompressionObj | None = None
        self._started = False

    def _new_member(self) -> None:
        if self.compression == "gzip":
            self._gzip = zlib.decompressobj(wbits=31)
        else:
            self._zstd = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: bytes) -> bytes:
        if self.compression == "none":
            return data
        out: list[bytes] = []
        try:
            while data:
                if not self._started:
                    self._new_member()
                    self._started = True
                if self.compression == "gzip":
                    assert self._gzip is not None
                    out.append(self._gzip.decompress(data))
                    if not self._gzip.eof:
                        break
                    data = self._gzip.unused_data
                else:
                    assert self._zstd is not None
                    out.append(self._zstd.decompress(data))
                    if not self._zstd.eof:
                        break
                    data = self._zstd.unused_data
                self._started = False
        except (zlib.error, zstandard.ZstdError) as exc:
            raise FormatError(f"corrupt {self.compression} layer data: {exc}") from None
        return b"".join(out)

    def finish(self) -> None:
        """Raise if the stream stopped inside a member or frame."""
        if self.compression != "none" and self._started:
            raise FormatError(f"{self.compression} layer data ends in the middle of a stream")
