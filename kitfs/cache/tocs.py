"""Per-layer records kept next to the chunks: tables of contents and verified-layer digests.

- `<root>/tocs/<layer hex>.json`: a layer's table of contents, so a second
  mount of the same ModelKit does no tar header walk.
- `<root>/verified/<layer hex>.json`: the per-chunk digests the engine
  recorded once it verified a layer end to end, so later mounts verify chunk
  by chunk instead of trusting bytes until the whole layer is hashed.
- `<root>/blobs/<hex>.json` and `<root>/resolved/<hex>.json`: the manifests,
  configs and tables of contents a mount read, by digest, and what each
  reference resolved to (kitfs/offline.py), so a warmed ModelKit mounts with
  its registry down. Blobs are checked against their digest when read back.

Both use the chunk store's frame (32-byte header with length and xxh3, see
`fileformat`; the JSON starts at byte 32) and the same temp + fdatasync +
rename write, so a torn or bit-rotted record reads as absent and is rebuilt,
never parsed half. `kitfs cache du` counts the kept blobs and records, `clear`
removes them with the chunks, and `gc` drops those no registry answer has
used for KEPT_MAX_AGE_S (offline.py refreshes a kept file each time it would
keep it again), so they stay bounded without an offline node losing what it
needs to mount between two collections. Unlike chunks, a record may be replaced (a table of
contents from a kitfs-packed referrer supersedes one built by walking
headers); the rename makes that atomic too.

A record decides which chunks a mount trusts, so its directories get the
chunk store's treatment (`ownership`): ours alone, 0700, files 0600, checked
on first use (not in `__init__`: constructing a TocCache touches no disk), and
a record that is a symlink or anything but a regular file reads as absent.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from kitfs.cache.fileformat import (
    BLOB_MAGIC,
    RESOLVED_MAGIC,
    TOC_MAGIC,
    VERIFIED_MAGIC,
    BadFrame,
    CacheError,
    as_bytes_view,
    cache_error,
    read_frame,
    write_frame,
)
from kitfs.cache.keys import digest_hex
from kitfs.cache.ownership import secure_directory

logger = logging.getLogger(__name__)

#: `gc` removes kept blobs and resolved records not used online for this long (30 days).
KEPT_MAX_AGE_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class KeptFile:
    """A file in blobs/ or resolved/ (a temporary one a crash left included)."""

    path: Path
    size: int
    mtime_ns: int


class TocCache:
    """Tables of contents and verified-layer records by layer digest, and the metadata blobs
    and resolved references offline.py keeps. Thread- and process-safe."""

    def __init__(self, root: Path, *, sync: bool = True) -> None:
        self.root = Path(root)
        self._sync = sync
        self._dirs = {TOC_MAGIC: self.root / "tocs", VERIFIED_MAGIC: self.root / "verified",
                      BLOB_MAGIC: self.root / "blobs", RESOLVED_MAGIC: self.root / "resolved"}
        self._secured: set[Path] = set()  # directories secure_directory passed in this process

    def get(self, layer_digest: str) -> bytes | None:
        return self._get(TOC_MAGIC, layer_digest)

    def put(self, layer_digest: str, data: bytes) -> None:
        self._put(TOC_MAGIC, layer_digest, data)

    def remove(self, layer_digest: str) -> bool:
        return self._remove(TOC_MAGIC, layer_digest)

    def get_verified(self, layer_digest: str) -> bytes | None:
        return self._get(VERIFIED_MAGIC, layer_digest)

    def put_verified(self, layer_digest: str, data: bytes) -> None:
        self._put(VERIFIED_MAGIC, layer_digest, data)

    def remove_verified(self, layer_digest: str) -> bool:
        """Forget a layer's verification (its digest turned out wrong: the layer is poisoned)."""
        return self._remove(VERIFIED_MAGIC, layer_digest)

    def get_blob(self, digest: str) -> bytes | None:
        """A metadata blob kept by `put_blob`, unchecked: the caller hashes it (offline.py)."""
        return self._get(BLOB_MAGIC, digest)

    def put_blob(self, digest: str, data: bytes) -> None:
        self._put(BLOB_MAGIC, digest, data)

    def get_resolved(self, key: str) -> bytes | None:
        """The record of what a reference resolved to; `key` a sha256 digest of its name."""
        return self._get(RESOLVED_MAGIC, key)

    def put_resolved(self, key: str, data: bytes) -> None:
        self._put(RESOLVED_MAGIC, key, data)

    def touch_blob(self, digest: str) -> None:
        """Mark a kept blob used now (gc keeps what was used within KEPT_MAX_AGE_S)."""
        path = self._path(BLOB_MAGIC, digest)
        try:
            if self._ready(path.parent, create=False):
                os.utime(path, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise cache_error(f"cannot touch cached record {path}", exc) from exc

    def kept(self) -> list[KeptFile]:
        """The files in blobs/ and resolved/ (what offline.py keeps); nothing is followed."""
        found: list[KeptFile] = []
        for magic in (BLOB_MAGIC, RESOLVED_MAGIC):
            directory = self._dirs[magic]
            try:
                if not self._ready(directory, create=False):
                    continue
                with os.scandir(directory) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISREG(st.st_mode):
                            found.append(KeptFile(Path(entry.path), st.st_size,
                                                  st.st_mtime_ns))
            except OSError as exc:
                raise cache_error(f"cannot list cached records in {directory}", exc) from exc
        return found

    def remove_kept(self, older_than_s: float | None = None) -> list[KeptFile]:
        """Remove the kept files (only those unchanged for `older_than_s`, if given)."""
        cutoff = None if older_than_s is None else time.time_ns() - int(older_than_s * 1e9)
        removed: list[KeptFile] = []
        for f in self.kept():
            if cutoff is not None and f.mtime_ns >= cutoff:
                continue
            try:
                os.unlink(f.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise cache_error(f"cannot remove cached record {f.path}", exc) from exc
            removed.append(f)
        return removed

    def _path(self, magic: bytes, layer_digest: str) -> Path:
        return self._dirs[magic] / f"{digest_hex(layer_digest)}.json"

    def _ready(self, directory: Path, *, create: bool) -> bool:
        """Whether the root and `directory` exist (made if `create`) and are ours alone.

        Checked once per process and directory; CacheError if one is not ours.
        """
        for d in (self.root, directory):
            if d not in self._secured:
                if not secure_directory(d, create=create):
                    return False
                self._secured.add(d)
        return True

    def _get(self, magic: bytes, layer_digest: str) -> bytes | None:
        path = self._path(magic, layer_digest)
        try:
            if not self._ready(path.parent, create=False):
                return None
            payload, _ = read_frame(path, magic)
        except FileNotFoundError:
            return None
        except BadFrame as bad:
            logger.warning("cached record %s is corrupt (%s): dropped", path, bad)
            try:
                if os.lstat(path).st_ino == bad.inode:
                    os.unlink(path)
            except OSError:
                pass  # gone already, or not ours to delete: it still reads as absent
            return None
        except CacheError as exc:
            raise CacheError(f"cannot read cached record {path}: {exc}") from exc
        except OSError as exc:
            raise cache_error(f"cannot read cached record {path}", exc) from exc
        return bytes(payload)  # small records: immutable is worth the copy

    def _put(self, magic: bytes, layer_digest: str, data: bytes) -> None:
        path = self._path(magic, layer_digest)
        view = as_bytes_view(data)
        try:
            self._ready(path.parent, create=True)
            try:
                write_frame(path.parent, path.name, magic, view, sync=self._sync)
            except FileNotFoundError:  # the directory was removed since it was checked
                self._secured.clear()
                self._ready(path.parent, create=True)
                write_frame(path.parent, path.name, magic, view, sync=self._sync)
        except CacheError as exc:
            raise CacheError(f"cannot write cached record {path}: {exc}") from exc
        except OSError as exc:
            raise cache_error(f"cannot write cached record {path}", exc) from exc

    def _remove(self, magic: bytes, layer_digest: str) -> bool:
        path = self._path(magic, layer_digest)
        try:
            if not self._ready(path.parent, create=False):
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        except CacheError as exc:
            raise CacheError(f"cannot remove cached record {path}: {exc}") from exc
        except OSError as exc:
            raise cache_error(f"cannot remove cached record {path}", exc) from exc
        return True
