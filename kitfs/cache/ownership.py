"""Who may use a cache directory: only the user kitfs runs as.

The node-wide cache (`/var/cache/kitfs`) is written by mount daemons running
as root and holds private models' bytes. Anyone else who can read it reads
those models; anyone who can write it (or swap one of its directories for a
symlink) can plant chunks that a daemon serves. So every directory kitfs
creates in it is 0700 and every file 0600, and a directory kitfs is handed
is checked before use: it must be a real directory (not a symlink: that is
how a directory is swapped), owned by the effective uid and writable by no
one else. A directory that is ours and private to write but readable by
others (0755, what kitfs before this check created) is tightened to 0700
rather than refused, so existing caches keep working.

The check runs on a descriptor opened with O_NOFOLLOW, so what is checked is
what gets chmodded: nobody can swap the path between the two.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from kitfs.cache.fileformat import CacheError, cache_error

log = logging.getLogger(__name__)

#: Mode of every directory kitfs creates in a cache; files are FILE_MODE (fileformat).
DIR_MODE = 0o700

#: Opens a directory without following a symlink in its last component.
DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def secure_directory(path: Path, *, create: bool) -> bool:
    """Make sure `path` is a directory only we can use; False if it is absent and not `create`d.

    Creates it 0700 when missing and `create` (its parents with the usual
    mode: they are not part of the cache). Raises CacheError, one line saying
    why and what to do, when it is a symlink, not a directory, someone else's
    or writable by group or others; tightens a readable-by-others one to 0700.
    """
    try:
        fd = os.open(path, DIR_OPEN_FLAGS)
    except OSError as exc:
        _refuse_non_directory(path)
        if exc.errno == errno.ENOENT and not create:
            return False
        # ENOTDIR here: a parent is not a directory, which mkdir reports best
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR) or not create:
            raise cache_error(f"cannot open cache directory {path}", exc) from exc
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(path, DIR_OPEN_FLAGS)
        except OSError as again:
            raise cache_error(f"cannot create cache directory {path}", again) from again
    try:
        _check(path, fd)
    finally:
        os.close(fd)
    _check_ancestors(path)
    return True


def _check_ancestors(path: Path) -> None:
    """CacheError if someone else could swap `path` for a directory of theirs.

    Whoever can write a directory above the cache (without the sticky bit,
    which keeps them from renaming entries they do not own) can move the
    cache aside and put their own in its place after the check above, with
    planted verified records and chunks. So every directory above it, as
    written and as resolved through symlinks, must be root's or ours and
    writable by no one else unless sticky.
    """
    uid = os.geteuid()
    absolute = Path(os.path.abspath(path))
    seen: set[Path] = set()
    for chain in (absolute.parents, Path(os.path.realpath(absolute)).parents):
        for parent in chain:
            if parent in seen:
                continue
            seen.add(parent)
            try:
                st = os.lstat(parent)
            except OSError as exc:
                raise cache_error(f"cannot check {parent}, above cache directory {path}",
                                  exc) from exc
            mode = stat.S_IMODE(st.st_mode)
            if st.st_uid not in (0, uid):
                raise CacheError(
                    f"{parent}, above cache directory {path}, belongs to uid {st.st_uid}: "
                    f"they could swap the cache for their own; pass a --cache-dir only root "
                    f"or uid {uid} controls")
            if stat.S_ISDIR(st.st_mode) and mode & 0o022 and not mode & stat.S_ISVTX:
                raise CacheError(
                    f"{parent}, above cache directory {path}, is writable by others (mode "
                    f"{mode:04o}): they could swap the cache for their own; chmod go-w "
                    f"{parent} or pass another --cache-dir")


def _check(path: Path, fd: int) -> None:
    st = os.fstat(fd)
    uid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != uid:
        raise CacheError(
            f"cache directory {path} belongs to uid {st.st_uid}, not to uid {uid} that kitfs "
            f"runs as: refusing to use it; chown {uid} {path} or pass --cache-dir"
        )
    if mode & 0o022:
        who = "other users" if mode & 0o002 else "its group"
        raise CacheError(
            f"cache directory {path} is writable by {who} (mode {mode:04o}): refusing to use "
            f"it; chmod 700 {path} or pass --cache-dir"
        )
    if mode & 0o077:
        try:
            os.fchmod(fd, DIR_MODE)
        except OSError as exc:
            raise cache_error(f"cannot make cache directory {path} private (chmod 700)", exc) \
                from exc
        log.info("cache directory %s was readable by other users (mode %04o): made it 0700",
                 path, mode)


def _refuse_non_directory(path: Path) -> None:
    """CacheError if `path` exists but is a symlink or not a directory; nothing otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return  # absent, or a parent is the problem: the caller's error says which
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(
            f"cache directory {path} is a symbolic link: refusing to follow it; "
            f"pass the real directory as --cache-dir"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(
            f"cache directory {path} is not a directory (ENOTDIR): refusing to use it; "
            f"remove it or pass --cache-dir"
        )
