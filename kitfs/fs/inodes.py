"""Inode numbers for an immutable tree.

The tree never changes while it is mounted, so inode numbers are handed out
once, directory by directory with names sorted (the root is 1, as FUSE
requires). The same ModelKit mounted with the same filters therefore always
gets the same numbers, which keeps `find -inum`, rsync and NFS-style handles stable across
remounts, and nothing ever has to be forgotten: FUSE's lookup counts can be
ignored because no inode is ever freed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kitfs.modelkit.tree import Node, Tree

ROOT_INODE = 1


@dataclass(frozen=True)
class Entry:
    """One inode: its node, its parent, and for directories its children by name."""

    inode: int
    parent: int
    node: Node
    names: tuple[bytes, ...] = ()  # directory listing order (sorted, as `Tree.walk`)
    inodes: tuple[int, ...] = ()  # the inode of each name, same positions
    subdirs: int = 0

    @property
    def is_dir(self) -> bool:
        return self.node.kind == "dir"


class InodeTable:
    """Inode <-> node, and (directory inode, name) -> inode, built once from a Tree."""

    def __init__(self, tree: Tree) -> None:
        self._entries: list[Entry | None] = [None]  # index = inode; 0 is never valid
        self._by_name: dict[tuple[int, bytes], int] = {}
        self._by_path: dict[str, int] = {"": ROOT_INODE}
        self.total_size = 0
        root = tree.nodes.get("")
        if root is None or root.kind != "dir":
            raise ValueError("tree has no root directory")
        self._entries.append(None)  # placeholder for the root, filled below
        self._add_dir(tree, root, ROOT_INODE, ROOT_INODE)

    def _add_dir(self, tree: Tree, node: Node, inode: int, parent: int) -> None:
        names: list[bytes] = []
        inodes: list[int] = []
        pending: list[tuple[Node, int]] = []
        subdirs = 0
        for name in sorted(tree.children.get(node.path, ())):
            path = f"{node.path}/{name}" if node.path else name
            child = tree.nodes[path]
            child_inode = len(self._entries)
            self._entries.append(None)
            raw = os.fsencode(name)
            names.append(raw)
            inodes.append(child_inode)
            self._by_name[(inode, raw)] = child_inode
            self._by_path[path] = child_inode
            if child.kind == "dir":
                subdirs += 1
                pending.append((child, child_inode))
            else:
                self.total_size += child.size
                self._entries[child_inode] = Entry(child_inode, inode, child)
        self._entries[inode] = Entry(inode, parent, node, tuple(names), tuple(inodes), subdirs)
        for child, child_inode in pending:
            self._add_dir(tree, child, child_inode, inode)

    def __len__(self) -> int:
        return len(self._entries) - 1

    def get(self, inode: int) -> Entry | None:
        if 0 < inode < len(self._entries):
            return self._entries[inode]
        return None

    def inode_of(self, path: str) -> int | None:
        """The inode of the node at `path` (to tell the kernel to drop what it cached of it)."""
        return self._by_path.get(path)

    def child(self, parent: int, name: bytes) -> int | None:
        """The inode of `name` in directory `parent` ('.' and '..' included), or None."""
        if name == b".":
            return parent if self.get(parent) is not None else None
        if name == b"..":
            entry = self.get(parent)
            return entry.parent if entry is not None else None
        return self._by_name.get((parent, name))
