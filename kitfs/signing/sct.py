"""Signed certificate timestamps: proof that a Fulcio certificate was logged publicly.

Fulcio embeds, in every certificate, a CT log's signature over the certificate
as it was before the SCT was added (the precertificate). cosign checks it by
default; a certificate without a valid SCT could have been issued in secret
with a stolen CA key. The signed structure is RFC 6962 §3.2's
`digitally-signed` over a precert entry: version, signature type, timestamp,
entry type, sha256 of the issuer's key, the precert TBS, the SCT extensions.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.certificate_transparency import LogEntryType

from kitfs.signing.refusal import Reason, SignatureRefused
from kitfs.signing.trustroot import TrustedRoot

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def verify_sct(cert: x509.Certificate, issuer: x509.Certificate, root: TrustedRoot) -> None:
    """Pass if one embedded SCT verifies with a CT log key of `root`; else UNTRUSTED."""
    try:
        scts = cert.extensions.get_extension_for_class(
            x509.PrecertificateSignedCertificateTimestamps
        ).value
    except x509.ExtensionNotFound:
        raise SignatureRefused(
            Reason.UNTRUSTED, "the certificate carries no certificate-transparency timestamp"
        ) from None
    issuer_key_hash = hashlib.sha256(
        issuer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).digest()
    tbs = cert.tbs_precertificate_bytes
    for sct in scts:
        if sct.entry_type != LogEntryType.PRE_CERTIFICATE:
            continue
        when = sct.timestamp.replace(tzinfo=UTC)
        key = root.ct_log_key(sct.log_id.hex(), when)
        if key is None:
            continue
        millis = (when - _EPOCH) // timedelta(milliseconds=1)
        signed = (
            bytes([sct.version.value, 0])  # v1, certificate_timestamp
            + millis.to_bytes(8, "big")
            + (1).to_bytes(2, "big")  # precert_entry
            + issuer_key_hash
            + len(tbs).to_bytes(3, "big")
            + tbs
            + len(sct.extension_bytes).to_bytes(2, "big")
            + sct.extension_bytes
        )
        try:
            key.verify(sct.signature, signed)
        except SignatureRefused:
            continue
        return
    raise SignatureRefused(
        Reason.UNTRUSTED,
        f"no certificate-transparency timestamp verifies with a CT log of {root.source}",
    )
