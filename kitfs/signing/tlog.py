"""Rekor transparency-log entries, checked offline by their signed promise.

A signed entry timestamp (SET, a bundle's `inclusionPromise`) is the log's
signature over the entry and the time it was integrated; it is what lets a
short-lived Fulcio certificate be judged at signing time rather than now, and
it can be checked with the log's key from the trusted root alone. The entry's
body must also describe this very signature (CVE-2022-36056): same signature
bytes, same signer, same payload hash.

A bundle's entry may also carry an inclusion proof: the Merkle path from the
entry to a tree root the log signed (a checkpoint). When present it is checked
too (RFC 9162 inclusion, signed-note checkpoint), but the promise is still
required, since it alone gives the time. Not covered: Rekor v2 entries, which
carry no integrated time and need an RFC 3161 timestamp instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from kitfs.signing.keys import PublicKey, load_public_key, supported_public_key
from kitfs.signing.refusal import Reason, SignatureRefused
from kitfs.signing.trustroot import TrustedRoot


def _untrusted(why: str) -> SignatureRefused:
    return SignatureRefused(Reason.UNTRUSTED, f"transparency log: {why}")


@dataclass(frozen=True)
class InclusionProof:
    index: int  # the entry's index in the log shard the proof is about
    tree_size: int
    root_hash: bytes
    hashes: tuple[bytes, ...]
    checkpoint: str  # signed note text


@dataclass(frozen=True)
class LogEntry:
    body: str  # base64 of the canonicalized entry, exactly as the log signed it
    integrated_time: int
    log_index: int
    log_id: str  # hex
    promise: bytes | None  # the SET
    proof: InclusionProof | None = None

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.integrated_time, UTC)

    def decoded_body(self) -> dict[str, Any]:
        try:
            doc = json.loads(base64.b64decode(self.body, validate=True))
        except (ValueError, binascii.Error):
            raise _untrusted("the entry body is not base64 JSON") from None
        if not isinstance(doc, dict):
            raise _untrusted("the entry body is not an object")
        return doc


def entry_from_rekor_annotation(text: str) -> LogEntry:
    """From a classic layer's `dev.sigstore.cosign/bundle` annotation (cosign's RekorBundle)."""
    try:
        doc = json.loads(text)
        payload = doc["Payload"]
        return LogEntry(
            body=str(payload["body"]),
            integrated_time=int(payload["integratedTime"]),
            log_index=int(payload["logIndex"]),
            log_id=str(payload["logID"]),
            promise=base64.b64decode(doc["SignedEntryTimestamp"], validate=True),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise _untrusted(f"malformed Rekor bundle annotation ({e})") from None


def entry_from_bundle(doc: Any) -> LogEntry:
    """From one of a sigstore bundle's `verificationMaterial.tlogEntries` (protojson)."""
    try:
        promise = doc.get("inclusionPromise") or {}
        set_b64 = promise.get("signedEntryTimestamp")
        proof_doc = doc.get("inclusionProof")
        proof = None
        if proof_doc:
            proof = InclusionProof(
                index=int(proof_doc["logIndex"]),
                tree_size=int(proof_doc["treeSize"]),
                root_hash=base64.b64decode(proof_doc["rootHash"], validate=True),
                hashes=tuple(base64.b64decode(h, validate=True) for h in proof_doc["hashes"]),
                checkpoint=str(proof_doc["checkpoint"]["envelope"]),
            )
        return LogEntry(
            body=str(doc["canonicalizedBody"]),
            integrated_time=int(doc.get("integratedTime") or 0),
            log_index=int(doc["logIndex"]),
            log_id=base64.b64decode(doc["logId"]["keyId"], validate=True).hex(),
            promise=base64.b64decode(set_b64, validate=True) if set_b64 else None,
            proof=proof,
        )
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise _untrusted(f"malformed tlog entry ({e})") from None


def verify_promise(entry: LogEntry, root: TrustedRoot) -> datetime:
    """The integration time the log vouches for, once its SET verifies with a log key of
    `root` valid at that time."""
    if entry.promise is None or not entry.integrated_time:
        raise _untrusted("the entry has no signed promise (inclusion proofs are not checked)")
    key = root.log_key(entry.log_id, entry.time)
    if key is None:
        raise _untrusted(f"log {entry.log_id[:16]}… is not in {root.source} at {entry.time}")
    # RFC 8785 canonical JSON: every value here is an integer or an ASCII string.
    canonical = json.dumps(
        {
            "body": entry.body,
            "integratedTime": entry.integrated_time,
            "logID": entry.log_id,
            "logIndex": entry.log_index,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    try:
        key.verify(entry.promise, canonical)
    except SignatureRefused:
        raise _untrusted(f"the signed entry timestamp does not verify with {key.source}") from None
    return entry.time


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _root_from_path(index: int, size: int, leaf: bytes, path: tuple[bytes, ...]) -> bytes:
    """RFC 9162 §2.1.3.2: the root a Merkle inclusion path leads to."""
    if index >= size:
        raise _untrusted("the inclusion proof's index is outside its tree")
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            raise _untrusted("the inclusion proof is longer than its tree is deep")
        if fn & 1 or fn == sn:
            node = _node(sibling, node)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            node = _node(node, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise _untrusted("the inclusion proof is shorter than its tree is deep")
    return node


def _verify_checkpoint(proof: InclusionProof, log_id: str, key: PublicKey) -> None:
    """The checkpoint is a signed note by the log (key hint = first 4 bytes of its ID)
    naming the tree size and root the proof leads to."""
    text = proof.checkpoint
    split = text.find("\n\n")
    if split < 0:
        raise _untrusted("the checkpoint is not a signed note")
    header, signatures = text[: split + 1], text[split + 2 :]
    lines = header.split("\n")
    if len(lines) < 4 or lines[1] != str(proof.tree_size):
        raise _untrusted("the checkpoint is for another tree size")
    if lines[2] != base64.b64encode(proof.root_hash).decode():
        raise _untrusted("the checkpoint names another tree root")
    hint = bytes.fromhex(log_id)[:4]
    for line in signatures.splitlines():
        _, _, blob = line.rpartition(" ")
        if not line.startswith("\u2014 "):
            continue
        try:
            raw = base64.b64decode(blob, validate=True)
        except binascii.Error:
            continue
        if raw[:4] != hint:
            continue
        try:
            key.verify(raw[4:], header.encode())
        except SignatureRefused:
            raise _untrusted(
                f"the checkpoint's signature does not verify with {key.source}"
            ) from None
        return
    raise _untrusted("the checkpoint carries no signature by the log")


def verify_inclusion(entry: LogEntry, root: TrustedRoot) -> None:
    """The entry's Merkle inclusion proof leads to the root of a checkpoint the log signed;
    nothing to do if the entry carries no proof."""
    proof = entry.proof
    if proof is None:
        return
    key = root.log_key(entry.log_id, entry.time)
    if key is None:
        raise _untrusted(f"log {entry.log_id[:16]}… is not in {root.source} at {entry.time}")
    try:
        leaf = hashlib.sha256(b"\x00" + base64.b64decode(entry.body, validate=True)).digest()
    except binascii.Error:
        raise _untrusted("the entry body is not base64") from None
    if _root_from_path(proof.index, proof.tree_size, leaf, proof.hashes) != proof.root_hash:
        raise _untrusted("the inclusion proof does not lead to the logged tree root")
    _verify_checkpoint(proof, entry.log_id, key)


def _signer_of(content_b64: Any) -> bytes:
    """PKIX DER of the key in a body's base64 PEM (a public key or a certificate)."""
    try:
        pem = base64.b64decode(str(content_b64), validate=True)
        if b"CERTIFICATE" in pem:
            cert = x509.load_pem_x509_certificate(pem)
            return supported_public_key(cert.public_key(), "entry").der()
        return load_public_key(pem, "entry").der()
    except (ValueError, binascii.Error, SignatureRefused):
        raise _untrusted("the entry names an unreadable signer") from None


def check_hashedrekord(
    entry: LogEntry, payload: bytes, signature_b64: str, signer: PublicKey
) -> None:
    """The entry (hashedrekord 0.0.1) is about this payload, signature and signer."""
    body = entry.decoded_body()
    if (body.get("kind"), body.get("apiVersion")) != ("hashedrekord", "0.0.1"):
        raise _untrusted(f"entry kind {body.get('kind')!r} {body.get('apiVersion')!r} unexpected")
    spec = body.get("spec") or {}
    try:
        digest = spec["data"]["hash"]
        content = spec["signature"]["content"]
        key = spec["signature"]["publicKey"]["content"]
    except (KeyError, TypeError):
        raise _untrusted("the hashedrekord entry is incomplete") from None
    if digest.get("algorithm") != "sha256" or digest.get("value") != hashlib.sha256(
        payload
    ).hexdigest():
        raise _untrusted("the entry is for another payload")
    if content != signature_b64:
        raise _untrusted("the entry is for another signature")
    if _signer_of(key) != signer.der():
        raise _untrusted("the entry is for another signer")


def check_dsse_entry(entry: LogEntry, payload: bytes, signature: bytes, signer: PublicKey) -> None:
    """The entry (dsse 0.0.1) is about this envelope's payload, signature and signer."""
    body = entry.decoded_body()
    if (body.get("kind"), body.get("apiVersion")) != ("dsse", "0.0.1"):
        raise _untrusted(f"entry kind {body.get('kind')!r} {body.get('apiVersion')!r} unexpected")
    spec = body.get("spec") or {}
    payload_hash = spec.get("payloadHash") or {}
    if payload_hash.get("algorithm") != "sha256" or payload_hash.get(
        "value"
    ) != hashlib.sha256(payload).hexdigest():
        raise _untrusted("the entry is for another payload")
    signatures = spec.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise _untrusted("the dsse entry does not hold exactly one signature")
    try:
        listed = base64.b64decode(signatures[0]["signature"], validate=True)
        verifier = signatures[0]["verifier"]
    except (KeyError, TypeError, binascii.Error):
        raise _untrusted("the dsse entry's signature is unreadable") from None
    if listed != signature:
        raise _untrusted("the entry is for another signature")
    if _signer_of(verifier) != signer.der():
        raise _untrusted("the entry is for another signer")
