"""Whole-stream decompression across gzip members and zstd frames, fed in awkward pieces.

Also: output is bounded whatever the ratio (decompression bombs), and the zstd
frame walker finds every frame end, whatever the header says and wherever the
stream is cut. Never print decompressed data here: a bomb is a GiB.
"""

from __future__ import annotations

import gzip
import os
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
import xxhash
import zstandard

from kitfs.errors import FormatError
from kitfs.modelkit.decompress import OUTPUT_PIECE, StreamDecompressor, _ZstdFrames

PARTS = [os.urandom(1000) + b"a" * 5000, b"", b"hello" * 999, os.urandom(77)]

GIB = 1 << 30
MIB = 1 << 20


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


# --- decompress_to: the same streams, through a sink -------------------------------


class _Collect:
    """A sink that keeps what it is given and checks every piece is bounded."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def __call__(self, piece: bytes) -> None:
        assert 0 < len(piece) <= OUTPUT_PIECE
        self.pieces.append(piece)

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


def _feed(d: StreamDecompressor, blob: bytes, piece: int, sink: Callable[[bytes], None]) -> None:
    for i in range(0, len(blob), piece):
        d.decompress_to(blob[i : i + piece], sink)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("piece", [997, 65536, 1 << 20, 1 << 30])
def test_decompress_to_big_members(compression: str, piece: int) -> None:
    """Members bigger than OUTPUT_PIECE: output is cut inside a member too."""
    parts = [*PARTS, os.urandom(4096) * 700, b"z" * (3 * MIB + 5), b"end"]
    if compression == "gzip":
        blob = b"".join(gzip.compress(p, mtime=0, compresslevel=1) for p in parts)
    else:
        blob = b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(p) for p in parts)
    d = StreamDecompressor(compression)
    sink = _Collect()
    _feed(d, blob, piece, sink)
    d.finish()
    assert sink.data == b"".join(parts)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_decompress_to_small_pieces(compression: str, piece: int) -> None:
    blob = _members(compression)
    d = StreamDecompressor(compression)
    sink = _Collect()
    _feed(d, blob, piece, sink)
    d.finish()
    assert sink.data == b"".join(PARTS)


def test_uncompressed_pieces_are_bounded_too() -> None:
    data = os.urandom(2 * MIB + 3)
    d = StreamDecompressor("none")
    sink = _Collect()
    d.decompress_to(data, sink)
    d.decompress_to(b"", sink)
    d.finish()
    assert sink.data == data
    assert len(sink.pieces) == 3
    assert d.decompress(b"abc") == b"abc"
    with pytest.raises(FormatError, match="more than 2 bytes"):
        StreamDecompressor("none").decompress(b"abc", limit=2)


def test_sink_can_abort() -> None:
    class Enough(Exception):
        pass

    calls = 0

    def sink(piece: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Enough

    for compression, blob in [
        ("zstd", zstandard.ZstdCompressor().compress(bytes(8 * MIB))),
        ("gzip", gzip.compress(bytes(8 * MIB), mtime=0)),
    ]:
        calls = 0
        d = StreamDecompressor(compression)
        with pytest.raises(Enough):
            d.decompress_to(blob, sink)
        assert calls == 2
        # What the stream holds now is unknown: no later call may pretend otherwise.
        with pytest.raises(FormatError, match="already failed"):
            d.decompress_to(b"", sink)
        with pytest.raises(FormatError, match="already failed"):
            d.finish()


# --- bombs ---------------------------------------------------------------------------


def _zstd_bomb() -> bytes:
    """1 GiB of zeros as kit would write it: one streamed zstd frame (about 32 KiB)."""
    c = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    zeros = bytes(MIB)
    return b"".join([*(c.compress(zeros) for _ in range(1024)), c.flush()])


def _gzip_bomb() -> bytes:
    """1 GiB of zeros as one gzip member (about 1 MiB), built without compressing a GiB.

    After a full flush deflate forgets its history, so each further MiB of zeros
    compresses to the same bytes: repeat them, and write the trailer by hand.
    """
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    repeat = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) == repeat
    end = c.flush()[:-8]  # the final block; its trailer counted only 3 MiB
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(zeros, crc)
    return head + repeat * 1023 + end + struct.pack("<II", crc, GIB & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"zstd": _zstd_bomb(), "gzip": _gzip_bomb()}


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_bomb_streams_in_bounded_memory(bombs: dict[str, bytes], compression: str) -> None:
    blob = bombs[compression]
    assert len(blob) < 2 * MIB
    total = 0
    biggest = 0

    def count(piece: bytes) -> None:
        nonlocal total, biggest
        total += len(piece)
        biggest = max(biggest, len(piece))

    d = StreamDecompressor(compression)
    tracemalloc.start()
    try:
        d.decompress_to(blob, count)
        d.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == GIB
    assert biggest <= OUTPUT_PIECE
    assert peak < 16 * MIB


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_bomb_stops_at_limit(bombs: dict[str, bytes], compression: str) -> None:
    d = StreamDecompressor(compression)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(FormatError, match=r"decompresses to more than 2097152 bytes"):
            d.decompress(bombs[compression], limit=2 * MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0  # a few MiB inflated, not a GiB
    # The limit, the piece that passed it, zlib's copies of the unread input (a MiB).
    assert peak < 2 * MIB + OUTPUT_PIECE + 4 * MIB
    with pytest.raises(FormatError, match="already failed"):
        d.finish()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_limit_is_inclusive(compression: str) -> None:
    blob = _members(compression)
    expected = b"".join(PARTS)
    assert StreamDecompressor(compression).decompress(blob, limit=len(expected)) == expected
    with pytest.raises(FormatError, match="more than"):
        StreamDecompressor(compression).decompress(blob, limit=len(expected) - 1)


# --- zstd frames of every shape --------------------------------------------------------


def _raw_block(data: bytes, last: bool) -> bytes:
    return (len(data) << 3 | 0 << 1 | last).to_bytes(3, "little") + data


def _rle_block(byte: int, count: int, last: bool) -> bytes:
    return (count << 3 | 1 << 1 | last).to_bytes(3, "little") + bytes([byte])


def _frame(
    content: bytes,
    *,
    fcs_flag: int = 0,
    single: bool = False,
    checksum: bool = False,
    dict_flag: int = 0,
    rle_tail: int = 0,
) -> tuple[bytes, bytes]:
    """A hand-made zstd frame (raw blocks, an RLE block of `rle_tail` x's): (frame, content)."""
    whole = content + b"x" * rle_tail
    descriptor = fcs_flag << 6 | single << 5 | checksum << 2 | dict_flag
    header = struct.pack("<IB", 0xFD2FB528, descriptor)
    if not single:
        header += bytes([(20 - 10) << 3])  # window 1 MiB
    header += (0, 0x7E, 0xBEEF, 0x12345678)[dict_flag].to_bytes((0, 1, 2, 4)[dict_flag], "little")
    fcs_bytes = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if fcs_bytes:
        header += (len(whole) - (256 if fcs_flag == 1 else 0)).to_bytes(fcs_bytes, "little")
    blocks = [content[i : i + 1000] for i in range(0, len(content), 1000)]
    body = b"".join(_raw_block(b, last=False) for b in blocks)
    body += _rle_block(ord("x"), rle_tail, last=True)
    if checksum:
        body += struct.pack("<I", xxhash.xxh64_intdigest(whole) & 0xFFFFFFFF)
    return header + body, whole


def _skippable(payload: bytes, nibble: int = 0) -> bytes:
    return struct.pack("<II", 0x184D2A50 | nibble, len(payload)) + payload


def _real_frames() -> list[tuple[bytes, bytes]]:
    """Frames zstd itself writes, with and without checksum and content size."""
    content = os.urandom(3000) + b"q" * 300_000 + b"hello" * 100
    frames = []
    for checksum in (False, True):
        for size in (False, True):
            c = zstandard.ZstdCompressor(write_checksum=checksum, write_content_size=size)
            frames.append((c.compress(content), content))
            frames.append((c.compress(b"tiny"), b"tiny"))  # single segment, 1-byte size
            frames.append((c.compress(b""), b""))
            streamed = c.compressobj()  # size unknown: no content size field
            frames.append((streamed.compress(content) + streamed.flush(), content))
    return frames


def _made_frames() -> list[tuple[bytes, bytes]]:
    """Hand-made frames covering every content size width and block type."""
    text = os.urandom(2500)
    return [
        _frame(b"", single=True, rle_tail=200),  # 1-byte size
        _frame(text, fcs_flag=1, rle_tail=7),  # 2-byte size
        _frame(text, fcs_flag=2, single=True, checksum=True),  # 4-byte size
        _frame(text[:10], fcs_flag=3, rle_tail=100_000),  # 8-byte size
        _frame(text, checksum=True, rle_tail=1),  # no size, window descriptor
    ]


def _stream(frames: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, set[int]]:
    """Frames joined, with skippable frames between: (blob, content, frame ends)."""
    blob, content, ends = b"", b"", {0}
    for n, (frame, data) in enumerate(frames):
        if n % 3 == 0:
            blob += _skippable(b"metadata" * n, nibble=n % 16)
            ends.add(len(blob))
        blob += frame
        content += data
        ends.add(len(blob))
    return blob, content, ends


def test_made_frames_are_what_libzstd_reads() -> None:
    for frame, content in _made_frames():
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size in (len(content), zstandard.CONTENTSIZE_UNKNOWN)
        assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == content


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_frames_of_every_shape(piece: int) -> None:
    blob, content, _ = _stream(_real_frames() + _made_frames() + [(_skippable(b""), b"")])
    d = StreamDecompressor("zstd")
    sink = _Collect()
    _feed(d, blob, piece, sink)
    d.finish()
    assert sink.data == content


def test_frame_walker_finds_every_end() -> None:
    """Fed a byte at a time, the walker is between frames exactly at frame ends."""
    frames = _real_frames() + _made_frames()
    for dict_flag in (1, 2, 3):  # libzstd would want the dictionary: walk only
        frame, content = _frame(b"abc" * 500, dict_flag=dict_flag, fcs_flag=2, checksum=True)
        assert zstandard.get_frame_parameters(frame).dict_id == (0, 0x7E, 0xBEEF, 0x12345678)[
            dict_flag]
        frames.append((frame, content))
    blob, _, ends = _stream(frames)
    walker = _ZstdFrames()
    seen = {0}
    for i in range(len(blob)):
        walker.feed(blob[i : i + 1])
        if walker.between_frames:
            seen.add(i + 1)
    assert seen == ends


def test_truncation_at_every_byte_is_seen() -> None:
    one, two = b"first " * 50, os.urandom(300)
    first = zstandard.ZstdCompressor(write_checksum=True).compress(one)
    blob = first + zstandard.ZstdCompressor(write_content_size=False).compress(two)
    clean = {0: b"", len(first): one, len(blob): one + two}
    for cut in range(len(blob) + 1):
        d = StreamDecompressor("zstd")
        sink = _Collect()
        d.decompress_to(blob[:cut], sink)
        if cut in clean:
            d.finish()
            assert sink.data == clean[cut]
        else:
            with pytest.raises(FormatError, match="middle"):
                d.finish()


def test_gzip_truncation_at_every_byte_is_seen() -> None:
    first = gzip.compress(b"first " * 50, mtime=0)
    blob = first + gzip.compress(os.urandom(300), mtime=0)
    for cut in range(len(blob) + 1):
        d = StreamDecompressor("gzip")
        d.decompress(blob[:cut])
        if cut in (0, len(first), len(blob)):
            d.finish()
        else:
            with pytest.raises(FormatError, match="middle"):
                d.finish()


@pytest.mark.parametrize(
    "blob",
    [
        b"not zstd at all",
        zstandard.ZstdCompressor().compress(b"ok") + b"\0\0\0\0trailing",
        struct.pack("<IB", 0xFD2FB528, 0x08) + b"\0" * 16,  # reserved header bit
        struct.pack("<IBB", 0xFD2FB528, 0x20, 3) + (3 << 1 | 1).to_bytes(3, "little"),
    ],
    ids=["magic", "trailing-garbage", "reserved-bit", "reserved-block"],
)
@pytest.mark.parametrize("piece", [1, 4096])
def test_zstd_structure_errors_are_corrupt(blob: bytes, piece: int) -> None:
    d = StreamDecompressor("zstd")
    with pytest.raises(FormatError, match="corrupt"):
        _feed(d, blob, piece, _Collect())
        d.finish()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("piece", [1, 4096])
def test_small_output_pieces(
    monkeypatch: pytest.MonkeyPatch, compression: str, piece: int
) -> None:
    """With pieces smaller than blocks, a frame's last block still comes out whole.

    zstd holds a frame's last input byte back until that frame's output is
    all written; the hand-made frames end in a 100 kB RLE block, no checksum.
    """
    monkeypatch.setattr("kitfs.modelkit.decompress.OUTPUT_PIECE", 1000)
    if compression == "zstd":
        blob, content, _ = _stream(_made_frames())
    else:
        content = b"".join(PARTS) + b"x" * 100_000
        blob = _members("gzip") + gzip.compress(b"x" * 100_000, mtime=0)
    d = StreamDecompressor(compression)
    pieces: list[bytes] = []
    _feed(d, blob, piece, pieces.append)
    d.finish()
    assert max(len(p) for p in pieces) <= 1000
    assert b"".join(pieces) == content
