"""The order in which a mount loads a model before anyone asks: what loaders read first.

Model servers open the small files first (config.json, tokenizer files,
the safetensors index), then read every shard's header to plan the load,
then stream the weights shard by shard. Prefetching in that order makes the
first reads hit the cache and keeps the weight stream ahead of the loader.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import trio

from kitfs.engine.geometry import LayerGeometry
from kitfs.modelkit.manifest import LayerInfo
from kitfs.modelkit.tree import Node, Tree

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
