"""Incremental, bounded decompression of whole gzip / zstd layer streams.

Layers `kit` compressed are one stream of many members (gzip) or frames
(zstd) as far as a reader knows; both must be read across member and frame
boundaries, as Go's readers (and so `kit unpack`) do, which neither zlib's
nor zstandard's one-shot objects do alone.

Output is bounded: `StreamDecompressor.decompress_to` hands uncompressed
bytes to a sink in pieces of at most `OUTPUT_PIECE` bytes, so a few KiB of
hostile (or merely very compressible) input never becomes gigabytes held at
once. An honest kit-made zstd layer of zeros expands ~32000x; a 1 MiB
network piece of it is tens of GiB.

zstandard's streaming writer bounds its output pieces but does not say where
frames end, so `_ZstdFrames` walks the frame structure (RFC 8878) of the same
compressed bytes to know whether a stream stopped cleanly between frames.
zstandard's one-shot `decompress(max_output_size=...)` is no bound at all: it
allocates whatever a frame header declares.

Pure: no threads, no I/O; callers run it in a worker thread.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import IO, cast

import zstandard

from kitfs.errors import FormatError

#: The most uncompressed bytes handed to a sink at once (and so the most one
#: call holds beyond what the sink keeps).
OUTPUT_PIECE = 1 << 20

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # .. 0x184D2A5F: the low 4 bits are free
_DICT_ID_BYTES = (0, 1, 2, 4)
_FCS_BYTES = (0, 2, 4, 8)  # flag 0 means 1 byte in a single-segment frame
_RLE_BLOCK, _RESERVED_BLOCK = 1, 3

# The fields `_ZstdFrames` collects, and their sizes; everything else is skipped.
_MAGIC, _SKIPPABLE_SIZE, _DESCRIPTOR, _BLOCK_HEADER = range(4)
_FIELD_BYTES = (4, 4, 1, 3)


class _ZstdFrames:
    """Follows zstd frame boundaries in a compressed stream fed in arbitrary pieces.

    It reads only what locates the next boundary (magic numbers, frame header
    descriptors, block headers, skippable frame sizes) and skips the rest, so
    it costs a few steps per block whatever the block holds. Decoding and
    every deeper check are zstd's.

    Invariants: `_skip` bytes are still to be passed over, then a `_field`
    of `_FIELD_BYTES[_field]` bytes is read, of which `_partial` holds what
    has arrived. Between frames: nothing to skip, `_field` is `_MAGIC`,
    `_partial` is empty. `_checksum` is the current frame's content checksum
    flag.
    """

    def __init__(self) -> None:
        self._skip = 0
        self._field = _MAGIC
        self._partial = bytearray()
        self._checksum = False

    @property
    def between_frames(self) -> bool:
        """Whether the bytes fed so far end exactly where a frame (or none) ended."""
        return not self._skip and self._field == _MAGIC and not self._partial

    def feed(self, data: bytes) -> None:
        """Walk the next compressed bytes; raise FormatError where they cannot be zstd."""
        pos, end = 0, len(data)
        while True:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
            if pos == end:
                return
            size = _FIELD_BYTES[self._field]
            if self._partial or end - pos < size:
                step = min(size - len(self._partial), end - pos)
                self._partial += data[pos : pos + step]
                pos += step
                if len(self._partial) < size:
                    return
                value = int.from_bytes(self._partial, "little")
                self._partial.clear()
            else:
                value = int.from_bytes(data[pos : pos + size], "little")
                pos += size
            self._take(value)

    def _take(self, value: int) -> None:
        """Act on a whole field: say what to skip and which field comes next."""
        if self._field == _MAGIC:
            if value == _ZSTD_MAGIC:
                self._field = _DESCRIPTOR
            elif value & ~0xF == _SKIPPABLE_MAGIC:
                self._field = _SKIPPABLE_SIZE
            else:
                raise FormatError(f"corrupt zstd layer data: no frame magic (found {value:#010x})")
        elif self._field == _SKIPPABLE_SIZE:
            self._skip = value
            self._field = _MAGIC
        elif self._field == _DESCRIPTOR:
            if value & 0x08:
                raise FormatError("corrupt zstd layer data: reserved frame header bit set")
            single_segment = bool(value & 0x20)
            fcs_flag = value >> 6
            fcs = 1 if fcs_flag == 0 and single_segment else _FCS_BYTES[fcs_flag]
            window = 0 if single_segment else 1
            self._checksum = bool(value & 0x04)
            self._skip = window + _DICT_ID_BYTES[value & 0x03] + fcs
            self._field = _BLOCK_HEADER
        else:
            block_type = (value >> 1) & 0x3
            if block_type == _RESERVED_BLOCK:
                raise FormatError("corrupt zstd layer data: reserved block type")
            self._skip = 1 if block_type == _RLE_BLOCK else value >> 3
            if value & 0x1:  # last block
                self._skip += 4 if self._checksum else 0
                self._field = _MAGIC


class _SinkWriter:
    """The file-like object zstandard's stream writer writes to: forwards to a sink."""

    def __init__(self) -> None:
        self.sink: Callable[[bytes], None] | None = None

    def write(self, piece: bytes) -> int:
        assert self.sink is not None
        self.sink(piece)
        return len(piece)


class StreamDecompressor:
    """Feed compressed bytes in order, get uncompressed bytes out in bounded pieces.

    `decompress_to` and `decompress` may be mixed; `finish()` says whether the
    stream ended cleanly. Once a call raised (corrupt data, a sink that
    aborted, a limit), the stream's state is unknown and every later call
    raises too.
    """

    def __init__(self, compression: str) -> None:
        if compression not in ("none", "gzip", "zstd"):
            raise FormatError(f"unsupported layer compression {compression!r}")
        self.compression = compression
        self._failed = False
        # gzip: the member being read; None between members.
        self._gzip: zlib._Decompress | None = None
        # zstd: one decoder across frames, and the frame walker beside it.
        self._frames = _ZstdFrames()
        self._out = _SinkWriter()
        self._zstd: zstandard.ZstdDecompressionWriter | None = None
        if compression == "zstd":
            # Only write() is ever called on the target (flush() only when the writer is).
            self._zstd = zstandard.ZstdDecompressor().stream_writer(
                cast(IO[bytes], self._out), write_size=OUTPUT_PIECE, write_return_read=True,
                closefd=False)

    def decompress_to(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        """Decompress the next `data`, calling `sink` with each piece (at most OUTPUT_PIECE bytes).

        Memory stays bounded whatever the compression ratio: no more than a
        piece is held here at once. An exception the sink raises ends the
        call and propagates.
        """
        if self._failed:
            raise FormatError(f"{self.compression} layer data: decompression already failed")
        try:
            if self.compression == "none":
                self._pass_through(data, sink)
            elif self.compression == "gzip":
                self._gunzip(data, sink)
            else:
                self._unzstd(data, sink)
        except (zlib.error, zstandard.ZstdError) as exc:
            self._failed = True
            raise FormatError(f"corrupt {self.compression} layer data: {exc}") from None
        except BaseException:
            self._failed = True
            raise

    def decompress(self, data: bytes, limit: int | None = None) -> bytes:
        """Decompress the next `data` and return its bytes.

        With `limit`, raise FormatError as soon as the output would pass it,
        having held at most `limit` bytes plus one piece: a caller that knows
        how much to expect (a chunk of a seekable layer) is never flooded.
        """
        if self.compression == "none" and limit is None and not self._failed:
            return data
        pieces: list[bytes] = []
        total = 0

        def keep(piece: bytes) -> None:
            nonlocal total
            total += len(piece)
            if limit is not None and total > limit:
                raise FormatError(
                    f"{self.compression} layer data decompresses to more than {limit} bytes")
            pieces.append(piece)

        self.decompress_to(data, keep)
        return b"".join(pieces)

    def finish(self) -> None:
        """Raise if the stream stopped inside a member or frame."""
        if self._failed:
            raise FormatError(f"{self.compression} layer data: decompression already failed")
        if self._gzip is not None or not self._frames.between_frames:
            raise FormatError(f"{self.compression} layer data ends in the middle of a stream")

    @staticmethod
    def _pass_through(data: bytes, sink: Callable[[bytes], None]) -> None:
        if len(data) <= OUTPUT_PIECE:
            if data:
                sink(data)
            return
        for start in range(0, len(data), OUTPUT_PIECE):
            sink(data[start : start + OUTPUT_PIECE])

    def _gunzip(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        """Inflate member after member, never asking zlib for more than a piece at a time."""
        while data:
            if self._gzip is None:
                self._gzip = zlib.decompressobj(wbits=31)
            member = self._gzip
            while True:
                piece = member.decompress(data, OUTPUT_PIECE)
                data = member.unconsumed_tail
                if piece:
                    sink(piece)
                # A short piece with no input left: zlib has nothing pending.
                if member.eof or (len(piece) < OUTPUT_PIECE and not data):
                    break
            if not member.eof:
                return
            data = member.unused_data
            self._gzip = None

    def _unzstd(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        """Decode across frames; the writer consumes all input, flushing what each frame made.

        zstd keeps a frame's last input byte back until all of that frame's
        output is written, so nothing of a finished frame is left inside.
        """
        self._frames.feed(data)
        assert self._zstd is not None
        self._out.sink = sink
        try:
            self._zstd.write(data)
        finally:
            self._out.sink = None
