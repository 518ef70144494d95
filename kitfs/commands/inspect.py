"""`kitfs inspect`: a ModelKit's manifest, Kitfile and layers, read from manifest and config."""

from __future__ import annotations

import argparse
import sys

from kitfs.commands.command import Command
from kitfs.commands.common import (
    add_network_options,
    client_options,
    inspect_reference,
    run_async,
)

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from collections.abc import Sequence

    from kitfs.inspection import Inspection
    from kitfs.modelkit.manifest import LayerInfo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    p.add_argument("-r", "--remote", action="store_true",
                   help="ask the registry, not kit's local storage (where `pull` keeps a "
                        "registry's ModelKits)")
    p.add_argument("--json", action="store_true", help="print everything as one JSON document")
    add_network_options(p)


def _layer_rows(ins: Inspection, layers: Sequence[LayerInfo] | None = None
                ) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for layer in ins.view.layers if layers is None else layers:
        toc = ins.toc.layer(layer.digest) if ins.toc is not None else None
        rows.append({
            "type": layer.kind, "path": layer.path, "name": layer.name,
            "mediaType": layer.media_type, "format": layer.fmt,
            "compression": layer.compression, "digest": layer.digest, "size": layer.size,
            "diffId": layer.diff_id, "files": None if toc is None else sum(
                1 for e in toc.entries if e.kind == "file"),
            "chunks": None if toc is None else len(toc.chunks),
        })
    return rows


def run(args: argparse.Namespace) -> int:
    import json

    from kitfs.modelkit.kitfile import kitfile_to_yaml
    from kitfs.oci.layout import display_name
    from kitfs.oci.reference import parse_reference
    from kitfs.units import human_bytes

    ref = parse_reference(args.reference)
    options = client_options(args)
    ins, _ = run_async(lambda: inspect_reference(
        ref, options, where="remote" if args.remote else "local-first"))
    view = ins.view
    kitfile_yaml = kitfile_to_yaml(view.kitfile.without_layer_digests())
    if args.json:
        doc = {
            "reference": args.reference,
            "digest": ins.digest,
            "manifest": ins.manifest_json,
            "config": json.loads(ins.config) if ins.config and view.family == "kitops"
            else None,
            "kitfile": kitfile_yaml,
            "kitfileSource": view.kitfile_source,
            "layers": _layer_rows(ins),
            "tableOfContents": view.annotations.get("dev.kitfs.toc.digest"),
            "parents": [
                {"reference": str(p.reference), "digest": p.inspection.digest,
                 "layers": _layer_rows(p.inspection, p.model_layers)}
                for p in ins.parents
            ],
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    pkg = view.kitfile.package
    print(f"ModelKit    {args.reference}")
    print(f"Digest      {ins.digest}")
    kind = f"{view.family}" + (f", made by kit {view.cli_version}" if view.cli_version else "")
    print(f"Format      {kind}")
    if view.created:
        print(f"Created     {view.created}")
    if pkg.name or pkg.version:
        print(f"Package     {pkg.name} {pkg.version}".rstrip())
    total = sum(layer.size for layer in view.layers)
    print(f"Size        {human_bytes(total)} in {len(view.layers)} layers")
    if ins.parents:
        inherited = [layer for p in ins.parents for layer in p.model_layers]
        chain = " => ".join(display_name(str(p.reference)) for p in ins.parents)
        count = f"{len(inherited)} model layer" + ("" if len(inherited) == 1 else "s")
        print(f"Parents     {chain} (via model.path: {count}, "
              f"{human_bytes(sum(layer.size for layer in inherited))})")
    toc = view.annotations.get("dev.kitfs.toc.digest")
    print("Index       " + (f"kitfs table of contents {toc}" if ins.toc else
                           "none (mounts read tar headers on demand)"))
    print("\nKitfile:")
    for line in kitfile_yaml.rstrip("\n").splitlines():
        print(f"  {line}")
    print("\nLayers:")
    _print_layers(_layer_rows(ins))
    for parent in ins.parents:
        # kit unpack writes these where unpacking the parent alone would; so a mount shows them
        print(f"\nModel layers of parent {display_name(str(parent.reference))} "
              f"({parent.inspection.digest}):")
        _print_layers(_layer_rows(parent.inspection, parent.model_layers))
    return 0


def _print_layers(rows: list[dict[str, object]]) -> None:
    from kitfs.units import human_bytes

    width = max([len(str(r["path"])) for r in rows] + [4])
    print(f"  {'TYPE':<9} {'PATH':<{width}} {'FORMAT':<9} {'SIZE':>10}  DIGEST")
    for r in rows:
        fmt = str(r["format"]) + ("" if r["compression"] == "none" else f"+{r['compression']}")
        print(f"  {r['type']!s:<9} {r['path']!s:<{width}} {fmt:<9} "
              f"{human_bytes(int(str(r['size']))):>10}  {str(r['digest'])[:19]}")


COMMAND = Command(
    name="inspect",
    help="show a ModelKit's manifest, Kitfile and layers",
    description="""\
Fetch only the manifest and config of REF and show what it holds: its digest,
the Kitfile, and every layer with its type, path, format and size. Works for
ModelKits made by kitfs and by every generation of `kit`, and for ModelPack
manifests. (`kitfs info` prints just the Kitfile, as `kit info` does.)

A Kitfile whose model.path names another ModelKit has that parent (and its
own parents) followed as `kit unpack` follows them: the parents and the
model layers they add to a mount are listed too (--json: "parents").

Like `kit inspect`, kitfs looks in kit's local storage first (where `kitfs
pull` and `kit pull` keep a registry's ModelKit under its registry name), so
a pulled ModelKit inspects offline; unlike kit, it then asks the registry.
--remote asks the registry only.

examples:
  kitfs inspect localhost:5000/demo/llm:v1
  kitfs inspect --remote localhost:5000/demo/llm:v1
  kitfs inspect mymodel:v1 --json | jq .layers
""",
    add_arguments=add_arguments,
    run=run,
)
