"""Bind mounts from a shared daemon's staging mount onto each pod's target path.

Made with mount(2) directly (no `mount` binary needed in the image, no
output to parse). A bind mount cannot be made read-only in the same call:
the kernel ignores MS_RDONLY with MS_BIND, so a second call remounts it
read-only (with nosuid, nodev: nothing in a ModelKit needs them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

from kitfs.mounts import find_mount

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class BindError(OSError):
    """mount(2) or umount2(2) failed; str() is one line naming the paths."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise BindError(err, f"{what}: {os.strerror(err)}")


def bind_readonly(source: Path, target: Path) -> None:
    """Bind `source` onto `target` (an existing directory), read-only."""
    _check(_libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None),
           f"cannot bind-mount {source} on {target}")
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    try:
        _check(_libc.mount(None, os.fsencode(target), None, flags, None),
               f"cannot make the bind mount on {target} read-only")
    except BindError:
        unbind(target)  # never leave a writable bind behind
        raise


def is_mounted(target: Path) -> bool:
    return find_mount(target) is not None


def unbind(target: Path) -> None:
    """Unmount every mount stacked at `target`; lazily when something still holds one
    (a reader with an open file keeps its file until it closes it)."""
    while is_mounted(target):
        if _libc.umount2(os.fsencode(target), 0) == 0:
            continue
        err = ctypes.get_errno()
        if err == errno.EINVAL and not is_mounted(target):
            return
        if err != errno.EBUSY:
            raise BindError(err, f"cannot unmount {target}: {os.strerror(err)}")
        log.info("%s is busy; detaching it lazily", target)
        _check(_libc.umount2(os.fsencode(target), MNT_DETACH), f"cannot detach {target}")
