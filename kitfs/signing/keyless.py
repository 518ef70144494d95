"""Keyless (Fulcio certificate) signatures, and keyed ones with a transparency-log entry.

A keyless signature is only as good as three checks cosign makes and kitfs repeats
offline against a trusted-root file: the log promises when the signature was
logged (SET); the short-lived certificate chains to a Fulcio CA and was valid at
that time; and the certificate names the expected identity (SAN) and OIDC issuer.
The signature itself is then checked with the certificate's key exactly as a
keyed one is (classic.verify_classic, bundle.verify_bundle).

The certificate's embedded SCT must verify with a CT log of the trusted root too.
Not covered: RFC 3161 timestamps (so Rekor v2 entries), identity regexps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from kitfs.signing import bundle as bundles
from kitfs.signing import classic
from kitfs.signing.keys import PublicKey, supported_public_key
from kitfs.signing.refusal import Reason, SignatureRefused
from kitfs.signing.sct import verify_sct
from kitfs.signing.tlog import (
    check_dsse_entry,
    check_hashedrekord,
    entry_from_bundle,
    entry_from_rekor_annotation,
    verify_inclusion,
    verify_promise,
)
from kitfs.signing.trustroot import TrustedRoot
from kitfs.signing.verdict import Verdict

# Fulcio's certificate extensions (sigstore/fulcio docs/oid-info.md).
_OIDC_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # DER UTF8String
_OIDC_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # raw bytes (deprecated)
_OTHERNAME_SAN = ObjectIdentifier("1.3.6.1.4.1.57264.1.7")


@dataclass(frozen=True)
class Identity:
    """Who must have signed: `--certificate-identity` and `--certificate-oidc-issuer`."""

    subject: str
    issuer: str

    def __str__(self) -> str:
        return f"{self.subject} (issuer {self.issuer})"


def _der_utf8(value: bytes) -> str:
    if len(value) >= 2 and value[0] == 0x0C and value[1] < 0x80 and len(value) == 2 + value[1]:
        return value[2:].decode("utf-8", errors="replace")
    return value.decode("utf-8", errors="replace")


def _issuer_of(cert: x509.Certificate) -> str | None:
    for oid in (_OIDC_ISSUER_V2, _OIDC_ISSUER_V1):
        try:
            ext = cert.extensions.get_extension_for_oid(oid).value
        except x509.ExtensionNotFound:
            continue
        if isinstance(ext, x509.UnrecognizedExtension):
            if oid == _OIDC_ISSUER_V2:
                return _der_utf8(ext.value)
            return ext.value.decode("utf-8", errors="replace")
    return None


def _subjects_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = [*san.get_values_for_type(x509.RFC822Name)]
    names += san.get_values_for_type(x509.UniformResourceIdentifier)
    names += [
        _der_utf8(other.value)
        for other in san.get_values_for_type(x509.OtherName)
        if other.type_id == _OTHERNAME_SAN
    ]
    return names


def _check_time(cert: x509.Certificate, when: datetime, logged: bool) -> None:
    if cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        return
    if logged:
        why = f"it was not valid when the log recorded the signature ({when:%Y-%m-%dT%H:%M:%SZ})"
    else:
        why = "and no transparency-log entry was checked to show it was used in time"
    raise SignatureRefused(
        Reason.EXPIRED_CERTIFICATE,
        f"expired certificate: valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, {why}",
    )


def verify_certificate(
    cert: x509.Certificate, root: TrustedRoot, when: datetime, identity: Identity, logged: bool
) -> PublicKey:
    """The certificate's key, once it was valid at `when`, chains to a Fulcio CA of `root`
    (valid at `when`), carries an SCT of a CT log of `root`, is a code-signing
    certificate and names `identity`."""
    _check_time(cert, when, logged)
    anchors = [c for ca in root.authorities_at(when) for c in ca.chain]
    if not anchors:
        raise SignatureRefused(
            Reason.UNTRUSTED, f"no certificate authority in {root.source} is valid at {when}"
        )
    ca_policy = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, Criticality.NON_CRITICAL, None
    )
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, Criticality.NON_CRITICAL, None
    )
    verifier = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(when)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        chain = verifier.verify(cert, []).chain
    except (VerificationError, ValueError) as e:
        raise SignatureRefused(
            Reason.UNTRUSTED, f"the certificate does not chain to a CA in {root.source} ({e})"
        ) from None
    verify_sct(cert, chain[1], root)
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage, extended = None, None
    if (
        usage is None
        or extended is None
        or not usage.digital_signature
        or ExtendedKeyUsageOID.CODE_SIGNING not in extended
    ):
        raise SignatureRefused(Reason.UNTRUSTED, "the certificate is not for code signing")
    subjects = _subjects_of(cert)
    if identity.subject not in subjects:
        raise SignatureRefused(
            Reason.IDENTITY_MISMATCH,
            f"identity mismatch: the certificate is for {', '.join(subjects) or 'nobody'}, "
            f"not {identity.subject}",
        )
    issuer = _issuer_of(cert)
    if issuer != identity.issuer:
        raise SignatureRefused(
            Reason.IDENTITY_MISMATCH,
            f"identity mismatch: the certificate's OIDC issuer is {issuer or 'missing'}, "
            f"not {identity.issuer}",
        )
    return _cert_key(cert, identity)


def _cert_key(cert: x509.Certificate, identity: Identity) -> PublicKey:
    return supported_public_key(cert.public_key(), f"certificate for {identity}")


def _now() -> datetime:
    return datetime.now(UTC)


def verify_classic_keyless(
    sig: classic.ClassicSignature,
    root: TrustedRoot,
    identity: Identity,
    manifest_digest: str,
    ignore_tlog: bool = False,
) -> Verdict:
    """A classic signature with a `dev.sigstore.cosign/certificate`, checked as
    `cosign verify --certificate-identity --certificate-oidc-issuer` does offline."""
    pem = sig.annotations.get(classic.ANNOTATION_CERTIFICATE, "")
    if not pem:
        raise SignatureRefused(
            Reason.WRONG_KEY, "the signature has no certificate (it was made with a key)"
        )
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise SignatureRefused(Reason.NOT_A_SIGNATURE, "unreadable signing certificate") from None
    verdict = classic.verify_classic(sig, _cert_key(cert, identity), manifest_digest)
    when, logged = _now(), False
    if not ignore_tlog:
        when, logged = _classic_tlog(sig, _cert_key(cert, identity), root), True
    verify_certificate(cert, root, when, identity, logged)
    return dataclasses.replace(verdict, key=f"certificate for {identity}", tlog_checked=logged)


def _classic_tlog(sig: classic.ClassicSignature, signer: PublicKey, root: TrustedRoot) -> datetime:
    text = sig.annotations.get(classic.ANNOTATION_REKOR_BUNDLE, "")
    if not text:
        raise SignatureRefused(
            Reason.UNTRUSTED,
            "the signature has no transparency-log entry (verify with the tlog ignored "
            "to accept it)",
        )
    entry = entry_from_rekor_annotation(text)
    when = verify_promise(entry, root)
    check_hashedrekord(entry, sig.payload, sig.signature_b64, signer)
    return when


def verify_classic_logged(
    sig: classic.ClassicSignature, key: PublicKey, manifest_digest: str, root: TrustedRoot
) -> Verdict:
    """A keyed classic signature whose Rekor entry (annotation) is checked too."""
    verdict = classic.verify_classic(sig, key, manifest_digest)
    _classic_tlog(sig, key, root)
    return dataclasses.replace(verdict, tlog_checked=True)


def _bundle_tlog(bundle: bundles.Bundle, signer: PublicKey, root: TrustedRoot) -> datetime:
    envelope = bundle.envelope
    assert envelope is not None  # verify_bundle ran first
    if not bundle.tlog_entries:
        raise SignatureRefused(
            Reason.UNTRUSTED,
            "the bundle has no transparency-log entry (verify with the tlog ignored to accept it)",
        )
    if len(bundle.tlog_entries) != 1:
        raise SignatureRefused(Reason.UNTRUSTED, "the bundle has more than one tlog entry")
    entry = entry_from_bundle(bundle.tlog_entries[0])
    when = verify_promise(entry, root)
    verify_inclusion(entry, root)
    check_dsse_entry(entry, envelope.payload, envelope.signatures[0], signer)
    return when


def verify_bundle_keyless(
    bundle: bundles.Bundle,
    root: TrustedRoot,
    identity: Identity,
    manifest_digest: str,
    ignore_tlog: bool = False,
) -> Verdict:
    """A bundle with a Fulcio certificate, checked offline against `root`."""
    if bundle.certificate is None:
        raise SignatureRefused(
            Reason.WRONG_KEY, "the bundle has no certificate (it was made with a key)"
        )
    key = _cert_key(bundle.certificate, identity)
    verdict = bundles.verify_bundle(bundle, key, manifest_digest)
    when, logged = _now(), False
    if not ignore_tlog:
        when, logged = _bundle_tlog(bundle, key, root), True
    verify_certificate(bundle.certificate, root, when, identity, logged)
    return dataclasses.replace(verdict, key=f"certificate for {identity}", tlog_checked=logged)


def verify_bundle_logged(
    bundle: bundles.Bundle, key: PublicKey, manifest_digest: str, root: TrustedRoot
) -> Verdict:
    """A keyed bundle whose transparency-log entry is checked too."""
    verdict = bundles.verify_bundle(bundle, key, manifest_digest)
    _bundle_tlog(bundle, key, root)
    return dataclasses.replace(verdict, tlog_checked=True)
