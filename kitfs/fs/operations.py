"""The FUSE adapter: kernel requests in, tree lookups and engine reads out, errno back.

This is the one place errors become errno values. pyfuse3 only understands
`FUSEError`; any other exception escaping a handler would end its main loop
and leave a dead mount behind, so every handler goes through `_guarded`,
which also bounds it in time: a registry that stops answering turns into
EIO for the reader after `request_timeout` seconds, never a process stuck
in D state.

Everything is read-only and immutable while mounted, so the kernel may cache
entries, attributes and pages for as long as it likes (`keep_cache`, long
timeouts, negative lookups cached too). `direct_io` stays off: it would make
`mmap(MAP_SHARED)` fail with ENODEV, and model loaders map weights.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from kitfs.engine.api import FileReader
from kitfs.engine.readahead import Cursor
from kitfs.errors import IntegrityError, KitfsError, UnreachableError
from kitfs.fs.inodes import Entry, InodeTable
from kitfs.fs.latency import LatencyHistogram
from kitfs.modelkit.tree import Node, Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
# Nothing changes under a mount, so the kernel may keep what it learnt "forever".
CACHE_TIMEOUT_S = 24 * 3600.0
# What applications size their buffered reads by (Python's open() among them):
# the kernel's readahead window (design.md: 1 MiB requests are where FUSE is fast).
PREFERRED_IO_SIZE = 1 << 20
STATFS_BLOCK = 4096
NAME_MAX = 255
# A failure that keeps happening is logged at most this often (with a count).
ERROR_LOG_INTERVAL_S = 60.0
MAX_ERROR_KEYS = 1024


@dataclass(frozen=True)
class FsConfig:
    uid: int
    gid: int
    #: st_atime/st_mtime/st_ctime of every node (ns since the epoch).
    time_ns: int
    #: Upper bound on any one request; past it the caller gets EIO.
    request_timeout: float = 30.0
    #: Upper bound on a read, which may wait for the registry (a backstop behind the
    #: engine's own deadlines, so it should be a little longer than they are).
    read_timeout: float = 35.0


class ErrorLog:
    """Log each cause of failure once, then a count at most every ERROR_LOG_INTERVAL_S.

    A dead registry fails every read of every reader; logging each would bury
    the one line that says why. Causes are keyed by kind and operation, not
    by message, because messages carry paths and offsets; integrity failures,
    whose message names the poisoned layer, are keyed by it.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # -> (last logged, suppressed)
        self.total = 0

    def report(self, kind: str, where: str, message: str, *, exc_info: bool = False) -> None:
        self.total += 1
        key = (kind, where)
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < ERROR_LOG_INTERVAL_S:
            self._seen[key] = (last[0], last[1] + 1)
            return
        if last is None and len(self._seen) >= MAX_ERROR_KEYS:
            self._seen.clear()
        more = f" ({last[1]} more like it since)" if last is not None and last[1] else ""
        log.error("%s%s", message, more, exc_info=exc_info)
        self._seen[key] = (now, 0)


Handler = Callable[Concatenate["KitfsOperations", P], Awaitable[R]]
Guarded = Callable[Concatenate["KitfsOperations", P], Coroutine[Any, Any, R]]


def _guarded(fn: Handler[P, R]) -> Guarded[P, R]:
    return _guard(fn, read=False)


def _guarded_read(fn: Handler[P, R]) -> Guarded[P, R]:
    return _guard(fn, read=True)


def _guard(fn: Handler[P, R], *, read: bool) -> Guarded[P, R]:
    """Bound a handler in time and turn every failure into a FUSEError."""
    op = fn.__name__

    @functools.wraps(fn)
    async def handler(self: KitfsOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        limit = self.config.read_timeout if read else self.config.request_timeout
        try:
            # A bare cancel scope, not trio.fail_after: that one's context-manager
            # machinery was a few percent of the event loop on every 1 MiB read.
            with trio.CancelScope(deadline=trio.current_time() + limit):
                return await fn(self, *args, **kwargs)
            self.timeouts += 1  # reached only when the bound cancelled the handler
            self.errors.report(
                "timeout", op,
                f"{op}: no answer within {limit:g}s (reader gets EIO)",
            )
        except pyfuse3.FUSEError:
            raise
        except IntegrityError as exc:  # one line per poisoned layer (the message names it)
            self.errors.report("integrity", str(exc), f"{op}: integrity failure, EIO: {exc}")
        except UnreachableError as exc:
            self.errors.report("unreachable", op, f"{op}: registry unreachable, EIO: {exc}")
        except KitfsError as exc:
            self.errors.report(type(exc).__name__, op, f"{op}: {exc} (reader gets EIO)")
        except Exception as exc:  # a bug: keep the mount alive, say so loudly (once)
            self.errors.report(
                "bug", f"{op}:{type(exc).__name__}", f"{op}: unexpected error (EIO)",
                exc_info=True,
            )
        raise pyfuse3.FUSEError(errno.EIO)

    return handler


def _read_only(op: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def refuse(self: KitfsOperations, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    refuse.__name__ = op
    refuse.__doc__ = "A ModelKit mount is read-only."
    return refuse


class KitfsOperations(pyfuse3.Operations):
    """A Tree served read-only; file bytes come from a FileReader."""

    def __init__(self, tree: Tree, reader: FileReader, config: FsConfig) -> None:
        super().__init__()
        self.inodes = InodeTable(tree)
        self.reader = reader
        self.config = config
        self.errors = ErrorLog()
        self._handles: dict[int, tuple[Node, Cursor | None]] = {}
        self._next_fh = 1
        self.reads = 0
        self.read_bytes = 0
        self.timeouts = 0
        #: Seconds each answered read took, from the request to its bytes.
        self.read_seconds = LatencyHistogram()
        #: True while pyfuse3 has a session: only then may the kernel be told anything.
        self.attached = False

    # -- helpers ----------------------------------------------------------------

    def _entry(self, inode: int) -> Entry:
        entry = self.inodes.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        node = entry.node
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = entry.inode
        attr.generation = 0
        attr.entry_timeout = CACHE_TIMEOUT_S
        attr.attr_timeout = CACHE_TIMEOUT_S
        if entry.is_dir:
            attr.st_mode = stat.S_IFDIR | (node.mode & 0o7777 & ~WRITE_BITS)
            attr.st_nlink = 2 + entry.subdirs
            attr.st_size = 0
        else:
            attr.st_mode = stat.S_IFREG | (node.mode & 0o7777 & ~WRITE_BITS)
            attr.st_nlink = 1
            attr.st_size = node.size
        attr.st_uid = self.config.uid
        attr.st_gid = self.config.gid
        attr.st_rdev = 0
        attr.st_blksize = PREFERRED_IO_SIZE
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.config.time_ns
        return attr

    async def forget_pages(self, nodes: Sequence[Node]) -> None:
        """Drop what the kernel cached of these files (their layer was poisoned).

        Pages read before the lie was found would otherwise stay readable
        (`keep_cache`), to this reader and every later one. Each call goes to a
        worker thread: the kernel takes the pages' locks, which a read request
        of ours may hold while it waits for this loop to answer it.
        """
        if not self.attached:  # no session: the kernel holds nothing of this mount
            return
        for node in nodes:
            inode = self.inodes.inode_of(node.path)
            if inode is None:
                continue
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
            except OSError as exc:  # ENOENT: the kernel holds nothing of it
                log.debug("invalidating %s: %s", node.path, exc)
        log.warning("dropped the kernel's cached pages of %d files of a poisoned layer",
                    len(nodes))

    def status(self) -> dict[str, Any]:
        return {
            "reads": self.reads,
            "readBytes": self.read_bytes,
            "openFiles": len(self._handles),
            "errors": self.errors.total,
            "timeouts": self.timeouts,
            "readSeconds": self.read_seconds.to_json(),
        }

    # -- metadata -------------------------------------------------------------------

    @_guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._entry(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        inode = self.inodes.child(parent_inode, name)
        if inode is None:
            # st_ino 0: the kernel caches the miss, so loaders probing for optional
            # files (tokenizer.json? config.json?) ask once.
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = CACHE_TIMEOUT_S
            return miss
        return self.attributes(self._entry(inode))

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attributes(self._entry(inode))

    @_guarded
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._entry(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = STATFS_BLOCK
        data.f_frsize = STATFS_BLOCK
        data.f_blocks = (self.inodes.total_size + STATFS_BLOCK - 1) // STATFS_BLOCK
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.inodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = NAME_MAX
        return data

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._entry(inode)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        self._entry(inode)
        return []

    # -- directories ------------------------------------------------------------

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # Directories are immutable, so the inode itself is the handle: no state.
        if not self._entry(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # next_id is the position after the entry: a listing resumed with any
        # id the kernel got back continues exactly where it stopped.
        entry = self._entry(fh)
        for position in range(start_id, len(entry.names)):
            child = self._entry(entry.inodes[position])
            if not pyfuse3.readdir_reply(
                token, entry.names[position], self.attributes(child), position + 1
            ):
                break

    @_guarded
    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ------------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = self._entry(inode)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        keep = True
        cursor = None
        if entry.node.inline is None:
            cursor = self.reader.opened(entry.node)
            # A poisoned file's pages are never kept: an open without keep_cache
            # makes the kernel drop any it still has.
            keep = self.reader.trusted(entry.node)
        self._handles[fh] = (entry.node, cursor)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    # pyfuse3 hands the result to PyObject_GetBuffer, so a memoryview (which spares
    # a copy of every chunk slice) works although its stub says bytes.
    @_guarded_read
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node, cursor = handle
        if off >= node.size or size <= 0:
            return b""
        size = min(size, node.size - off)
        started = time.perf_counter()
        try:
            if node.inline is not None:
                data: bytes | memoryview = memoryview(node.inline)[off : off + size]
            else:
                data = await self.reader.read(node, off, size, cursor)
        finally:  # failed and timed-out reads are the slow tail the histogram is for
            self.read_seconds.observe(time.perf_counter() - started)
        self.reads += 1
        self.read_bytes += len(data)
        return data

    @_guarded
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle[0].inline is None:
            self.reader.released(handle[0])

    # -- everything that would change the tree: EROFS ------------------------------

    setattr = _read_only("setattr")
    write = _read_only("write")
    create = _read_only("create")
    mknod = _read_only("mknod")
    mkdir = _read_only("mkdir")
    unlink = _read_only("unlink")
    rmdir = _read_only("rmdir")
    symlink = _read_only("symlink")
    rename = _read_only("rename")
    link = _read_only("link")
    setxattr = _read_only("setxattr")
    removexattr = _read_only("removexattr")
