"""`kitfs tag`: another name for a ModelKit in kit's local storage, as `kit tag` gives it.

kit (pkg/cmd/tag/tag.go) resolves SOURCE in its repository's local index; a
TARGET in the same repository only gets the tag, one in another repository
(another name, or a registry's name for a later `kit push`) gets the manifest
listed in that repository's index too. Blobs are shared by every repository
of the store, so nothing is copied.
"""

from __future__ import annotations

import argparse

from kitfs.commands.command import Command
from kitfs.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="[REGISTRY/]REPO[:TAG|@DIGEST] in local storage")
    p.add_argument("target", metavar="TARGET", help="[REGISTRY/]REPO[:TAG[,TAG2...]]")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kitfs.oci.credentials import kitops_home
    from kitfs.oci.layout import LocalStorage, display_name
    from kitfs.oci.reference import parse_reference

    source = parse_reference(args.source)
    target = parse_reference(args.target)
    if target.digest is not None:
        raise UsageError(f"cannot tag with a digest: {args.target} (give TARGET a tag)")
    storage = LocalStorage.for_home(Path(kitops_home(args.kitops_home)))
    desc = storage.repo(source.name).resolve(source.target)
    repo = storage.repo(target.name)
    repo.add(desc)
    for tag in target.tags:
        repo.tag(desc, tag)
    repo.save()
    shown = display_name(str(source))
    for tag in target.tags:
        print(f"Modelkit {shown} tagged as {display_name(f'{target.name}:{tag}')}",
)
    return 0


COMMAND = Command(
    name="tag",
    help="give a ModelKit in kit's local storage another name (as `kit tag`)",
    description="""\
Create or move the tag TARGET so that it names the ModelKit SOURCE, in kit's
local storage (no registry is contacted). TARGET may be in another
repository, or carry a registry's name so that `kitfs push TARGET` (or `kit
push`) sends it there; nothing is copied, local repositories share their
blobs.

examples:
  kitfs tag mymodel:latest mymodel:v1.0.0
  kitfs tag localhost:5000/demo/llm:v1 llm:v1
  kitfs tag mymodel:v1 registry.example.com/team/mymodel:v1 &&
    kitfs push registry.example.com/team/mymodel:v1
""",
    add_arguments=add_arguments,
    run=run,
)
