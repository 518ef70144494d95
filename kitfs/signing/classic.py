"""Classic cosign signatures: the layers of the `sha256-<hex>.sig` image.

Each layer's blob is a simple-signing payload and its descriptor annotation
`dev.cosignproject.cosign/signature` is the base64 signature over those exact
bytes. Verification mirrors `cosign verify --key` (signature first, over the
stored bytes; then the digest claim; `docker-reference` ignored) and, like
containers/image, also requires the layer media type and `critical.type`, which
real cosign signatures always satisfy. Signing produces the manifest and config
bytes go-containerregistry's `mutate.Append` would, so a later `cosign sign` on
the same digest appends to what kitfs pushed and the other way round.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kitfs.errors import FormatError
from kitfs.modelkit.manifest import sha256_digest
from kitfs.modelkit.mediatypes import OCI_MANIFEST
from kitfs.signing.gojson import go_json
from kitfs.signing.keys import PrivateKey, PublicKey
from kitfs.signing.payload import COSIGN_SIGNATURE_TYPE, build_payload, check_digest, parse_payload
from kitfs.signing.refusal import Reason, SignatureRefused, first_pass
from kitfs.signing.verdict import Verdict

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
SIGNATURE_TAG_SUFFIX = "sig"

ANNOTATION_SIGNATURE = "dev.cosignproject.cosign/signature"
ANNOTATION_CERTIFICATE = "dev.sigstore.cosign/certificate"
ANNOTATION_CHAIN = "dev.sigstore.cosign/chain"
ANNOTATION_REKOR_BUNDLE = "dev.sigstore.cosign/bundle"
ANNOTATION_RFC3161 = "dev.sigstore.cosign/rfc3161timestamp"

_ZERO_TIME = "0001-01-01T00:00:00Z"


def signature_tag(manifest_digest: str, prefix: str = "") -> str:
    """The tag cosign keeps a digest's classic signatures under: `sha256-<hex>.sig`."""
    algorithm, _, hexpart = check_digest(manifest_digest).partition(":")
    return f"{prefix}{algorithm}-{hexpart}.{SIGNATURE_TAG_SUFFIX}"


@dataclass(frozen=True)
class ClassicSignature:
    """One layer of a `.sig` image: its blob and descriptor facts."""

    payload: bytes
    annotations: Mapping[str, str]
    media_type: str = SIMPLESIGNING_MEDIA_TYPE
    layer_digest: str | None = None  # the descriptor's digest, when the blob came from one

    @classmethod
    def from_layer(cls, descriptor: Mapping[str, Any], blob: bytes) -> ClassicSignature:
        annotations = descriptor.get("annotations")
        if not isinstance(annotations, Mapping):
            annotations = {}
        return cls(
            payload=blob,
            annotations={k: v for k, v in annotations.items() if isinstance(v, str)},
            media_type=str(descriptor.get("mediaType", "")),
            layer_digest=str(descriptor.get("digest", "")) or None,
        )

    @property
    def signature_b64(self) -> str:
        return self.annotations.get(ANNOTATION_SIGNATURE, "")


def verify_classic(sig: ClassicSignature, key: PublicKey, manifest_digest: str) -> Verdict:
    """The verdict on one classic signature for `manifest_digest`, or SignatureRefused."""
    if sig.media_type != SIMPLESIGNING_MEDIA_TYPE:
        raise SignatureRefused(
            Reason.NOT_A_SIGNATURE, f"layer of type {sig.media_type!r} is not a cosign signature"
        )
    if sig.layer_digest is not None and sig.layer_digest != sha256_digest(sig.payload):
        raise SignatureRefused(
            Reason.TAMPERED, f"tampered payload: its bytes do not match layer {sig.layer_digest}"
        )
    if not sig.signature_b64:
        raise SignatureRefused(
            Reason.NOT_A_SIGNATURE, f"layer has no {ANNOTATION_SIGNATURE} annotation"
        )
    try:
        raw = base64.b64decode(sig.signature_b64, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        raise SignatureRefused(
            Reason.NOT_A_SIGNATURE, f"{ANNOTATION_SIGNATURE} is not base64"
        ) from None
    scheme = key.verify(raw, sig.payload)
    claims = parse_payload(sig.payload)
    if claims.type != COSIGN_SIGNATURE_TYPE:
        raise SignatureRefused(
            Reason.NOT_A_SIGNATURE, f"payload type {claims.type!r} is not a cosign image signature"
        )
    if claims.manifest_digest != manifest_digest:
        raise SignatureRefused(
            Reason.DIGEST_MISMATCH,
            f"digest mismatch: the signature is for {claims.manifest_digest}, "
            f"not {manifest_digest}",
        )
    return Verdict(
        format="classic",
        manifest_digest=manifest_digest,
        key=f"{key.kind} key {key.source}",
        scheme=scheme,
        docker_reference=claims.docker_reference,
    )


def verify_any_classic(
    signatures: Iterable[ClassicSignature], key: PublicKey, manifest_digest: str
) -> Verdict:
    """The first signature that passes; else the most telling refusal."""
    return first_pass(
        signatures, lambda sig: verify_classic(sig, key, manifest_digest), manifest_digest
    )


@dataclass(frozen=True)
class SignedLayer:
    """A new classic signature: the blob to upload and the layer descriptor to append."""

    payload: bytes
    descriptor: dict[str, Any] = field(hash=False)


def sign_classic(
    key: PrivateKey,
    docker_reference: str,
    manifest_digest: str,
    annotations: Mapping[str, str] | None = None,
) -> SignedLayer:
    """Sign `manifest_digest` as `cosign sign --key` does (no Rekor upload)."""
    payload = build_payload(docker_reference, manifest_digest, annotations)
    signature = base64.b64encode(key.sign(payload)).decode()
    return SignedLayer(
        payload=payload,
        descriptor={
            "mediaType": SIMPLESIGNING_MEDIA_TYPE,
            "size": len(payload),
            "digest": sha256_digest(payload),
            "annotations": {ANNOTATION_SIGNATURE: signature},
        },
    )


def _is_duplicate(existing: Mapping[str, Any], new: SignedLayer, key: PublicKey) -> bool:
    """cosign's dedupe: same payload and media type, same other annotations, and the
    existing signature verifies with the signer's key."""
    if existing.get("digest") != new.descriptor["digest"]:
        return False
    if existing.get("mediaType") != new.descriptor["mediaType"]:
        return False
    old_annotations = existing.get("annotations") or {}
    for name, value in new.descriptor["annotations"].items():
        if name != ANNOTATION_SIGNATURE and old_annotations.get(name) != value:
            return False
    old = ClassicSignature(new.payload, old_annotations, layer_digest=existing.get("digest"))
    try:
        key.verify(base64.b64decode(old.signature_b64, validate=True), new.payload)
    except (SignatureRefused, binascii.Error):
        return False
    return True


def append_signature(
    new: SignedLayer,
    signer: PublicKey,
    existing_manifest: bytes | None = None,
    existing_config: bytes | None = None,
) -> tuple[bytes, bytes] | None:
    """(manifest, config) bytes for the `.sig` tag with `new` appended, or None when an
    equal signature by the same key is already there.

    Existing layers (other keys' signatures, other tools' layers) are kept verbatim,
    and the config's `diff_ids`/`history` extended by one entry, as `mutate.Append` does.
    """
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG_MEDIA_TYPE},
        "layers": [],
    }
    config: dict[str, Any] = {
        "architecture": "",
        "created": _ZERO_TIME,
        "history": [],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {},
    }
    try:
        if existing_manifest is not None:
            manifest = json.loads(existing_manifest)
            if not isinstance(manifest.get("layers"), list):
                raise ValueError("no layers list")
        if existing_config is not None:
            config = json.loads(existing_config)
            config.setdefault("history", [])
            config.setdefault("rootfs", {"type": "layers"})
            if config["rootfs"].get("diff_ids") is None:
                config["rootfs"]["diff_ids"] = []
            if not isinstance(config["history"], list) or not isinstance(
                config["rootfs"]["diff_ids"], list
            ):
                raise ValueError("history or diff_ids not a list")
    except (ValueError, AttributeError, TypeError) as e:
        raise FormatError(f"the existing signature image is malformed ({e})") from None
    if any(_is_duplicate(layer, new, signer) for layer in manifest["layers"]):
        return None
    manifest["layers"].append(new.descriptor)
    config["rootfs"]["diff_ids"].append(new.descriptor["digest"])  # uncompressed: diff_id = digest
    config["history"].append({"created": _ZERO_TIME})
    config_bytes = go_json(config)
    old_config = manifest.get("config")
    old_type = old_config.get("mediaType") if isinstance(old_config, dict) else None
    manifest["config"] = {
        "mediaType": old_type or OCI_CONFIG_MEDIA_TYPE,
        "size": len(config_bytes),
        "digest": sha256_digest(config_bytes),
    }
    return go_json(manifest), config_bytes
