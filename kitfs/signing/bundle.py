"""Sigstore bundles (v0.3, cosign 2.5+/3.x's default) about an image digest.

`cosign sign --key` pushes a bundle holding a DSSE envelope of an in-toto
statement whose subject is the manifest digest, as an OCI 1.1 referrer of
the signed manifest. This module parses such bundles (protojson, so parsed,
never compared as bytes), verifies them with a public key as `cosign verify
--key --insecure-ignore-tlog` does, and builds them and their referrer manifest.

Certificates, identities and transparency-log entries are keyless.py's part;
a Verdict from here says `tlog_checked=False`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from kitfs.modelkit.manifest import sha256_digest
from kitfs.modelkit.mediatypes import ANNOTATION_CREATED, OCI_EMPTY_JSON, OCI_MANIFEST
from kitfs.signing.dsse import (
    COSIGN_SIGN_PREDICATE,
    INTOTO_PAYLOAD_TYPE,
    Envelope,
    build_statement,
    pae,
    parse_statement,
)
from kitfs.signing.gojson import go_json
from kitfs.signing.keys import PrivateKey, PublicKey, supported_public_key
from kitfs.signing.payload import check_digest
from kitfs.signing.refusal import Reason, SignatureRefused, first_pass
from kitfs.signing.verdict import Verdict

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
#: Every bundle media type starts so; cosign keeps referrers whose one layer does.
BUNDLE_MEDIA_TYPE_PREFIX = "application/vnd.dev.sigstore.bundle"
ANNOTATION_BUNDLE_CONTENT = "dev.sigstore.bundle.content"
ANNOTATION_BUNDLE_PREDICATE = "dev.sigstore.bundle.predicateType"
#: The empty JSON config blob every OCI artifact without a config points at.
EMPTY_CONFIG = b"{}"

_MEDIA_TYPE_RE = re.compile(
    r"^application/vnd\.dev\.sigstore\.bundle"
    r"(?:\.v(\d+)\.(\d+)\+json|\+json;version=(\d+)\.(\d+))$"
)


@dataclass(frozen=True)
class Bundle:
    """The parts of a bundle a verifier uses."""

    media_type: str
    version: tuple[int, int]
    envelope: Envelope | None  # None for message-signature (blob) bundles
    public_key_hint: str | None
    certificate: x509.Certificate | None
    tlog_entries: tuple[Any, ...]  # protojson TransparencyLogEntry objects, as found


def parse_bundle(data: bytes) -> Bundle:
    """A bundle from its JSON bytes; SignatureRefused(NOT_A_SIGNATURE) if it is not one."""

    def refuse(why: str) -> SignatureRefused:
        return SignatureRefused(Reason.NOT_A_SIGNATURE, f"not a sigstore bundle: {why}")

    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise refuse("not JSON") from None
    if not isinstance(doc, dict):
        raise refuse("not an object")
    media_type = doc.get("mediaType")
    match = _MEDIA_TYPE_RE.match(media_type) if isinstance(media_type, str) else None
    if match is None or not isinstance(media_type, str):
        raise refuse(f"unknown media type {media_type!r}")
    major, minor = (int(g) for g in match.groups() if g is not None)
    material = doc.get("verificationMaterial")
    if not isinstance(material, dict):
        raise refuse("no verificationMaterial")
    hint = _field(material, "publicKey", "hint")
    certificate = None
    raw_cert = _field(material, "certificate", "rawBytes")
    if raw_cert is None and (major, minor) < (0, 3):
        chain = _field(material, "x509CertificateChain", "certificates")
        if isinstance(chain, list) and chain and isinstance(chain[0], dict):
            raw_cert = chain[0].get("rawBytes")
    if raw_cert is not None:
        try:
            certificate = x509.load_der_x509_certificate(base64.b64decode(raw_cert, validate=True))
        except (ValueError, TypeError, binascii.Error):
            raise refuse("unreadable certificate") from None
    envelope_doc = doc.get("dsseEnvelope", doc.get("dsse_envelope"))
    envelope = Envelope.from_json(envelope_doc) if envelope_doc is not None else None
    tlog = material.get("tlogEntries", material.get("tlog_entries")) or []
    return Bundle(
        media_type=media_type,
        version=(major, minor),
        envelope=envelope,
        public_key_hint=hint if isinstance(hint, str) else None,
        certificate=certificate,
        tlog_entries=tuple(tlog) if isinstance(tlog, list) else (),
    )


def _field(doc: Mapping[str, Any], outer: str, inner: str) -> Any:
    value = doc.get(outer)
    return value.get(inner) if isinstance(value, dict) else None


def _signed_by(bundle: Bundle, key: PublicKey) -> bool | None:
    """Whether the bundle says `key` signed it (its hint or certificate); None if it says
    nothing. Unauthenticated: used only to tell "wrong key" from "tampered"."""
    if bundle.public_key_hint is not None:
        return bundle.public_key_hint == key.hint()
    if bundle.certificate is not None:
        try:
            cert_key = supported_public_key(bundle.certificate.public_key(), "certificate")
        except SignatureRefused:
            return None
        return cert_key.der() == key.der()
    return None


def verify_bundle(bundle: Bundle, key: PublicKey, manifest_digest: str) -> Verdict:
    """The verdict on one bundle for `manifest_digest` with `key`, or SignatureRefused.

    As sigstore-go: exactly one DSSE signature, over the PAE; an in-toto payload;
    some subject's digest equal to the manifest's. The predicate type is reported,
    not filtered (cosign does not filter it either).
    """
    check_digest(manifest_digest)
    envelope = bundle.envelope
    if envelope is None:
        raise SignatureRefused(
            Reason.NOT_A_SIGNATURE, "the bundle signs a blob (message signature), not an image"
        )
    if len(envelope.signatures) != 1:
        raise SignatureRefused(
            Reason.NOT_A_SIGNATURE,
            f"the bundle's DSSE envelope has {len(envelope.signatures)} signatures, not exactly 1",
        )
    try:
        scheme = key.verify(envelope.signatures[0], envelope.signed_bytes())
    except SignatureRefused:
        if _signed_by(bundle, key):
            raise SignatureRefused(
                Reason.TAMPERED,
                f"tampered bundle: the signature by {key.kind} key {key.source} "
                "does not match its payload",
            ) from None
        raise
    statement = parse_statement(envelope)
    if not statement.names(manifest_digest):
        named = ", ".join(
            f"{a}:{h}" for d in statement.subject_digests for a, h in sorted(d.items())
        )
        raise SignatureRefused(
            Reason.DIGEST_MISMATCH,
            f"digest mismatch: the bundle is for {named or 'no digest'}, not {manifest_digest}",
        )
    return Verdict(
        format="bundle",
        manifest_digest=manifest_digest,
        key=f"{key.kind} key {key.source}",
        scheme=scheme,
        predicate_type=statement.predicate_type,
    )


def verify_any_bundle(bundles: Iterable[bytes], key: PublicKey, manifest_digest: str) -> Verdict:
    """The first bundle (JSON bytes) that passes; else the most telling refusal."""
    return first_pass(
        bundles,
        lambda data: verify_bundle(parse_bundle(data), key, manifest_digest),
        manifest_digest,
    )


def build_bundle(
    key: PrivateKey, manifest_digest: str, annotations: Mapping[str, str] | None = None
) -> bytes:
    """The bundle `cosign sign --key --tlog-upload=false` makes (keyed, no tlog entry)."""
    statement = build_statement(manifest_digest, annotations)
    signature = key.sign(pae(INTOTO_PAYLOAD_TYPE, statement))
    envelope = Envelope(statement, INTOTO_PAYLOAD_TYPE, (signature,))
    return go_json(
        {
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {"publicKey": {"hint": key.public().hint()}},
            "dsseEnvelope": envelope.to_json(),
        }
    )


def is_bundle_referrer(manifest: Mapping[str, Any]) -> bool:
    """Whether a referrer manifest holds a bundle, by cosign's rule: exactly one layer,
    of a sigstore bundle media type (TOCs, SBOMs and the rest are skipped)."""
    layers = manifest.get("layers")
    return (
        isinstance(layers, list)
        and len(layers) == 1
        and isinstance(layers[0], dict)
        and str(layers[0].get("mediaType", "")).startswith(BUNDLE_MEDIA_TYPE_PREFIX)
    )


def bundle_referrer_manifest(
    bundle: bytes, subject: Mapping[str, Any], created: str
) -> bytes:
    """The referrer manifest cosign pushes for `bundle` (its blob and EMPTY_CONFIG are
    uploaded first); `subject` is the signed manifest's descriptor (mediaType, size,
    digest); `created` an RFC 3339 UTC time."""
    return go_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_EMPTY_JSON,
                "size": len(EMPTY_CONFIG),
                "digest": sha256_digest(EMPTY_CONFIG),
                "artifactType": BUNDLE_MEDIA_TYPE,
            },
            "layers": [
                {"mediaType": BUNDLE_MEDIA_TYPE, "size": len(bundle),
                 "digest": sha256_digest(bundle)}
            ],
            "annotations": {
                ANNOTATION_BUNDLE_CONTENT: "dsse-envelope",
                ANNOTATION_BUNDLE_PREDICATE: COSIGN_SIGN_PREDICATE,
                ANNOTATION_CREATED: created,
            },
            "subject": {
                "mediaType": subject["mediaType"],
                "size": subject["size"],
                "digest": subject["digest"],
            },
            "artifactType": BUNDLE_MEDIA_TYPE,
        }
    )
