"""Everything a mount serves from, built in one place: source, tree, caches, engine.

The daemon, the tests and the benchmarks open a ModelKit the same way, so
what they measure is what users run.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kitfs.cache.store import ChunkStore
from kitfs.cache.tocs import TocCache
from kitfs.engine.reader import Engine, EngineConfig
from kitfs.inspection import Inspection, file_tree_and_layouts
from kitfs.modelkit.filters import FilterSet
from kitfs.modelkit.manifest import LayerInfo
from kitfs.modelkit.toc import LayerToc
from kitfs.modelkit.tree import Tree
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import Reference
from kitfs.oci.source import BlobSource, Where
from kitfs.parents import open_modelkit

if TYPE_CHECKING:
    from kitfs.enforcement import SignatureGate


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
    where: Where = "local-first",
    gate: SignatureGate | None = None,
) -> AsyncIterator[OpenedKit]:
    """Resolve, read the metadata (tables of contents cached by layer digest), build the engine.

    A ModelKit in kit's local storage is served from there, a registry's one too
    once pulled (as `kit unpack` finds it: local storage first; `where` says
    otherwise, as oci/source.py's open_source reads it); so is each parent
    ModelKit its `model.path` names, whose model layers the tree holds and the
    source serves (kitfs/parents.py). Fetches no file data. The caller starts the
    engine's background work with `await kit.engine.start(nursery)`; the sources are
    closed on exit. A `gate` checks every ModelKit's signatures before its files are read.
    """
    # What each registry reference resolved to is kept beside the chunks, so a warmed
    # ModelKit opens with its registry down (kitfs/offline.py).
    options = replace(options, metadata_cache=str(cache_dir))
    async with open_modelkit(reference, options, where=where, gate=gate) as (source, ins):
        # No fsync per chunk: every chunk file carries its xxh3, so one torn by a
        # crash reads as absent and is fetched again, never served; syncing each
        # chunk cost more I/O wait than the fetch itself (design.md asked for it).
        store = ChunkStore(cache_dir, budget=cache_budget, sync=False)
        tocs = TocCache(cache_dir)
        tree, layouts = await file_tree_and_layouts(source, ins, filters or FilterSet(), tocs)
        used = {n.layer for n in tree.files() if n.layer is not None}
        layers: dict[str, LayerInfo] = {}
        layer_tocs: dict[str, LayerToc] = {}
        for owner, layer in ins.placed_layers():  # a parent's model layers too
            if layer.digest not in used:
                continue
            layers.setdefault(layer.digest, layer)
            toc = owner.toc.layer(layer.digest) if owner.toc is not None else None
            if toc is not None:
                layer_tocs.setdefault(layer.digest, toc)
        engine = Engine(source, list(layers.values()), layer_tocs, tree, store,
                        config or EngineConfig(), toc_cache=tocs, layouts=layouts)
        yield OpenedKit(reference.with_digest(ins.digest), source, ins, tree, engine)
