"""The order in which a mount loads a model before anyone asks: what loaders read first.

Model servers open the small files first (config.json, tokenizer files,
the safetensors index), then read every shard's header to plan the load,
then stream the weights shard by shard. Prefetching in that order makes the
first reads hit the cache and keeps the weight stream ahead of the loader.
"""

from __future__ import annotations

from collections.abc import Mapping

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
