"""`kitfs cache du|gc|verify|clear|warm`: look after the chunk cache every mount on the node shares.

Every operation is safe while mounts are running: chunks never change after
they are written, a removed chunk is fetched again when next read, and the
store's own locking keeps two collections from racing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options
from kitfs.errors import UsageError

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from kitfs.cache.store import ChunkStore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("du", "gc", "verify", "clear", "warm"))
    p.add_argument("reference", metavar="REF", nargs="?",
                   help="for warm: the ModelKit whose chunks to fetch")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the cache (default: $KITFS_CACHE_DIR, else /var/cache/kitfs for "
                        "root, else $XDG_CACHE_HOME/kitfs)")
    p.add_argument("--max-size", metavar="SIZE", help="for gc: the size to trim down to")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-f", "--filter", action="append", metavar="FILTER", default=[],
                   help="for warm: only what matches, as for mount and unpack (repeatable)")
    add_network_options(p)


def _store(root: Path) -> ChunkStore | None:
    """The store at the cache directory, None if there is no cache there.

    A cache that is there but not ours (someone else's, a symlink, writable by
    others) is an error from ChunkStore, not "no cache": lstat rather than
    is_dir, which would call a directory we may not enter absent.
    """
    from kitfs.cache.store import ChunkStore

    try:
        os.lstat(root / "chunks")
    except FileNotFoundError:
        return None
    except OSError:
        pass  # EACCES, ENOTDIR: ChunkStore says what is wrong with the directory
    return ChunkStore(root)


def _emit(args: argparse.Namespace, doc: dict[str, object], text: str) -> None:
    import json

    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(text)


def run(args: argparse.Namespace) -> int:
    from kitfs.cache.tocs import KEPT_MAX_AGE_S, TocCache
    from kitfs.mounts import default_cache_dir
    from kitfs.units import human_bytes, parse_size

    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.action == "warm":
        return _warm(args, Path(os.path.abspath(root)))
    if args.reference is not None or args.filter:
        raise UsageError(f"kitfs cache {args.action} takes no REF or --filter (warm does)")
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
    records = TocCache(root)  # the manifests and records offline.py keeps, beside the chunks
    if args.action == "du":
        usage = store.scan()
        kept = records.kept()
        kept_bytes = sum(f.size for f in kept)
        _emit(args, {"cache_dir": str(root), "bytes": usage.bytes + kept_bytes,
                     "chunks": usage.chunks, "chunk_bytes": usage.bytes,
                     "kept_files": len(kept), "kept_bytes": kept_bytes},
              f"{human_bytes(usage.bytes + kept_bytes)} in {usage.chunks} chunks and "
              f"{len(kept)} kept manifests and records at {root}")
        return 0
    if args.action == "gc":
        result = store.gc(target)
        expired = records.remove_kept(KEPT_MAX_AGE_S)
        usage = store.scan()
        left = usage.bytes + sum(f.size for f in records.kept())
        _emit(args, {"cache_dir": str(root), "removed_chunks": result.removed_chunks,
                     "removed_bytes": result.removed_bytes, "removed_kept": len(expired),
                     "bytes": left},
              f"removed {result.removed_chunks} chunks ({human_bytes(result.removed_bytes)}) "
              f"and {len(expired)} kept manifests and records unused for "
              f"{KEPT_MAX_AGE_S / 86400:g} days; {human_bytes(left)} left at {root}")
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
    cleared = records.remove_kept()
    _emit(args, {"cache_dir": str(root), "removed_chunks": removed,
                 "removed_kept": len(cleared)},
          f"removed {removed} chunks and {len(cleared)} kept manifests and records from {root}")
    return 0


def _warm(args: argparse.Namespace, root: Path) -> int:
    import logging
    from dataclasses import replace

    from kitfs.commands.common import client_options, run_async
    from kitfs.engine.session import open_kit
    from kitfs.modelkit.filters import FilterSet
    from kitfs.oci.reference import parse_reference
    from kitfs.progress import Progress
    from kitfs.units import human_bytes
    from kitfs.unpack import engine_config
    from kitfs.warm import WarmSummary, warm

    if args.reference is None:
        raise UsageError("kitfs cache warm needs REF (e.g. kitfs cache warm "
                         "registry.example.com/team/llm:v1)")
    if not args.verbose:
        # Failures reach the user as cli.main's one line; the read path's warnings on the
        # way would repeat it.
        logging.getLogger("kitfs").setLevel(logging.CRITICAL)
    ref = parse_reference(args.reference)
    if ref.extra_tags:
        raise UsageError(f"{args.reference}: can not warm multiple tags")
    if ref.is_local:
        raise UsageError(f"{args.reference}: kitfs cache warm fetches from a registry; name "
                         "one (e.g. registry.example.com/team/llm:v1)")
    filters = FilterSet.parse(list(args.filter))
    # Never from the kept record: a warm fetches what REF means now, or fails saying why.
    options = replace(client_options(args), offline_fallback=False)
    progress = Progress("warming", 0)

    async def main() -> WarmSummary:
        async with open_kit(ref, options, root, filters=filters,
                            config=engine_config(options.read_timeout), where="remote") as kit:
            return await warm(kit, progress)

    try:
        done = run_async(main)
    finally:
        progress.close()
    h = human_bytes
    _emit(args, {"cache_dir": str(root), "reference": str(ref), "digest": done.digest,
                 "layers": done.layers, "bytes": done.total, "already_cached": done.present,
                 "fetched": done.fetched},
          f"warmed {ref} ({done.digest}): {done.layers} layers, {h(done.total)}; "
          f"{h(done.present)} already cached, {h(done.fetched)} fetched, into {root}")
    return 0


COMMAND = Command(
    name="cache",
    help="show, fill, trim, check or empty the shared chunk cache",
    description="""\
Every mount on a node shares one content-addressed chunk cache. These actions
are safe while mounts run: a removed chunk is simply fetched again.

  du       how much the cache holds (chunks, and the manifests warm and mounts keep)
  gc       evict least-recently-used chunks until it holds at most --max-size, and
           kept manifests no registry answer has used for 30 days
  verify   check every chunk's checksum; remove bad ones (exit 1 if any)
  clear    remove every chunk and kept manifest
  warm     fetch every chunk of REF (or what --filter selects) into the cache,
           verified, without mounting; again, it fetches only what is missing.
           What REF resolved to is kept: a mount of it then works with the
           registry down (as resolved when warmed; the mount warns so). warm
           itself never uses that record: with the registry unreachable it fails

examples:
  kitfs cache du
  kitfs cache gc --max-size 200G
  kitfs cache verify --cache-dir /mnt/nvme/kitfs
  kitfs cache warm registry.example.com/team/llm:v1 --filter model
""",
    add_arguments=add_arguments,
    run=run,
)
