"""`kitfs push`: a ModelKit from kit's local storage to a registry, as `kit push` sends it."""

from __future__ import annotations

import argparse

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options, client_options, run_async
from kitfs.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="the ModelKit in kit's local storage: [REGISTRY/]REPO[:TAG|@DIGEST]")
    p.add_argument("destination", metavar="DESTINATION", nargs="?",
                   help="where to push it: REGISTRY/REPO[:TAG[,TAG2...]|@DIGEST] (default: "
                        "SOURCE, which must then name a registry)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="blobs uploaded at once (default: 4)")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    from kitfs.oci.layout import display_name
    from kitfs.oci.reference import parse_reference
    from kitfs.push import push
    from kitfs.units import human_bytes

    if args.concurrency < 1:
        raise UsageError(f"invalid argument for concurrency ({args.concurrency}): "
                         "must be at least 1")
    source = parse_reference(args.source)
    dest = parse_reference(args.destination) if args.destination else None
    options = client_options(args)
    result = run_async(lambda: push(source, dest, options, jobs=args.concurrency))
    print(f"pushed {display_name(str(result.source))} to {result.destination.registry} "
          f"({result.blobs} blobs, "
          f"{human_bytes(result.bytes_uploaded)} uploaded, "
          f"{human_bytes(result.bytes_skipped)} already there)")
    for target in result.targets:
        sep = "@" if target.startswith("sha256:") else ":"
        suffix = "" if sep == "@" else f"@{result.digest}"
        print(f"{result.destination.name}{sep}{target}{suffix}")
    return 0


COMMAND = Command(
    name="push",
    help="upload a ModelKit from kit's local storage to a registry (as `kit push`)",
    description="""\
Push SOURCE, a ModelKit in kit's local storage (what `kitfs pack` or `kit
pack` stored, or `kitfs pull`/`kit pull` fetched), to a registry: to
DESTINATION if given, else to the registry SOURCE names (it must then have
been tagged with that name locally, e.g. with `kitfs tag`).

Blobs the registry already has are skipped, blobs in another repository of
the same registry are mounted from it rather than uploaded, and the manifest
goes last, as the same bytes as in local storage: the ModelKit keeps its
digest. A kitfs table of contents stored with it is pushed and attached as an
OCI referrer (kit ignores it).

examples:
  kitfs push mymodel:v1 registry.example.com/team/mymodel:v1
  kitfs push registry.example.com/team/mymodel:v1
  kitfs push mymodel@sha256:0f3a... localhost:5000/demo/mymodel:v1,latest
""",
    add_arguments=add_arguments,
    run=run,
)
