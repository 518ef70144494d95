"""`kitfs-kserve`: KServe's storage-initializer contract for `kit://` URIs, served by kitfs.

A KServe ClusterStorageContainer runs its container with two arguments,
[storage-uri, dest-path] (the InferenceService's storageUri and usually
/mnt/models), and the pod succeeds to start only if it exits 0. kit's image
(build/dockerfiles/KServe/entrypoint.sh) strips `kit://`, logs in with
KIT_USER / KIT_PASSWORD when both are set, and runs
`kit unpack REF -d DEST $KIT_UNPACK_FLAGS`; so does this, in-process.

Exit 0 means every file is in place and verified: `kitfs unpack` renames a file
to its final name only after its bytes matched the ModelKit's digests.

Credentials given in KIT_USER / KIT_PASSWORD are checked against REF's registry
and kept for this run only, in a private kitops home inside a 0700 temporary
directory removed on exit (entrypoint.scratch_directory); KIT_PASSWORD is
never printed, and is dropped from os.environ once read, so that no process
this one starts inherits it. That does not hide it on the node: the kernel
keeps the environment the process started with, and /proc/PID/environ shows
it to root and to the same user for the life of the process (as it does for
kit's own image); a Secret mounted as a file would be the way to avoid that.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

from kitfs.entrypoint import (
    parse_unpack,
    run_entry,
    say,
    say_version,
    shown_flags,
    split_flags,
    term_as_interrupt,
)
from kitfs.errors import UsageError

PROG = "kitfs-kserve"
SCHEME = "kit://"
FLAGS = "KIT_UNPACK_FLAGS"
#: kit's image logs in to ECR or Google Artifact Registry from these; kitfs does not (yet).
CLOUD_LOGIN_VARIABLES = ("AWS_ROLE_ARN", "GCP_WIF")


def reference_of(uri: str) -> str:
    """REF out of `kit://REF`; any other storage URI is refused, naming what is accepted."""
    if not uri.startswith(SCHEME) or not uri[len(SCHEME):].strip():
        raise UsageError(f"storage URI {uri!r}: {PROG} accepts only kit://REGISTRY/REPO[:TAG]"
                         "[@DIGEST]")
    return uri[len(SCHEME):]


def prepare(argv: list[str], environ: MutableMapping[str, str], scratch: Path
            ) -> argparse.Namespace:
    """The `kitfs unpack` kit's KServe entrypoint would run, as parsed arguments; logs in
    first when KIT_USER and KIT_PASSWORD are set (credentials kept in `scratch`, which
    run_entry removes)."""
    if len(argv) != 2:
        raise UsageError(f"usage: {PROG} kit://REF DEST-PATH (got {len(argv)} arguments)")
    uri, dest = argv
    reference = reference_of(uri)
    flags = split_flags(FLAGS, environ)
    args = parse_unpack(FLAGS, flags, reference)
    if args.dir is not None:
        raise UsageError(f"{FLAGS}: -d/--dir makes no sense here: KServe gives the "
                         f"destination ({dest})")
    args.dir = dest
    say_version(PROG)
    user = environ.get("KIT_USER", "")
    # A secret made with --from-file often ends in a newline; kit's `echo | kit login
    # --password-stdin` drops it too.
    password = environ.pop("KIT_PASSWORD", "").rstrip("\r\n")
    if user and password:
        if args.kitops_home:
            raise UsageError(f"{FLAGS}: --config cannot be used with KIT_USER/KIT_PASSWORD")
        _login(args, reference, user, password, scratch / "home")
    else:
        if user or password:
            say("Only one of KIT_USER and KIT_PASSWORD is set: not logging in")
        for name in CLOUD_LOGIN_VARIABLES:
            if environ.get(name):
                say(f"{name} is set: {PROG} does not log in to cloud registries from it; "
                    "going on with the credentials this container has, if any (or set "
                    "KIT_USER/KIT_PASSWORD)")
    say(f"Unpacking {reference} to {dest}")
    say(f"Unpack options: {shown_flags(flags)}")
    return args


def _login(args: argparse.Namespace, reference: str, user: str, password: str,
           home: Path) -> None:
    from kitfs.commands.common import client_options, run_async
    from kitfs.oci.credentials import login
    from kitfs.oci.reference import parse_reference

    ref = parse_reference(reference)
    if ref.is_local:
        raise UsageError(f"{reference} names kit's local storage, not a registry: "
                         "KIT_USER/KIT_PASSWORD have nothing to log in to")
    registry = ref.registry
    say(f"Logging in using repo url: {registry}")
    args.kitops_home = str(home)
    options = client_options(args)
    run_async(lambda: login(registry, user, password, options, file_only=True))


def show_kitfile(args: argparse.Namespace) -> None:
    """kit's entrypoint prints the unpacked Kitfile: what was deployed is in the log."""
    kitfile = Path(args.dir) / "Kitfile"
    if kitfile.is_file():
        say("Unpacked modelkit:")
        say(kitfile.read_text(errors="replace").rstrip("\n"))


def main() -> None:
    term_as_interrupt()
    sys.exit(run_entry(lambda scratch: prepare(sys.argv[1:], os.environ, scratch),
                       show_kitfile))


if __name__ == "__main__":
    main()
