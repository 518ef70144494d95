"""`kitfs-init`: kit's init-container contract (ghcr.io/kitops-ml/kitops-init), served by kitfs.

The environment kit's image reads (build/dockerfiles/init/entrypoint.sh), with
its defaults:

- MODELKIT_REF (required): the ModelKit to unpack;
- UNPACK_PATH (default /home/user/modelkit/): where, unless EXTRA_FLAGS has -d/--dir;
- UNPACK_FILTER (default `model`): given as --filter, so what it selects is unpacked
  (a --filter in EXTRA_FLAGS adds to it, as in kit);
- EXTRA_FLAGS (default `--ignore-existing`, only when empty): more `kitfs unpack` flags;
- COSIGN_KEY (a public key file), or COSIGN_CERT_IDENTITY with COSIGN_CERT_OIDC_ISSUER:
  unpack only a ModelKit whose cosign signature verifies (COSIGN_KEY wins when both
  are set, as in kit's script). kit runs `cosign verify`, which also reads its flags
  from COSIGN_* variables; kitfs reads the two an offline check needs the same way:
  COSIGN_TRUSTED_ROOT (trusted_root.json; required for keyless) and
  COSIGN_INSECURE_IGNORE_TLOG (true: accept keyed signatures without a log entry).
  The tag is resolved once and that digest's signature checked and unpacked
  (kitfs/enforcement.py). A policy file in the image (/etc/kitfs/policy.yaml) applies too;
  the node's does not reach a container.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from kitfs.enforcement import flags_requirement
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
from kitfs.signing.flags import FlagNames, SignatureFlags, parse_bool

PROG = "kitfs-init"
DEFAULT_UNPACK_PATH = "/home/user/modelkit/"
DEFAULT_FILTER = "model"
DEFAULT_FLAGS = ("--ignore-existing",)


#: The settings as this contract spells them, for errors that name what to change.
INIT_NAMES = FlagNames(key="COSIGN_KEY", identity="COSIGN_CERT_IDENTITY",
                       issuer="COSIGN_CERT_OIDC_ISSUER", trusted_root="COSIGN_TRUSTED_ROOT",
                       ignore_tlog="COSIGN_INSECURE_IGNORE_TLOG=true")


def signature_check(reference: str, environ: Mapping[str, str]) -> tuple[SignatureFlags, str]:
    """The signature check the COSIGN_* variables ask for, and the line kit's script prints.

    Checked here, before anything is fetched: a setting that cannot make a check is
    refused, never skipped (kit also skips the check silently when only one of the
    keyless pair is set; kitfs refuses that too).
    """
    def get(name: str) -> str:
        return environ.get(name, "").strip()

    key = get("COSIGN_KEY")
    identity, issuer = get("COSIGN_CERT_IDENTITY"), get("COSIGN_CERT_OIDC_ISSUER")
    root = get("COSIGN_TRUSTED_ROOT") or None
    if not (key or identity or issuer):
        return SignatureFlags(), "Signature verification is disabled"
    ignore = parse_bool(environ.get("COSIGN_INSECURE_IGNORE_TLOG", ""),
                        "COSIGN_INSECURE_IGNORE_TLOG")
    if key and "://" in key:
        raise SignatureError(
            f"COSIGN_KEY={key}: kitfs verifies with a public key file only (no KMS, "
            "Kubernetes secret or URL keys): mount the key into the container and give its "
            "path")
    if key:
        flags = SignatureFlags(key=os.path.abspath(key), trusted_root=root, ignore_tlog=ignore)
        line = f"Verifying signature for modelkit {reference} via key"
    else:
        flags = SignatureFlags(identity=identity or None, issuer=issuer or None,
                               trusted_root=root, ignore_tlog=ignore)
        line = f"Verifying signature for modelkit {reference}"
    flags_requirement(flags, INIT_NAMES)  # files read and checked now
    return flags, line


def prepare(environ: Mapping[str, str]) -> argparse.Namespace:
    """The `kitfs unpack` that kit's init entrypoint would run, as parsed arguments."""
    reference = required(environ, "MODELKIT_REF")
    path = environ.get("UNPACK_PATH") or DEFAULT_UNPACK_PATH
    unpack_filter = environ.get("UNPACK_FILTER") or DEFAULT_FILTER
    flags = split_flags("EXTRA_FLAGS", environ) or list(DEFAULT_FLAGS)
    args = parse_unpack("EXTRA_FLAGS", flags, reference, (f"--filter={unpack_filter}",))
    signature, line = signature_check(reference, environ)
    say(line)
    if signature.given:
        args.signature_key, args.signature_identity = signature.key, signature.identity
        args.signature_issuer, args.trusted_root = signature.issuer, signature.trusted_root
        args.insecure_ignore_tlog = signature.ignore_tlog
        args.signature_names = INIT_NAMES  # refusals name COSIGN_KEY, not --signature-key
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
