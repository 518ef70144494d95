"""Write a layer tar byte for byte as `kit pack` does, plus its table of contents.

Headers are what Go's `archive/tar.Writer` produces for the headers kit builds
(`pkg/lib/kitfile/layer.go`: `tar.FileInfoHeader`, `Name` set to the cleaned
relative path, then `sanitizeTarHeader`: zero times, uid 1000, gid 0, empty
user and group names). With no format requested Go picks USTAR when every
field fits, else PAX (`Writer.WriteHeader`, `Header.allowedFormats`):

- numbers are zero-padded octal with a trailing NUL (`formatOctal`); a zero
  mtime is written as 0 (`templateV7Plus`); devmajor/devminor are written
  as octal zero; magic `ustar\\0`, version `00`; the checksum is six octal
  digits, NUL, space;
- a name longer than 100 bytes is split at a `/` into prefix (<= 155) and name
  (<= 100) when possible (`splitUSTARPath`); otherwise, or when the name is
  not ASCII, or a size is 8 GiB or more, a PAX `x` header comes first, named
  `<dir>/PaxHeaders.0/<base>`, with sorted `path` / `size` records; the main
  header then holds the name made ASCII and cut to 100 bytes, and size 0 when
  it does not fit;
- no trailing slash on directory names (kit overwrites `FileInfoHeader`'s);
- the archive ends with two zero blocks, with no padding to a 10 KiB record.

The uncompressed stream is cut into fixed-size chunks; each gets a sha256,
and, for gzip and zstd, is compressed on its own (one gzip member or zstd
frame per chunk), so that any chunk can be fetched and decompressed alone
while the whole blob stays a valid gzip or zstd stream for `kit unpack`.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Literal

import zstandard

from kitfs.errors import LocalStorageError
from kitfs.modelkit.chunkdigest import block_digests, chunk_digest
from kitfs.modelkit.layers import PlannedEntry
from kitfs.modelkit.toc import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    EntryKind,
    LayerToc,
    TocChunk,
    TocEntry,
)

Compression = Literal["none", "gzip", "zstd"]

BLOCK_SIZE = 512
NAME_SIZE = 100
PREFIX_SIZE = 155
KIT_UID = 1000
KIT_GID = 0
# kit's `--compression gzip` uses Go's default level (6), `gzip-fastest` level 1.
# We use 1: deflate is the slow step of packing, and the stream stays plain gzip.
GZIP_LEVEL = 1
ZSTD_LEVEL = 3
# Longest single read from a source file.
READ_SIZE = 8 * 1024 * 1024

_ZERO_BLOCK = bytes(BLOCK_SIZE)
_MAGIC_USTAR = b"ustar\x00"
_VERSION_USTAR = b"00"
# Go's gzip.Writer header for a zero ModTime, no name/comment/extra; XFL 4
# marks the fastest level, OS 255 is "unknown".
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"


# --- header encoding (Go archive/tar) -------------------------------------------------


def _is_ascii(s: bytes) -> bool:
    """Go's isASCII: no NUL and nothing >= 0x80."""
    return s.isascii() and b"\x00" not in s


def _to_ascii(s: bytes) -> bytes:
    """Go's toASCII: drop every non-ASCII rune (all bytes >= 0x80) and NULs."""
    if _is_ascii(s):
        return s
    return bytes(b for b in s if 0 < b < 0x80)


def _fits_in_octal(width: int, x: int) -> bool:
    return x >= 0 and (width >= 22 or x < 1 << ((width - 1) * 3))


def _put_string(block: bytearray, start: int, width: int, s: bytes) -> None:
    """Go's formatter.formatString into block[start:start+width] (block is zeroed)."""
    field = s[:width]
    block[start : start + len(field)] = field
    if len(s) > width and block[start + width - 1] == ord("/"):
        n = len(s[: width - 1].rstrip(b"/"))
        block[start + n] = 0


def _put_octal(block: bytearray, start: int, width: int, x: int) -> None:
    """Go's formatter.formatOctal: zero-padded, NUL-terminated; 0 when it does not fit."""
    if not _fits_in_octal(width, x):
        x = 0
    digits = format(x, "o").encode()
    _put_string(block, start, width, digits.rjust(width - 1, b"0"))


def _set_checksum(block: bytearray) -> None:
    """Go's block.setFormat for USTAR/PAX: magic, version, then the checksum."""
    block[257:263] = _MAGIC_USTAR
    block[263:265] = _VERSION_USTAR
    total = sum(block[:148]) + 8 * ord(" ") + sum(block[156:])
    block[148:156] = bytes(8)
    _put_octal(block, 148, 7, total)
    block[155] = ord(" ")


def split_ustar_path(name: bytes) -> tuple[bytes, bytes] | None:
    """Go's splitUSTARPath: (prefix, name) for an ASCII name over 100 bytes, else None."""
    length = len(name)
    if length <= NAME_SIZE or not _is_ascii(name):
        return None
    if length > PREFIX_SIZE + 1:
        length = PREFIX_SIZE + 1
    elif name[length - 1 : length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    nlen = len(name) - i - 1
    if i <= 0 or nlen > NAME_SIZE or nlen == 0 or i > PREFIX_SIZE:
        return None
    return name[:i], name[i + 1 :]


def format_pax_record(key: str, value: bytes) -> bytes:
    """Go's formatPAXRecord: `"%d %s=%s\\n"` where %d counts the whole record."""
    k = key.encode()
    size = len(k) + len(value) + 3
    size += len(str(size))
    record = b"%d %s=%s\n" % (size, k, value)
    if len(record) != size:
        record = b"%d %s=%s\n" % (len(record), k, value)
    return record


def _typeflag(kind: EntryKind) -> int:
    return ord("5") if kind == "dir" else ord("0")


def _template(name: bytes, typeflag: int, mode: int, size: int, *, pax: bool) -> bytearray:
    """Go's Writer.templateV7Plus with kit's sanitized fields."""
    block = bytearray(BLOCK_SIZE)
    block[156] = typeflag
    _put_string(block, 0, NAME_SIZE, _to_ascii(name) if pax else name)
    _put_octal(block, 100, 8, mode)
    _put_octal(block, 108, 8, KIT_UID)
    _put_octal(block, 116, 8, KIT_GID)
    _put_octal(block, 124, 12, size)
    _put_octal(block, 136, 12, 0)  # zero ModTime is written as Unix time 0
    _put_octal(block, 329, 8, 0)  # devmajor
    _put_octal(block, 337, 8, 0)  # devminor
    return block


def _pax_header_name(name: bytes) -> bytes:
    """path.Join(dir, "PaxHeaders.0", base), made ASCII, cut to 100, trailing '/' trimmed."""
    head, sep, tail = name.rpartition(b"/")
    full = head + b"/PaxHeaders.0/" + tail if sep else b"PaxHeaders.0/" + name
    return _to_ascii(full)[:NAME_SIZE].rstrip(b"/")


def encode_header(name: bytes, kind: EntryKind, mode: int, size: int) -> bytes:
    """The header block(s) Go's tar.Writer writes for kit's header of one entry.

    `name` is the cleaned entry name (no trailing slash, even for directories).
    Returns 512 bytes for USTAR, or PAX header + records (padded) + 512 bytes.
    """
    if kind == "dir":
        size = 0
    pax: dict[str, bytes] = {}
    ustar_ok = True
    if not _is_ascii(name) or len(name) > NAME_SIZE:
        pax["path"] = name
        if split_ustar_path(name) is None:
            ustar_ok = False
    if not _fits_in_octal(12, size):
        pax["size"] = str(size).encode()
        ustar_ok = False
    if ustar_ok:
        prefix = b""
        short = name
        split = split_ustar_path(name)
        if split is not None:
            prefix, short = split
        block = _template(short, _typeflag(kind), mode, size, pax=False)
        _put_string(block, 345, PREFIX_SIZE, prefix)
        _set_checksum(block)
        return bytes(block)
    data = b"".join(format_pax_record(k, pax[k]) for k in sorted(pax))
    xhdr = bytearray(BLOCK_SIZE)
    xhdr[156] = ord("x")
    _put_string(xhdr, 0, NAME_SIZE, _pax_header_name(name))
    _put_octal(xhdr, 100, 8, 0)
    _put_octal(xhdr, 108, 8, 0)
    _put_octal(xhdr, 116, 8, 0)
    _put_octal(xhdr, 124, 12, len(data))
    _put_octal(xhdr, 136, 12, 0)
    _set_checksum(xhdr)
    main = _template(name, _typeflag(kind), mode, size, pax=True)
    _set_checksum(main)
    return bytes(xhdr) + data + bytes(-len(data) % BLOCK_SIZE) + bytes(main)


# --- chunked, hashed, optionally compressed output ------------------------------------


def _gzip_member(data: memoryview) -> bytes:
    """One self-contained gzip member, byte-identical for identical input."""
    body = zlib.compress(data, GZIP_LEVEL, wbits=-15)
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return b"".join((_GZIP_HEADER, body, trailer))


class _ZstdFrames:
    """One zstd frame per chunk, content size in the frame header; one context per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, data: memoryview) -> bytes:
        cctx: Any = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, write_content_size=True, write_checksum=True
            )
            self._local.cctx = cctx
        out: bytes = cctx.compress(data)
        return out


_Job = tuple[str, bytes, bytes | memoryview]  # digest, block digests, what goes in the blob


def _chunk_job(
    data: memoryview, compress: Callable[[memoryview], bytes] | None, block_size: int
) -> _Job:
    digest = chunk_digest(data)
    blocks = block_digests(data, block_size) if block_size else b""
    return digest, blocks, (compress(data) if compress is not None else data)


_Pending = tuple[memoryview, int, int, "Future[_Job]", "Future[None]"]


class _ChunkedOutput:
    """Buffers the uncompressed stream into chunks and writes them out in order.

    With workers, chunk hashing and compression run on a thread pool (hashlib,
    zlib and zstandard release the GIL) and the stream hash on one more thread,
    while the caller keeps reading files into the next buffer; the output is
    the same bytes whatever the number of workers.
    """

    def __init__(
        self, out: BinaryIO, compression: Compression, chunk_size: int, workers: int,
        block_size: int = 0,
    ) -> None:
        self._out = out
        self._chunk_size = chunk_size
        self._block_size = block_size
        self._compress: Callable[[memoryview], bytes] | None
        if compression == "gzip":
            self._compress = _gzip_member
        elif compression == "zstd":
            self._compress = _ZstdFrames()
        else:
            self._compress = None
        self._stream_hash = hashlib.sha256()
        self._blob_hash = hashlib.sha256() if self._compress is not None else None
        self._pool = ThreadPoolExecutor(workers, "kitfs-pack") if workers > 0 else None
        self._hasher = ThreadPoolExecutor(1, "kitfs-pack-hash") if workers > 0 else None
        nbuf = workers + 2 if workers > 0 else 1
        self._free: list[memoryview] = [memoryview(bytearray(chunk_size)) for _ in range(nbuf)]
        self._pending: deque[_Pending] = deque()
        self._buf = self._free.pop()
        self._fill = 0
        self.stream_pos = 0  # bytes of the uncompressed stream accepted so far
        self._chunk_offset = 0  # stream offset of the current buffer
        self._blob_pos = 0
        self.chunks: list[TocChunk] = []

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), self._chunk_size - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            self.stream_pos += n
            view = view[n:]
            if self._fill == self._chunk_size:
                self._emit()

    def read_file(self, f: io.FileIO, size: int, progress: Callable[[int], None] | None) -> int:
        """Copy up to `size` bytes from raw file `f` straight into the chunk buffers."""
        copied = 0
        while copied < size:
            n = min(size - copied, self._chunk_size - self._fill, READ_SIZE)
            got = f.readinto(self._buf[self._fill : self._fill + n])
            if not got:
                break
            self._fill += got
            self.stream_pos += got
            copied += got
            if progress is not None:
                progress(got)
            if self._fill == self._chunk_size:
                self._emit()
        return copied

    def _emit(self) -> None:
        view = self._buf[: self._fill]
        offset = self._chunk_offset
        self._chunk_offset += self._fill
        if self._pool is None or self._hasher is None:
            digest, blocks, blob = _chunk_job(view, self._compress, self._block_size)
            self._stream_hash.update(view)
            self._store(offset, len(view), digest, blocks, blob)
            self._fill = 0
            return
        job = self._pool.submit(_chunk_job, view, self._compress, self._block_size)
        hashed = self._hasher.submit(self._stream_hash.update, view)
        self._pending.append((self._buf, offset, len(view), job, hashed))
        while not self._free:
            self._drain_one()
        self._buf = self._free.pop()
        self._fill = 0

    def _drain_one(self) -> None:
        buf, offset, size, job, hashed = self._pending.popleft()
        digest, blocks, blob = job.result()
        self._store(offset, size, digest, blocks, blob)
        hashed.result()
        self._free.append(buf)

    def _store(self, offset: int, size: int, digest: str, blocks: bytes,
               blob: bytes | memoryview) -> None:
        if self._blob_hash is not None:
            self._blob_hash.update(blob)
        try:
            written = self._out.write(blob)
            # A raw (unbuffered) file may take less than asked for.
            if written is not None and written < len(blob):
                view = memoryview(blob)[written:]
                while view:
                    n = self._out.write(view)
                    if not n:
                        raise LocalStorageError("cannot write layer: the output took no bytes")
                    view = view[n:]
        except OSError as exc:
            raise LocalStorageError(f"cannot write layer: {exc}") from None
        self.chunks.append(TocChunk(offset, size, digest, self._blob_pos, len(blob), blocks))
        self._blob_pos += len(blob)

    def finish(self) -> tuple[str, str, int]:
        """Flush the last chunk; return (digest, diff_id, blob size)."""
        if self._fill:
            self._emit()
        while self._pending:
            self._drain_one()
        self.close()
        diff_id = "sha256:" + self._stream_hash.hexdigest()
        digest = diff_id if self._blob_hash is None else "sha256:" + self._blob_hash.hexdigest()
        return digest, diff_id, self._blob_pos

    def close(self) -> None:
        for pool in (self._pool, self._hasher):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Threads for hashing and compressing chunks: one per usable CPU, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def write_layer(
    entries: Sequence[PlannedEntry],
    out: BinaryIO,
    *,
    compression: Compression,
    media_type: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> LayerToc:
    """Write one layer blob to `out` and return its table of contents.

    The tar stream is what `kit pack` writes for the same entries; `compression`
    "gzip" / "zstd" compress every `chunk_size` slice of it as its own gzip
    member / zstd frame. `progress` is called with the number of file bytes
    just read (increments, not totals). `workers` threads hash and compress
    chunks (default: up to 4, one per CPU; 0 does everything on the calling
    thread); the bytes written never depend on it. Uncompressed layers get
    block digests every `block_size` bytes of each chunk (0: none), so a
    mount can fetch and check part of a chunk; a compressed chunk can only be
    decompressed whole, so it gets none. Memory stays at about
    `(workers + 2) * chunk_size` whatever the layer size.

    Raises `LocalStorageError` when a source file cannot be read, changed size
    since it was planned, or `out` cannot be written.
    """
    if chunk_size <= 0 or chunk_size % BLOCK_SIZE:
        raise ValueError(f"chunk size must be a positive multiple of {BLOCK_SIZE}")
    if compression not in ("none", "gzip", "zstd"):
        raise ValueError(f"unknown compression {compression!r}")
    if compression != "none" or block_size <= 0 or block_size >= chunk_size or (
            chunk_size % block_size):
        block_size = 0  # chunks this small (or compressed) are fetched whole anyway
    sink = _ChunkedOutput(
        out, compression, chunk_size, default_workers() if workers is None else workers,
        block_size,
    )
    toc_entries: list[TocEntry] = []
    try:
        for entry in entries:
            size = entry.size if entry.kind == "file" else 0
            sink.write(encode_header(os.fsencode(entry.name), entry.kind, entry.mode, size))
            toc_entries.append(TocEntry(entry.name, entry.kind, entry.mode, size, sink.stream_pos))
            if entry.kind == "file":
                _copy_file(sink, entry, size, progress)
                sink.write(_ZERO_BLOCK[: -size % BLOCK_SIZE])
        sink.write(_ZERO_BLOCK * 2)
        digest, diff_id, blob_size = sink.finish()
    finally:
        sink.close()
    return LayerToc(
        digest=digest,
        diff_id=diff_id,
        media_type=media_type,
        blob_size=blob_size,
        stream_size=sink.stream_pos,
        entries=tuple(toc_entries),
        chunk_size=chunk_size,
        chunks=tuple(sink.chunks),
        block_size=block_size,
    )


def _copy_file(
    sink: _ChunkedOutput, entry: PlannedEntry, size: int, progress: Callable[[int], None] | None
) -> None:
    try:
        with open(entry.source, "rb", buffering=0) as f:
            if size:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            copied = sink.read_file(f, size, progress)
            grew = copied == size and f.read(1) != b""
    except OSError as exc:
        raise LocalStorageError(f"cannot read {entry.source}: {exc.strerror or exc}") from None
    if copied != size or grew:
        raise LocalStorageError(f"{entry.source} changed size while packing (planned {size} bytes)")
