"""`kitfs sign`: sign a manifest digest with a cosign key and push the signature, as `cosign sign`.

The signature is over the digest the tag names when `kitfs sign` runs (printed,
so a user can check it is the one they meant). Nothing goes to Rekor: the
signature carries no transparency-log entry, so `cosign verify` needs
`--insecure-ignore-tlog=true` for it, as for `cosign sign --tlog-upload=false`.
"""

from __future__ import annotations

import argparse

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options, client_options, run_async
from kitfs.errors import UsageError

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from pathlib import Path

    from kitfs.oci.options import ClientOptions
    from kitfs.oci.reference import Reference
    from kitfs.signing.keys import PrivateKey

PASSWORD_ENV = "COSIGN_PASSWORD"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF",
                   help="REGISTRY/REPO[:TAG|@DIGEST]: the manifest to sign (any, a ModelKit "
                        "or not)")
    p.add_argument("--key", dest="cosign_key", metavar="KEY",
                   help="cosign private key file (`cosign generate-key-pair`'s cosign.key; "
                        "default: $COSIGN_KEY, as cosign); its password comes from "
                        f"${PASSWORD_ENV}, else a terminal prompt")
    p.add_argument("--bundle-format", choices=("new", "classic"), default="new",
                   help="new (default, as cosign 3): a sigstore bundle attached as an OCI "
                        "referrer; classic: a layer of the `sha256-<hex>.sig` image")
    add_network_options(p, tls_client=False)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kitfs.oci.reference import parse_reference

    ref = parse_reference(args.reference)
    if ref.is_local:
        raise UsageError(f"sign needs a reference with a registry, not {args.reference!r} "
                         "(e.g. registry.example.com/team/model:v1)")
    import os

    path = args.cosign_key or os.environ.get("COSIGN_KEY", "").strip()
    if not path:
        raise UsageError("sign needs --key cosign.key (or $COSIGN_KEY)")
    key = _load_key(Path(path))
    options = client_options(args)
    print(run_async(lambda: _sign(ref, options, key, args.bundle_format)))
    return 0


def _password() -> bytes:
    """$COSIGN_PASSWORD (may be empty, as cosign allows), else asked on the terminal."""
    import os
    import sys

    password = os.environ.get(PASSWORD_ENV)
    if password is not None:
        return password.encode()
    if not sys.stdin.isatty():
        raise UsageError(f"${PASSWORD_ENV} is not set and there is no terminal to ask for "
                         "the key's password")
    import getpass

    return getpass.getpass("Enter password for private key: ").encode()


def _load_key(path: Path) -> PrivateKey:
    from kitfs.signing.keys import load_encrypted_private_key

    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read --key {path}: {e.strerror}") from None
    return load_encrypted_private_key(data, _password(), path.name)


async def _sign(ref: Reference, options: ClientOptions, key: PrivateKey, fmt: str) -> str:
    import os
    from datetime import UTC, datetime

    from kitfs.oci.client import RegistryClient
    from kitfs.oci.signatures import (
        push_bundle,
        push_classic,
        signature_client,
        signature_repository,
    )
    from kitfs.signing.bundle import build_bundle
    from kitfs.signing.classic import sign_classic

    registry, repo = signature_repository(ref, os.environ)
    async with RegistryClient(ref.registry, options) as client:
        body, media_type, digest = await client.get_manifest(ref.repository, ref.target)
        signed = f"{ref.name}@{digest}"
        async with signature_client(client, registry) as target:
            where = f"{registry}/{repo}"
            if fmt == "classic":
                layer = sign_classic(key, ref.name, digest)
                tag = await push_classic(target, repo, digest, layer, key.public())
                if tag is None:
                    return f"{signed}: already signed with this key (classic), nothing pushed"
                return f"Signed {signed} (classic, {key.public().kind}): pushed {where}:{tag}"
            created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            subject = {"mediaType": media_type, "size": len(body), "digest": digest}
            referrer = await push_bundle(target, repo, subject, build_bundle(key, digest),
                                         created)
            return f"Signed {signed} (bundle, {key.public().kind}): pushed {where}@{referrer}"


COMMAND = Command(
    name="sign",
    help="sign a ModelKit's manifest with a cosign key and push the signature (as `cosign sign`)",
    description="""\
Resolve REF to its manifest digest, sign that digest with a cosign private key
and push the signature to the registry (to $COSIGN_REPOSITORY when set). The
key is cosign's encrypted cosign.key (ECDSA, RSA or Ed25519); its password is
read from $COSIGN_PASSWORD, or asked for on a terminal, never from the command
line. Signing keyless (Fulcio/OIDC) is not supported.

The default format is a sigstore bundle attached as an OCI referrer (what
cosign 3 writes); --bundle-format classic appends to the `sha256-<hex>.sig`
image instead (cosign 2's format; an equal signature by the same key is not
added twice). No transparency-log entry is made, so check the result with
`kitfs verify --key cosign.pub --insecure-ignore-tlog REF` or
`cosign verify --key cosign.pub --insecure-ignore-tlog=true REF`.

examples:
  cosign generate-key-pair
  COSIGN_PASSWORD=... kitfs sign --key cosign.key registry.example.com/team/llm:v1
  kitfs sign --key cosign.key --bundle-format classic registry.example.com/team/llm:v1
""",
    add_arguments=add_arguments,
    run=run,
)
