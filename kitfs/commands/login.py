"""`kitfs login`: check credentials against a registry and save them where `kit` reads them."""

from __future__ import annotations

import argparse
import sys

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options, client_options, run_async
from kitfs.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", required=True)
    p.add_argument("-p", "--password", help="the password (prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    from kitfs.oci.credentials import login

    if args.password_stdin and args.password is not None:
        raise UsageError("give either --password or --password-stdin, not both")
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    else:
        import getpass

        if not sys.stdin.isatty():
            raise UsageError("no password: use --password-stdin to read it from a pipe")
        password = getpass.getpass(f"Password for {args.username}@{args.registry}: ")
    if not password:
        raise UsageError("empty password")
    options = client_options(args)
    run_async(lambda: login(args.registry, args.username, password, options))
    print(f"Login succeeded: credentials for {args.registry} saved")
    return 0


COMMAND = Command(
    name="login",
    help="log in to a registry (writes the credentials `kit` reads)",
    description="""\
Check USERNAME and the password against REGISTRY and, if they work, save them
in $KITOPS_HOME/credentials.json, the file `kit login` writes.

examples:
  echo "$TOKEN" | kitfs login ghcr.io -u me --password-stdin
""",
    add_arguments=add_arguments,
    run=run,
)
