"""`kitfs verify`: check a manifest's cosign signatures in its registry, as `cosign verify`.

The tag is resolved to a digest once and every signature is judged against
that digest, so the line printed names exactly what was verified (a tag moved
afterwards names something else). Any one valid signature is enough, as in
cosign; when none is, the most telling reason is the one shown. Nothing is
fetched from Rekor or Fulcio: transparency-log entries and certificates are
checked offline against --trusted-root, or the log is skipped on request.
"""

from __future__ import annotations

import argparse

from kitfs.commands.command import Command
from kitfs.commands.common import (
    add_network_options,
    add_signature_options,
    client_options,
    run_async,
    signature_flags,
)
from kitfs.errors import UsageError
from kitfs.signing.flags import VERIFY_FLAGS

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from kitfs.oci.options import ClientOptions
    from kitfs.oci.reference import Reference
    from kitfs.signing.trust import Trust
    from kitfs.signing.verdict import Verdict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF",
                   help="REGISTRY/REPO[:TAG|@DIGEST]: any manifest, a ModelKit or not")
    add_signature_options(p, VERIFY_FLAGS, "who must have signed (--key, or an identity)")
    add_network_options(p, tls_client=False)


def run(args: argparse.Namespace) -> int:
    import os

    from kitfs.enforcement import flags_requirement
    from kitfs.oci.reference import parse_reference
    from kitfs.signing.flags import cosign_environment

    ref = parse_reference(args.reference)
    if ref.is_local:
        raise UsageError(f"verify needs a reference with a registry, not {args.reference!r} "
                         "(e.g. registry.example.com/team/model:v1)")
    flags = cosign_environment(signature_flags(args), os.environ)
    if not flags.given:
        raise UsageError("give --key PUB, or --certificate-identity and "
                         "--certificate-oidc-issuer (one of the two ways)")
    requirement = flags_requirement(flags, VERIFY_FLAGS)
    assert requirement is not None  # flags.given
    options = client_options(args)
    verdict = run_async(lambda: _verify(ref, options, requirement.trusts[0]))
    print(verdict.describe() + ("" if verdict.tlog_checked else " [transparency log not checked]"))
    return 0


async def _verify(ref: Reference, options: ClientOptions, trust: Trust) -> Verdict:
    import os

    from kitfs.oci.client import RegistryClient
    from kitfs.oci.signatures import fetch_signatures, signature_client, signature_repository
    from kitfs.signing.trust import check_signatures

    registry, repo = signature_repository(ref, os.environ)
    async with RegistryClient(ref.registry, options) as client:
        _, _, digest = await client.get_manifest(ref.repository, ref.target)
        async with signature_client(client, registry) as target:
            found = await fetch_signatures(target, repo, digest)
    return check_signatures(found, digest, trust)


COMMAND = Command(
    name="verify",
    help="check a ModelKit's cosign signatures in its registry (as `cosign verify`)",
    description="""\
Resolve REF to a manifest digest once, find that digest's cosign signatures
(sigstore bundles attached as OCI referrers, and classic `sha256-<hex>.sig`
images; in $COSIGN_REPOSITORY when set) and check them. Exit 0 and one line
naming the digest, the signature format and the key or identity when at least
one signature verifies; otherwise one line saying why (no signature, wrong key,
digest mismatch, tampered, identity mismatch, expired certificate, untrusted)
and exit 1. Works on any manifest, not only ModelKits, and needs no cosign.

Each flag not given is read from cosign's variable for it, as cosign does:
COSIGN_KEY, COSIGN_CERTIFICATE_IDENTITY, COSIGN_CERTIFICATE_OIDC_ISSUER,
COSIGN_TRUSTED_ROOT, COSIGN_INSECURE_IGNORE_TLOG.

Nothing is fetched from Sigstore's services: keyless signatures and Rekor
entries are checked against --trusted-root (the trusted_root.json cosign
uses). Signatures made by `kitfs sign` (or `cosign sign --tlog-upload=false`)
have no log entry: verify them with --insecure-ignore-tlog.

examples:
  kitfs verify --key cosign.pub --insecure-ignore-tlog registry.example.com/team/llm:v1
  kitfs verify --key cosign.pub --trusted-root trusted_root.json ghcr.io/org/llm:v1
  kitfs verify --certificate-identity me@example.com \\
      --certificate-oidc-issuer https://github.com/login/oauth \\
      --trusted-root trusted_root.json ghcr.io/org/llm@sha256:...
""",
    add_arguments=add_arguments,
    run=run,
)
