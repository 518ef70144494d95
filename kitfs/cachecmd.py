"""`kitfs cache du|gc|verify|clear`: look after the chunk cache every mount on the node shares.

Every operation is safe while mounts are running: chunks never change after
they are written, a removed chunk is fetched again when next read, and the
store's own locking keeps two collections from racing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kitfs.cache.store import ChunkStore
from kitfs.errors import UsageError
from kitfs.mounts import default_cache_dir
from kitfs.units import human_bytes, parse_size


def _store(root: Path) -> ChunkStore | None:
    """The store at the cache directory, None if there is no cache there.

    A cache that is there but not ours (someone else's, a symlink, writable by
    others) is an error from ChunkStore, not "no cache": lstat rather than
    is_dir, which would call a directory we may not enter absent.
    """
    try:
        os.lstat(root / "chunks")
    except FileNotFoundError:
        return None
    except OSError:
        pass  # EACCES, ENOTDIR: ChunkStore says what is wrong with the directory
    return ChunkStore(root)


def _emit(args: argparse.Namespace, doc: dict[str, object], text: str) -> None:
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(text)


def cmd_cache(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    target = 0
    if args.action == "gc":  # a bad size is wrong whether or not there is a cache
        if args.max_size is None:
            raise UsageError("kitfs cache gc needs --max-size SIZE (e.g. --max-size 100G)")
        target = parse_size(args.max_size)
    store = _store(root)
    if store is None:
        _emit(args, {"cache_dir": str(root), "bytes": 0, "chunks": 0, "exists": False},
              f"no kitfs cache at {root}")
        return 0
    if args.action == "du":
        usage = store.scan()
        _emit(args, {"cache_dir": str(root), "bytes": usage.bytes, "chunks": usage.chunks},
              f"{human_bytes(usage.bytes)} in {usage.chunks} chunks at {root}")
        return 0
    if args.action == "gc":
        result = store.gc(target)
        usage = store.scan()
        _emit(args, {"cache_dir": str(root), "removed_chunks": result.removed_chunks,
                     "removed_bytes": result.removed_bytes, "bytes": usage.bytes},
              f"removed {result.removed_chunks} chunks ({human_bytes(result.removed_bytes)}); "
              f"{human_bytes(usage.bytes)} left at {root}")
        return 0
    if args.action == "verify":
        checked = store.verify()
        _emit(args, {"cache_dir": str(root), "checked": checked.checked, "bad": checked.bad,
                     "removed": checked.removed},
              f"checked {checked.checked} chunks: {checked.bad} bad"
              + (f", {checked.removed} removed (they will be fetched again)" if checked.bad
                 else ""))
        return 1 if checked.bad else 0
    removed = store.clear()
    _emit(args, {"cache_dir": str(root), "removed_chunks": removed},
          f"removed {removed} chunks from {root}")
    return 0
