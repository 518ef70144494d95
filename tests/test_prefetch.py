"""Prefetch order follows how model loaders read: small files, shard headers, then weights."""

from __future__ import annotations

from kitfs.engine.geometry import plan_layer
from kitfs.engine.prefetch import prefetch_plan
from kitfs.modelkit.manifest import LayerInfo
from kitfs.modelkit.toc import TocEntry
from kitfs.modelkit.tree import Placement, build_tree

MIB = 1 << 20


def layer(digest: str, kind: str, size: int, compression: str = "none") -> LayerInfo:
    return LayerInfo(index=0, digest=digest, size=size, media_type="x", kind=kind,  # type: ignore[arg-type]
                     layer_kind=kind, fmt="tar", compression=compression,  # type: ignore[arg-type]
                     family="kitops", path="./x", clean_path="x", name=None, entry_index=0,
                     annotations={}, diff_id=None)


def test_order_small_files_headers_weights_then_other_layers() -> None:
    model_d, data_d = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    model = Placement(model_d, (
        TocEntry("m/config.json", "file", 0o644, 100, 512),
        TocEntry("m/model-00001.safetensors", "file", 0o644, 10 * MIB, 1024),
        TocEntry("m/model-00002.safetensors", "file", 0o644, 10 * MIB, 1024 + 10 * MIB + 512),
        TocEntry("m/tokenizer.json", "file", 0o644, 2000, 21 * MIB),
    ))
    data = Placement(data_d, (TocEntry("d/train.csv", "file", 0o644, 3 * MIB, 512),))
    tree = build_tree([model, data], None)
    infos = {model_d: layer(model_d, "model", 22 * MIB), data_d: layer(data_d, "dataset", 4 * MIB)}
    geos = {d: plan_layer(i, None, 4 * MIB) for d, i in infos.items()}
    plan = prefetch_plan(tree, infos, geos, "model")
    # config.json (chunk 0) and tokenizer.json (chunk 5) first, then headers (0, 2), then weights
    assert plan[:3] == [(model_d, 0), (model_d, 5), (model_d, 2)]
    assert sorted(plan) == [(model_d, i) for i in range(6)]
    assert all(d == model_d for d, _ in plan)  # datasets only with "all"
    everything = prefetch_plan(tree, infos, geos, "all")
    assert everything[-1][0] == data_d and len(everything) == 7
    assert prefetch_plan(tree, infos, geos, "none") == []


def test_streamed_layers_are_asked_for_once() -> None:
    d = "sha256:" + "c" * 64
    tree = build_tree([Placement(d, (TocEntry("w.bin", "file", 0o644, 30 * MIB, 512),))], None)
    infos = {d: layer(d, "model", 20 * MIB, "gzip")}
    geos = {d: plan_layer(infos[d], None, 8 * MIB)}
    assert geos[d].shape == "stream"
    assert prefetch_plan(tree, infos, geos, "model") == [(d, 0)]
