"""What the filesystem adapter needs from the engine, and nothing more.

`fs/` depends on this protocol, not on the engine's classes, so the adapter
stays a thin translation of FUSE requests and the engine can be exercised
without a mount.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from kitfs.engine.readahead import Cursor
from kitfs.modelkit.tree import Node

PrefetchMode = Literal["none", "model", "all"]
VerifyMode = Literal["lazy", "strict"]


class FileReader(Protocol):
    async def read(self, node: Node, offset: int, size: int,
                   cursor: Cursor | None = None) -> bytes | memoryview:
        """Bytes [offset, offset+size) of `node` (fewer only at end of file).

        `cursor` is the reading handle's (from `opened`): its readahead is its own.

        Raises KitfsError subclasses on failure: IntegrityError for a poisoned
        layer, UnreachableError when the registry cannot deliver in time.
        """
        ...

    def opened(self, node: Node) -> Cursor:
        """A file handle was opened: its chunks are evicted last; its reads go with the
        cursor returned."""
        ...

    def released(self, node: Node) -> None: ...

    def trusted(self, node: Node) -> bool:
        """False once the layer holding `node` is poisoned: the kernel must keep none of it."""
        ...

    def status(self) -> dict[str, Any]:
        """Counters for `kitfs status` (JSON-serialisable)."""
        ...
