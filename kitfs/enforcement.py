"""The signature check a mount or unpack makes before a byte of a ModelKit is served.

kitfs/parents.py resolves each reference of a chain (the ModelKit and its
parents) to a manifest digest once, calls `SignatureGate.check` with that
digest, and only then reads anything the manifest names; everything after is
fetched by digest. So the digest whose signature passed is the one served: a
tag moved between the check and the reads changes nothing (cosign's own
verify-then-pull has that race; kit's init container inherits it).

What is required comes from two places and both must hold: the mount's own
flags (--signature-key, ...; kitfs-init's COSIGN_* variables; CSI volume
attributes), and the node's policy files (kitfs/signing/policy.py), which
flags cannot lift. Both apply to parent ModelKits too: a signed ModelKit whose
`model.path` names an unsigned parent would otherwise serve unsigned weights.

This module reads the files the flags and policies name (kitfs.signing stays
pure) and fetches signatures from the registry (kitfs.oci.signatures).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from kitfs.errors import KitfsError, NotFoundError, PolicyError, SignatureError, UsageError
from kitfs.oci.client import INDEX_MEDIA_TYPES, RegistryClient
from kitfs.oci.digest import short
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import Reference
from kitfs.oci.signatures import (
    COSIGN_REPOSITORY_ENV,
    fetch_signatures,
    signature_client,
    signature_repository,
)
from kitfs.signing.flags import NODE_POLICY, POLICY_ENV, FlagNames, SignatureFlags
from kitfs.signing.policy import (
    Policy,
    Requirement,
    parse_policy,
    policy_name,
    requirement_from_flags,
)
from kitfs.signing.refusal import SignatureRefused, first_pass
from kitfs.signing.trust import FoundSignatures, check_signatures
from kitfs.signing.verdict import Verdict

log = logging.getLogger(__name__)

#: Policies, keys and trusted roots are kilobytes; a bigger file is a mistake.
MAX_FILE = 16 << 20


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise UsageError(f"{what} {path} is over {MAX_FILE >> 20} MiB: not a key, trusted "
                         "root or policy")
    return data


def flags_requirement(flags: SignatureFlags, names: FlagNames) -> Requirement | None:
    """What signature flags ask for, their files read now (a bad key fails before any
    fetch); None when they ask for nothing."""
    return requirement_from_flags(flags, names, flags.describe(names), read_file)


def load_policies(environ: Mapping[str, str]) -> tuple[Policy, ...]:
    """/etc/kitfs/policy.yaml if it exists, and $KITFS_POLICY (which must exist) too."""
    policies = []

    def read_policy(path: str, what: str) -> bytes:
        try:
            return read_file(path, what)
        except UsageError as exc:
            raise PolicyError(str(exc)) from None

    try:
        os.lstat(NODE_POLICY)  # a dangling symlink (a ConfigMap not there yet) is no absence
    except FileNotFoundError:
        pass
    except OSError as e:
        raise PolicyError(f"cannot read the node policy {NODE_POLICY}: {e.strerror}") from None
    else:
        policies.append(parse_policy(read_policy(str(NODE_POLICY), "the node policy"),
                                     str(NODE_POLICY), read_file))
    named = environ.get(POLICY_ENV, "").strip()
    if named:
        path = os.path.abspath(named)
        policies.append(parse_policy(read_policy(path, f"${POLICY_ENV}"), path, read_file))
    return tuple(policies)


@dataclass
class SignatureGate:
    """The requirements of one mount or unpack, and what passed (for `kitfs status`)."""

    options: ClientOptions
    flags: Requirement | None = None
    policies: tuple[Policy, ...] = ()
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    passed: list[str] = field(default_factory=list)

    def requirements(self, ref: Reference) -> list[Requirement]:
        """What `ref` must carry; PolicyRejected when a policy forbids it outright."""
        name = policy_name(ref.registry, ref.repository)
        found = [r for p in self.policies if (r := p.requirement_for(name)) is not None]
        return found + ([self.flags] if self.flags is not None else [])

    async def check(self, ref: Reference, digest: str) -> None:
        """Return if `digest` (what `ref` resolved to) may be served, else raise a
        SignatureError saying why; nothing of the ModelKit has been read yet."""
        requirements = self.requirements(ref)
        if not requirements:
            log.info("%s: %s is not required to be signed", ref, short(digest))
            return
        if ref.is_local and not self.environ.get(COSIGN_REPOSITORY_ENV, "").strip():
            raise SignatureError(
                f"{ref}: signature required, but this ModelKit is only in kit's local storage, "
                f"which holds no signatures: use a registry reference, or set "
                f"${COSIGN_REPOSITORY_ENV} to where its signatures are")
        registry, repo = signature_repository(ref, self.environ)
        try:
            async with RegistryClient(registry, self.options) as client:
                found = await fetch_signatures(client, repo, digest)
                for requirement in requirements:
                    verdict = await self._judge(found, digest, requirement, ref, client, repo)
                    line = verdict.describe() + (
                        "" if verdict.tlog_checked else " [transparency log not checked]")
                    log.info("%s: signature verified (%s): %s", ref, requirement.origin, line)
                    self.passed.append(line)
        except SignatureError:
            raise
        except KitfsError as exc:
            raise SignatureError(f"{ref}: cannot read its signatures from {registry}/{repo} "
                                 f"(signature required): {exc}") from None

    async def _judge(self, found: FoundSignatures, digest: str, requirement: Requirement,
                     ref: Reference, client: RegistryClient, repo: str) -> Verdict:
        try:
            return _first_trust(found, digest, requirement)
        except SignatureRefused as refusal:
            if ref.tag is not None and not ref.is_local:
                try:
                    verdict = await self._through_index(ref, digest, requirement, client, repo)
                except KitfsError as exc:  # the refusal of the ModelKit itself says more
                    log.info("%s: no signed index to fall back on: %s", ref, exc)
                    verdict = None
                if verdict is not None:
                    return verdict
            raise SignatureRefused(refusal.reason, f"{ref}: refused, signature required by "
                                                   f"{requirement.origin}: {refusal}") from None

    async def _through_index(self, ref: Reference, digest: str, requirement: Requirement,
                             client: RegistryClient, repo: str) -> Verdict | None:
        """A ModelKit served from an image index whose tag is signed on the index, as
        `cosign sign` signs what the tag names: the index (whatever the tag names now; its
        signature vouches for its own bytes) must list `digest`, and be signed."""
        try:
            async with signature_client(client, ref.registry) as origin:
                body, media_type, index_digest = await origin.get_manifest(ref.repository,
                                                                           ref.tag or "")
        except NotFoundError:
            return None
        if media_type not in INDEX_MEDIA_TYPES or index_digest == digest:
            return None
        try:
            listed = {str(m.get("digest")) for m in json.loads(body).get("manifests") or []
                      if isinstance(m, dict)}
        except (ValueError, AttributeError):
            return None
        if digest not in listed:
            return None
        found = await fetch_signatures(client, repo, index_digest)
        try:
            verdict = _first_trust(found, index_digest, requirement)
        except SignatureRefused:
            return None
        log.info("%s: %s is listed in the signed index %s", ref, short(digest),
                 short(index_digest))
        return verdict


def _first_trust(found: FoundSignatures, digest: str, requirement: Requirement) -> Verdict:
    return first_pass(requirement.trusts, lambda t: check_signatures(found, digest, t), digest)


def may_require(flags: SignatureFlags, policies: tuple[Policy, ...]) -> bool:
    """Whether anything a mount serves may need a signature: the flags ask for one, or a
    policy has a rule that does (for the ModelKit or one of its parents, which are only
    known once resolved). Such a mount serves verified bytes only, by default."""
    return flags.given or any(rule.action == "require" for p in policies for rule in p.rules)


def signature_gate(
    flags: SignatureFlags, names: FlagNames, options: ClientOptions,
    environ: Mapping[str, str] | None = None, policies: tuple[Policy, ...] | None = None,
) -> SignatureGate | None:
    """The gate for a mount or unpack given `flags` and the node's policies (read now
    unless given); None when neither asks for anything. Files are read and checked here,
    before any fetch."""
    env = dict(os.environ) if environ is None else dict(environ)
    requirement = flags_requirement(flags, names)
    policies = load_policies(env) if policies is None else policies
    if requirement is None and not policies:
        return None
    return SignatureGate(options, requirement, policies, env)
