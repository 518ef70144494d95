"""Which files go into a layer, exactly as `kit pack` decides (kitops `pkg/lib/kitfile/layer.go`).

kit changes into the context directory and runs `filepath.Walk(".")` over the
*whole* context for every layer, keeping an entry when:

1. it is a regular file or a directory (`os.Lstat`: symlinks, sockets, FIFOs
   and devices are skipped silently, and never followed);
2. it is in the same tree as the layer path (`sameDirTree`): the layer path
   itself, anything under it, or one of its ancestors. Siblings are pruned.
   kit tests this with `strings.Contains(filepath.Rel(...), "..")` in both
   directions, so a name under the layer path that *contains* `..` (`v1..2`,
   `a..b.bin`) is dropped too, with everything below it; we do the same (and
   log a warning) so that digests match kit's;
3. `.kitignore` and kit's defaults do not exclude it, and it is not under
   another layer's path (`KitIgnore.excludes`). An excluded directory is
   pruned unless some pattern is a `!` exclusion; then kit walks into it and
   may keep files whose directory entry it left out.

Walk order is `filepath.Walk`'s: depth first, each directory's names sorted
by their bytes, a directory before its contents. Entry names are relative to
the context root, cleaned, without a trailing slash.

Modes are what `tar.FileInfoHeader` records: the permission bits plus
setuid/setgid/sticky (`st_mode & 0o7777`). Sizes are `st_size` for files and
0 for directories. Times, owners and names are not planned: kit's
`sanitizeTarHeader` overwrites them (the tar writer writes mtime 0, uid 1000,
gid 0, no user or group names).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kitfs.errors import KitfileError
from kitfs.modelkit.kitignore import KitIgnore, go_clean, go_rel
from kitfs.modelkit.toc import EntryKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedEntry:
    """One tar entry to write: `name` is the entry name, `source` where its bytes are."""

    name: str
    kind: EntryKind
    mode: int
    size: int
    source: Path


def _same_dir_tree(a: str, b: str) -> bool:
    """kit's `sameDirTree`: is one of a, b a parent of (or equal to) the other?"""
    a_to_b = go_rel(a, b)
    b_to_a = go_rel(b, a)
    if a_to_b is None or b_to_a is None:
        log.warning("cannot compare directories %s and %s, skipping path", a, b)
        return False
    return not (".." in a_to_b and ".." in b_to_a)


def _is_under(path: str, base: str) -> bool:
    return base == "." or path == base or path.startswith(base + "/")


def _sorted_names(directory: str) -> list[str]:
    # Go's sort.Strings over the names' bytes.
    return sorted(os.listdir(directory), key=os.fsencode)


def plan_layer(
    context_dir: Path,
    layer_path: str,
    other_layer_paths: list[str],
    ignore: KitIgnore,
) -> list[PlannedEntry]:
    """The entries `kit pack` puts in the layer for `layer_path`, in order.

    `layer_path` is the path as written in the Kitfile (`./models/` is fine).
    `other_layer_paths` are the Kitfile's other layer paths (kit passes all of
    them, this layer's own included, plus the parent ModelKit's when
    `model.path` is a reference; passing this layer's own path is harmless).
    Raises `KitfileError` when the path does not exist, leaves the context, or
    a directory cannot be read.
    """
    base = go_clean(layer_path)
    if base.startswith("/") or base == ".." or base.startswith("../"):
        raise KitfileError(f"layer path {layer_path} must stay within the context directory")
    root = os.fspath(context_dir)
    base_abs = os.path.join(root, base)
    try:
        base_st = os.stat(base_abs)
    except FileNotFoundError:
        raise KitfileError(f"path {layer_path} does not exist") from None
    except OSError as exc:
        raise KitfileError(f"cannot read layer path {layer_path}: {exc.strerror}") from None
    if not (stat.S_ISREG(base_st.st_mode) or stat.S_ISDIR(base_st.st_mode)):
        raise KitfileError(f"path {layer_path} is neither a file nor a directory")
    if ignore.excludes(base, base, other_layer_paths):
        log.warning("layer path %s is ignored by .kitignore", base)

    entries: list[PlannedEntry] = []
    prune_ignored = not ignore.has_exclusions
    # Explicit stack instead of recursion: (relative dir, its sorted names, next index).
    try:
        stack: list[tuple[str, list[str], int]] = [("", _sorted_names(root), 0)]
    except OSError as exc:
        raise KitfileError(f"cannot read context directory {root}: {exc.strerror}") from None
    while stack:
        rel_dir, names, index = stack[-1]
        if index >= len(names):
            stack.pop()
            continue
        stack[-1] = (rel_dir, names, index + 1)
        name = names[index]
        rel = f"{rel_dir}/{name}" if rel_dir else name
        abs_path = os.path.join(root, rel)
        try:
            st = os.lstat(abs_path)
        except OSError as exc:
            raise KitfileError(f"cannot read {rel}: {exc.strerror}") from None
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir and not stat.S_ISREG(st.st_mode):
            if _is_under(rel, base):
                what = "symlink" if stat.S_ISLNK(st.st_mode) else "special file"
                log.warning(
                    "skipping %s %s: kit packs only regular files and directories", what, rel
                )
            continue
        if not _same_dir_tree(base, rel):
            if _is_under(rel, base):
                log.warning("skipping %s: kit leaves out paths whose name contains '..'", rel)
            continue
        if ignore.excludes(rel, base, other_layer_paths):
            log.debug("skipping %s: ignored", rel)
            if is_dir and not prune_ignored:
                stack.append(_listing(root, rel))
            continue
        if is_dir:
            entries.append(PlannedEntry(rel, "dir", st.st_mode & 0o7777, 0, Path(abs_path)))
            stack.append(_listing(root, rel))
        else:
            entries.append(
                PlannedEntry(rel, "file", st.st_mode & 0o7777, st.st_size, Path(abs_path))
            )
    if sum(e.size for e in entries) == 0:
        log.warning("no files detected in layer with path %s", base)
    return entries


def _listing(root: str, rel: str) -> tuple[str, list[str], int]:
    try:
        return (rel, _sorted_names(os.path.join(root, rel)), 0)
    except OSError as exc:
        raise KitfileError(f"cannot read directory {rel}: {exc.strerror}") from None
