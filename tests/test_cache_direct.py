"""Chunk files written with O_DIRECT from the buffer a chunk was received into.

Run on a disk-backed directory (O_DIRECT is the point: tmpfs before Linux 6.6
refuses it), with util-linux `fincore` to see what stayed in the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kitfs.buffers import DIRECT_ALIGN, address_of, new_aligned_buffer
from kitfs.cache import HEADER_SIZE, CacheError, ChunkStore, chunk_key_for_position, fileformat
from kitfs.cache.fileformat import (
    CHUNK_MAGIC,
    frame_of,
    new_frame_buffer,
    parse_header,
    write_frame,
)

LAYER = "sha256:" + "cd" * 32
SIZES = [0, 1, 4095, 4096, 4097, DIRECT_ALIGN - HEADER_SIZE, 2 << 20, (2 << 20) + 7]


def key(i: int) -> str:
    return chunk_key_for_position(LAYER, 4096, i)


def _takes_o_direct(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        probe.unlink(missing_ok=True)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system that takes O_DIRECT: pytest's, else one in /var/tmp."""
    if _takes_o_direct(tmp_path):
        yield tmp_path
        return
    if not Path("/var/tmp").is_dir():
        pytest.skip("no directory here takes O_DIRECT")
    other = Path(tempfile.mkdtemp(prefix="kitfs-direct-", dir="/var/tmp"))
    try:
        if not _takes_o_direct(other):
            pytest.skip("no directory here takes O_DIRECT")
        yield other
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileformat, "_no_direct", set())


class _OpenSpy:
    """Counts O_DIRECT opens; `refuse` makes them fail as tmpfs before 6.6 does (the file
    is created, then EINVAL)."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.direct = 0
        self.real = os.open

    def __call__(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
                 ) -> int:
        if flags & os.O_DIRECT:
            self.direct += 1
            if self.refuse:
                os.close(self.real(path, flags & ~os.O_DIRECT, mode, dir_fd=dir_fd))
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return self.real(path, flags, mode, dir_fd=dir_fd)


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> _OpenSpy:
    spy = _OpenSpy()
    monkeypatch.setattr(fileformat.os, "open", spy)
    return spy


def content(size: int, seed: int) -> bytes:
    """Bytes that differ from block to block, so a block written to the wrong place shows."""
    return random.Random(seed).randbytes(size)


def filled(data: bytes) -> memoryview:
    buf = new_frame_buffer(len(data))
    buf[:] = data
    return buf


def resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache, by util-linux fincore."""
    if shutil.which("fincore") is None:
        pytest.skip("util-linux fincore is not installed")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "PAGES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def temp_files(directory: Path) -> list[Path]:
    return list(directory.rglob(".*.tmp"))


# -- frame buffers ---------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_frame_buffer_is_a_writable_payload_with_an_aligned_header_before_it(size: int) -> None:
    buf = new_frame_buffer(size)
    assert buf.nbytes == size and not buf.readonly
    frame = frame_of(buf)
    if HEADER_SIZE + size < DIRECT_ALIGN:
        assert frame is None  # not one whole block: nothing for O_DIRECT to write
        return
    assert frame is not None
    assert frame.nbytes == HEADER_SIZE + size
    assert address_of(frame) % DIRECT_ALIGN == 0
    assert address_of(frame) + HEADER_SIZE == address_of(buf)


def test_only_frame_buffers_and_their_prefixes_are_taken_for_frames() -> None:
    """An aligned view into any other buffer is not a frame: writing a header before it
    would overwrite the bytes of whatever shares that buffer."""
    buf = new_frame_buffer(3 * DIRECT_ALIGN)
    assert frame_of(buf[: 2 * DIRECT_ALIGN]) is not None
    assert frame_of(memoryview(buf)) is not None
    assert frame_of(buf[DIRECT_ALIGN:]) is None  # its header would land in the payload
    assert frame_of(buf.toreadonly()) is None
    shared = new_aligned_buffer(4 * DIRECT_ALIGN)
    assert frame_of(shared[HEADER_SIZE:]) is None  # aligned as a frame, yet not one
    assert frame_of(memoryview(bytearray(3 * DIRECT_ALIGN))) is None
    assert frame_of(memoryview(bytes(3 * DIRECT_ALIGN))) is None


def test_write_frame_leaves_a_shared_buffer_alone(disk_dir: Path, opens: _OpenSpy) -> None:
    shared = new_aligned_buffer(4 * DIRECT_ALIGN)
    shared[:] = content(shared.nbytes, 3)
    before = bytes(shared)
    write_frame(disk_dir, "chunk", CHUNK_MAGIC, shared[HEADER_SIZE : 2 * DIRECT_ALIGN])
    assert bytes(shared) == before
    assert opens.direct == 0
    assert (disk_dir / "chunk").read_bytes()[HEADER_SIZE:] == before[HEADER_SIZE:2 * DIRECT_ALIGN]


# -- writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["nosync", "sync"])
@pytest.mark.parametrize("size", SIZES)
def test_frame_buffer_put_reads_back_and_is_written_with_o_direct(
    disk_dir: Path, opens: _OpenSpy, size: int, sync: bool
) -> None:
    store = ChunkStore(disk_dir / "cache", sync=sync)
    data = content(size, size)
    buf = filled(data)
    store.put(key(1), buf)
    assert bytes(buf) == data  # the header went before the payload, not into it
    assert opens.direct == (1 if HEADER_SIZE + size >= DIRECT_ALIGN else 0)
    raw = store.path(key(1)).read_bytes()
    assert len(raw) == HEADER_SIZE + size  # no block padding in the file
    assert parse_header(CHUNK_MAGIC, raw[:HEADER_SIZE], len(raw))[0] == size
    assert raw[HEADER_SIZE:] == data
    got = store.get(key(1))
    assert got is not None and bytes(got) == data
    assert temp_files(disk_dir) == []
    assert store.usage().bytes == HEADER_SIZE + size


def test_the_same_frame_buffer_may_be_written_twice(disk_dir: Path, opens: _OpenSpy) -> None:
    """The mark that makes a buffer a frame survives a write (a retry after a full disk
    writes the same buffer again)."""
    data = content(1 << 20, 9)
    buf = filled(data)
    write_frame(disk_dir, "a", CHUNK_MAGIC, buf)
    write_frame(disk_dir, "b", CHUNK_MAGIC, buf)
    assert opens.direct == 2
    assert (disk_dir / "a").read_bytes() == (disk_dir / "b").read_bytes()
    assert (disk_dir / "a").read_bytes()[HEADER_SIZE:] == data


@pytest.mark.parametrize("sync", [False, True], ids=["nosync", "sync"])
def test_frame_buffer_writes_leave_no_pages_cached(disk_dir: Path, sync: bool) -> None:
    """At most the last partial block (written through the page cache) stays, and not
    even that once it is synced; a plain buffered write, the control, stays whole."""
    size = 2 << 20
    store = ChunkStore(disk_dir / "cache", sync=sync)
    store.put(key(1), filled(content(size, 1)))
    assert resident_pages(store.path(key(1))) <= (0 if sync else 1)
    ChunkStore(disk_dir / "control", sync=False).put(key(1), bytearray(content(size, 1)))
    control = disk_dir / "control" / "chunks" / key(1)[:2] / key(1)
    assert resident_pages(control) >= size // 4096  # what fincore sees without O_DIRECT


def test_buffered_synced_writes_leave_no_pages_cached(disk_dir: Path, opens: _OpenSpy) -> None:
    size = 2 << 20
    store = ChunkStore(disk_dir / "cache", sync=True)
    store.put(key(1), bytearray(content(size, 2)))
    assert opens.direct == 0
    assert resident_pages(store.path(key(1))) == 0
    got = store.get(key(1))
    assert got is not None and bytes(got) == content(size, 2)


# -- refusals and failures ---------------------------------------------------------------


def test_refused_at_open_falls_back_to_buffered_and_is_not_asked_again(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spy = _OpenSpy(refuse=True)
    monkeypatch.setattr(fileformat.os, "open", spy)
    store = ChunkStore(disk_dir / "cache", sync=False)
    sizes = [(2 << 20) + 7, 1 << 20, 4096]
    with caplog.at_level("INFO", logger="kitfs.cache.fileformat"):
        for i, size in enumerate(sizes):
            store.put(key(i), filled(content(size, i)))
    assert spy.direct == 1  # refused once, then that device is written buffered
    assert os.stat(disk_dir).st_dev in fileformat._no_direct
    assert caplog.text.count("O_DIRECT refused") == 1
    assert temp_files(disk_dir) == []  # the file the refused open created is gone
    for i, size in enumerate(sizes):
        raw = store.path(key(i)).read_bytes()
        assert len(raw) == HEADER_SIZE + size and raw[HEADER_SIZE:] == content(size, i)
        got = store.get(key(i))
        assert got is not None and bytes(got) == content(size, i)


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def test_refused_at_write_falls_back_to_buffered(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, opens: _OpenSpy
) -> None:
    """Some file systems open with O_DIRECT and then fail the write (EINVAL)."""
    real = os.pwrite
    refused = [0]

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if _is_direct(fd):
            refused[0] += 1
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(fileformat.os, "pwrite", pwrite)
    data = content((2 << 20) + 7, 4)
    write_frame(disk_dir, "chunk", CHUNK_MAGIC, filled(data), sync=True)
    assert refused == [1] and opens.direct == 1
    assert resident_pages(disk_dir / "chunk") == 0  # synced, then dropped
    raw = (disk_dir / "chunk").read_bytes()
    assert len(raw) == HEADER_SIZE + len(data) and raw[HEADER_SIZE:] == data
    write_frame(disk_dir, "again", CHUNK_MAGIC, filled(data))
    assert opens.direct == 1  # not asked again on that device


def test_short_direct_writes_are_continued(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short O_DIRECT writes (a disk filling up) are continued where they stopped; the
    last partial block goes through the page cache; the file is whole."""
    real = os.pwrite
    calls: list[tuple[bool, int]] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        direct = _is_direct(fd)
        calls.append((direct, offset))
        if direct and len(calls) <= 2:
            return real(fd, memoryview(data)[: len(calls) * DIRECT_ALIGN], offset)
        return real(fd, data, offset)

    monkeypatch.setattr(fileformat.os, "pwrite", pwrite)
    data = content(64 * 1024 + 5, 5)
    write_frame(disk_dir, "chunk", CHUNK_MAGIC, filled(data))
    assert calls == [(True, 0), (True, DIRECT_ALIGN), (True, 3 * DIRECT_ALIGN),
                     (False, 64 * 1024)]
    assert (disk_dir / "chunk").read_bytes()[HEADER_SIZE:] == data


@pytest.mark.parametrize("at", ["direct", "tail"])
def test_full_disk_mid_write_leaves_no_temporary_file(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if _is_direct(fd) == (at == "direct"):
            real(fd, memoryview(data)[:DIRECT_ALIGN], offset)  # a real one takes some first
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(fileformat.os, "pwrite", pwrite)
    with pytest.raises(OSError) as info:
        write_frame(disk_dir, "chunk", CHUNK_MAGIC, filled(content((2 << 20) + 7, 6)))
    assert info.value.errno == errno.ENOSPC
    assert list(disk_dir.iterdir()) == []

    store = ChunkStore(disk_dir / "cache", sync=False)
    with pytest.raises(CacheError, match=r"^cache disk full: "):
        store.put(key(1), filled(content((2 << 20) + 7, 6)))
    assert temp_files(disk_dir) == [] and not store.contains(key(1))


def test_toc_records_still_round_trip(disk_dir: Path) -> None:
    """Tables of contents and verified records (bytes, not frame buffers) take the buffered
    path, synced and dropped from the page cache."""
    from kitfs.cache import TocCache

    tocs = TocCache(disk_dir / "cache")
    record = b'{"layers": []}' * 1000
    tocs.put("sha256:" + "ef" * 32, record)
    assert tocs.get("sha256:" + "ef" * 32) == record

