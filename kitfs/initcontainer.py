"""`kitfs-init`: kit's init-container contract (ghcr.io/kitops-ml/kitops-init), served by kitfs.

The environment kit's image reads (build/dockerfiles/init/entrypoint.sh), with
its defaults:

- MODELKIT_REF (required): the ModelKit to unpack;
- UNPACK_PATH (default /home/user/modelkit/): where, unless EXTRA_FLAGS has -d/--dir;
- UNPACK_FILTER (default `model`): given as --filter, so what it selects is unpacked
  (a --filter in EXTRA_FLAGS adds to it, as in kit);
- EXTRA_FLAGS (default `--ignore-existing`, only when empty): more `kitfs unpack` flags;
- COSIGN_KEY, or COSIGN_CERT_IDENTITY with COSIGN_CERT_OIDC_ISSUER: verify the
  ModelKit's signature first. kitfs cannot verify signatures yet, so any of them
  set is refused (signature_check), never skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from kitfs.entrypoint import (
    parse_unpack,
    required,
    run_entry,
    say,
    say_version,
    shown_flags,
    split_flags,
    term_as_interrupt,
)
from kitfs.errors import SignatureError

PROG = "kitfs-init"
DEFAULT_UNPACK_PATH = "/home/user/modelkit/"
DEFAULT_FILTER = "model"
DEFAULT_FLAGS = ("--ignore-existing",)
COSIGN_VARIABLES = ("COSIGN_KEY", "COSIGN_CERT_IDENTITY", "COSIGN_CERT_OIDC_ISSUER")


def signature_check(reference: str, environ: Mapping[str, str]) -> str:
    """The signature check the COSIGN_* variables ask for, before anything is unpacked; the
    log line to print when none is asked for.

    kit runs `cosign verify` here. Until kitfs verifies signatures itself, asking for
    it fails: a user who set a key wants no unverified model to run. (kit also skips
    the check silently when only one of the keyless pair is set; kitfs refuses that
    too.) The signatures work replaces the body of this function.
    """
    asked = [name for name in COSIGN_VARIABLES if environ.get(name, "").strip()]
    if not asked:
        return "Signature verification is disabled"
    raise SignatureError(
        f"{reference}: {' and '.join(asked)} asks for signature verification, which is not "
        f"available in this kitfs yet; refusing to unpack an unverified ModelKit (unset "
        f"{', '.join(COSIGN_VARIABLES)} to unpack without a check)")


def prepare(environ: Mapping[str, str]) -> argparse.Namespace:
    """The `kitfs unpack` that kit's init entrypoint would run, as parsed arguments."""
    reference = required(environ, "MODELKIT_REF")
    path = environ.get("UNPACK_PATH") or DEFAULT_UNPACK_PATH
    unpack_filter = environ.get("UNPACK_FILTER") or DEFAULT_FILTER
    flags = split_flags("EXTRA_FLAGS", environ) or list(DEFAULT_FLAGS)
    args = parse_unpack("EXTRA_FLAGS", flags, reference, (f"--filter={unpack_filter}",))
    say(signature_check(reference, environ))
    say_version(PROG)
    shown = shown_flags(flags)
    if args.dir is None:
        args.dir = path
        say(f"Unpacking modelkit {reference} to {path} with filter '{unpack_filter}'. "
            f"Additional flags: {shown}")
    else:
        say(f"Unpacking modelkit {reference} with flags '--filter={unpack_filter} {shown}'")
    return args


def main() -> None:
    term_as_interrupt()
    sys.exit(run_entry(lambda _scratch: prepare(os.environ)))


if __name__ == "__main__":
    main()
