"""The simple-signing payload a classic cosign signature signs.

The signature covers these exact bytes, and the bytes name the manifest digest:
that two-hop binding is the whole of what a classic signature says. kitfs
writes them exactly as cosign does (Go `json.Marshal` of sigstore's
`payload.SimpleContainerImage`: critical{identity, image, type}, optional, with
`"optional":null` when there are no annotations) so its signatures are
indistinguishable from cosign's; it parses whatever a verifier meets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kitfs.signing.gojson import go_json
from kitfs.signing.refusal import Reason, SignatureRefused

#: `critical.type` of every cosign image signature.
COSIGN_SIGNATURE_TYPE = "cosign container image signature"

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")


def check_digest(digest: str) -> str:
    """`digest` if it is a sha256/sha512 OCI digest; a signature can only name those."""
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"not a manifest digest: {digest!r}")
    return digest


@dataclass(frozen=True)
class SimpleSigning:
    """What a simple-signing payload claims."""

    docker_reference: str
    manifest_digest: str
    type: str = COSIGN_SIGNATURE_TYPE
    optional: Mapping[str, object] | None = field(default=None)


def build_payload(
    docker_reference: str,
    manifest_digest: str,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """The payload `cosign sign` writes for `docker_reference` (registry/repository, no tag)
    at `manifest_digest`; `annotations` are `cosign sign -a k=v` (sorted, as Go maps are)."""
    optional = None if not annotations else dict(sorted(annotations.items()))
    return go_json(
        {
            "critical": {
                "identity": {"docker-reference": docker_reference},
                "image": {"docker-manifest-digest": check_digest(manifest_digest)},
                "type": COSIGN_SIGNATURE_TYPE,
            },
            "optional": optional,
        }
    )


def parse_payload(data: bytes) -> SimpleSigning:
    """The claims of a payload; SignatureRefused(NOT_A_SIGNATURE) if it is not one."""

    def refuse(why: str) -> SignatureRefused:
        return SignatureRefused(Reason.NOT_A_SIGNATURE, f"not a simple-signing payload: {why}")

    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise refuse("not JSON") from None
    critical = doc.get("critical") if isinstance(doc, dict) else None
    if not isinstance(critical, dict):
        raise refuse("no `critical` object")
    identity = critical.get("identity")
    image = critical.get("image")
    kind = critical.get("type")
    reference = identity.get("docker-reference") if isinstance(identity, dict) else None
    digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(digest, str):
        raise refuse("no `critical.image.docker-manifest-digest`")
    if not isinstance(kind, str):
        raise refuse("no `critical.type`")
    optional = doc.get("optional")
    return SimpleSigning(
        docker_reference=reference if isinstance(reference, str) else "",
        manifest_digest=digest,
        type=kind,
        optional=optional if isinstance(optional, dict) else None,
    )
