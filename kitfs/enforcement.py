"""The signature check a mount or unpack makes before a byte of a ModelKit is served.

kitfs/parents.py resolves each reference of a chain (the ModelKit and its
parents) to a manifest digest once, calls `SignatureGate.check` with that
digest, and only then reads anything the manifest names; everything after is
fetched by digest. So the digest whose signature passed is the one served: a
tag moved between the check and the reads changes nothing (cosign's own
verify-then-pull has that race; kit's init container inherits it).

What is required comes from two places and both must hold: the mount's own
flags (--signature-key, ...; kitfs-init's COSIGN_* variables; CSI volume
attributes), and the node's policy file (kitfs/signing/policy.py), which
flags cannot lift. Both apply to parent ModelKits too: a signed ModelKit whose
`model.path` names an unsigned parent would otherwise serve unsigned weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from kitfs.errors import KitfsError, SignatureError
from kitfs.oci.client import RegistryClient
from kitfs.oci.digest import short
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import Reference
from kitfs.oci.signatures import (
    COSIGN_REPOSITORY_ENV,
    fetch_signatures,
    signature_client,
    signature_repository,
)
from kitfs.signing.flags import FlagNames, SignatureFlags
from kitfs.signing.policy import Policy, Requirement, load_policy, requirement_from_flags
from kitfs.signing.refusal import SignatureRefused, most_telling
from kitfs.signing.trust import FoundSignatures, check_signatures
from kitfs.signing.verdict import Verdict

log = logging.getLogger(__name__)


@dataclass
class SignatureGate:
    """The requirements of one mount or unpack, and what passed (for `kitfs status`)."""

    options: ClientOptions
    flags: Requirement | None = None
    policy: Policy | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    passed: list[str] = field(default_factory=list)

    async def check(self, ref: Reference, digest: str) -> None:
        """Return if `digest` (what `ref` resolved to) may be served, else raise a
        SignatureError saying why; nothing of the ModelKit has been read yet."""
        requirements: list[Requirement] = []
        if self.policy is not None:
            from_policy = self.policy.requirement_for(ref.name)
            if from_policy is not None:
                requirements.append(from_policy)
        if self.flags is not None:
            requirements.append(self.flags)
        if not requirements:
            log.info("%s: %s is not required to be signed", ref, short(digest))
            return
        found = await self._signatures(ref, digest)
        for requirement in requirements:
            verdict = _judge(found, digest, requirement, ref)
            line = verdict.describe() + (
                "" if verdict.tlog_checked else " [transparency log not checked]")
            log.info("%s: signature verified (%s): %s", ref, requirement.origin, line)
            self.passed.append(line)

    async def _signatures(self, ref: Reference, digest: str) -> FoundSignatures:
        if ref.is_local and not self.environ.get(COSIGN_REPOSITORY_ENV, "").strip():
            raise SignatureError(
                f"{ref}: signature required, but this ModelKit is only in kit's local storage, "
                f"which holds no signatures: use a registry reference, or set "
                f"${COSIGN_REPOSITORY_ENV} to where its signatures are")
        registry, repo = signature_repository(ref, self.environ)
        try:
            async with RegistryClient(registry, self.options) as client, \
                    signature_client(client, registry) as target:
                return await fetch_signatures(target, repo, digest)
        except SignatureError:
            raise
        except KitfsError as exc:
            raise SignatureError(f"{ref}: cannot read its signatures from {registry}/{repo} "
                                 f"(signature required): {exc}") from None


def _judge(found: FoundSignatures, digest: str, requirement: Requirement,
           ref: Reference) -> Verdict:
    refusals: list[SignatureRefused] = []
    for trust in requirement.trusts:
        try:
            return check_signatures(found, digest, trust)
        except SignatureRefused as refusal:
            refusals.append(refusal)
    best = most_telling(refusals, digest)
    raise SignatureRefused(best.reason, f"{ref}: refused, signature required by "
                                        f"{requirement.origin}: {best}")


def signature_gate(
    flags: SignatureFlags, names: FlagNames, options: ClientOptions, origin: str,
    environ: Mapping[str, str] | None = None,
) -> SignatureGate | None:
    """The gate for a mount or unpack given `flags` and the node's policy; None when neither
    asks for anything. Files are read and checked here: a bad key fails before any fetch."""
    env = dict(os.environ) if environ is None else dict(environ)
    requirement = requirement_from_flags(flags, names, origin)
    policy = load_policy(env)
    if requirement is None and policy is None:
        return None
    return SignatureGate(options, requirement, policy, env)
