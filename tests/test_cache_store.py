"""ChunkStore: the on-disk chunk cache every mount on a node shares."""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from kitfs.cache import (
    HEADER_SIZE,
    BadKeyError,
    CacheError,
    CacheUsage,
    ChunkStore,
    chunk_key_for_digest,
    chunk_key_for_position,
    fileformat,
    validate_key,
)
from kitfs.errors import LocalStorageError

LAYER = "sha256:" + "ab" * 32
OTHER_LAYER = "sha256:" + "ab" + "cd" * 31


def key(i: int) -> str:
    return chunk_key_for_position(LAYER, 4096, i)


def payload(name: str, size: int = 4096) -> bytes:
    """Deterministic bytes per name, so any process can check what it reads."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def temp_files(root: Path) -> list[Path]:
    return [p for p in (root / "chunks").rglob(".*.tmp")]


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "cache", sync=False)


# -- basics ----------------------------------------------------------------------------


def test_round_trip_layout_and_format(store: ChunkStore) -> None:
    data = os.urandom(100_000)
    k = chunk_key_for_digest("sha256:" + hashlib.sha256(data).hexdigest())
    store.put(k, data)
    path = store.root / "chunks" / k[:2] / k
    assert store.path(k) == path
    assert path.stat().st_size == HEADER_SIZE + len(data)
    assert path.read_bytes()[:4] == b"KFSC"
    assert path.read_bytes()[HEADER_SIZE:] == data
    assert store.contains(k)
    assert store.get(k) == data
    assert store.get(key(99)) is None
    assert not store.contains(key(99))
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.puts, stats.put_bytes) == (1, 1, 1, len(data))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytearray(b"xyz" * 1000),
        memoryview(b"0123456789")[2:8],
        memoryview(array.array("I", range(1000))),  # typed buffer: stored as its bytes
    ],
    ids=["empty", "bytearray", "memoryview-slice", "typed-memoryview"],
)
def test_put_accepts_buffers(store: ChunkStore, data: bytes | bytearray | memoryview) -> None:
    store.put(key(1), data)
    assert store.get(key(1)) == bytes(data)


def test_same_key_twice_keeps_first_file(store: ChunkStore) -> None:
    store.put(key(1), b"first")
    inode = store.path(key(1)).stat().st_ino
    store.put(key(1), b"first")
    assert store.path(key(1)).stat().st_ino == inode
    assert store.stats().puts == 1
    assert store.usage().chunks == 1
    assert store.get(key(1)) == b"first"


def test_creating_store_makes_directories_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    ChunkStore(root)
    ChunkStore(root)
    assert (root / "chunks").is_dir()


def test_unusable_root_is_a_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(CacheError, match="cannot create cache directory"):
        ChunkStore(blocker / "cache")


# -- corruption ------------------------------------------------------------------------


def _flip_payload_byte(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[HEADER_SIZE + 10] ^= 0x01
    p.write_bytes(raw)


def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size - 100)


def _append(p: Path) -> None:
    with p.open("ab") as f:
        f.write(b"extra")


def _garbage_header(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[:HEADER_SIZE] = os.urandom(HEADER_SIZE)
    p.write_bytes(raw)


def _header_length_field(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[8] ^= 0xFF  # length changed, header checksum now wrong too
    p.write_bytes(raw)


def _short_header(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:20])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _toc_frame_under_chunk_name(p: Path) -> None:
    from kitfs.cache.fileformat import TOC_MAGIC, encode_header

    body = b"not a chunk"
    p.write_bytes(encode_header(TOC_MAGIC, memoryview(body)) + body)


CORRUPTIONS: list[Callable[[Path], None]] = [
    _flip_payload_byte,
    _truncate,
    _append,
    _garbage_header,
    _header_length_field,
    _short_header,
    _empty,
    _toc_frame_under_chunk_name,
]


@pytest.mark.parametrize("size", [8192, (2 << 20) + 1234], ids=["buffered", "o_direct"])
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_chunk_reads_as_missing_and_is_dropped(
    store: ChunkStore, corrupt: Callable[[Path], None], caplog: pytest.LogCaptureFixture,
    size: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fileformat, "_no_direct", set())
    data = payload("c", size)
    store.put(key(1), data)
    store.put(key(2), payload("other"))
    corrupt(store.path(key(1)))
    with caplog.at_level("WARNING", logger="kitfs.cache.store"):
        assert store.get(key(1)) is None
    assert not store.path(key(1)).exists()
    assert "corrupt" in caplog.text
    assert store.stats().corrupt == 1
    assert store.get(key(2)) == payload("other")  # neighbours untouched
    store.put(key(1), data)
    assert store.get(key(1)) == data


class _FcntlSpy:
    """Records the O_DIRECT switches read_frame makes; optionally refuses them (EINVAL)."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.direct_attempts = 0
        self.real = fcntl.fcntl

    def __call__(self, fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            self.direct_attempts += 1
            if self.refuse:
                raise OSError(errno.EINVAL, "Invalid argument")
        return int(self.real(fd, cmd, arg))


def _takes_o_direct(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        probe.unlink()


@pytest.mark.parametrize("refuse", [False, True], ids=["direct", "refused"])
def test_big_chunks_are_read_with_o_direct_or_buffered_where_refused(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch, refuse: bool
) -> None:
    """Sizes that are not whole blocks read back exactly; a file system refusing
    O_DIRECT (EINVAL) is read buffered, and is not asked again."""
    if not refuse and not _takes_o_direct(store.root):
        pytest.skip("this file system refuses O_DIRECT (tmpfs before Linux 6.6)")
    spy = _FcntlSpy(refuse)
    monkeypatch.setattr(fileformat.fcntl, "fcntl", spy)
    monkeypatch.setattr(fileformat, "_no_direct", set())
    sizes = [(2 << 20) + 1234, 1 << 20, fileformat.DIRECT_MIN_SIZE - HEADER_SIZE - 1, 0]
    for i, size in enumerate(sizes):
        store.put(key(i), payload(f"d{i}", size))
    for _ in range(2):
        for i, size in enumerate(sizes):
            got = store.get(key(i))
            assert got is not None and bytes(got) == payload(f"d{i}", size)
    # two big files twice each; refused: asked once, then that device is read buffered
    assert spy.direct_attempts == (1 if refuse else 4)
    assert bool(fileformat._no_direct) is refuse


def test_put_over_a_corrupt_file_is_a_no_op_until_get_drops_it(store: ChunkStore) -> None:
    """Content addressing: put trusts an existing file; the next get catches the rot."""
    store.put(key(1), b"good bytes")
    _append(store.path(key(1)))
    store.put(key(1), b"good bytes")
    assert store.get(key(1)) is None
    store.put(key(1), b"good bytes")
    assert store.get(key(1)) == b"good bytes"


def test_unreadable_chunk_is_a_one_line_cache_error(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing disk (EIO) is a broken cache, not a bad chunk: an error, and the file stays."""
    store.put(key(1), b"on a failing disk")

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fileformat.os, "preadv", preadv)
    with pytest.raises(CacheError, match=r"cannot read cache chunk .*\(EIO\)") as info:
        store.get(key(1))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, LocalStorageError)
    monkeypatch.undo()
    assert store.get(key(1)) == b"on a failing disk"


def test_a_directory_in_a_chunks_place_is_a_miss_and_put_over_it_an_error(
    store: ChunkStore,
) -> None:
    store.path(key(1)).mkdir(parents=True)
    assert store.get(key(1)) is None
    assert not store.contains(key(1))
    assert store.stats().corrupt == 1
    with pytest.raises(CacheError, match=r"cannot write cache chunk .*\(EISDIR\)"):
        store.put(key(1), b"x")


# -- crashes and concurrency -----------------------------------------------------------


def test_crash_leftover_temp_file_is_ignored_then_collected(store: ChunkStore) -> None:
    store.put(key(1), b"whole")
    shard = store.path(key(2)).parent
    stale = shard / f".{key(2)}.4242.deadbeef.tmp"
    stale.write_bytes(b"half a chu")
    fresh = shard / f".{key(3)}.4243.deadbeef.tmp"
    fresh.write_bytes(b"being written right now")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    assert store.get(key(2)) is None
    assert not store.contains(key(2))
    assert store.usage().chunks == 1  # temp files are not chunks
    result = store.gc()
    assert result.removed_temp_files == 1
    assert result.removed_chunks == 0
    assert not stale.exists()
    assert fresh.exists()  # another process may still be writing it
    assert store.get(key(1)) == b"whole"


def _shared(i: int) -> tuple[str, bytes]:
    """A key every worker writes: same key, same bytes, whoever writes it."""
    k = chunk_key_for_position(LAYER, 65536, i)
    return k, payload(k, 65536 + 1000 * i)


def _own(worker: int, r: int) -> tuple[str, bytes]:
    k = chunk_key_for_position(f"{worker:02x}" * 32, 65536, r)
    return k, payload(k, 65536 + r)


def _worker(root: str, worker: int, rounds: int, errors: multiprocessing.Queue[str]) -> None:
    store = ChunkStore(Path(root), budget=None)
    try:
        for r in range(rounds):
            pairs = [_shared(r % 8), _own(worker, r)]
            for k, data in pairs:
                store.put(k, data)
            for k, data in pairs:
                if store.get(k) != data:
                    errors.put(f"worker {worker}: wrong or missing bytes for {k}")
    except Exception as exc:  # reported to the parent, which fails the test
        errors.put(f"worker {worker}: {exc!r}")


def test_concurrent_processes_share_one_directory(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    ChunkStore(root)
    ctx = multiprocessing.get_context("fork")
    errors: multiprocessing.Queue[str] = ctx.Queue()
    rounds = 40
    procs = [ctx.Process(target=_worker, args=(str(root), w, rounds, errors)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []

    store = ChunkStore(root)
    expected = [_shared(i) for i in range(8)]
    expected += [_own(w, r) for w in range(6) for r in range(rounds)]
    for k, data in expected:
        assert store.get(k) == data
    result = store.verify()
    assert (result.checked, result.bad) == (len(expected), 0)
    assert temp_files(root) == []


def test_threads_share_one_store(store: ChunkStore) -> None:
    import threading

    failures: list[str] = []

    def run(t: int) -> None:
        for i in range(50):
            k = key(i % 10)
            store.put(k, payload(k))
            if store.get(k) != payload(k):
                failures.append(k)
            store.pin(k)
            store.touch(k)
            store.unpin(k)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert store.scan().chunks == 10


# -- LRU, pins, budget -----------------------------------------------------------------


CHUNK = 1000
FILE = HEADER_SIZE + CHUNK


def test_lru_eviction_order_oldest_first_pinned_last(store: ChunkStore) -> None:
    a, b, c, d = key(0xA), key(0xB), key(0xC), key(0xD)
    for k in (a, b, c, d):
        store.put(k, payload(k, CHUNK))
    store.touch(a)  # a: most recent now
    store.pin(b)  # b: oldest, but in use

    assert store.gc(target=2 * FILE).removed_chunks == 2
    assert [store.contains(k) for k in (a, b, c, d)] == [True, True, False, False]
    assert store.gc(target=FILE).removed_chunks == 1
    assert [store.contains(k) for k in (a, b)] == [False, True]  # unpinned go first
    assert store.gc(target=0).removed_chunks == 1  # pinned go last, not never
    assert not store.contains(b)
    assert store.usage().bytes == 0


def test_unpin_balances_pin(store: ChunkStore) -> None:
    a, b = key(0xA), key(0xB)
    store.put(a, payload(a, CHUNK))
    store.put(b, payload(b, CHUNK))
    store.pin(a)
    store.pin(a)
    store.unpin(a)  # still pinned once
    store.gc(target=FILE)
    assert store.contains(a) and not store.contains(b)
    store.put(b, payload(b, CHUNK))
    store.unpin(a)
    store.touch(b)
    store.gc(target=FILE)
    assert store.contains(b) and not store.contains(a)


def test_lru_across_processes_follows_file_mtimes(tmp_path: Path) -> None:
    """Another process sees recency through mtimes: a fresh store has no in-memory uses."""
    root = tmp_path / "cache"
    writer = ChunkStore(root, sync=False)
    keys = [key(i) for i in range(4)]
    for k in keys:
        writer.put(k, payload(k, CHUNK))
    now = time.time()
    for age, k in zip([10, 400, 30, 200], keys, strict=True):
        os.utime(writer.path(k), (now - age, now - age))

    other = ChunkStore(root, sync=False)
    other.gc(target=2 * FILE)
    assert [other.contains(k) for k in keys] == [True, False, True, False]


def test_touch_reaches_disk_at_most_once_per_interval(store: ChunkStore) -> None:
    k = key(1)
    store.put(k, payload(k))
    old = time.time() - 1000
    os.utime(store.path(k), (old, old))
    store.touch(k)  # written at put: within the interval, memory only
    assert store.path(k).stat().st_mtime == pytest.approx(old)
    store.TOUCH_INTERVAL_S = 0.0
    store.touch(k)
    assert store.path(k).stat().st_mtime > time.time() - 60
    store.touch(key(77))  # a chunk that is not there: nothing happens
    assert not store.contains(key(77))


def test_flush_writes_pending_uses(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache", sync=False)
    k = key(1)
    store.put(k, payload(k))
    old = time.time() - 1000
    os.utime(store.path(k), (old, old))
    store.touch(k)
    store.flush()
    assert store.path(k).stat().st_mtime > time.time() - 60


def test_budget_is_enforced_on_put(tmp_path: Path) -> None:
    budget = 5 * FILE
    store = ChunkStore(tmp_path / "cache", budget=budget, sync=False)
    for i in range(20):
        store.put(key(i), payload(key(i), CHUNK))
        assert store.usage().bytes <= budget
        assert store.scan().bytes <= budget
    assert store.contains(key(19))  # the newest survive
    assert not store.contains(key(0))  # the oldest went first
    assert store.stats().evicted_chunks >= 15


def test_budget_sees_other_processes_after_rescan(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = ChunkStore(root, budget=4 * FILE, sync=False)
    first.put(key(0), payload(key(0), CHUNK))  # first scan happens here
    other = ChunkStore(root, sync=False)
    for i in range(1, 4):
        other.put(key(i), payload(key(i), CHUNK))
    first.RESCAN_INTERVAL_S = 0.0  # as if the rescan interval had passed
    first.put(key(4), payload(key(4), CHUNK))
    assert first.scan().bytes <= 4 * FILE


def test_usage_tracks_puts_and_removals(store: ChunkStore) -> None:
    assert store.usage().chunks == 0
    store.put(key(1), b"x" * 100)
    store.put(key(2), b"y" * 200)
    assert store.usage().bytes == 2 * HEADER_SIZE + 300
    assert store.remove(key(1))
    assert not store.remove(key(1))
    assert store.usage().chunks == 1
    assert store.scan().bytes == HEADER_SIZE + 200


# -- full disk -------------------------------------------------------------------------


def _fail_writes(monkeypatch: pytest.MonkeyPatch, code: int, times: int | None) -> list[int]:
    """Make os.writev fail with `code` (`times` times, or always); returns a call counter."""
    real = os.writev
    calls = [0]

    def writev(fd: int, buffers: list[bytes | memoryview]) -> int:
        calls[0] += 1
        if times is None or calls[0] <= times:
            # a real full disk often accepts part of the data before failing
            real(fd, [memoryview(buffers[0])[:10]])
            raise OSError(code, os.strerror(code))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    return calls


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_is_a_clear_error_and_leaves_no_partial_chunk(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    for i in range(3):
        store.put(key(i), payload(key(i), CHUNK))
    calls = _fail_writes(monkeypatch, code, times=None)
    with pytest.raises(CacheError, match=r"^cache disk full: ") as info:
        store.put(key(9), payload(key(9), CHUNK))
    assert "\n" not in str(info.value)
    assert calls[0] == 2  # evicted, retried once, gave up
    assert not store.contains(key(9))
    assert temp_files(store.root) == []
    assert store.stats().disk_full == 1
    monkeypatch.undo()
    assert store.verify().bad == 0  # whatever survived eviction is intact


def test_full_disk_evicts_and_retries_once(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        store.put(key(i), payload(key(i), CHUNK))
    _fail_writes(monkeypatch, errno.ENOSPC, times=1)
    store.put(key(9), payload(key(9), CHUNK))
    assert store.get(key(9)) == payload(key(9), CHUNK)
    assert store.usage().chunks < 5  # something made room
    assert temp_files(store.root) == []


def test_other_write_errors_are_cache_errors(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_writes(monkeypatch, errno.EIO, times=None)
    with pytest.raises(CacheError, match=r"cannot write cache chunk .*\(EIO\)"):
        store.put(key(1), b"data")
    assert temp_files(store.root) == []


# -- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a",
        "ab/cd",
        "../etc/passwd",
        "ab/../../x",
        ".abc",
        "..",
        "AB12",
        "ab cd",
        "ab\x00",
        "zz12",
        "ab" + "c" * 300,
        "abé",
    ],
)
def test_bad_keys_are_rejected_everywhere(store: ChunkStore, bad: str) -> None:
    for op in (store.get, store.contains, store.touch, store.pin, store.remove):
        with pytest.raises(BadKeyError):
            op(bad)
    with pytest.raises(ValueError):  # BadKeyError is both a ValueError and a CacheError
        store.put(bad, b"x")
    assert list((store.root / "chunks").iterdir()) == []


def test_key_helpers() -> None:
    hexd = "0123456789abcdef" * 4
    assert chunk_key_for_digest(hexd) == hexd
    assert chunk_key_for_digest("sha256:" + hexd) == hexd
    assert chunk_key_for_position("sha256:" + hexd, 8 << 20, 3) == f"{hexd}-8388608-3"
    assert chunk_key_for_position("sha512:" + hexd * 2, 4096, 0) == f"{hexd * 2}-4096-0"
    for k in (chunk_key_for_digest(hexd), chunk_key_for_position(hexd, 1, 0)):
        assert validate_key(k) == k
    for bad_digest in (
        "sha256:" + hexd[:-1],
        "sha256:" + hexd.upper(),
        "md5:" + hexd,
        "sha512:" + hexd,
        "sha256:../" + hexd[3:],
        "",
    ):
        with pytest.raises(BadKeyError):
            chunk_key_for_position(bad_digest, 4096, 0)
    with pytest.raises(BadKeyError):
        chunk_key_for_digest(hexd * 2)  # sha512 is not a chunk sha256
    with pytest.raises(BadKeyError):
        chunk_key_for_position(hexd, 0, 0)
    with pytest.raises(BadKeyError):
        chunk_key_for_position(hexd, 4096, -1)


# -- maintenance -----------------------------------------------------------------------


def test_verify_finds_and_removes_bad_chunks(store: ChunkStore) -> None:
    for i in range(6):
        store.put(key(i), payload(key(i)))
    _flip_payload_byte(store.path(key(1)))
    _truncate(store.path(key(4)))
    stray = store.path(key(0)).parent / "cd-misplaced"
    stray.write_bytes(b"who put this here")
    result = store.verify()
    assert (result.checked, result.bad, result.removed) == (6, 3, 3)
    assert not stray.exists()
    assert [store.contains(key(i)) for i in range(6)] == [True, False, True, True, False, True]
    assert store.verify().bad == 0
    assert store.usage().chunks == 4


def test_clear_removes_chunks_and_temp_files(store: ChunkStore) -> None:
    for i in range(5):
        store.put(key(i), payload(key(i)))
    store.put(chunk_key_for_digest("ff" * 32), b"other shard")
    leftover = store.path(key(0)).parent / f".{key(9)}.1.00000000.tmp"
    leftover.write_bytes(b"partial")
    assert store.clear() == 6
    assert store.usage().chunks == 0
    assert store.scan().chunks == 0
    assert temp_files(store.root) == []
    store.put(key(1), b"after clear")
    assert store.get(key(1)) == b"after clear"


def test_remove_layer_removes_only_that_layers_chunks(store: ChunkStore) -> None:
    mine = [chunk_key_for_position(LAYER, 4096, i) for i in range(3)]
    other = [chunk_key_for_position(OTHER_LAYER, 4096, i) for i in range(2)]
    by_digest = chunk_key_for_digest(LAYER)  # same hex, but a digest key, not a position key
    for k in [*mine, *other, by_digest]:
        store.put(k, payload(k))
    assert store.remove_layer(LAYER) == 3
    assert not any(store.contains(k) for k in mine)
    assert all(store.contains(k) for k in [*other, by_digest])
    assert store.remove_layer("sha256:" + "77" * 32) == 0


def test_sync_mode_round_trip(tmp_path: Path) -> None:
    """The default (fdatasync before rename) path works too."""
    store = ChunkStore(tmp_path / "cache")
    store.put(key(1), b"durable")
    assert store.get(key(1)) == b"durable"


# -- adopting a chunk under its digest --------------------------------------------------


def test_adopt_renames_a_position_keyed_chunk_to_its_digest_key(store: ChunkStore) -> None:
    data = payload("adopted", 10_000)
    digest_key = chunk_key_for_digest("sha256:" + hashlib.sha256(data).hexdigest())
    store.put(key(1), data)
    inode = store.path(key(1)).stat().st_ino
    before = store.usage()
    assert store.adopt(key(1), digest_key)
    assert not store.contains(key(1))
    assert store.path(digest_key).stat().st_ino == inode  # renamed, not rewritten
    assert store.usage() == before
    assert store.scan() == before
    assert store.get(digest_key) == data
    assert store.get(key(1)) is None


def test_adopt_when_the_digest_key_is_there_already_removes_the_old_file(
    store: ChunkStore,
) -> None:
    data = payload("twice", 5000)
    b3 = chunk_key_for_digest("blake3:" + blake3.blake3(data).hexdigest())
    store.put(key(1), data)
    store.put(b3, data)
    inode = store.path(b3).stat().st_ino
    assert store.adopt(key(1), b3)
    assert not store.contains(key(1))
    assert store.path(b3).stat().st_ino == inode
    assert store.usage() == store.scan() == CacheUsage(HEADER_SIZE + len(data), 1)


def test_adopt_of_a_missing_chunk_and_of_the_wrong_digest(store: ChunkStore) -> None:
    digest_key = chunk_key_for_digest("sha256:" + hashlib.sha256(b"x").hexdigest())
    assert not store.adopt(key(1), digest_key)
    store.put(key(2), b"not x")
    assert store.adopt(key(2), digest_key)  # the caller vouched, wrongly...
    assert store.get(digest_key) is None  # ...and the first read finds out
    assert not store.contains(digest_key)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (key(1), key(2)),  # a position key promises nothing
        ("ab" * 32, "cd" * 32),  # a digest key's file is already checked by digest
        (key(1), "ab/" + "c" * 62),
        ("../x", "ab" * 32),
    ],
)
def test_adopt_takes_only_a_position_key_to_a_digest_key(
    store: ChunkStore, old: str, new: str
) -> None:
    with pytest.raises(BadKeyError):
        store.adopt(old, new)


def test_a_cache_removed_under_a_running_store_is_made_again(store: ChunkStore) -> None:
    """An operator's `rm -rf` of the cache while mounts run: the next put recreates it, private."""
    import shutil

    store.put(key(1), b"before")
    shutil.rmtree(store.root)
    assert store.get(key(1)) is None
    store.put(key(1), b"after")
    assert store.get(key(1)) == b"after"
    for d in (store.root, store.root / "chunks", store.path(key(1)).parent):
        assert d.stat().st_mode & 0o777 == 0o700
