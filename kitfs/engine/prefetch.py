"""The order in which a mount loads a model before anyone asks: what loaders read first.

Model servers open the small files first (config.json, tokenizer files,
the safetensors index), then read every shard's header to plan the load,
then stream the weights shard by shard. Prefetching in that order makes the
first reads hit the cache and keeps the weight stream ahead of the loader.

`prefetch_plan` is that order; `Prefetcher` walks it with PREFETCH_WORKERS
tasks, paced by a `Pacer` so the weight stream stays at most half a memory
tier ahead of its reader, and starts each model layer's verification once
the plan is done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import trio

from kitfs.cache.memory import ChunkData
from kitfs.engine.context import Context, foreign
from kitfs.engine.geometry import LayerGeometry
from kitfs.engine.layerstate import LayerState, State
from kitfs.modelkit.manifest import LayerInfo
from kitfs.modelkit.tree import Node, Tree

#: Tasks walking the prefetch plan. Fetches among them are bounded by the background
#: request slots (taken before a run is claimed, so no claimed chunk waits for one);
#: the rest keep chunk-file reads in flight on a warm mount, where two workers read
#: one chunk each at a time. Four: faster warm than two, no better with eight, which
#: hold more memory (benchmarks/TUNING.md).
PREFETCH_WORKERS = 4
SMALL_FILE = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".npz")
HEADER_SUFFIXES = (".safetensors", ".gguf")
MODEL_KINDS = ("model", "modelpart")


def _chunks_of(node: Node, geo: LayerGeometry, length: int | None = None) -> range:
    size = geo.chunk_size
    end = node.offset + (node.size if length is None else min(length, node.size))
    if end <= node.offset:
        return range(0)
    return range(node.offset // size, (end - 1) // size + 1)


def prefetch_plan(
    tree: Tree,
    layers: Mapping[str, LayerInfo],
    geometry: Mapping[str, LayerGeometry],
    mode: str,
) -> list[tuple[str, int]]:
    """(layer digest, chunk index) pairs, each once, in the order to load them.

    `model` covers model and model-part layers; `all` every layer afterwards.
    Layers that can only be streamed from their start appear as one entry
    (their first chunk): asking for it starts the stream, which brings the rest.
    """
    if mode == "none":
        return []
    seen: set[tuple[str, int]] = set()
    order: list[tuple[str, int]] = []

    def add(digest: str, indexes: range) -> None:
        geo = geometry[digest]
        if geo.shape == "stream":
            indexes = range(0, 1)
        for i in indexes:
            if geo.chunks and i >= len(geo.chunks):
                break
            if (digest, i) not in seen:
                seen.add((digest, i))
                order.append((digest, i))

    files = [n for n in tree.files() if n.layer is not None and n.layer in layers]
    model_files = [n for n in files if layers[n.layer or ""].kind in MODEL_KINDS]
    groups = [model_files] + ([[n for n in files if n not in model_files]]
                              if mode == "all" else [])
    for group in groups:
        for node in group:  # small files: configs, tokenizers, indexes
            if node.size <= SMALL_FILE and not node.path.endswith(WEIGHT_SUFFIXES):
                add(node.layer or "", _chunks_of(node, geometry[node.layer or ""]))
        for node in group:  # every shard's header
            if node.path.endswith(HEADER_SUFFIXES):
                add(node.layer or "", _chunks_of(node, geometry[node.layer or ""], 1))
        for node in group:  # then the rest, file by file in path order
            add(node.layer or "", _chunks_of(node, geometry[node.layer or ""]))
    return order


#: A reader quiet for this long no longer holds prefetch back.
READER_IDLE_S = 1.0
#: How long prefetch keeps chunks already on disk out of memory while no reader has
#: come (past the first half memory tier); then it loads them anyway.
NO_READER_WAIT_S = 10.0


class Pacer:
    """Keeps the weight stream's prefetch at most a lead ahead of a reader of its layer.

    Without a reader, prefetch fills the disk cache as fast as it can, but
    leaves chunks already on disk (beyond the lead) until a reader comes or
    NO_READER_WAIT_S pass: a warm mount's prefetch, started before its reader,
    filled memory with chunks far ahead that were pushed out again before the
    reader got to them. With one streaming the model as it arrives, a
    prefetcher far ahead had its chunks pushed out of memory before the reader
    got there, and the reader read them back from disk (benchmarks/TUNING.md).

    Invariant: `_front[layer]` is (the furthest chunk a reader got to, when)
    for a layer someone read; a reader quiet for READER_IDLE_S no longer
    counts, and each read wakes every paced worker (a parking lot, so no
    object is made per read).
    """

    def __init__(self, started_at: float) -> None:
        self._started_at = started_at
        self._front: dict[str, tuple[int, float]] = {}
        self._progress = trio.lowlevel.ParkingLot()

    def read(self, layer: str, last: int) -> None:
        """A reader of `layer` got to chunk `last`."""
        now = trio.current_time()
        front = self._front.get(layer)
        if front is not None and now - front[1] < READER_IDLE_S:
            last = max(last, front[0])
        self._front[layer] = (last, now)
        self._progress.unpark_all()

    async def pace(self, layer: str, index: int, lead: int,
                   on_disk: Callable[[int], Awaitable[bool]]) -> None:
        """Return when prefetching chunk `index` of `layer` no longer runs too far ahead."""
        while True:
            front = self._front.get(layer)
            if front is None and index > lead and (
                    trio.current_time() - self._started_at < NO_READER_WAIT_S
                    and await on_disk(index)):
                # Nobody reads this layer yet and the chunk is on disk: loading it now only
                # pushed the chunks a reader wants first out of memory before it came.
                await self._wait()
                continue
            if (front is None or index <= front[0] + lead
                    or trio.current_time() - front[1] >= READER_IDLE_S):
                return
            await self._wait()

    async def _wait(self) -> None:
        with trio.move_on_after(READER_IDLE_S):
            await self._progress.park()


class Prefetcher:
    def __init__(self, ctx: Context,
                 chunk: Callable[[LayerState, int], Awaitable[ChunkData]],
                 absent: Callable[[LayerState, list[int]], Awaitable[set[int]]],
                 verify: Callable[[LayerState], None]) -> None:
        self.ctx = ctx
        self.chunk = chunk
        self.absent = absent
        self.verify = verify
        self.pacer = Pacer(0.0)  # made again by start(), on the trio clock

    def start(self) -> None:
        """Plan and start prefetch (in the engine's nursery), unless it is off."""
        ctx = self.ctx
        self.pacer = Pacer(trio.current_time())
        if ctx.config.prefetch == "none":
            return
        plan = prefetch_plan(ctx.tree, {d: layer.info for d, layer in ctx.layers.items()},
                             {d: layer.geo for d, layer in ctx.layers.items()},
                             ctx.config.prefetch)
        ctx.planned = {d for d, _ in plan}
        ctx.spawn(self._run, plan)

    def read(self, layer: LayerState, end: int) -> None:
        """A reader got to byte `end` of the layer's stream (paces the prefetch)."""
        self.pacer.read(layer.info.digest, (end - 1) // layer.geo.chunk_size)

    async def _run(self, plan: list[tuple[str, int]]) -> None:
        """Load what model loaders read first, in the order they read it, in the background."""
        ctx = self.ctx
        ctx.counters.prefetch_total = sum(
            ctx.chunk_bytes(ctx.layers[d], i) for d, i in plan)
        # Only the weight stream is paced: a chunk right after the plan's previous
        # one. Headers and small files are single jumps ahead of any reader; pacing
        # them held the whole plan behind the header of a shard far ahead (the reader
        # then fetched on its own and prefetch came in behind it).
        todo = iter([(d, i, k > 0 and plan[k - 1] == (d, i - 1))
                     for k, (d, i) in enumerate(plan)])

        async def worker() -> None:
            for digest, index, streaming in todo:
                layer = ctx.layers[digest]
                if streaming:
                    await self._pace(layer, index)
                if layer.state is not State.POISONED:
                    try:
                        await self.chunk(layer, index)
                    except Exception as exc:
                        ctx.note_error(f"prefetch: {foreign(exc, 'prefetch')}")
                        await trio.sleep(1)
                ctx.counters.prefetch_done += ctx.chunk_bytes(layer, index)

        async with trio.open_nursery() as workers:
            for _ in range(PREFETCH_WORKERS):
                workers.start_soon(worker)
        for layer in ctx.layers.values():
            if ctx.config.prefetch == "all" or layer.info.kind in MODEL_KINDS:
                self.verify(layer)

    async def _pace(self, layer: LayerState, index: int) -> None:
        """At most half a memory tier ahead of a reader of this layer (see Pacer)."""
        lead = max(1, self.ctx.config.memory_bytes // 2 // layer.geo.chunk_size)

        async def on_disk(i: int) -> bool:
            return not await self.absent(layer, [i])

        await self.pacer.pace(layer.info.digest, index, lead, on_disk)
