"""The chunk store: content-addressed chunks on local disk, shared by every kitfs process.

Layout: `<root>/chunks/<first 2 chars of key>/<key>`, each file one framed
chunk (see `fileformat`). Files are created by write-to-temp + fdatasync +
rename and never modified afterwards, so any number of daemons share one
directory without locks on the data path: a reader sees a whole chunk or none,
and two writers of one key write the same bytes (same key = same content), so
whichever rename lands last is as good as the first.

Cross-process state is kept on disk where it must be shared and in memory
where approximate is good enough:

- Recency (LRU) is the file's mtime. `touch` records a use in memory at
  once (exact LRU inside the process) and writes it to the inode with
  `os.utime` at most once per `TOUCH_INTERVAL_S` per chunk, so the hot read path
  costs a dict update, and other processes see recency to within a minute.
  mtime rather than atime because atime is unreliable (noatime/relatime), and
  the content never changes so mtime carries no other meaning.
- Usage (bytes, chunks) is a counter in memory: filled by a directory scan
  the first time it is needed (not in `__init__`, so startup never waits on
  a big cache), adjusted by this process's puts and evictions, and refreshed
  by a rescan every `RESCAN_INTERVAL_S` and by every gc, which picks up what
  other processes wrote. The budget is therefore enforced to within what
  other processes added since the last scan.
- Pins (chunks an open file is reading) are in-process; other processes'
  reads show up as recent mtimes instead.
- Only one gc runs at a time on a cache directory (an advisory `flock` on
  `<root>/chunks/.gc.lock`): a put that finds the cache over budget while
  another process is evicting skips its own gc instead of evicting twice.

Everything here is synchronous and may block on disk: callers run puts,
gcs and verifies in threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kitfs.cache.fileformat import (
    CHUNK_MAGIC,
    DISK_FULL_ERRNOS,
    HEADER_SIZE,
    BadFrame,
    CacheError,
    as_bytes_view,
    cache_error,
    describe_oserror,
    is_temp_name,
    read_frame,
    write_frame,
)
from kitfs.cache.keys import MAX_KEY_LENGTH, layer_key_prefix, validate_key

logger = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_KEY_RE = re.compile(r"[0-9a-f]{2}[0-9a-f._-]*")


@dataclass(frozen=True)
class CacheUsage:
    """Bytes on disk (headers included) and number of chunk files."""

    bytes: int
    chunks: int


@dataclass(frozen=True)
class GcResult:
    removed_chunks: int
    removed_bytes: int
    removed_temp_files: int = 0


@dataclass(frozen=True)
class VerifyResult:
    """`bad` chunks failed their check; `removed` of them were deleted (others vanished first)."""

    checked: int
    bad: int
    removed: int


@dataclass(frozen=True)
class CacheStats:
    """What this process's store has done since it was created (for `status` and logs)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    puts: int = 0
    put_bytes: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    disk_full: int = 0


@dataclass(frozen=True)
class _File:
    name: str
    path: str
    size: int
    mtime_ns: int


class ChunkStore:
    """Chunks on local disk with checksums, an LRU size budget and pins. Thread-safe."""

    TOUCH_INTERVAL_S = 60.0
    RESCAN_INTERVAL_S = 300.0
    STALE_TEMP_AGE_S = 3600.0
    # A budget-triggered gc evicts down to this fraction of the budget, so that
    # puts do not each pay for a directory scan once the cache is full.
    LOW_WATERMARK = 0.9
    # Bound on the in-memory recency table; beyond it pending uses are written out.
    MAX_TRACKED_USES = 65536

    def __init__(self, root: Path, *, budget: int | None = None, sync: bool = True) -> None:
        """`budget`: max bytes on disk (None: unlimited). `sync=False` skips fdatasync.

        Skipping the sync is safe for integrity (a chunk torn by a crash fails its
        checksum and is refetched) and only costs a refetch; it exists for
        benchmarks and for caches on throwaway disks.
        """
        if budget is not None and budget < 0:
            raise ValueError(f"cache budget must be >= 0, got {budget}")
        self.root = Path(root)
        self.budget = budget
        self._sync = sync
        self._chunks = self.root / "chunks"
        try:
            self._chunks.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cache_error(f"cannot create cache directory {self._chunks}", exc) from exc
        self._lock = threading.Lock()
        self._gc_lock = threading.Lock()
        self._usage_bytes = 0
        self._usage_chunks = 0
        self._scanned_at: float | None = None  # time.monotonic() of the last full scan
        self._pins: dict[str, int] = {}
        self._uses: dict[str, tuple[int, int]] = {}  # key -> (last use ns, last written ns)
        self._stats = CacheStats()

    # -- paths and keys ---------------------------------------------------------------

    def path(self, key: str) -> Path:
        """Where chunk `key` lives (whether or not it is there); validates the key."""
        validate_key(key)
        return self._chunks / key[:2] / key

    # -- data path --------------------------------------------------------------------

    def get(self, key: str) -> memoryview | None:
        """The payload of chunk `key`, checked; None when absent or corrupt (then deleted).

        A corrupt chunk is a cache miss, never an error: the caller refetches.
        Only a failing disk or directory (EACCES, EIO, ...) raises CacheError.
        """
        path = self.path(key)
        try:
            payload, _ = read_frame(path, CHUNK_MAGIC)
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except BadFrame as bad:
            self._drop_bad(key, path, bad)
            self._count(misses=1)
            return None
        except OSError as exc:
            raise cache_error(f"cannot read cache chunk {path}", exc) from exc
        self._count(hits=1)
        self.touch(key)
        return payload

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store chunk `key` atomically; nothing happens if it is already there.

        Over budget, least-recently-used chunks are evicted first. On a full disk
        (ENOSPC/EDQUOT) chunks are evicted and the write retried once; if that
        fails too, CacheError("cache disk full: ...") and no partial file remains.
        """
        path = self.path(key)
        if self._exists(path):
            self.touch(key)
            return
        view = as_bytes_view(data)
        size = HEADER_SIZE + view.nbytes
        if self.budget is not None:
            self._make_room(size)
        try:
            self._write(path, view)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise cache_error(f"cannot write cache chunk {path}", exc) from exc
            self._count(disk_full=1)
            usage = self.usage()
            logger.warning(
                "cache disk full writing %s (%d bytes, cache holds %d bytes): evicting",
                key,
                size,
                usage.bytes,
            )
            self._gc(max(0, usage.bytes - 2 * size), blocking=True)
            try:
                self._write(path, view)
            except OSError as again:
                if again.errno in DISK_FULL_ERRNOS:
                    raise CacheError(
                        f"cache disk full: cannot store a {size}-byte chunk in {self.root} "
                        f"even after eviction ({describe_oserror(again)})"
                    ) from again
                raise cache_error(f"cannot write cache chunk {path}", again) from again
        now = time.time_ns()
        with self._lock:
            self._usage_bytes += size
            self._usage_chunks += 1
            self._uses[key] = (now, now)
            self._stats = _bump(self._stats, puts=1, put_bytes=view.nbytes)

    def contains(self, key: str) -> bool:
        """Whether a chunk file exists for `key` (unchecked: `get` checks)."""
        return self._exists(self.path(key))

    def remove(self, key: str) -> bool:
        """Delete chunk `key` (a poisoned layer's chunks); True if this call removed it."""
        path = self.path(key)
        size = _unlink(path)
        with self._lock:
            self._uses.pop(key, None)
            if size is not None:
                self._usage_bytes = max(0, self._usage_bytes - size)
                self._usage_chunks = max(0, self._usage_chunks - 1)
        return size is not None

    def remove_layer(self, layer_digest: str) -> int:
        """Delete every position-keyed chunk of a layer; the number removed.

        Position keys start with the layer's hex, so they all sit in one shard.
        """
        prefix = layer_key_prefix(layer_digest)
        shard = self._chunks / prefix[:2]
        try:
            names = [n for n in os.listdir(shard) if n.startswith(prefix)]
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise cache_error(f"cannot list cache directory {shard}", exc) from exc
        return sum(self.remove(name) for name in names if _KEY_RE.fullmatch(name))

    # -- recency and pins -------------------------------------------------------------

    def touch(self, key: str) -> None:
        """Record a use of `key` for LRU eviction.

        Exact in this process at once; written to the file's mtime at most every
        TOUCH_INTERVAL_S, so calling this on every read is cheap. A failed write
        (file gone, read-only cache, someone else's file) only loses recency.
        """
        validate_key(key)
        now = time.time_ns()
        interval_ns = int(self.TOUCH_INTERVAL_S * 1e9)
        with self._lock:
            _, written = self._uses.get(key, (0, 0))
            flush = now - written >= interval_ns
            self._uses[key] = (now, now if flush else written)
            prune = len(self._uses) > self.MAX_TRACKED_USES
        if flush:
            self._write_mtime(key, None)
        if prune:
            self.flush()

    def flush(self) -> None:
        """Write every recorded use to disk and forget them (at shutdown, or when the table is big).

        Explicit times need ownership of the file; where that fails (a cache shared
        by several users) the use is simply lost.
        """
        with self._lock:
            pending = [(k, use) for k, (use, written) in self._uses.items() if use > written]
            self._uses.clear()
        for key, use in pending:
            self._write_mtime(key, use)

    def pin(self, key: str) -> None:
        """Protect `key` from eviction until as many `unpin` calls (evicted last, not never)."""
        validate_key(key)
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        with self._lock:
            count = self._pins.get(key, 0) - 1
            if count > 0:
                self._pins[key] = count
            else:
                self._pins.pop(key, None)

    # -- accounting and maintenance ---------------------------------------------------

    def usage(self) -> CacheUsage:
        """Approximate usage: scanned on first use and every RESCAN_INTERVAL_S, tracked between."""
        with self._lock:
            fresh = (
                self._scanned_at is not None
                and time.monotonic() - self._scanned_at < self.RESCAN_INTERVAL_S
            )
            if fresh:
                return CacheUsage(self._usage_bytes, self._usage_chunks)
        return self.scan()

    def scan(self) -> CacheUsage:
        """Usage from a full directory scan (what other processes wrote included)."""
        started = time.monotonic()
        chunks, _, _ = self._list()
        usage = CacheUsage(sum(f.size for f in chunks), len(chunks))
        self._set_usage(usage, started)
        logger.debug(
            "cache scan: %d chunks, %d bytes in %.3f s",
            usage.chunks,
            usage.bytes,
            time.monotonic() - started,
        )
        return usage

    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats

    def gc(self, target: int | None = None) -> GcResult:
        """Evict least-recently-used chunks until usage <= target (default: the budget).

        Pinned chunks go last. Temporary files older than STALE_TEMP_AGE_S (left by
        a crash) are removed too. With neither target nor budget, only those go.
        Waits for a gc running in another thread or process to finish first.
        """
        result = self._gc(self.budget if target is None else target, blocking=True)
        assert result is not None  # a blocking gc always runs
        return result

    def verify(self) -> VerifyResult:
        """Check every chunk's header, length and checksum; delete the bad ones.

        Files in a shard that no `get` would ever find (foreign or misplaced names)
        count as bad too. Unreadable files (EIO) are bad, not fatal: verify is
        what an operator runs on a disk they distrust.
        """
        chunks, _, strays = self._list()
        checked = bad = removed = 0
        for f in strays:
            bad += 1
            logger.warning("cache verify: removing stray file %s", f.path)
            removed += _unlink(f.path) is not None
        for f in chunks:
            try:
                read_frame(f.path, CHUNK_MAGIC)
            except FileNotFoundError:
                continue
            except BadFrame as exc:
                checked += 1
                bad += 1
                removed += self._drop_bad(f.name, Path(f.path), exc)
                continue
            except OSError as exc:
                checked += 1
                bad += 1
                logger.warning(
                    "cache verify: removing unreadable chunk %s: %s", f.path, describe_oserror(exc)
                )
                removed += self.remove(f.name)
                continue
            checked += 1
        logger.info("cache verify: %d chunks checked, %d bad, %d removed", checked, bad, removed)
        return VerifyResult(checked, bad, removed)

    def clear(self) -> int:
        """Remove every chunk and temporary file; the number of chunks removed.

        A put racing with clear in another process survives: its writer retries
        once when its temporary file vanishes.
        """
        started = time.monotonic()
        chunks, temps, _ = self._list()
        removed = sum(_unlink(f.path) is not None for f in chunks)
        for f in temps:
            _unlink(f.path)
        with self._lock:
            self._uses.clear()
        self._set_usage(CacheUsage(0, 0), started)
        logger.info("cache cleared: %d chunks removed from %s", removed, self._chunks)
        return removed

    # -- internals --------------------------------------------------------------------

    def _exists(self, path: Path) -> bool:
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise cache_error(f"cannot stat cache chunk {path}", exc) from exc
        return True

    def _write(self, path: Path, view: memoryview) -> None:
        """write_frame, creating the shard directory on first use.

        FileNotFoundError means the shard does not exist yet, or a concurrent
        `clear` removed our temporary file before the rename: both are fixed
        by trying once more.
        """
        try:
            write_frame(path.parent, path.name, CHUNK_MAGIC, view, sync=self._sync)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_frame(path.parent, path.name, CHUNK_MAGIC, view, sync=self._sync)

    def _make_room(self, size: int) -> None:
        assert self.budget is not None
        usage = self.usage()
        if usage.bytes + size <= self.budget:
            return
        if size > self.budget:
            logger.warning("cache chunk of %d bytes exceeds the whole budget %d", size, self.budget)
        self._gc(max(0, int(self.budget * self.LOW_WATERMARK) - size), blocking=False)

    def _gc(self, target: int | None, *, blocking: bool) -> GcResult | None:
        """One gc pass, or None when not blocking and another gc holds the lock."""
        if not self._gc_lock.acquire(blocking=blocking):
            return None
        try:
            with _flock(self._chunks / ".gc.lock", blocking=blocking) as locked:
                if not locked:
                    return None
                return self._gc_locked(target)
        finally:
            self._gc_lock.release()

    def _gc_locked(self, target: int | None) -> GcResult:
        started = time.monotonic()
        chunks, temps, _ = self._list()
        stale_before = time.time_ns() - int(self.STALE_TEMP_AGE_S * 1e9)
        removed_temp = 0
        for f in temps:
            if f.mtime_ns < stale_before and _unlink(f.path) is not None:
                removed_temp += 1
                logger.info("cache gc: removed stale temporary file %s", f.path)
        total = sum(f.size for f in chunks)
        count = len(chunks)
        removed_chunks = removed_bytes = 0
        evicted: list[str] = []
        if target is not None and total > target:
            with self._lock:
                pins = set(self._pins)
                uses = {k: use for k, (use, _) in self._uses.items()}
            chunks.sort(
                key=lambda f: (f.name in pins, max(f.mtime_ns, uses.get(f.name, 0)), f.name)
            )
            for f in chunks:
                if total <= target:
                    break
                size = _unlink(f.path)
                total -= f.size  # gone either way: removed here or by another process
                count -= 1
                if size is not None:
                    evicted.append(f.name)
                    removed_chunks += 1
                    removed_bytes += size
            with self._lock:
                for name in evicted:
                    self._uses.pop(name, None)
                self._stats = _bump(
                    self._stats, evicted_chunks=removed_chunks, evicted_bytes=removed_bytes
                )
        self._set_usage(CacheUsage(total, count), started)
        if removed_chunks or removed_temp:
            logger.info(
                "cache gc: evicted %d chunks (%d bytes), %d temporary files; %d bytes left "
                "(target %s) in %.3f s",
                removed_chunks,
                removed_bytes,
                removed_temp,
                total,
                target,
                time.monotonic() - started,
            )
        return GcResult(removed_chunks, removed_bytes, removed_temp)

    def _set_usage(self, usage: CacheUsage, scan_started: float) -> None:
        with self._lock:
            self._usage_bytes, self._usage_chunks = usage.bytes, usage.chunks
            self._scanned_at = scan_started

    def _list(self) -> tuple[list[_File], list[_File], list[_File]]:
        """(chunks, temporary files, strays) found in the shard directories."""
        chunks: list[_File] = []
        temps: list[_File] = []
        strays: list[_File] = []
        try:
            for shard, entry in _walk(self._chunks):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                f = _File(entry.name, entry.path, st.st_size, st.st_mtime_ns)
                if is_temp_name(entry.name):
                    temps.append(f)
                elif (
                    entry.name.startswith(shard)
                    and len(entry.name) <= MAX_KEY_LENGTH
                    and _KEY_RE.fullmatch(entry.name)
                ):
                    chunks.append(f)
                else:
                    strays.append(f)
        except OSError as exc:
            raise cache_error(f"cannot list cache directory {self._chunks}", exc) from exc
        return chunks, temps, strays

    def _drop_bad(self, key: str, path: Path, bad: BadFrame) -> bool:
        """Delete a corrupt chunk file unless another process replaced it meanwhile."""
        logger.warning("cache chunk %s is corrupt (%s): dropped, will be refetched", path, bad)
        removed = False
        try:
            if bad.inode == 0 or os.lstat(path).st_ino == bad.inode:
                removed = _unlink(path) is not None
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove corrupt cache chunk %s: %s", path, describe_oserror(exc))
        with self._lock:
            self._stats = _bump(self._stats, corrupt=1)
            self._uses.pop(key, None)
            if removed:
                self._usage_bytes = max(0, self._usage_bytes - bad.size)
                self._usage_chunks = max(0, self._usage_chunks - 1)
        return removed

    def _write_mtime(self, key: str, ns: int | None) -> None:
        path = self._chunks / key[:2] / key
        try:
            if ns is None:
                os.utime(path)  # "now" needs only write access, not ownership
            else:
                os.utime(path, ns=(ns, ns))
        except FileNotFoundError:
            with self._lock:
                self._uses.pop(key, None)
        except OSError as exc:
            logger.debug("cannot record use of cache chunk %s: %s", path, describe_oserror(exc))

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._stats = _bump(self._stats, **deltas)


def _bump(stats: CacheStats, **deltas: int) -> CacheStats:
    values = {name: getattr(stats, name) + delta for name, delta in deltas.items()}
    return CacheStats(**{**stats.__dict__, **values})


def _walk(chunks: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(shard name, entry) for every entry of every shard directory; missing dirs are empty."""
    try:
        top = os.scandir(chunks)
    except FileNotFoundError:
        return
    with top:
        shards = [e for e in top if _SHARD_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    for shard in shards:
        try:
            inner = os.scandir(shard.path)
        except FileNotFoundError:
            continue
        with inner:
            for entry in inner:
                yield shard.name, entry


def _unlink(path: Path | str) -> int | None:
    """Remove a file; its size, or None if it was already gone. Other errors: CacheError."""
    try:
        size = os.lstat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise cache_error(f"cannot remove cache file {path}", exc) from exc
    return size


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool) -> Iterator[bool]:
    """An advisory exclusive lock on `path`; yields False if busy and not blocking."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise cache_error(f"cannot open cache lock {path}", exc) from exc
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            locked = False
        except OSError as exc:
            # A file system without locks: run unlocked, a double gc only over-evicts.
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise cache_error(f"cannot lock {path}", exc) from exc
        yield locked
    finally:
        os.close(fd)
