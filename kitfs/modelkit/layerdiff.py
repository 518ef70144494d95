"""Two ModelKits' layers side by side, for `kitfs diff`.

kit's diff (pkg/cmd/diff/diff.go, CompareManifests) sorts layers into those
both hold (by digest) and those unique to each. A layer whose content
changed is then one unique to each side; pairing those by type and path
says what a reviewer asks: which entry of the Kitfile got new bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kitfs.modelkit.manifest import LayerInfo


@dataclass(frozen=True)
class LayerDiff:
    #: Same digest in both: (ModelKit1's layer, ModelKit2's), in ModelKit2's order.
    shared: list[tuple[LayerInfo, LayerInfo]]
    #: Same type and cleaned path, different digest.
    changed: list[tuple[LayerInfo, LayerInfo]]
    #: Only in ModelKit1, in its order.
    removed: list[LayerInfo]
    #: Only in ModelKit2, in its order.
    added: list[LayerInfo]


def compare_layers(a: tuple[LayerInfo, ...], b: tuple[LayerInfo, ...]) -> LayerDiff:
    """Match by digest first (a layer both hold once each is shared once), then by place."""
    by_digest: dict[str, list[LayerInfo]] = {}
    for layer in a:
        by_digest.setdefault(layer.digest, []).append(layer)
    shared: list[tuple[LayerInfo, LayerInfo]] = []
    only_b: list[LayerInfo] = []
    for layer in b:
        same = by_digest.get(layer.digest)
        if same:
            shared.append((same.pop(0), layer))
        else:
            only_b.append(layer)
    taken = {x.index for x, _ in shared}
    only_a = [layer for layer in a if layer.index not in taken]
    by_place: dict[tuple[str, str], list[LayerInfo]] = {}
    for layer in only_a:
        by_place.setdefault((layer.kind, layer.clean_path), []).append(layer)
    changed: list[tuple[LayerInfo, LayerInfo]] = []
    added: list[LayerInfo] = []
    for layer in only_b:
        before = by_place.get((layer.kind, layer.clean_path))
        if before:
            changed.append((before.pop(0), layer))
        else:
            added.append(layer)
    paired = {x.index for x, _ in changed}
    return LayerDiff(shared, changed, [x for x in only_a if x.index not in paired], added)
