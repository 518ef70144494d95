"""Everything a mount serves from, built in one place: source, tree, caches, engine.

The daemon, the tests and the benchmarks open a ModelKit the same way, so
what they measure is what users run.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from kitfs.cache.store import ChunkStore
from kitfs.cache.tocs import TocCache
from kitfs.engine.reader import Engine, EngineConfig
from kitfs.inspection import Inspection, file_tree_and_layouts, inspect
from kitfs.modelkit.filters import FilterSet
from kitfs.modelkit.toc import LayerToc
from kitfs.modelkit.tree import Tree
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import Reference
from kitfs.oci.source import BlobSource, Where, open_source


@dataclass
class OpenedKit:
    reference: Reference
    source: BlobSource
    inspection: Inspection
    tree: Tree
    engine: Engine


@contextlib.asynccontextmanager
async def open_kit(
    reference: Reference,
    options: ClientOptions,
    cache_dir: Path,
    *,
    filters: FilterSet | None = None,
    config: EngineConfig | None = None,
    cache_budget: int | None = None,
    where: Where = "reference",
) -> AsyncIterator[OpenedKit]:
    """Resolve, read the metadata (tables of contents cached by layer digest), build the engine.

    Fetches no file data. The caller starts the engine's background work with
    `await kit.engine.start(nursery)`; the source is closed on exit. `where`:
    kit's local storage or a registry, as oci/source.py's open_source says.
    """
    source = open_source(reference, options, where=where)
    try:
        # No fsync per chunk: every chunk file carries its xxh3, so one torn by a
        # crash reads as absent and is fetched again, never served; syncing each
        # chunk cost more I/O wait than the fetch itself (design.md asked for it).
        store = ChunkStore(cache_dir, budget=cache_budget, sync=False)
        tocs = TocCache(cache_dir)
        ins = await inspect(source)
        tree, layouts = await file_tree_and_layouts(source, ins, filters or FilterSet(), tocs)
        layer_tocs: dict[str, LayerToc] = {}
        if ins.toc is not None:
            layer_tocs = {layer.digest: layer for layer in ins.toc.layers}
        used = {n.layer for n in tree.files() if n.layer is not None}
        layers = [layer for layer in ins.view.layers if layer.digest in used]
        engine = Engine(source, layers, layer_tocs, tree, store, config or EngineConfig(),
                        toc_cache=tocs, layouts=layouts)
        yield OpenedKit(reference.with_digest(ins.digest), source, ins, tree, engine)
    finally:
        await source.aclose()
