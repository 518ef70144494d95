"""The on-disk frame every cache file uses, and the one way such a file is written.

A cached file is a 32-byte header followed by the payload:

    offset size  field
    0      4     magic (b"KFSC" chunk, b"KFST" table of contents, b"KFSV" verified record)
    4      2     format version (1), little endian
    6      2     header size (32): lets a later version grow the header
    8      8     payload length
    16     8     xxh3-64 of the payload
    24     8     xxh3-64 of bytes 0..23

Chunk files are read with O_DIRECT where the file system allows it: the
bytes go from the disk straight into the daemon's buffer instead of through
the page cache, which cost a kernel copy per byte and kept a second copy of
every warm chunk in memory next to the mount's own page cache (2 GiB from
the chunk files: 0.31-0.50 instead of 0.84-1.07 CPU seconds at the same
speed, benchmarks/TUNING.md).

Chunks are written with O_DIRECT too, straight from the buffer they were
received into (`new_frame_buffer` keeps the header's 32 bytes free in front
of the payload, at a block boundary): a buffered write copied every byte into
the page cache, which was most of the cost of writing a chunk, and left all
of it there, a copy nobody reads next to the mount's own (1 GiB per GiB of a
cold read). The last partial block goes through the page cache, as does any
payload not in such a buffer; a synced write then drops those pages (unsynced
they are dirty, and the kernel keeps dirty pages whatever it is told).

The payload length is checked against the file size before the payload is
read, so a truncated file (a crash between write and rename on a file system
that reorders, a full disk, a copy cut short) is caught without hashing, and
a garbage header cannot make us allocate an absurd buffer. The header has its
own checksum so that "bad header" and "bad payload" are told apart in the log.
xxh3 runs at about 8 GB/s here (it does not release the GIL), i.e. about 1 ms
per 8 MiB chunk, small next to the read itself. The payload starts at a fixed
offset, so a reader that has checked a chunk once may `os.pread` inside it.

Files are written to a temporary name in the same directory, synced and
renamed: a reader (in any process) sees the whole file or no file. Temporary
names start with a dot, which no key may, so listings tell them apart.

Cache files are 0600 and opened with O_NOFOLLOW: a file that is not a plain
file (a symlink to someone else's copy, a FIFO that would block the reader)
is a bad frame like a torn one, never followed (see `ownership` for the
directories). A caller that checks the payload against a digest of its own
passes `check_payload=False`, so a chunk is hashed once, not twice; the
header checksum and the length are checked either way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import struct
from pathlib import Path

import xxhash

from kitfs.buffers import DIRECT_ALIGN, address_of, new_aligned_buffer
from kitfs.errors import LocalStorageError

log = logging.getLogger(__name__)

CHUNK_MAGIC = b"KFSC"
TOC_MAGIC = b"KFST"
VERIFIED_MAGIC = b"KFSV"
BLOB_MAGIC = b"KFSB"  # a manifest, config or table of contents, by its digest
RESOLVED_MAGIC = b"KFSR"  # what a reference resolved to, and when
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHQQQ")
HEADER_SIZE = HEADER.size  # payload offset inside every cache file
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
#: Mode of every file kitfs creates in a cache: the daemon's alone (directories: `ownership`).
FILE_MODE = 0o600

# Errors that mean "the disk (or our quota on it) is full" rather than "broken".
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class CacheError(LocalStorageError):
    """The cache directory could not be read or written (not: a chunk was corrupt)."""


def describe_oserror(exc: OSError) -> str:
    """One line for an OSError: its message and errno name, without the repr noise."""
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def cache_error(what: str, exc: OSError) -> CacheError:
    """CacheError("<what>: <reason> (<ERRNO>)"): one line, no repr of the OSError."""
    return CacheError(f"{what}: {describe_oserror(exc)}")


class BadFrame(Exception):
    """A cache file whose header, length or checksum is wrong; `str()` says which.

    `inode` and `size` describe the file that was read (0 when unknown), so the
    caller can drop exactly that file and correct its usage count.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.inode = 0
        self.size = 0


def encode_header(magic: bytes, payload: memoryview) -> bytes:
    """The 32-byte header for `payload` (a byte-format, contiguous memoryview)."""
    head = HEADER.pack(
        magic, FORMAT_VERSION, HEADER_SIZE, payload.nbytes, xxhash.xxh3_64_intdigest(payload), 0
    )
    return head[:24] + struct.pack("<Q", xxhash.xxh3_64_intdigest(head[:24]))


def parse_header(magic: bytes, head: bytes, file_size: int) -> tuple[int, int]:
    """(payload length, payload checksum) of a file whose first bytes are `head`.

    Raises BadFrame when the header cannot be trusted or disagrees with the file size.
    """
    if len(head) < HEADER_SIZE:
        raise BadFrame(f"file is {file_size} bytes, shorter than the {HEADER_SIZE}-byte header")
    got_magic, version, header_size, length, checksum, head_sum = HEADER.unpack(head)
    if xxhash.xxh3_64_intdigest(head[:24]) != head_sum:
        raise BadFrame("header checksum mismatch")
    if got_magic != magic:
        raise BadFrame(f"magic {got_magic!r}, expected {magic!r}")
    if version != FORMAT_VERSION or header_size != HEADER_SIZE:
        raise BadFrame(f"unsupported format version {version} (header size {header_size})")
    if file_size != HEADER_SIZE + length:
        raise BadFrame(f"file is {file_size} bytes, header says {HEADER_SIZE + length}")
    return length, checksum


#: No cache file is bigger than this; a larger one is garbage, not something to read in.
MAX_FRAME_PAYLOAD = 1 << 30


#: Files smaller than this are read through the page cache (tables of contents,
#: records, short last chunks): O_DIRECT saves nothing on a few pages.
DIRECT_MIN_SIZE = 256 * 1024

#: Devices (st_dev) whose file system refused O_DIRECT; read them buffered from then on.
_no_direct: set[int] = set()


def read_frame(
    path: Path | str, magic: bytes, *, dir_fd: int | None = None, check_payload: bool = True
) -> tuple[memoryview, int]:
    """(payload, inode) of the cache file at `path` (relative to `dir_fd` if given), checked.

    Raises FileNotFoundError when absent, BadFrame when corrupt or not a
    regular file, OSError otherwise. The inode lets a caller that drops a bad
    file avoid deleting a good one that another process renamed into place
    meanwhile. The whole file is read with one read into a buffer sized from
    the file (the header then has to agree with that size), so a warm chunk
    costs one read and no copy; the payload is a view of that buffer.
    `check_payload=False` skips the payload's xxh3, for a caller that checks
    the payload against its digest instead.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):  # a symlink; a socket
            raise
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            raise
        raise not_regular(st) from None
    try:
        st = os.fstat(fd)
        try:
            if not stat.S_ISREG(st.st_mode):
                raise not_regular(st)
            if not HEADER_SIZE <= st.st_size <= HEADER_SIZE + MAX_FRAME_PAYLOAD:
                raise BadFrame(f"file is {st.st_size} bytes, not a cache frame")
            whole = _read_whole(fd, st)
            # parse_header also checks its length against the file's size
            _, checksum = parse_header(magic, bytes(whole[:HEADER_SIZE]), st.st_size)
            payload = whole[HEADER_SIZE:]
            if check_payload and xxhash.xxh3_64_intdigest(payload) != checksum:
                raise BadFrame("payload checksum mismatch")
        except BadFrame as bad:
            bad.inode, bad.size = st.st_ino, st.st_size
            raise
    finally:
        os.close(fd)
    return payload, st.st_ino


def file_kind(st: os.stat_result) -> str:
    """What a directory entry is, for messages: "a regular file", "a symbolic link", ..."""
    kinds = {stat.S_IFREG: "a regular file", stat.S_IFLNK: "a symbolic link",
             stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(st.st_mode), "a device")


def not_regular(st: os.stat_result) -> BadFrame:
    """BadFrame for a cache entry that is not a regular file (size 0: it was never counted)."""
    bad = BadFrame(f"not a regular file but {file_kind(st)}")
    bad.inode = st.st_ino
    return bad


def _read_whole(fd: int, st: os.stat_result) -> memoryview:
    """The file's `st.st_size` bytes, with O_DIRECT when it is big enough and allowed."""
    size = st.st_size
    buffer = new_aligned_buffer(-size % DIRECT_ALIGN + size)
    if size >= DIRECT_MIN_SIZE and st.st_dev not in _no_direct and hasattr(os, "O_DIRECT"):
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK | os.O_DIRECT)
            # Whole aligned blocks: the read stops at the end of the file by itself.
            _read_all(fd, [buffer], size)
            return buffer[:size]  # the descriptor is the caller's to close, flags and all
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _refused(st.st_dev)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # read on below without it
    _read_all(fd, [buffer[:size]], size)
    return buffer[:size]


def _read_all(fd: int, buffers: list[memoryview], size: int) -> None:
    """Read the file's `size` bytes into `buffers` from its start; BadFrame if it ends first
    (it shrank). The buffers may be longer than the file (whole blocks for O_DIRECT)."""
    at = 0
    while at < size:
        n = os.preadv(fd, buffers, at)
        if n <= 0:  # pread of a regular file is short only at EOF
            raise BadFrame(f"file ended after {at} bytes")
        at += n
        _consume(buffers, n)


def _consume(buffers: list[memoryview], n: int) -> None:
    """Drop the first `n` bytes of a scatter/gather list (what one readv/writev moved)."""
    while buffers and n >= len(buffers[0]):
        n -= len(buffers[0])
        buffers.pop(0)
    if buffers and n:
        buffers[0] = buffers[0][n:]


def as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of `data`, so lengths are bytes even for typed buffers."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def temp_name(name: str) -> str:
    """A temporary file name next to `name`, unique across processes and threads."""
    return f"{TEMP_PREFIX}{name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


class _FrameBytes(bytearray):
    """The memory of a frame buffer: only `new_frame_buffer` makes these, so no bytes a
    caller holds (a view into someone else's buffer, data off the wire) can pass for a
    frame and have a header written over their neighbours. `payload_at` is where in
    it the payload starts: a view further in is not a frame's payload."""

    __slots__ = ("payload_at",)

    def __init__(self) -> None:
        super().__init__()
        self.payload_at = -1


def new_frame_buffer(size: int) -> memoryview:
    """A writable view of `size` uninitialized bytes to receive a payload into, which
    `write_frame` then writes to disk with O_DIRECT, straight from this memory.

    The view is the payload part of an aligned frame: the header's 32 bytes
    sit just before it (not visible through it) and are filled in by
    `write_frame`, so the file's bytes leave in one piece from a block
    boundary with no copy to assemble them. Any other payload is written
    through the page cache.
    """
    if size < 0:
        raise ValueError(f"frame payload size must be >= 0, got {size}")
    frame = new_aligned_buffer(HEADER_SIZE + size, _FrameBytes)
    owner = frame.obj
    assert isinstance(owner, _FrameBytes)
    payload = frame[HEADER_SIZE:]
    if owner:
        owner.payload_at = address_of(frame) - address_of(owner) + HEADER_SIZE
    return payload


def frame_of(payload: memoryview) -> memoryview | None:
    """Header and payload as one aligned view, when `payload` came from `new_frame_buffer`
    (or is a prefix of one) and is big enough for O_DIRECT to write any of it; else None."""
    owner = payload.obj
    if (not isinstance(owner, _FrameBytes) or payload.readonly or not payload.c_contiguous
            or HEADER_SIZE + payload.nbytes < DIRECT_ALIGN):
        return None
    raw = memoryview(owner)
    start = address_of(payload) - address_of(raw) - HEADER_SIZE
    if start + HEADER_SIZE != owner.payload_at or start + HEADER_SIZE + payload.nbytes > raw.nbytes:
        return None
    return raw[start : start + HEADER_SIZE + payload.nbytes]


def write_frame(
    directory: Path | int, name: str, magic: bytes, payload: memoryview, *, sync: bool = True
) -> int:
    """Atomically create `name` in `directory` (a path or an open directory descriptor)
    holding `payload`, mode 0600; the file size is returned.

    An existing file of that name is replaced (same name = same content in
    every caller). On any failure the temporary file is removed, so a full disk
    leaves nothing half-written behind, and the OSError propagates. The
    directory itself is not synced: losing the rename in a crash only loses a
    cache entry, which is refetched. A payload from `new_frame_buffer` is
    written with O_DIRECT where the file system allows it; the header is
    written into the 32 bytes before it.
    """
    header = encode_header(magic, payload)
    if isinstance(directory, int):
        dir_fd: int | None = directory
        tmp: Path | str = temp_name(name)
        final: Path | str = name
    else:
        dir_fd, tmp, final = None, directory / temp_name(name), directory / name
    frame = frame_of(payload) if hasattr(os, "O_DIRECT") else None
    if frame is not None and _no_direct and _device(directory) in _no_direct:
        frame = None
    fd, direct = _create(tmp, dir_fd, directory, direct=frame is not None)
    try:
        try:
            if frame is not None and direct:
                frame[:HEADER_SIZE] = header
                cached = _write_direct(fd, frame, directory)
            else:
                _write_all(fd, header, payload)
                cached = 0
            if sync:
                os.fdatasync(fd)
                if cached < HEADER_SIZE + payload.nbytes:
                    # Clean now, so this drops them: they only duplicate what the
                    # caller holds in memory.
                    os.posix_fadvise(fd, cached, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.rename(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    return HEADER_SIZE + payload.nbytes


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _create(tmp: Path | str, dir_fd: int | None, directory: Path | int, *, direct: bool
            ) -> tuple[int, bool]:
    """Create the temporary file: (descriptor, whether it is open with O_DIRECT), which
    is asked for with `direct` and left out where the file system refuses it."""
    if direct:
        try:
            return os.open(tmp, _CREATE_FLAGS | os.O_DIRECT, FILE_MODE, dir_fd=dir_fd), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Linux creates the file before it checks O_DIRECT (tmpfs before 6.6)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            _refused(_device(directory))
    return os.open(tmp, _CREATE_FLAGS, FILE_MODE, dir_fd=dir_fd), False


def _device(directory: Path | int) -> int:
    return os.fstat(directory).st_dev if isinstance(directory, int) else os.stat(directory).st_dev


def _refused(device: int) -> None:
    if device not in _no_direct:
        _no_direct.add(device)  # tmpfs before Linux 6.6, some FUSE and network fs
        log.info("O_DIRECT refused on device %#x: cache files read and written buffered",
                 device)


def _write_direct(fd: int, frame: memoryview, directory: Path | int) -> int:
    """Write `frame` at offset 0 of `fd`, opened with O_DIRECT: its whole blocks from
    memory to disk, the rest (the last partial block; all of it if the file system
    refuses O_DIRECT) through the page cache. Returns where that rest starts.

    The partial block goes through the page cache rather than being padded to a
    whole block and cut off with ftruncate, because shrinking a file to the
    middle of a block makes ext4 read that block back from disk first: one
    synchronous read per chunk file.
    """
    whole = frame.nbytes - frame.nbytes % DIRECT_ALIGN
    at = 0
    try:
        while at < whole and at % DIRECT_ALIGN == 0:  # short writes: only at a full disk
            at += _progress(os.pwrite(fd, frame[at:whole], at))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        if at == 0:  # remembered for the file's device and the directory's (which
            _refused(os.fstat(fd).st_dev)  # later writes look up): overlayfs tells apart
            _refused(_device(directory))
    cached = at
    if at < frame.nbytes:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        while at < frame.nbytes:
            at += _progress(os.pwrite(fd, frame[at:], at))
    return cached


def _progress(written: int) -> int:
    if written <= 0:  # a regular file never does this; do not spin if one does
        raise OSError(errno.EIO, "write made no progress")
    return written


def _write_all(fd: int, header: bytes, payload: memoryview) -> None:
    """Write header and payload with as few syscalls as the kernel allows (usually one)."""
    buffers = [memoryview(header), payload]
    while buffers:
        _consume(buffers, _progress(os.writev(fd, buffers)))
