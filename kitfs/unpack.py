"""`kitfs unpack`: a ModelKit's files written to a directory exactly as `kit unpack` writes them.

What is written (kit's `pkg/lib/filesystem/unpack/core.go`; `pkg/cmd/unpack/unpack.go`
up to v1.7):

- the Kitfile first, as `<dir>/Kitfile` (the YAML `kit` writes, without
  digests, mode 0644), unless the filters leave it out or the ModelKit has
  none of its own (a ModelPack without the Kitfile annotation: `kit` derives
  one to find its layers but writes none);
- then the files and directories of every selected layer where `kit`
  places them (modelkit/tree.py: tar entries at their names, pre-v0.5
  entries under the parent of the layer path, a raw layer's one file at its
  filepath annotation), each file's bytes what `tar -x` of its layer writes;
- modes as `kit` gives them: a file the permission bits of its header
  (`mode & 0o777`: `os.OpenFile(..., mode & fs.ModePerm)`), a directory its
  bits with the sticky bit (`os.MkdirAll` with the header's mode; Linux's
  mkdir keeps `0o1777`), both less the umask; a directory that already
  exists keeps its mode; no owner or time is set;
- what is there already, checked before anything is fetched: a file is an
  error naming it, skipped with `ignore_existing` (`-i`), replaced with
  `overwrite` (`-o`, only a regular file); a directory's place must hold a
  directory; an existing Kitfile with the same bytes is left as it is (kit
  compares it), with other bytes it is an error unless `-o`.

Never outside the directory: entry names were cleaned and checked when the
tree was built (modelkit/tree.py, tarindex.py: no absolute path, no `..`,
no link of any kind); on disk every directory below the unpack directory is
opened component by component with O_NOFOLLOW, so a symlink already there is
refused rather than followed (`kit` follows one that stays inside), and a
file is renamed into place, which replaces a link instead of writing through
it.

How (fast, and never a half-written file under its final name):

- the bytes come through the mount's read path (engine/): `Engine.views`
  hands out checked chunks of a range, fetched with merged range requests,
  from and into the shared chunk cache, so what a mount or an earlier unpack
  already fetched costs no registry bytes;
- work is cut into ranges of RANGE_BYTES in layer order, taken by WORKERS
  tasks in one nursery, so several files (and parts of one big file) are
  fetched and written at once while the request slots stay full;
- each file is written to a temporary name (TEMP_PREFIX + 16 hex digits) in
  its own directory and renamed into place once whole; the files of a layer
  whose chunks carry no digests of their own (what `kit` wrote, streamed
  gzip/zstd) only after `Engine.verified` says the layer matched its digest,
  so no unverified byte ever sits under a final name. That hash starts at
  once and runs beside the writes, which keep within HASH_LEAD of it
  (`Engine.hashed_past`), so it finds its chunks in memory;
- on an error or Ctrl-C the temporary files are removed; after a kill -9
  they are left, and the next unpack into the directory removes them. The
  chunks fetched before are in the cache (the engine reads back even those
  of a layer nobody verified yet: `reuse_unverified`), so that unpack fetches
  only what is missing;
- memory stays flat: a range's chunks are written as they come, at most
  WRITE_BATCH bytes per worker held for one write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from kitfs.cache.fileformat import DISK_FULL_ERRNOS, describe_oserror
from kitfs.engine.reader import Engine, EngineConfig
from kitfs.engine.session import OpenedKit
from kitfs.errors import LocalStorageError
from kitfs.modelkit.tree import KITFILE_NAME, Node, Tree
from kitfs.progress import Progress
from kitfs.units import shown_path

#: Temporary files are named this plus 16 hex digits, in the directory of the file they become.
TEMP_PREFIX = ".kitfs-unpack."
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]{16}")
#: Each task fetches and writes this much of a file at a time (a merged request's worth).
RANGE_BYTES = 16 << 20
#: Ranges in flight: twice the engine's request slots, so each slot has the next request
#: ready while a finished one is written out.
WORKERS = 8
#: A task hands the disk at most this much at once (one thread hop per write).
WRITE_BATCH = 8 << 20
#: The engine's memory tier for an unpack: the chunks between their arrival and their
#: write, and those a layer's end-to-end hash is about to read in order.
MEMORY_BYTES = 128 << 20
#: A range of a layer checked whole starts at most this far ahead of the layer's hash
#: (with the ranges in flight, within the memory tier).
HASH_LEAD = MEMORY_BYTES * 2 // 4

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def engine_config(read_timeout: float = 30.0) -> EngineConfig:
    """The read path as an unpack uses it (open_kit's `config`): nothing fetched but what
    is written (no prefetch); no layer hashed whole unless `Engine.verified` asks (a layer
    whose chunks carry digests needs no more); chunks a killed unpack fetched read back."""
    return EngineConfig(prefetch="none", read_timeout=read_timeout, memory_bytes=MEMORY_BYTES,
                        reuse_unverified=True, verify_when_whole=False)


@dataclass(frozen=True)
class UnpackOptions:
    overwrite: bool = False
    ignore_existing: bool = False
    workers: int = WORKERS
    range_bytes: int = RANGE_BYTES


@dataclass(frozen=True)
class Summary:
    """What an unpack did: files written (and their bytes), files left as they were."""

    files: int
    bytes: int
    skipped: int


def _error(what: str, exc: OSError) -> LocalStorageError:
    if exc.errno in DISK_FULL_ERRNOS:
        return LocalStorageError(f"{what}: the disk is full ({describe_oserror(exc)})")
    return LocalStorageError(f"{what}: {describe_oserror(exc)}")


class Destination:
    """The unpack directory, held open; what is below it is reached one component at a time.

    Every directory on a path is opened with O_NOFOLLOW relative to its
    parent, so nothing kitfs writes can land outside the directory through
    a symlink (or a directory swapped for one) already there. The directory
    is locked (flock) while an unpack writes to it: a second one would take
    the first's temporary files for leftovers. Methods block on the disk:
    call them in a thread.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            os.makedirs(root, mode=0o755, exist_ok=True)
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _error(f"cannot use {root} to unpack into", exc) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LocalStorageError(
                    f"{root}: another kitfs unpack is writing to it") from None
            raise _error(f"cannot lock {root}", exc) from None

    def close(self) -> None:
        os.close(self.fd)  # the lock goes with it

    def shown(self, path: str) -> str:
        return shown_path(os.path.join(self.root, path) if path else str(self.root))

    def open_dir(self, path: str) -> int:
        """A descriptor of directory `path` (relative; "" is the root); the caller closes it.
        A symlink on the way is refused (ELOOP, or ENOTDIR for one to a file)."""
        fd = os.dup(self.fd)
        try:
            for part in path.split("/") if path else ():
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def lstat(self, path: str) -> os.stat_result | None:
        """What is at `path` itself (None: nothing), its parents reached without a symlink."""
        parent, _, name = path.rpartition("/")
        try:
            fd = self.open_dir(parent)
        except FileNotFoundError:
            return None
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)

    def read_small(self, path: str, limit: int) -> bytes | None:
        """The bytes of regular file `path` if it has at most `limit`, else None."""
        parent, _, name = path.rpartition("/")
        fd = self.open_dir(parent)
        try:
            f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        with os.fdopen(f, "rb") as file:
            data = file.read(limit + 1)
        return data if len(data) <= limit else None

    def mkdir(self, path: str, mode: int) -> None:
        parent, _, name = path.rpartition("/")
        fd = self.open_dir(parent)
        try:
            os.mkdir(name, mode, dir_fd=fd)
        finally:
            os.close(fd)

    def chmod(self, path: str, mode: int) -> None:
        fd = self.open_dir(path)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def create_temp(self, parent: str, mode: int) -> tuple[str, int]:
        """A new, empty temporary file in directory `parent`: (its name, a descriptor)."""
        dfd = self.open_dir(parent)
        try:
            while True:
                name = TEMP_PREFIX + secrets.token_hex(8)
                try:
                    return name, os.open(name, _TEMP_FLAGS, mode, dir_fd=dfd)
                except FileExistsError:
                    continue
        finally:
            os.close(dfd)

    def rename(self, parent: str, temp: str, name: str) -> None:
        dfd = self.open_dir(parent)
        try:
            os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)

    def remove(self, parent: str, name: str) -> None:
        with contextlib.suppress(OSError):
            dfd = self.open_dir(parent)
            try:
                os.unlink(name, dir_fd=dfd)
            finally:
                os.close(dfd)

    def remove_leftovers(self, directories: list[str], keep: set[str]) -> int:
        """Delete temporary files an earlier unpack left in these directories (killed before
        it could); names in `keep` are real files of the ModelKit. The number removed."""
        removed = 0
        for path in directories:
            try:
                dfd = self.open_dir(path)
            except OSError:
                continue
            try:
                for entry in os.scandir(dfd):
                    full = f"{path}/{entry.name}" if path else entry.name
                    if (_TEMP_NAME.fullmatch(entry.name) and full not in keep
                            and entry.is_file(follow_symlinks=False)):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.name, dir_fd=dfd)
                            removed += 1
            finally:
                os.close(dfd)
        return removed


# -- what to write ----------------------------------------------------------------------


@dataclass
class Plan:
    """What an unpack writes, decided before anything is fetched."""

    mkdirs: list[Node] = field(default_factory=list)  # directories to create, parents first
    files: list[Node] = field(default_factory=list)  # files to write (the Kitfile first)
    skipped: list[str] = field(default_factory=list)  # existing files left as they are
    directories: list[str] = field(default_factory=list)  # every directory of the tree


def _is_kitfile(node: Node) -> bool:
    return node.path == KITFILE_NAME and node.layer is None


def make_plan(tree: Tree, dest: Destination, options: UnpackOptions,
              kitfile: Node | None) -> Plan:
    """Where each node of `tree` goes, and what is in the way; LocalStorageError naming the
    first path `kit unpack` would refuse. `kitfile` is the Kitfile node to write, if any."""
    plan = Plan()
    if kitfile is not None:
        _plan_kitfile(plan, dest, kitfile, options)
    for node in tree.walk():
        if _is_kitfile(node):
            continue
        try:
            st = dest.lstat(node.path)
        except OSError as exc:
            raise _refused(dest, node.path, exc) from None
        if node.kind == "dir":
            plan.directories.append(node.path)
            if st is None:
                plan.mkdirs.append(node)
            elif stat.S_ISLNK(st.st_mode):
                raise LocalStorageError(f"path '{dest.shown(node.path)}' is a symbolic link: "
                                        "kitfs does not unpack through links")
            elif not stat.S_ISDIR(st.st_mode):
                raise LocalStorageError(
                    f"path '{dest.shown(node.path)}' already exists and is not a directory")
            continue
        if st is None:
            plan.files.append(node)
        elif options.ignore_existing:
            plan.skipped.append(node.path)
        elif not options.overwrite:
            raise LocalStorageError(f"path '{dest.shown(node.path)}' already exists "
                                    "(-o overwrites existing files, -i skips them)")
        elif not stat.S_ISREG(st.st_mode):
            raise LocalStorageError(
                f"path '{dest.shown(node.path)}' already exists and is not a regular file")
        else:
            plan.files.append(node)
    plan.directories.insert(0, "")
    return plan


def _plan_kitfile(plan: Plan, dest: Destination, node: Node, options: UnpackOptions) -> None:
    """kit's unpackConfig: an existing Kitfile must be a regular file; without -o it is kept
    if it has the same bytes, an error otherwise (-i does not apply)."""
    assert node.inline is not None
    try:
        st = dest.lstat(node.path)
        if st is None or (options.overwrite and stat.S_ISREG(st.st_mode)):
            plan.files.append(node)
            return
        if not stat.S_ISREG(st.st_mode):
            raise LocalStorageError(f"failed to unpack config: path {dest.shown(node.path)} "
                                    "exists and is not a regular file")
        same = (st.st_size == len(node.inline)
                and dest.read_small(node.path, len(node.inline)) == node.inline)
    except OSError as exc:
        raise _refused(dest, node.path, exc) from None
    if not same:
        raise LocalStorageError(f"{dest.shown(node.path)} exists and does not match the "
                                "ModelKit's Kitfile (-o overwrites it)")
    plan.skipped.append(node.path)


def _refused(dest: Destination, path: str, exc: OSError) -> LocalStorageError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return LocalStorageError(f"cannot unpack {dest.shown(path)}: a directory on its path "
                                 "is a symbolic link or not a directory")
    return _error(f"cannot unpack {dest.shown(path)}", exc)


# -- writing --------------------------------------------------------------------------


@dataclass(eq=False)
class FileJob:
    """One file being written: its temporary file, and how many of its ranges are not done."""

    node: Node
    ranges: int
    parent: str = ""
    name: str = ""
    temp: str | None = None  # set once created; None again once renamed or removed
    fd: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.parent, _, self.name = self.node.path.rpartition("/")


@dataclass(eq=False)
class LayerWork:
    """The files of one layer that may be renamed into place only once it verified."""

    jobs: list[FileJob] = field(default_factory=list)
    left: int = 0
    done: trio.Event = field(default_factory=trio.Event)


class Writer:
    """Fetches and writes a plan's files; removes its temporary files if it does not finish."""

    def __init__(self, engine: Engine, dest: Destination, options: UnpackOptions,
                 progress: Progress | None) -> None:
        self.engine = engine
        self.dest = dest
        self.options = options
        self.progress = progress
        self.umask = _umask()
        self.gated: dict[str, LayerWork] = {}
        self.jobs: list[FileJob] = []
        self.written = 0

    def _mode(self, node: Node) -> int:
        return node.mode & 0o777  # the umask applies as the file is created

    def _ranges(self, files: list[Node]) -> list[tuple[FileJob, int, int]]:
        """(job, start, length) in the order to take them: the Kitfile, then each layer's
        stream front to back, so the tasks move through a layer together (and the hash
        of a layer checked whole follows them). Makes the jobs, and the gates of layers
        that must verify before their files are renamed into place."""
        order = {digest: i for i, digest in enumerate(self.engine.layers)}
        items: list[tuple[int, int, FileJob, int, int]] = []
        step = max(1, self.options.range_bytes)
        for node in files:
            count = max(1, -(-node.size // step))
            job = FileJob(node, count)
            self.jobs.append(job)
            if node.layer is not None and self._needs_check(node.layer):
                work = self.gated.setdefault(node.layer, LayerWork())
                work.jobs.append(job)
                work.left += 1
            rank = -1 if node.layer is None else order[node.layer]
            for i in range(count):
                start = i * step
                items.append((rank, node.offset + start, job, start,
                              min(step, node.size - start)))
        items.sort(key=lambda item: (item[0], item[1]))
        return [(job, start, length) for _, _, job, start, length in items]

    def _needs_check(self, digest: str) -> bool:
        """Whether the layer's bytes count only once it matched its digest end to end."""
        layer = self.engine.layers[digest]
        return not (layer.geo.verified_by_chunk or layer.verified_event.is_set())

    async def write(self, files: list[Node]) -> None:
        work = iter(self._ranges(files))
        try:
            async with trio.open_nursery() as nursery:
                for digest, layer in self.gated.items():
                    nursery.start_soon(self._when_verified, digest, layer)
                for _ in range(max(1, self.options.workers)):
                    nursery.start_soon(self._worker, work)
        finally:
            self._remove_temps()

    async def _worker(self, work: Iterator[tuple[FileJob, int, int]]) -> None:
        for job, start, length in work:  # one iterator, one event loop: each range once
            await self._range(job, start, length)

    async def _range(self, job: FileJob, start: int, length: int) -> None:
        layer = job.node.layer
        if layer is not None and layer in self.gated:
            # Stay within reach of the layer's hash, which reads what it hashes from memory.
            await self.engine.hashed_past(job.node.offset + start - HASH_LEAD, layer)
        batch: list[bytes | memoryview] = []
        held = 0
        at = start
        last = job.ranges == 1  # the file's only range: create, write, close in one hop
        async with contextlib.aclosing(self.engine.views(job.node, start, length)) as views:
            async for view in views:
                batch.append(view)
                held += len(view)
                if held >= WRITE_BATCH and at + held < start + length:
                    await trio.to_thread.run_sync(self._write, job, batch, at, False)
                    self._count(held)
                    at += held
                    batch, held = [], 0
        gate = self.gated.get(job.node.layer or "")
        await trio.to_thread.run_sync(self._write, job, batch, at, last, last and gate is None)
        self._count(held)
        if last:
            job.ranges = 0
        else:
            job.ranges -= 1
            if job.ranges == 0:
                await trio.to_thread.run_sync(self._close, job, gate is None)
        if job.ranges == 0 and gate is not None:
            gate.left -= 1
            if gate.left == 0:
                gate.done.set()

    def _count(self, n: int) -> None:
        self.written += n
        if self.progress is not None:
            self.progress.update(n)

    def _write(self, job: FileJob, views: list[bytes | memoryview], at: int,
               close: bool = False, rename: bool = False) -> None:
        """In a thread: write `views` at `at` into the job's temporary file (made on first use),
        then close it, and rename it into place, if asked."""
        try:
            with job.lock:
                if job.fd is None and job.temp is None:
                    job.temp, job.fd = self.dest.create_temp(job.parent, self._mode(job.node))
            assert job.fd is not None
            pending = [memoryview(v) for v in views if len(v)]
            while pending:
                n = os.pwritev(job.fd, pending, at)
                at += n
                while pending and n >= len(pending[0]):
                    n -= len(pending[0])
                    pending.pop(0)
                if pending and n:
                    pending[0] = pending[0][n:]
        except OSError as exc:
            raise _error(f"cannot write {self.dest.shown(job.node.path)}", exc) from None
        if close:
            self._close(job, rename)

    def _close(self, job: FileJob, rename: bool) -> None:
        """In a thread: close the job's temporary file, and rename it into place if asked."""
        try:
            if job.fd is not None:
                fd, job.fd = job.fd, None
                os.close(fd)
            if rename:
                self._rename(job)
        except OSError as exc:
            raise _error(f"cannot write {self.dest.shown(job.node.path)}", exc) from None

    def _rename(self, job: FileJob) -> None:
        assert job.temp is not None
        self.dest.rename(job.parent, job.temp, job.name)
        job.temp = None

    async def _when_verified(self, digest: str, work: LayerWork) -> None:
        """Rename a layer's files into place once they are all written and the layer matched
        its digest (started at once: the hash runs beside the writes, in the same order)."""
        await self.engine.verified(digest)
        await work.done.wait()

        def rename_all() -> None:
            for job in work.jobs:
                try:
                    self._rename(job)
                except OSError as exc:
                    raise _error(f"cannot write {self.dest.shown(job.node.path)}",
                                 exc) from None

        await trio.to_thread.run_sync(rename_all)

    def _remove_temps(self) -> None:
        """Close and delete every temporary file not renamed into place (on the way out: no
        await, so a cancelled unpack cleans up too)."""
        for job in self.jobs:
            if job.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(job.fd)
                job.fd = None
            if job.temp is not None:
                self.dest.remove(job.parent, job.temp)
                job.temp = None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def kitfile_node(kit: OpenedKit) -> Node | None:
    """The Kitfile an unpack writes: the tree's, unless the ModelKit has none of its own."""
    node = kit.tree.nodes.get(KITFILE_NAME)
    if node is None or not _is_kitfile(node):
        return None
    if kit.inspection.view.kitfile_source == "derived":
        return None  # kit derives one to place a ModelPack's layers, and writes none
    return node


async def unpack(kit: OpenedKit, directory: Path, options: UnpackOptions,
                 progress: Progress | None = None) -> Summary:
    """Write the files of `kit` (its tree, as its filters chose) into `directory`."""
    dest = await trio.to_thread.run_sync(Destination, directory)
    try:
        plan = await trio.to_thread.run_sync(
            make_plan, kit.tree, dest, options, kitfile_node(kit))
        keep = {n.path for n in kit.tree.files()}
        await trio.to_thread.run_sync(dest.remove_leftovers, plan.directories, keep)
        await trio.to_thread.run_sync(_make_dirs, dest, plan.mkdirs)
        if progress is not None:
            progress.add_total(sum(n.size for n in plan.files))
        writer = Writer(kit.engine, dest, options, progress)
        async with trio.open_nursery() as nursery:
            await kit.engine.start(nursery)
            await writer.write(plan.files)
            await kit.engine.flush()  # the cache holds what was fetched: a rerun needs it
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(_finish_dirs, dest, plan.mkdirs, writer.umask)
        return Summary(len(plan.files), writer.written, len(plan.skipped))
    finally:
        dest.close()


def _dir_mode(node: Node) -> int:
    return node.mode & 0o1777


def _make_dirs(dest: Destination, nodes: list[Node]) -> None:
    """Create the plan's directories, parents first; each writable by us until the end (a
    directory whose mode lacks u+wx gets it back in `_finish_dirs`)."""
    for node in nodes:
        try:
            dest.mkdir(node.path, _dir_mode(node) | 0o700)
        except FileExistsError:
            st = dest.lstat(node.path)
            if st is None or not stat.S_ISDIR(st.st_mode):
                raise LocalStorageError(f"path '{dest.shown(node.path)}' already exists and "
                                        "is not a directory") from None
        except OSError as exc:
            raise _refused(dest, node.path, exc) from None


def _finish_dirs(dest: Destination, nodes: list[Node], umask: int) -> None:
    for node in reversed(nodes):
        mode = _dir_mode(node)
        if mode & 0o700 != 0o700:
            try:
                dest.chmod(node.path, mode & ~umask)
            except OSError as exc:
                raise _refused(dest, node.path, exc) from None

