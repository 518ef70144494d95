"""Open a ModelKit in-process as a mount does (engine started in a nursery), for engine tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from kitfs.engine.reader import EngineConfig
from kitfs.engine.session import OpenedKit, open_kit
from kitfs.oci.client import ClientOptions
from kitfs.oci.reference import parse_reference

#: One-MiB chunks (small models still have several), nothing fetched ahead.
LAZY = EngineConfig(chunk_size=1 << 20, prefetch="none", read_timeout=10)


@contextlib.asynccontextmanager
async def opened(ref: str, cache: Path, config: EngineConfig = LAZY,
                 options: ClientOptions | None = None) -> AsyncIterator[OpenedKit]:
    """The kit with its engine running; its writes land on disk before it closes."""
    options = options or ClientOptions(read_timeout=3, retry_budget=2)
    async with open_kit(parse_reference(ref), options, cache, config=config) as kit, \
            trio.open_nursery() as nursery:
        await kit.engine.start(nursery)
        yield kit
        await kit.engine.flush()
        nursery.cancel_scope.cancel()


async def read_file(kit: OpenedKit, path: str, piece: int = 128 << 10) -> bytes:
    """The whole file, read `piece` bytes at a time as a reader would."""
    node = kit.tree.nodes[path]
    out = bytearray()
    while len(out) < node.size:
        out += await kit.engine.read(node, len(out), piece)
    return bytes(out)
