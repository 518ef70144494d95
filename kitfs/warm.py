"""`kitfs cache warm`: a ModelKit's chunks fetched into the node's cache, verified, no mount.

For nodes that come up before their pods (autoscaling): what a mount would
fetch on first read is already on disk, checked against the ModelKit's
digests, and what the reference resolved to is kept (kitfs/offline.py), so a
mount then starts, and reads every file, even with the registry down.

Everything goes through the mount's own read path (engine/), as unpack's
does (kitfs/unpack.py), so what lands in the cache is exactly what a mount
looks for:

- a layer not yet verified end to end on this node is verified
  (`Engine.verified`): the hash asks for every chunk in order, fetching
  only those not on disk (with unpack's `reuse_unverified`, even chunks a
  killed warm left), and records the layer's chunk digests, so mounts then
  check each chunk on its own. A kitfs-packed compressed layer (`seekable`)
  is fetched chunk by chunk first: its hash streams the blob, and caches
  nothing;
- a layer verified before has only its missing chunks fetched (`views`
  over them, RANGE_BYTES at a time by unpack's WORKERS), each checked
  against its recorded digest.

A second run finds its chunks there and says so; one interrupted fetches
only what the first did not. The progress bar counts registry bytes: what
was there already, then what is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from kitfs.engine.layerstate import LayerState, State
from kitfs.engine.reader import Engine
from kitfs.engine.session import OpenedKit
from kitfs.modelkit.tree import Node
from kitfs.progress import Progress
from kitfs.unpack import RANGE_BYTES, WORKERS

#: How often the progress bar follows the engine's fetch counter.
PROGRESS_EVERY_S = 0.2


@dataclass(frozen=True)
class WarmSummary:
    """What a warm found and did, in registry (blob) bytes."""

    digest: str
    layers: int
    total: int  # the selected layers' blobs
    present: int  # of those, already in the cache before
    fetched: int  # bytes read from the registry by this run


def _layer_node(layer: LayerState) -> Node:
    """A file spanning the layer's whole stream, to ask `Engine.views` for any chunks of it."""
    geo = layer.geo
    if geo.stream_size is not None:
        size = geo.stream_size
    elif geo.chunks:
        size = geo.chunks[-1].offset + geo.chunks[-1].size
    else:  # streamed: as many chunks as were recorded (the last one's end is past the data)
        size = (layer.stream_chunks or 0) * geo.chunk_size
    return Node(f"<layer {layer.info.digest}>", "file", 0o444, size, layer.info.digest, 0)


async def _missing(engine: Engine, layer: LayerState) -> list[int]:
    """The indexes of the layer's chunks not in the disk cache, of those known by now."""
    geo = layer.geo
    if geo.chunks:
        return sorted(await engine.chunks.absent(layer, range(len(geo.chunks))))
    if layer.state is not State.VERIFIED:
        return []  # an unverified stream is read from its start whatever is on disk
    keys = [geo.position_key(i) for i in range(layer.stream_chunks or 0)]
    store = engine.store
    here = await trio.to_thread.run_sync(lambda: [store.contains(k) for k in keys])
    return [i for i, ok in enumerate(here) if not ok]


def _present_bytes(layer: LayerState, missing: list[int]) -> int:
    geo = layer.geo
    if geo.chunks:
        gone = set(missing)
        return sum(c.blob_size for c in geo.chunks if c.index not in gone)
    if layer.state is State.VERIFIED and not missing:
        return layer.info.size
    return 0


def _ranges(layer: LayerState, missing: list[int], step: int) -> list[tuple[Node, int, int]]:
    """The missing chunks as (node, start, length) of at most `step` bytes, runs merged."""
    node = _layer_node(layer)
    size = layer.geo.chunk_size
    out: list[tuple[Node, int, int]] = []
    run_start: int | None = None
    prev = -2
    for index in [*missing, -1]:
        if index != prev + 1 or index == -1:
            if run_start is not None:
                start, end = run_start * size, min(node.size, (prev + 1) * size)
                out += [(node, at, min(step, end - at)) for at in range(start, end, step)]
            run_start = index
        prev = index
    return out


async def warm(kit: OpenedKit, progress: Progress | None = None, *,
               workers: int = WORKERS, range_bytes: int = RANGE_BYTES) -> WarmSummary:
    """Fetch and verify every chunk of the layers `kit`'s tree uses (as its filters chose)."""
    engine = kit.engine
    layers = list(engine.layers.values())
    counters = engine.ctx.counters
    total = sum(layer.info.size for layer in layers)
    present = 0
    work: list[tuple[Node, int, int]] = []
    verify: list[LayerState] = []
    after_fetch: list[LayerState] = []
    for layer in layers:
        layer.check()
        missing = await _missing(engine, layer)
        present += _present_bytes(layer, missing)
        if layer.state is State.VERIFIED or layer.geo.shape == "seekable":
            work += _ranges(layer, missing, max(1, range_bytes))
            if layer.state is not State.VERIFIED:
                after_fetch.append(layer)
        else:
            verify.append(layer)
    if progress is not None:
        progress.add_total(total)
        progress.update(present)
    fetched_before = counters.bytes_fetched

    async def fetch_ranges() -> None:
        items = iter(work)

        async def worker() -> None:
            for node, start, length in items:  # one iterator, one loop: each range once
                async for _ in engine.views(node, start, length):
                    pass
        async with trio.open_nursery() as inner:
            for _ in range(max(1, workers)):
                inner.start_soon(worker)
        async with trio.open_nursery() as inner:
            for layer in after_fetch:
                inner.start_soon(engine.verified, layer.info.digest)

    shown = fetched_before

    def show() -> None:
        nonlocal shown
        if progress is not None:
            now = counters.bytes_fetched
            progress.update(min(now - shown, max(0, progress.total - progress.done)))
            shown = now

    async def follow() -> None:
        while True:
            await trio.sleep(PROGRESS_EVERY_S)
            show()

    async with trio.open_nursery() as nursery:
        await engine.start(nursery)
        nursery.start_soon(follow)
        async with trio.open_nursery() as jobs:
            jobs.start_soon(fetch_ranges)
            for layer in verify:
                jobs.start_soon(engine.verified, layer.info.digest)
        await engine.flush()  # on disk before we say it is
        nursery.cancel_scope.cancel()
    show()
    return WarmSummary(kit.inspection.digest, len(layers), total, present,
                       counters.bytes_fetched - fetched_before)
