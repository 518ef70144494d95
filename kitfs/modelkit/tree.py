"""The file tree a ModelKit unpacks to: what `kitfs ls` prints and `kitfs mount` serves.

Built from each layer's table of contents (or, for raw layers, the one file
the layer is), placed where `kit unpack` would write it:

- tar entries are named relative to the pack context, so they land at their
  own names; ModelKits older than kit v0.5.0 rooted entries at the parent of
  the layer path, so their entries land under `dirname(path)`;
- a raw layer is one file at its `org.cncf.model.filepath`;
- the Kitfile sits at the root when the filters keep it.

Every path is checked the way unpack checks it: nothing absolute, nothing
that climbs out with `..`, only files and directories.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from kitfs.errors import FormatError
from kitfs.modelkit.toc import TocEntry

DIR_MODE = 0o755
KITFILE_NAME = "Kitfile"


@dataclass(frozen=True)
class Placement:
    """One layer, reduced to what placement needs."""

    digest: str
    entries: tuple[TocEntry, ...]
    prefix: str = ""  # the directory legacy layers are rooted at ("" for modern layers)


@dataclass(frozen=True)
class Node:
    path: str  # "" is the root
    kind: str  # "file" or "dir"
    mode: int
    size: int = 0
    layer: str | None = None  # digest of the layer holding the bytes
    offset: int = 0  # where the bytes start in the layer's uncompressed stream
    inline: bytes | None = None  # content kept in memory (the Kitfile)


@dataclass
class Tree:
    nodes: dict[str, Node] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)

    def files(self) -> Iterator[Node]:
        for path in sorted(self.nodes):
            node = self.nodes[path]
            if node.kind == "file":
                yield node

    def walk(self, parent: str = "") -> Iterator[Node]:
        """Every node below `parent`, depth first, names sorted: the order `ls -R` shows."""
        for name in sorted(self.children.get(parent, ())):
            path = f"{parent}/{name}" if parent else name
            node = self.nodes[path]
            yield node
            if node.kind == "dir":
                yield from self.walk(path)

    @property
    def total_size(self) -> int:
        return sum(n.size for n in self.files())


def safe_path(name: str, where: str) -> str:
    """Clean a path from a layer, refusing anything that would land outside the tree."""
    if name.startswith("/"):
        raise FormatError(f"{where}: absolute path {name!r} in layer")
    cleaned = posixpath.normpath(name)
    if cleaned in (".", ""):
        return ""
    if cleaned == ".." or cleaned.startswith("../"):
        raise FormatError(f"{where}: path {name!r} escapes the unpack directory")
    return cleaned


def _add_dir(tree: Tree, path: str, mode: int, where: str) -> None:
    existing = tree.nodes.get(path)
    if existing is not None:
        if existing.kind != "dir":
            raise FormatError(f"{where}: {path!r} is both a file and a directory")
        return
    if path:
        parent, _, name = path.rpartition("/")
        _add_dir(tree, parent, DIR_MODE, where)
        tree.children.setdefault(parent, []).append(name)
    tree.nodes[path] = Node(path, "dir", mode)
    tree.children.setdefault(path, [])


def _add_file(tree: Tree, node: Node, where: str) -> None:
    existing = tree.nodes.get(node.path)
    if existing is not None and existing.kind == "dir":
        raise FormatError(f"{where}: {node.path!r} is both a directory and a file")
    parent, _, name = node.path.rpartition("/")
    _add_dir(tree, parent, DIR_MODE, where)
    if existing is None:
        tree.children.setdefault(parent, []).append(name)
    tree.nodes[node.path] = node  # a later layer wins, as with `kit unpack -o`


def build_tree(layers: Iterable[Placement], kitfile: bytes | None) -> Tree:
    tree = Tree()
    _add_dir(tree, "", DIR_MODE, "tree")
    if kitfile is not None:
        _add_file(tree, Node(KITFILE_NAME, "file", 0o644, len(kitfile), inline=kitfile), "Kitfile")
    for layer in layers:
        where = f"layer {layer.digest[:19]}"
        prefix = safe_path(layer.prefix, where) if layer.prefix else ""
        for entry in layer.entries:
            path = safe_path(posixpath.join(prefix, entry.name) if prefix else entry.name, where)
            if not path:
                continue
            if entry.kind == "dir":
                _add_dir(tree, path, entry.mode & 0o7777, where)
                # a directory entry seen after its implied creation keeps the recorded mode
                tree.nodes[path] = Node(path, "dir", entry.mode & 0o7777)
            else:
                _add_file(
                    tree,
                    Node(path, "file", entry.mode & 0o7777, entry.size, layer.digest, entry.offset),
                    where,
                )
    return tree
