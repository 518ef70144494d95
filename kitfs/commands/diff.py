"""`kitfs diff`: what differs between two ModelKits, layer by layer and in their Kitfiles.

kit's diff (pkg/cmd/diff) strips a `local://` or `remote://` prefix from each
reference (no prefix: local storage first, then the registry), fetches both
manifests at once, prints "ModelKits are identical" when their digests match,
and otherwise compares config digests, annotations and layers by digest:
shared layers, and layers unique to each, as `Type | Digest | Size` tables. It
exits 0 whether or not they differ. kitfs prints the same sections under the
same titles, and adds what a reviewer of a new version asks next: the path of
every layer, the layers that changed (same type and path, new content, the one
pairing kit's digest sets leave out) and a unified diff of the two Kitfiles.
"""

from __future__ import annotations

import argparse
import sys

from kitfs.commands.command import Command
from kitfs.commands.common import (
    add_network_options,
    client_options,
    inspect_reference,
    run_async,
    shown_path,
)

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from kitfs.inspection import Inspection
    from kitfs.modelkit.manifest import LayerInfo
    from kitfs.oci.reference import Reference
    from kitfs.oci.source import Where

REMOTE_PREFIX = "remote://"
LOCAL_PREFIX = "local://"
RULE = "-" * 39
#: kit shows digests cut to `sha256:` and ten hex digits.
SHORT_DIGEST = 17


def _split(text: str) -> tuple[Where, str]:
    if text.startswith(REMOTE_PREFIX):
        return "remote", text.removeprefix(REMOTE_PREFIX)
    if text.startswith(LOCAL_PREFIX):
        return "local", text.removeprefix(LOCAL_PREFIX)
    return "local-first", text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference1", metavar="REF1",
                   help="the first ModelKit; prefix local:// or remote:// to say where")
    p.add_argument("reference2", metavar="REF2", help="the second ModelKit")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    import json

    import trio

    from kitfs.oci.reference import parse_reference

    targets = []
    for text in (args.reference1, args.reference2):
        where, bare = _split(text)
        targets.append((parse_reference(bare), where))
    options = client_options(args)

    async def both() -> list[Inspection]:
        found: dict[int, Inspection] = {}

        async def one(i: int, ref: Reference, where: Where) -> None:
            # kit diff compares the two ModelKits as they are, not their parents
            found[i], _ = await inspect_reference(ref, options, where=where, toc=False,
                                                  parents=False)

        async with trio.open_nursery() as nursery:  # both at once, as kit fetches them
            for i, (ref, where) in enumerate(targets):
                nursery.start_soon(one, i, ref, where)
        return [found[0], found[1]]

    a, b = run_async(both)
    if args.json:
        json.dump(_json_doc(args, a, b), sys.stdout, indent=2)
        print()
    else:
        _print_text(args, a, b)
    return 0


def _kitfile_diff(args: argparse.Namespace, a: Inspection, b: Inspection) -> list[str]:
    import difflib

    from kitfs.modelkit.kitfile import kitfile_to_yaml

    return list(difflib.unified_diff(
        kitfile_to_yaml(a.view.kitfile).splitlines(keepends=True),
        kitfile_to_yaml(b.view.kitfile).splitlines(keepends=True),
        fromfile=f"{args.reference1} Kitfile", tofile=f"{args.reference2} Kitfile"))


def _annotations_differ(a: Inspection, b: Inspection) -> list[str]:
    """The manifest annotation keys whose values differ (or that one side lacks)."""
    x, y = a.view.annotations, b.view.annotations
    return sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))


def _layer_doc(layer: LayerInfo) -> dict[str, object]:
    return {"type": layer.kind, "path": layer.path, "digest": layer.digest,
            "size": layer.size, "mediaType": layer.media_type}


def _json_doc(args: argparse.Namespace, a: Inspection, b: Inspection) -> dict[str, object]:
    from kitfs.modelkit.layerdiff import compare_layers

    layers = compare_layers(a.view.layers, b.view.layers)

    def side(text: str, ins: Inspection) -> dict[str, object]:
        return {"reference": text, "digest": ins.digest,
                "configDigest": ins.view.config.digest}

    return {
        "modelkit1": side(args.reference1, a),
        "modelkit2": side(args.reference2, b),
        "identical": a.digest == b.digest,
        "sameConfig": a.view.config.digest == b.view.config.digest,
        "annotationsMatch": not _annotations_differ(a, b),
        "annotationsDiffer": _annotations_differ(a, b),
        "kitfileDiff": "".join(_kitfile_diff(args, a, b)),
        "layers": {
            "shared": [{**_layer_doc(y), **({"pathInModelkit1": x.path} if x.path != y.path
                                            else {})} for x, y in layers.shared],
            "changed": [{"type": y.kind, "path": y.path, "modelkit1": _layer_doc(x),
                         "modelkit2": _layer_doc(y)} for x, y in layers.changed],
            "removed": [_layer_doc(x) for x in layers.removed],
            "added": [_layer_doc(y) for y in layers.added],
        },
    }


def _print_text(args: argparse.Namespace, a: Inspection, b: Inspection) -> None:
    from kitfs.modelkit.layerdiff import compare_layers

    if a.digest == b.digest:
        print("ModelKits are identical")
        return
    layers = compare_layers(a.view.layers, b.view.layers)
    print("Comparing:")
    print(f"  ModelKit1: {args.reference1}")
    print(f"  ModelKit2: {args.reference2}")
    print()
    print("Configurations:")
    print(RULE)
    config_a, config_b = a.view.config.digest, b.view.config.digest
    if config_a == config_b:
        print(f"  Configs are identical (Digest: {config_a[:SHORT_DIGEST]})")
    else:
        print("Configs differ:")
        print(f"  ModelKit1 Config Digest: {config_a[:SHORT_DIGEST]}")
        print(f"  ModelKit2 Config Digest: {config_b[:SHORT_DIGEST]}")
    print()
    print("Annotations:")
    print(RULE)
    differ = _annotations_differ(a, b)
    print(f"  Annotations does not match: {', '.join(map(shown_path, differ))}" if differ
          else "  Annotations are identical")
    print()
    print("Kitfile:")
    print(RULE)
    diff = _kitfile_diff(args, a, b)
    if not diff:
        print("  Kitfiles are identical")
    for line in diff:
        print(shown_path(line.rstrip("\n")))
    print()
    print(f"Layers: {len(layers.shared)} shared, {len(layers.changed)} changed, "
          f"{len(layers.removed)} only in ModelKit1, {len(layers.added)} only in ModelKit2")
    print()
    _table("Shared Layers",
           [(y.kind, _moved(x, y), y.digest[:SHORT_DIGEST], _size(y.size))
            for x, y in layers.shared])
    _table("Changed Layers (same type and path, new content)",
           [(y.kind, shown_path(y.path),
             f"{x.digest[:SHORT_DIGEST]} -> {y.digest[:SHORT_DIGEST]}",
             f"{_size(x.size)} -> {_size(y.size)}") for x, y in layers.changed])
    _table(f"Unique Layers to ModelKit1 ({args.reference1})",
           [(x.kind, shown_path(x.path), x.digest[:SHORT_DIGEST], _size(x.size))
            for x in layers.removed])
    _table(f"Unique Layers to ModelKit2 ({args.reference2})",
           [(y.kind, shown_path(y.path), y.digest[:SHORT_DIGEST], _size(y.size))
            for y in layers.added])


def _moved(x: LayerInfo, y: LayerInfo) -> str:
    if x.path == y.path:
        return shown_path(y.path)
    return f"{shown_path(x.path)} -> {shown_path(y.path)}"


def _size(n: int) -> str:
    from kitfs.units import human_bytes

    return human_bytes(n)


def _table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    print(title)
    print(RULE)
    if not rows:
        print("<none>")
        print()
        return
    head = ("Type", "Path", "Digest", "Size")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for row in [head, *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
              + f" | {row[3]}")
    print()


COMMAND = Command(
    name="diff",
    help="compare two ModelKits: layers and Kitfiles (as `kit diff`)",
    description="""\
Compare REF1 and REF2 from their manifests and configs alone (no layer data
is read). With no prefix a reference is looked for in kit's local storage
first, then in its registry; `local://REF` and `remote://REF` say where, as
in `kit diff`. The exit status is 0 whether or not they differ (as kit's).

The report has kit's sections: the config digests, the manifest annotations,
the layers both hold (same digest) and those unique to each, plus a unified
diff of the two Kitfiles and, between the unique ones, the layers that
changed: same type and path, new content. Unique to REF1 means removed in
REF2; unique to REF2, added. --json gives the same as `shared`, `changed`,
`removed` and `added` lists, with full digests.

examples:
  kitfs diff localhost:5000/demo/llm:v1 localhost:5000/demo/llm:v2
  kitfs diff local://registry.example.com/llm:v1 remote://registry.example.com/llm:v1
  kitfs diff mymodel:v1 mymodel:v2 --json | jq '.layers.changed'
""",
    add_arguments=add_arguments,
    run=run,
)
