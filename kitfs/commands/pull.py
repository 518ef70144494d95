"""`kitfs pull`: a ModelKit from a registry into kit's local storage, as `kit pull` stores it."""

from __future__ import annotations

import argparse

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options, client_options, run_async


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REGISTRY/REPOSITORY[:TAG|@DIGEST]")
    p.add_argument("--concurrency", type=int, default=5, metavar="N",
                   help="blobs downloaded at once (default: 5, as kit)")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    from kitfs.oci.reference import parse_reference
    from kitfs.pull import pull
    from kitfs.units import human_bytes

    ref = parse_reference(args.reference)
    options = client_options(args)
    result = run_async(lambda: pull(ref, options, jobs=args.concurrency))
    print(f"pulled {ref} ({result.blobs} blobs, {human_bytes(result.bytes_fetched)} fetched, "
          f"{human_bytes(result.bytes_present)} already in local storage)")
    for parent in result.parents:
        print(f"pulled parent {parent}")
    print(f"{ref.name}@{result.digest}")
    return 0


COMMAND = Command(
    name="pull",
    help="download a ModelKit into kit's local storage (as `kit pull`)",
    description="""\
Download REF's manifest, config and every layer into kit's local storage
($KITOPS_HOME/storage), laid out exactly as `kit pull` lays it out, so that
`kit` and kitfs both see it: `kitfs list`, `kitfs inspect REF`, `kitfs info
REF`, `kitfs tag` and `kitfs push` then work without the registry, and `kitfs
mount`/`kit unpack` of a name you tag it with read it from disk.

Every blob is checked against its digest while it downloads and only then
moved under its final name, so an interrupted pull (Ctrl-C, kill -9, a
registry that goes away, a full disk) leaves nothing half-written there; run
it again and it fetches only what is missing, resuming a blob where it
stopped. Blobs already in local storage are not fetched. A Kitfile whose
model.path names a parent ModelKit has the parent pulled too. A progress bar
is drawn on a terminal.

REF needs a registry (a first path segment with '.' or ':') and at most one
tag; a digest pulls without tagging, as kit does.

examples:
  kitfs pull registry.example.com/team/llama:v1
  kitfs pull localhost:5000/demo/llm@sha256:0f3a...
  kitfs pull registry.example.com/team/llama:v1 &&
    kitfs tag registry.example.com/team/llama:v1 llama:v1
""",
    add_arguments=add_arguments,
    run=run,
)
