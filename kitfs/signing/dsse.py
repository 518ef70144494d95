"""DSSE envelopes and the in-toto statements cosign signs in them.

A bundle's signature is over the DSSE pre-authentication encoding (PAE) of the
payload type and the decoded payload, never over the JSON it travels in, so
re-encoding the envelope cannot change what was signed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kitfs.signing.gojson import go_json
from kitfs.signing.payload import check_digest
from kitfs.signing.refusal import Reason, SignatureRefused

INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_V1 = "https://in-toto.io/Statement/v1"
#: The predicate type `cosign sign` (new bundle format) uses for an image signature.
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"

#: sigstore-go's limits on what an in-toto statement may list.
_MAX_SUBJECTS = 1024
_MAX_DIGESTS = 32


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSEv1 SP LEN(type) SP type SP LEN(body) SP body, lengths in ASCII decimal bytes."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope with its payload decoded."""

    payload: bytes
    payload_type: str
    signatures: tuple[bytes, ...]

    @classmethod
    def from_json(cls, doc: Any) -> Envelope:
        """From the bundle's `dsseEnvelope` object (protojson: base64 bytes fields)."""
        try:
            payload = base64.b64decode(doc["payload"], validate=True)
            payload_type = doc["payloadType"]
            signatures = tuple(
                base64.b64decode(s["sig"], validate=True) for s in doc.get("signatures") or []
            )
            if not isinstance(payload_type, str):
                raise TypeError("payloadType is not a string")
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # binascii.Error too
            raise SignatureRefused(
                Reason.NOT_A_SIGNATURE, f"malformed DSSE envelope ({e})"
            ) from None
        return cls(payload, payload_type, signatures)

    def to_json(self) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [{"sig": base64.b64encode(s).decode()} for s in self.signatures],
        }

    def signed_bytes(self) -> bytes:
        return pae(self.payload_type, self.payload)


@dataclass(frozen=True)
class Statement:
    """What an in-toto statement claims: its predicate type and subject digests."""

    predicate_type: str
    subject_digests: tuple[Mapping[str, str], ...]

    def names(self, manifest_digest: str) -> bool:
        algorithm, _, hexpart = manifest_digest.partition(":")
        return any(d.get(algorithm) == hexpart for d in self.subject_digests)


def build_statement(
    manifest_digest: str, annotations: Mapping[str, str] | None = None
) -> bytes:
    """The statement `cosign sign` signs in a bundle: one subject without a name, its
    digest, the `-a` annotations (`{}` when none), predicate `{}`."""
    algorithm, _, hexpart = check_digest(manifest_digest).partition(":")
    subject = {
        "digest": {algorithm: hexpart},
        "annotations": dict(sorted((annotations or {}).items())),
    }
    return go_json(
        {
            "_type": STATEMENT_V1,
            "subject": [subject],
            "predicateType": COSIGN_SIGN_PREDICATE,
            "predicate": {},
        }
    )


def parse_statement(envelope: Envelope) -> Statement:
    """The statement in `envelope`; SignatureRefused(NOT_A_SIGNATURE) if it holds none."""

    def refuse(why: str) -> SignatureRefused:
        return SignatureRefused(Reason.NOT_A_SIGNATURE, f"not an in-toto statement: {why}")

    if envelope.payload_type != INTOTO_PAYLOAD_TYPE:
        raise refuse(f"payload type {envelope.payload_type!r}")
    try:
        doc = json.loads(envelope.payload)
    except (ValueError, UnicodeDecodeError):
        raise refuse("payload is not JSON") from None
    if not isinstance(doc, dict):
        raise refuse("payload is not an object")
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise refuse("no subjects")
    if len(subjects) > _MAX_SUBJECTS:
        raise refuse(f"more than {_MAX_SUBJECTS} subjects")
    digests: list[Mapping[str, str]] = []
    for subject in subjects:
        digest = subject.get("digest") if isinstance(subject, dict) else None
        if not isinstance(digest, dict) or len(digest) > _MAX_DIGESTS:
            raise refuse("a subject without a valid digest map")
        digests.append({k: v for k, v in digest.items() if isinstance(v, str)})
    predicate_type = doc.get("predicateType")
    return Statement(
        predicate_type=predicate_type if isinstance(predicate_type, str) else "",
        subject_digests=tuple(digests),
    )
