"""`kitfs pack`: a directory with a Kitfile becomes a ModelKit, pushed or stored for kit."""

from __future__ import annotations

import argparse
from pathlib import Path

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options, client_options, run_async
from kitfs.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR",
                   help="the pack context (holds the Kitfile)")
    p.add_argument("-t", "--tag", required=True, metavar="REF",
                   help="where to put it: [REGISTRY/]REPO:TAG[,TAG2...]")
    p.add_argument("-f", "--file", type=Path, metavar="KITFILE",
                   help="Kitfile to use (default: DIR/Kitfile)")
    p.add_argument("--compression", choices=("none", "gzip", "zstd"), default="none",
                   help="layer compression (default: none; weights barely compress and "
                        "uncompressed layers are fastest to mount)")
    p.add_argument("--work-dir", type=Path, metavar="DIR",
                   help="where layers are staged before a push (default: $TMPDIR); needs "
                        "room for the packed model")
    p.add_argument("--jobs", type=int, default=4, metavar="N",
                   help="blobs pushed in parallel (default: 4)")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    from kitfs.oci.reference import parse_reference
    from kitfs.pack import PackRequest, pack
    from kitfs.units import human_bytes

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    ref = parse_reference(args.tag)
    req = PackRequest(
        context=Path(args.directory), reference=ref, kitfile=args.file,
        compression=args.compression, work_dir=args.work_dir, jobs=args.jobs,
    )
    options = client_options(args)
    result = run_async(lambda: pack(req, options))
    size = sum(layer.blob_size for layer in result.layers)
    where = "kit local storage" if ref.is_local else ref.registry
    print(f"packed {len(result.layers)} layers ({human_bytes(size)}) to {where}")
    for tag in ref.tags:
        print(f"{ref.name}:{tag}@{result.digest}")
    return 0


COMMAND = Command(
    name="pack",
    help="pack a directory into a ModelKit and push or store it",
    description="""\
Pack DIR (which holds a Kitfile) into a ModelKit that `kit` reads, exactly as
`kit pack` lays it out, and push it to REF's registry; a REF without a
registry (e.g. `mymodel:v1`) goes to kit's local storage, where `kit list`
sees it. The same directory always packs to the same layer digests.

kitfs also stores a table of contents (file offsets, BLAKE3 of every 2 MiB
chunk and, uncompressed, of every 256 KiB block) with the ModelKit, as an OCI
referrer, so that `kitfs mount` starts at once, verifies every byte it reads,
and fetches only the blocks a random reader needs. `kit` ignores it.

A model.path naming another ModelKit (registry/repo:tag) builds on it as
`kit pack` does: the parent must be readable (kit's local storage, then its
registry), its layers are not copied, and nothing at a path its Kitfile names
is packed again.

No Kitfile yet? `kitfs init DIR` writes one, as `kit init` does.

examples:
  kitfs pack . -t localhost:5000/demo/llm:v1
  kitfs pack ./model-dir -t registry.example.com/llm:v1,latest --compression zstd
""",
    add_arguments=add_arguments,
    run=run,
)
