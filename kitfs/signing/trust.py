"""Who must have signed, and the one rule for judging every signature a digest has.

`kitfs verify` applies it today; mount, unpack and the CSI driver are to apply the
same `Trust` to the same `FoundSignatures`, so a ModelKit passes or fails for the
same reason wherever it is checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from kitfs.signing import keyless
from kitfs.signing.bundle import parse_bundle, verify_bundle
from kitfs.signing.classic import ClassicSignature, verify_classic
from kitfs.signing.keyless import Identity
from kitfs.signing.keys import PublicKey
from kitfs.signing.refusal import Reason, SignatureRefused, first_pass
from kitfs.signing.trustroot import TrustedRoot
from kitfs.signing.verdict import Verdict


@dataclass(frozen=True)
class FoundSignatures:
    """Every signature of one digest, as stored (nothing checked yet)."""

    classic: tuple[ClassicSignature, ...]
    bundles: tuple[bytes, ...]  # sigstore bundle JSON, as attached


@dataclass(frozen=True)
class Trust:
    """A key, or a keyless identity (which needs `root`); `root` also makes a keyed
    signature's Rekor entry checked, unless `ignore_tlog` (cosign's --insecure-ignore-tlog)."""

    key: PublicKey | None = None
    identity: Identity | None = None
    root: TrustedRoot | None = None
    ignore_tlog: bool = False

    def __post_init__(self) -> None:
        if (self.key is None) == (self.identity is None):
            raise ValueError("Trust needs exactly one of key and identity")
        if self.identity is not None and self.root is None:
            raise ValueError("a keyless Trust needs a trusted root")
        if self.key is not None and self.root is None and not self.ignore_tlog:
            raise ValueError("a keyed Trust without a trusted root must ignore the tlog")

    def _check_bundle(self, data: bytes, digest: str) -> Verdict:
        bundle = parse_bundle(data)
        if self.identity is not None:
            assert self.root is not None
            return keyless.verify_bundle_keyless(bundle, self.root, self.identity, digest,
                                                 self.ignore_tlog)
        assert self.key is not None
        if self.ignore_tlog or self.root is None:
            return verify_bundle(bundle, self.key, digest)
        return keyless.verify_bundle_logged(bundle, self.key, digest, self.root)

    def _check_classic(self, sig: ClassicSignature, digest: str) -> Verdict:
        if self.identity is not None:
            assert self.root is not None
            return keyless.verify_classic_keyless(sig, self.root, self.identity, digest,
                                                  self.ignore_tlog)
        assert self.key is not None
        if self.ignore_tlog or self.root is None:
            return verify_classic(sig, self.key, digest)
        return keyless.verify_classic_logged(sig, self.key, digest, self.root)


def check_signatures(found: FoundSignatures, digest: str, trust: Trust) -> Verdict:
    """The first signature in `found` that passes for `digest` (bundles first, as cosign 3
    looks), else SignatureRefused with the most telling reason. Unlike cosign, classic
    signatures are still tried when bundles exist but fail: any one valid signature is
    enough."""
    checks: list[Callable[[], Verdict]] = [
        *(partial(trust._check_bundle, data, digest) for data in found.bundles),
        *(partial(trust._check_classic, sig, digest) for sig in found.classic),
    ]
    return first_pass(checks, _judged, digest)


def _judged(check: Callable[[], Verdict]) -> Verdict:
    """One signature's verdict; whatever else a signature made by anybody can make the
    parsers raise is that signature refused, never the end of the search (a junk
    signature attached beside a valid one must not hide it)."""
    try:
        return check()
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise SignatureRefused(Reason.NOT_A_SIGNATURE,
                               f"malformed signature ({type(exc).__name__}: {exc})") from None
