"""`kitfs logout`: forget what `kitfs login` or `kit login` saved for a registry."""

from __future__ import annotations

import argparse

from kitfs.commands.command import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("registry", metavar="REGISTRY")


def run(args: argparse.Namespace) -> int:
    from kitfs.oci.credentials import remove_login

    if remove_login(args.registry, getattr(args, "kitops_home", None)):
        print(f"Removed credentials for {args.registry}")
    else:
        print(f"No credentials were saved for {args.registry}")
    return 0


COMMAND = Command(
    name="logout",
    help="forget the credentials saved for a registry",
    description="""\
Remove REGISTRY from $KITOPS_HOME/credentials.json.

examples:
  kitfs logout ghcr.io
""",
    add_arguments=add_arguments,
    run=run,
)
