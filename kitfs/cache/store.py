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

What is on disk is checked, not trusted: the root and `chunks/` must be
ours and private (`ownership`; directories 0700, files 0600); chunk files are
opened with O_NOFOLLOW relative to their shard directory, itself opened with
O_NOFOLLOW, so neither a symlinked chunk nor a symlinked shard is followed;
and a chunk under a digest key is checked against that digest on every read
(`get`), so a chunk planted or rotted under it reads as absent. Position-keyed
chunks carry only their xxh3, unless the caller passes the digest it expects.

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
    FILE_MODE,
    HEADER_SIZE,
    BadFrame,
    CacheError,
    as_bytes_view,
    cache_error,
    describe_oserror,
    file_kind,
    is_temp_name,
    not_regular,
    read_frame,
    write_frame,
)
from kitfs.cache.keys import (
    MAX_KEY_LENGTH,
    BadKeyError,
    is_position_key,
    key_digest,
    layer_key_prefix,
    validate_key,
)
from kitfs.cache.ownership import DIR_MODE, DIR_OPEN_FLAGS, secure_directory
from kitfs.errors import FormatError
from kitfs.modelkit.chunkdigest import matches, parse_chunk_digest

logger = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_KEY_RE = re.compile(r"[0-9a-f]{2}[0-9a-f._-]*")
#: A shard directory on the data path: O_PATH is all openat needs and is the cheapest open.
_SHARD_FLAGS = DIR_OPEN_FLAGS | getattr(os, "O_PATH", 0)


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
        secure_directory(self.root, create=True)
        secure_directory(self._chunks, create=True)
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

    def get(self, key: str, digest: str | None = None) -> memoryview | None:
        """The payload of chunk `key`, checked; None when absent or corrupt (then deleted).

        A key that names a digest (sha256 hex, `<hex>.b3`) is checked against
        it; a position key against `digest` (`blake3:<hex>`, `sha256:<hex>`)
        when the caller passes one, else only against the frame's xxh3.
        `digest` is ignored for a key that names its own. A corrupt chunk,
        content that does not match, or a file that is not a regular file is
        a cache miss, never an error: the caller refetches. Only a failing
        disk or directory (EACCES, EIO, ...) raises CacheError. Hashes in the
        calling thread (BLAKE3 and sha256 release the GIL).
        """
        validate_key(key)
        want = key_digest(key)
        if want is None and digest is not None:
            try:  # `<algorithm>:<hex>` only: bare hex is a table of contents' form
                want = parse_chunk_digest(digest) if ":" in digest else None
            except FormatError:
                want = None
            if want is None:
                raise BadKeyError(f"invalid chunk digest {digest[:80]!r}")
        try:
            shard = _open_shard(self._chunks, key)
            if shard is None:
                self._count(misses=1)
                return None
            try:
                payload = self._load(key, shard, want)
            except BadFrame as bad:
                self._drop_bad(key, shard, bad)
                self._count(misses=1)
                return None
            finally:
                os.close(shard)
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except OSError as exc:
            raise cache_error(f"cannot read cache chunk {self.path(key)}", exc) from exc
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
        if self._exists(key):
            self.touch(key)
            return
        view = as_bytes_view(data)
        size = HEADER_SIZE + view.nbytes
        if self.budget is not None:
            self._make_room(size)
        try:
            self._write(key, view)
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
                self._write(key, view)
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
        """Whether a regular chunk file exists for `key` (its content unchecked: `get` checks)."""
        validate_key(key)
        return self._exists(key)

    def remove(self, key: str) -> bool:
        """Delete chunk `key` (a poisoned layer's chunks); True if this call removed it."""
        path = self.path(key)
        try:
            shard = _open_shard(self._chunks, key)
        except OSError as exc:
            raise cache_error(f"cannot remove cache file {path}", exc) from exc
        size = None
        if shard is not None:
            try:
                size = _unlink(key, dir_fd=shard, shown=path)
            finally:
                os.close(shard)
        with self._lock:
            self._uses.pop(key, None)
            if size:
                self._usage_bytes = max(0, self._usage_bytes - size)
                self._usage_chunks = max(0, self._usage_chunks - 1)
        return size is not None

    def remove_layer(self, layer_digest: str) -> int:
        """Delete every chunk kept under a layer (position and layer-scoped keys); the number
        removed.

        Those keys start with the layer's hex, so they all sit in one shard.
        """
        prefix = layer_key_prefix(layer_digest)
        shard = self._chunks / prefix[:2]
        try:
            fd = os.open(shard, DIR_OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return 0  # no shard, or not a real directory: none of our chunks (verify drops it)
        except OSError as exc:
            raise cache_error(f"cannot list cache directory {shard}", exc) from exc
        try:
            names = [n for n in os.listdir(fd) if n.startswith(prefix)]
        except OSError as exc:
            raise cache_error(f"cannot list cache directory {shard}", exc) from exc
        finally:
            os.close(fd)
        return sum(self.remove(name) for name in names if _KEY_RE.fullmatch(name))

    def adopt(self, old_key: str, new_key: str) -> bool:
        """Give the chunk under position key `old_key` the digest key `new_key`, without
        rewriting it; whether a chunk is now under `new_key`.

        For a layer verified end to end: later mounts then find its chunks by
        digest, and check each on every read. One rename, atomic and within
        the cache's file system; if `new_key` is there already, `old_key` is
        just removed. The caller vouches for the digest; if it is wrong, the
        first `get(new_key)` finds out and drops the file. Recency moves with
        the chunk; pins stay with `old_key` until unpinned.
        """
        validate_key(old_key)
        validate_key(new_key)
        if not is_position_key(old_key) or key_digest(new_key) is None:
            raise BadKeyError(f"cannot adopt {old_key[:80]!r} as {new_key[:80]!r}: "
                              f"only a position key can take a digest key")
        if self._exists(new_key):
            self.remove(old_key)
            return True
        src = dst = None
        try:
            src = _open_shard(self._chunks, old_key)
            if src is None:
                return self._exists(new_key)
            st = os.stat(old_key, dir_fd=src, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                self._drop_bad(old_key, src, not_regular(st))
                return self._exists(new_key)
            dst = _open_shard(self._chunks, new_key, create=True)
            assert dst is not None
            os.rename(old_key, new_key, src_dir_fd=src, dst_dir_fd=dst)
        except FileNotFoundError:
            return self._exists(new_key)  # another process removed or adopted it first
        except OSError as exc:
            raise cache_error(
                f"cannot rename cache chunk {self.path(old_key)} to {new_key}", exc) from exc
        finally:
            for fd in (src, dst):
                if fd is not None:
                    os.close(fd)
        with self._lock:
            use = self._uses.pop(old_key, None)
            if use is not None:
                self._uses[new_key] = use
        return True

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
        """Check every chunk's header, length and checksum (its digest, where its key
        names one); delete the bad ones.

        Entries in a shard that no `get` would ever accept (foreign or misplaced
        names, symlinks and anything else that is not a regular file, a shard
        that is not a real directory) count as bad too. Unreadable files (EIO)
        are bad, not fatal: verify is what an operator runs on a disk they distrust.
        """
        chunks, _, strays = self._list()
        checked = bad = removed = 0
        for f in strays:
            bad += 1
            logger.warning("cache verify: removing stray %s", f.path)
            removed += _discard(f.path)
        for f in chunks:
            try:
                shard = _open_shard(self._chunks, f.name)
                if shard is None:
                    continue  # removed by someone else meanwhile
                try:
                    self._load(f.name, shard, key_digest(f.name))
                except BadFrame as exc:
                    bad += 1
                    removed += self._drop_bad(f.name, shard, exc)
                finally:
                    os.close(shard)
            except FileNotFoundError:
                continue
            except OSError as exc:
                bad += 1
                logger.warning(
                    "cache verify: removing unreadable chunk %s: %s", f.path, describe_oserror(exc)
                )
                removed += self.remove(f.name)
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

    def _exists(self, key: str) -> bool:
        """Whether `key` is a regular file in a real shard directory (no symlink followed)."""
        try:
            shard = _open_shard(self._chunks, key)
            if shard is None:
                return False
            try:
                st = os.stat(key, dir_fd=shard, follow_symlinks=False)
            finally:
                os.close(shard)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise cache_error(f"cannot stat cache chunk {self.path(key)}", exc) from exc
        return stat.S_ISREG(st.st_mode)

    def _load(self, key: str, shard: int, want: str | None) -> memoryview:
        """The payload of `key` in `shard`, checked against digest `want` (instead of its
        xxh3) when given. FileNotFoundError, BadFrame (also for the wrong content), OSError."""
        payload, inode = read_frame(key, CHUNK_MAGIC, dir_fd=shard, check_payload=want is None)
        if want is not None and not matches(payload, want):
            bad = BadFrame(f"content does not match its digest {want}")
            bad.inode, bad.size = inode, HEADER_SIZE + payload.nbytes
            raise bad
        return payload

    def _write(self, key: str, view: memoryview) -> None:
        """write_frame into the shard directory, creating it on first use.

        FileNotFoundError means a concurrent `clear` removed our temporary file
        before the rename, or someone removed the shard directory: both are
        fixed by trying once more.
        """
        for attempt in range(2):
            shard = _open_shard(self._chunks, key, create=True)
            assert shard is not None
            try:
                write_frame(shard, key, CHUNK_MAGIC, view, sync=self._sync)
                return
            except FileNotFoundError:
                if attempt:
                    raise
            finally:
                os.close(shard)

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
            for shard, path, entry in _walk(self._chunks):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                f = _File(entry.name, path, st.st_size, st.st_mtime_ns)
                if shard is None or not stat.S_ISREG(st.st_mode):
                    strays.append(f)  # a symlink, a directory, a shard that is not one...
                elif is_temp_name(entry.name):
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

    def _drop_bad(self, key: str, shard: int, bad: BadFrame) -> bool:
        """Delete a corrupt chunk file unless another process replaced it meanwhile."""
        path = self.path(key)
        logger.warning("cache chunk %s is corrupt (%s): dropped, will be refetched", path, bad)
        removed = False
        try:
            st = os.stat(key, dir_fd=shard, follow_symlinks=False)
            if bad.inode in (0, st.st_ino):
                os.unlink(key, dir_fd=shard)
                removed = True
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove corrupt cache chunk %s: %s", path, describe_oserror(exc))
        with self._lock:
            self._stats = _bump(self._stats, corrupt=1)
            self._uses.pop(key, None)
            if removed and bad.size:  # not a symlink or other non-file: never counted
                self._usage_bytes = max(0, self._usage_bytes - bad.size)
                self._usage_chunks = max(0, self._usage_chunks - 1)
        return removed

    def _write_mtime(self, key: str, ns: int | None) -> None:
        try:
            shard = _open_shard(self._chunks, key)
            if shard is None:
                raise FileNotFoundError(key)
            try:
                if ns is None:  # "now" needs only write access, not ownership
                    os.utime(key, dir_fd=shard, follow_symlinks=False)
                else:
                    os.utime(key, ns=(ns, ns), dir_fd=shard, follow_symlinks=False)
            finally:
                os.close(shard)
        except FileNotFoundError:
            with self._lock:
                self._uses.pop(key, None)
        except OSError as exc:
            logger.debug("cannot record use of cache chunk %s: %s", self.path(key),
                         describe_oserror(exc))

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._stats = _bump(self._stats, **deltas)


def _bump(stats: CacheStats, **deltas: int) -> CacheStats:
    values = {name: getattr(stats, name) + delta for name, delta in deltas.items()}
    return CacheStats(**{**stats.__dict__, **values})


def _open_shard(chunks: Path, key: str, *, create: bool = False) -> int | None:
    """A descriptor of the shard directory of `key`; None if there is none (made first if
    `create`). A symlink or other non-directory in its place is removed, never followed.

    Opening the shard and then the file relative to it costs one open and one
    close per read (about 2 us, with O_PATH), as much as an lstat of the shard
    would, without the window between that lstat and the open; caching the
    descriptors would save that, but then a shard removed by `rm -rf` or
    another process would have to be noticed and reopened.
    """
    path = chunks / key[:2]
    try:
        return os.open(path, _SHARD_FLAGS)
    except FileNotFoundError:
        if not create:
            return None
    except NotADirectoryError:
        st = os.lstat(path)  # ENOTDIR again when chunks/ itself is the problem
        if not stat.S_ISDIR(st.st_mode):
            logger.warning("cache shard %s is %s, not a directory: removed",
                           path, file_kind(st))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if not create:
            return None
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass  # another writer made it first
    except FileNotFoundError:  # chunks/ itself was removed (rm -rf while mounted)
        secure_directory(chunks.parent, create=True)
        secure_directory(chunks, create=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)
    return os.open(path, _SHARD_FLAGS)


def _walk(chunks: Path) -> Iterator[tuple[str | None, str, os.DirEntry[str]]]:
    """(shard name, path, entry) for every entry of every shard directory; missing dirs
    are empty. An entry with a shard's name that is not a real directory comes with
    shard None (a stray), and is not looked into."""
    try:
        top = os.scandir(chunks)
    except FileNotFoundError:
        return
    with top:
        entries = [e for e in top if _SHARD_RE.fullmatch(e.name)]
    for shard in entries:
        if not shard.is_dir(follow_symlinks=False):
            yield None, shard.path, shard
            continue
        try:
            fd = os.open(shard.path, DIR_OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed, or swapped meanwhile: the next walk sees what it is now
        try:
            with os.scandir(fd) as inner:
                for entry in inner:
                    yield shard.name, os.path.join(shard.path, entry.name), entry
        finally:
            os.close(fd)


def _unlink(path: Path | str, *, dir_fd: int | None = None, shown: Path | str | None = None
            ) -> int | None:
    """Remove a file (`path` relative to `dir_fd` if given; `shown` in errors): its size
    if it was a regular file, 0 if something else (a symlink), None if already gone.
    Other errors: CacheError."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise cache_error(f"cannot remove cache file {shown or path}", exc) from exc
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _discard(path: str) -> bool:
    """Remove whatever is at `path` (a stray file, symlink or empty directory); whether it
    went. Failures are logged, not raised: verify goes on with the rest."""
    try:
        try:
            os.unlink(path)
        except IsADirectoryError:
            os.rmdir(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("cannot remove %s from the cache: %s", path, describe_oserror(exc))
        return False
    return True


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool) -> Iterator[bool]:
    """An advisory exclusive lock on `path`; yields False if busy and not blocking."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
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
