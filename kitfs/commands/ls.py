"""`kitfs ls`: the files a mount (or `kit unpack`) of a ModelKit would show, without their data."""

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    p.add_argument("-r", "--remote", action="store_true",
                   help="ask the registry, not kit's local storage (where `pull` keeps a "
                        "registry's ModelKits)")
    p.add_argument("--filter", action="append", metavar="FILTER", default=[],
                   help="as `kit unpack --filter`: TYPES[:IDS], TYPES from kitfile, model, "
                        "datasets, code, docs, prompts (repeatable)")
    p.add_argument("-l", "--long", action="store_true", help="show mode and layer too")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    import json
    import stat

    from kitfs.modelkit.filters import FilterSet
    from kitfs.oci.reference import parse_reference
    from kitfs.units import human_bytes

    filters = FilterSet.parse(args.filter)
    ref = parse_reference(args.reference)
    options = client_options(args)
    _, tree = run_async(lambda: inspect_reference(
        ref, options, where="remote" if args.remote else "local-first", tree_filters=filters))
    assert tree is not None
    if args.json:
        doc = [
            {"path": n.path, "type": n.kind, "mode": oct(n.mode), "size": n.size,
             "layer": n.layer, "offset": n.offset}
            for n in tree.walk()
        ]
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    for node in tree.walk():
        name = shown_path(node.path) + ("/" if node.kind == "dir" else "")
        if args.long:
            mode = stat.filemode((stat.S_IFDIR if node.kind == "dir" else stat.S_IFREG)
                                 | node.mode)
            layer = (node.layer or ("config" if node.inline is not None else ""))[:19]
            print(f"{mode} {node.size:>14} {layer:<19} {name}")
        else:
            size = "" if node.kind == "dir" else human_bytes(node.size)
            print(f"{size:>10}  {name}")
    files = sum(1 for _ in tree.files())
    print(f"{files} files, {human_bytes(tree.total_size)}")
    return 0


COMMAND = Command(
    name="ls",
    help="list the files a mount (or `kit unpack`) of a ModelKit would show",
    description="""\
List every file of REF with its size and the layer it comes from, without
downloading file data: kitfs reads its table of contents where one exists,
otherwise the tar headers of each layer with range requests. A ModelKit in
kit's local storage (packed there, or pulled from REF's registry) is read from
there first; --remote asks the registry only. When the Kitfile's model.path
names another ModelKit, that parent's model layers are listed where `kit
unpack` writes them (parents are looked for as kit does: local storage
first, then their registry).

examples:
  kitfs ls localhost:5000/demo/llm:v1
  kitfs ls localhost:5000/demo/llm:v1 --filter model --long
""",
    add_arguments=add_arguments,
    run=run,
)
