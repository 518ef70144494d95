"""The pure signature core against cosign's own published vectors, and round trips.

Vectors under tests/data/cosign/ are kept verbatim (see its README for each
file's repository, path and commit): signatures made by cosign and by
containers/image, cosign's encrypted test keys (password `hello`), and cosign's
keyless attestation bundle over go-containerregistry's empty image.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from kitfs.errors import SignatureError
from kitfs.signing import bundle, classic, dsse, keyless, keys, payload, trustroot
from kitfs.signing.refusal import Reason, SignatureRefused, first_pass

DATA = Path(__file__).parent / "data" / "cosign"
VALID_DIGEST = "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"
REKOR_DIGEST = "sha256:0489474da8ea22426ece86ace6c1c0026ab2fd3cdfbbd62b7e94650266c37d9a"
EMPTY_IMAGE_DIGEST = "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4"
OTHER_DIGEST = "sha256:" + "ab" * 32


def read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def public(name: str) -> keys.PublicKey:
    return keys.load_public_key(read(name), name)


def containers_image_signature(name: str) -> classic.ClassicSignature:
    """containers/image's `signature-N` files: a magic line, then the layer's media type,
    base64 payload and the same annotations cosign puts on the layer descriptor."""
    data = read(name)
    magic = b"\x00sigstore-json\n"
    assert data.startswith(magic)
    doc = json.loads(data[len(magic) :])
    return classic.ClassicSignature(
        payload=base64.b64decode(doc["payload"]),
        annotations=doc["annotations"],
        media_type=doc["mimeType"],
    )


def refused(reason: Reason, call: Any, *args: Any) -> str:
    with pytest.raises(SignatureRefused) as info:
        call(*args)
    assert info.value.reason == reason, str(info.value)
    assert "\n" not in str(info.value)
    return str(info.value)


def plain_private(name: str) -> keys.PrivateKey:
    key = serialization.load_pem_private_key(read(name), None)
    assert isinstance(key, keys.PrivateKeyType)
    return keys.PrivateKey(key, name)


# One private key per type cosign supports, from cosign's keys_test.go constants.
KEY_FILES = [
    "keys_test.validecp256.pem",
    "keys_test.validecp384.pem",
    "keys_test.validecp521.pem",
    "keys_test.validrsapkcs8.pem",
    "keys_test.ed25519key.pem",
]


@pytest.fixture(params=KEY_FILES)
def signer(request: pytest.FixtureRequest) -> keys.PrivateKey:
    return plain_private(request.param)


# --- keys ------------------------------------------------------------------------------------


def test_public_keys_cosign_reads_are_loaded() -> None:
    assert public("ci-cosign.pub").kind == "ECDSA P-256"
    assert public("cosign-test.pub").kind == "ECDSA P-256"
    assert public("cosign-testdata-rsa.pub").kind == "RSA 4096"  # PKCS#1 `RSA PUBLIC KEY`
    assert public("cosign-testdata-google.pub").kind == "RSA 4096"


def test_unsupported_and_garbage_public_keys_are_refused() -> None:
    p224 = plain_private_unchecked("keys_test.invalidecp224.pem").public_key()
    pem = p224.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    message = refused(Reason.UNSUPPORTED_KEY, keys.load_public_key, pem, "p224.pub")
    assert "secp224r1" in message
    small = rsa.generate_private_key(65537, 1024).public_key()
    pem = small.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    refused(Reason.UNSUPPORTED_KEY, keys.load_public_key, pem, "small.pub")
    refused(Reason.UNSUPPORTED_KEY, keys.load_public_key, b"garbage", "garbage.pub")


def plain_private_unchecked(name: str) -> Any:
    return serialization.load_pem_private_key(read(name), None)


@pytest.mark.parametrize("name", ["keys_test.pemcosignkey.key", "keys_test.pemsigstorekey.key"])
def test_cosign_encrypted_keys_decrypt_with_their_password(name: str) -> None:
    key = keys.load_encrypted_private_key(read(name), b"hello", name)
    assert key.public().kind == "ECDSA P-256"
    data = b"signed by a decrypted cosign key"
    assert key.public().verify(key.sign(data), data) == "ECDSA P-256 SHA256"


def test_sec1_inside_an_encrypted_key_is_refused_as_cosign_does() -> None:
    with pytest.raises(SignatureError, match="not PKCS#8"):
        keys.load_encrypted_private_key(
            read("keys_test.pemcosigneckey.key"), b"hello", "pemcosigneckey"
        )


def test_wrong_password_and_wrong_pem_type_are_refused() -> None:
    with pytest.raises(SignatureError, match="decryption failed"):
        keys.load_encrypted_private_key(read("cosign-test.key"), b"not the CI secret", "k")
    with pytest.raises(SignatureError, match="decryption failed"):
        keys.load_encrypted_private_key(read("keys_test.pemsigstorekey.key"), b"hellO", "k")
    with pytest.raises(SignatureError, match="unsupported PEM type 'PRIVATE KEY'"):
        keys.load_encrypted_private_key(read("keys_test.ed25519key.pem"), b"hello", "k")


def test_unusual_scrypt_parameters_are_refused() -> None:
    text = read("keys_test.pemsigstorekey.key").decode().splitlines()
    doc = json.loads(base64.b64decode("".join(text[1:-1])))
    doc["kdf"]["params"]["N"] = 1024
    body = base64.b64encode(json.dumps(doc).encode()).decode()
    pem = f"{text[0]}\n{body}\n{text[-1]}\n".encode()
    with pytest.raises(SignatureError, match="unsupported scrypt parameters N=1024"):
        keys.load_encrypted_private_key(pem, b"hello", "k")


def test_written_key_files_read_back_for_every_key_type(signer: keys.PrivateKey) -> None:
    pem = keys.encrypt_private_key(signer, b"pw")
    assert pem.startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    assert all(len(line) <= 64 for line in pem.splitlines())
    doc = json.loads(base64.b64decode(b"".join(pem.splitlines()[1:-1])))
    assert doc["kdf"]["params"] == {"N": 65536, "r": 8, "p": 1}
    back = keys.load_encrypted_private_key(pem, b"pw", "written")
    assert back.pkcs8() == signer.pkcs8()
    with pytest.raises(SignatureError, match="decryption failed"):
        keys.load_encrypted_private_key(pem, b"", "written")


def test_generated_key_is_p256() -> None:
    assert keys.generate_private_key().public().kind == "ECDSA P-256"


# --- payload ---------------------------------------------------------------------------------


def test_payload_is_byte_identical_to_cosigns() -> None:
    made_by_cosign = containers_image_signature("ci-valid.signature-1").payload
    built = payload.build_payload("192.168.64.2:5000/cosign-signed-single-sample", VALID_DIGEST)
    assert built == made_by_cosign
    assert built.endswith(b'"optional":null}')


def test_payload_annotations_are_sorted_and_go_escaped() -> None:
    built = payload.build_payload("r/x", VALID_DIGEST, {"z": "1", "a": "<&>"})
    assert built.endswith(b'"optional":{"a":"\\u003c\\u0026\\u003e","z":"1"}}')
    claims = payload.parse_payload(built)
    assert claims.optional == {"a": "<&>", "z": "1"}
    assert claims.manifest_digest == VALID_DIGEST


def test_payload_parse_refuses_what_is_not_one() -> None:
    refused(Reason.NOT_A_SIGNATURE, payload.parse_payload, b"this is not a signature")
    refused(Reason.NOT_A_SIGNATURE, payload.parse_payload, b'{"critical":{"type":"x"}}')
    with pytest.raises(ValueError):
        payload.build_payload("r/x", "sha256:short")


# --- classic: published vectors --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["ci-valid.signature-1", "ci-valid-with-tag.signature-1", "ci-valid-2.signature-2"],
)
def test_published_classic_signatures_verify(name: str) -> None:
    assert sha256(read("ci-valid.manifest.json")) == VALID_DIGEST
    verdict = classic.verify_classic(
        containers_image_signature(name), public("ci-cosign.pub"), VALID_DIGEST
    )
    assert verdict.format == "classic"
    assert verdict.scheme == "ECDSA P-256 SHA256"
    assert not verdict.tlog_checked
    assert VALID_DIGEST in verdict.describe()


def test_published_keyed_rekor_signature_verifies_with_its_key_only() -> None:
    sig = containers_image_signature("ci-key-rekor-valid.signature-1")
    assert classic.ANNOTATION_REKOR_BUNDLE in sig.annotations
    assert sha256(read("ci-key-rekor-valid.manifest.json")) == REKOR_DIGEST
    classic.verify_classic(sig, public("ci-cosign2.pub"), REKOR_DIGEST)
    refused(Reason.WRONG_KEY, classic.verify_classic, sig, public("ci-cosign.pub"), REKOR_DIGEST)


def test_published_broken_classic_signatures_are_refused_with_their_reason() -> None:
    key = public("ci-cosign.pub")
    unknown = containers_image_signature("ci-unknown-cosign-key.signature")
    refused(Reason.WRONG_KEY, classic.verify_classic, unknown, key, VALID_DIGEST)
    modified = sha256(read("ci-modified-manifest.manifest.json"))
    valid = containers_image_signature("ci-valid.signature-1")
    message = refused(Reason.DIGEST_MISMATCH, classic.verify_classic, valid, key, modified)
    assert VALID_DIGEST in message and modified in message
    other = containers_image_signature("ci-other-attachment.signature-1")
    refused(Reason.NOT_A_SIGNATURE, classic.verify_classic, other, key, VALID_DIGEST)
    # The same bytes in a simple-signing layer still are not a cosign payload.
    relabelled = classic.ClassicSignature(other.payload, other.annotations)
    refused(Reason.WRONG_KEY, classic.verify_classic, relabelled, key, VALID_DIGEST)


def test_any_one_signature_is_enough_and_the_most_telling_refusal_wins() -> None:
    key = public("ci-cosign.pub")
    unknown = containers_image_signature("ci-unknown-cosign-key.signature")
    valid = containers_image_signature("ci-valid.signature-1")
    other = containers_image_signature("ci-other-attachment.signature-1")
    assert classic.verify_any_classic([other, unknown, valid], key, VALID_DIGEST)
    refused(Reason.DIGEST_MISMATCH, classic.verify_any_classic, [other, valid, unknown], key,
            OTHER_DIGEST)
    refused(Reason.WRONG_KEY, classic.verify_any_classic, [other, unknown], key, VALID_DIGEST)
    message = refused(Reason.NO_SIGNATURE, classic.verify_any_classic, [], key, VALID_DIGEST)
    assert message == f"no signatures found for {VALID_DIGEST}"


# --- classic: sign and verify ----------------------------------------------------------------


def test_classic_round_trip_and_refusals_for_every_key_type(signer: keys.PrivateKey) -> None:
    layer = classic.sign_classic(signer, "registry.local/models/x", VALID_DIGEST, {"team": "a"})
    assert layer.descriptor["digest"] == sha256(layer.payload)
    sig = classic.ClassicSignature.from_layer(layer.descriptor, layer.payload)
    verdict = classic.verify_classic(sig, signer.public(), VALID_DIGEST)
    assert verdict.docker_reference == "registry.local/models/x"

    refused(Reason.DIGEST_MISMATCH, classic.verify_classic, sig, signer.public(), OTHER_DIGEST)
    wrong = keys.generate_private_key().public()
    refused(Reason.WRONG_KEY, classic.verify_classic, sig, wrong, VALID_DIGEST)
    tampered = layer.payload.replace(b"registry.local", b"registry.evil!")
    as_fetched = classic.ClassicSignature.from_layer(layer.descriptor, tampered)
    refused(Reason.TAMPERED, classic.verify_classic, as_fetched, signer.public(), VALID_DIGEST)
    bare = classic.ClassicSignature(tampered, layer.descriptor["annotations"])
    refused(Reason.WRONG_KEY, classic.verify_classic, bare, signer.public(), VALID_DIGEST)
    for garbage in (b"abc", b"\x30" * 64, b"\x00" * 64, b"\x00" * 512):
        annotations = {classic.ANNOTATION_SIGNATURE: base64.b64encode(garbage).decode()}
        broken = classic.ClassicSignature(layer.payload, annotations)
        refused(Reason.WRONG_KEY, classic.verify_classic, broken, signer.public(), VALID_DIGEST)
    unsigned = classic.ClassicSignature(layer.payload, {})
    refused(Reason.NOT_A_SIGNATURE, classic.verify_classic, unsigned, signer.public(),
            VALID_DIGEST)


def test_signatures_made_the_ways_cosign_makes_them_verify() -> None:
    data = payload.build_payload("r/x", VALID_DIGEST)
    # cosign v3 `sign` makes Ed25519ph (RFC 8032 prehash); `verify --key` checks pure.
    ed = ed25519.Ed25519PrivateKey.generate()
    seed = ed.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub_raw = ed.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    import nacl.bindings

    state = nacl.bindings.crypto_sign_ed25519ph_state()
    nacl.bindings.crypto_sign_ed25519ph_update(state, data)
    ph = nacl.bindings.crypto_sign_ed25519ph_final_create(state, seed + pub_raw)
    ed_pub = keys.PublicKey(ed.public_key(), "ed.pub")
    assert ed_pub.verify(ph, data) == "Ed25519ph"
    assert ed_pub.verify(ed.sign(data), data) == "Ed25519"
    # P-384 signed by `cosign sign` uses SHA-384; other signers use SHA-256: both pass.
    p384 = ec.generate_private_key(ec.SECP384R1())
    p384_pub = keys.PublicKey(p384.public_key(), "p384.pub")
    assert p384_pub.verify(p384.sign(data, ec.ECDSA(hashes.SHA384())), data).endswith("SHA384")
    assert p384_pub.verify(p384.sign(data, ec.ECDSA(hashes.SHA256())), data).endswith("SHA256")
    # ECDSA as IEEE P1363 r||s instead of DER.
    p256 = ec.generate_private_key(ec.SECP256R1())
    r, s = decode_dss_signature(p256.sign(data, ec.ECDSA(hashes.SHA256())))
    p1363 = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert keys.PublicKey(p256.public_key(), "p").verify(p1363, data) == "ECDSA P-256 SHA256"


def test_signature_tag_is_cosigns() -> None:
    assert classic.signature_tag(VALID_DIGEST) == f"sha256-{VALID_DIGEST[7:]}.sig"
    assert classic.signature_tag(VALID_DIGEST, "p-") == f"p-sha256-{VALID_DIGEST[7:]}.sig"


def test_new_signature_image_has_go_containerregistrys_bytes() -> None:
    signer = keys.generate_private_key()
    layer = classic.sign_classic(signer, "r/x", VALID_DIGEST)
    made = classic.append_signature(layer, signer.public())
    assert made is not None
    manifest, config = made
    assert config == (
        b'{"architecture":"","created":"0001-01-01T00:00:00Z","history":[{"created":'
        b'"0001-01-01T00:00:00Z"}],"os":"","rootfs":{"type":"layers","diff_ids":["'
        + layer.descriptor["digest"].encode()
        + b'"]},"config":{}}'
    )
    signature = layer.descriptor["annotations"][classic.ANNOTATION_SIGNATURE]
    assert manifest == (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        '"config":{"mediaType":"application/vnd.oci.image.config.v1+json",'
        f'"size":{len(config)},"digest":"{sha256(config)}"}},'
        '"layers":[{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json",'
        f'"size":{len(layer.payload)},"digest":"{sha256(layer.payload)}",'
        f'"annotations":{{"dev.cosignproject.cosign/signature":"{signature}"}}}}]}}'
    ).encode()


def test_appending_keeps_other_layers_and_skips_duplicates() -> None:
    first, second = keys.generate_private_key(), keys.generate_private_key()
    layer1 = classic.sign_classic(first, "r/x", VALID_DIGEST)
    made = classic.append_signature(layer1, first.public())
    assert made is not None
    manifest1, config1 = made
    layer2 = classic.sign_classic(second, "r/x", VALID_DIGEST)
    made = classic.append_signature(layer2, second.public(), manifest1, config1)
    assert made is not None
    manifest2, config2 = made
    layers = json.loads(manifest2)["layers"]
    assert layers == [layer1.descriptor, layer2.descriptor]
    assert json.loads(config2)["rootfs"]["diff_ids"] == [
        layer1.descriptor["digest"],
        layer2.descriptor["digest"],
    ]
    # The same payload signed again by the first key: cosign's dedupe leaves it alone.
    again = classic.sign_classic(first, "r/x", VALID_DIGEST)
    assert again.descriptor != layer1.descriptor  # ECDSA signatures are randomised
    assert classic.append_signature(again, first.public(), manifest2, config2) is None
    # Both signatures (same payload, one layer each) verify from the pushed image.
    for descriptor, key in zip(layers, (first, second), strict=True):
        sig = classic.ClassicSignature.from_layer(descriptor, layer1.payload)
        classic.verify_classic(sig, key.public(), VALID_DIGEST)


# --- DSSE and bundles ------------------------------------------------------------------------


def test_pae_matches_the_dsse_spec_example() -> None:
    assert (
        dsse.pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_statement_is_the_one_cosign_signs() -> None:
    assert dsse.build_statement(VALID_DIGEST) == (
        '{"_type":"https://in-toto.io/Statement/v1","subject":[{"digest":{"sha256":"'
        + VALID_DIGEST[7:]
        + '"},"annotations":{}}],"predicateType":"https://sigstore.dev/cosign/sign/v1",'
        '"predicate":{}}'
    ).encode()


def empty_image_manifest() -> bytes:
    """go-containerregistry's `empty.Image` manifest: the subject of cosign's test bundle."""
    config = (
        b'{"architecture":"","created":"0001-01-01T00:00:00Z","os":"",'
        b'"rootfs":{"type":"layers","diff_ids":null},"config":{}}'
    )
    return (
        '{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
        '"config":{"mediaType":"application/vnd.docker.container.image.v1+json",'
        f'"size":{len(config)},"digest":"{sha256(config)}"}},"layers":[]}}'
    ).encode()


def cosign_attestation() -> tuple[bundle.Bundle, keys.PublicKey]:
    parsed = bundle.parse_bundle(read("cosign-oci-attestation.sigstore.json"))
    assert parsed.certificate is not None
    cert_key = parsed.certificate.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    return parsed, keys.PublicKey(cert_key, "leaf certificate")


def test_cosigns_attestation_bundle_verifies_over_the_empty_image() -> None:
    """Signature and subject only (with the certificate's key): chain, identity and
    tlog are keyless checks this core does not make."""
    assert sha256(empty_image_manifest()) == EMPTY_IMAGE_DIGEST
    parsed, cert_key = cosign_attestation()
    assert parsed.version == (0, 3) and len(parsed.tlog_entries) == 1
    verdict = bundle.verify_bundle(parsed, cert_key, EMPTY_IMAGE_DIGEST)
    assert verdict.predicate_type == "https://cosign.sigstore.dev/attestation/v1"
    assert not verdict.tlog_checked
    refused(Reason.DIGEST_MISMATCH, bundle.verify_bundle, parsed, cert_key, VALID_DIGEST)
    wrong = keys.generate_private_key().public()
    refused(Reason.WRONG_KEY, bundle.verify_bundle, parsed, wrong, EMPTY_IMAGE_DIGEST)


def test_cosigns_attestation_bundle_refused_when_tampered() -> None:
    doc = json.loads(read("cosign-oci-attestation.sigstore.json"))
    statement = base64.b64decode(doc["dsseEnvelope"]["payload"])
    forged = statement.replace(EMPTY_IMAGE_DIGEST[7:].encode(), VALID_DIGEST[7:].encode())
    assert forged != statement
    doc["dsseEnvelope"]["payload"] = base64.b64encode(forged).decode()
    parsed = bundle.parse_bundle(json.dumps(doc).encode())
    _, cert_key = cosign_attestation()
    refused(Reason.TAMPERED, bundle.verify_bundle, parsed, cert_key, VALID_DIGEST)

    two = json.loads(read("cosign-oci-attestation.sigstore.json"))
    two["dsseEnvelope"]["signatures"] *= 2
    parsed = bundle.parse_bundle(json.dumps(two).encode())
    message = refused(Reason.NOT_A_SIGNATURE, bundle.verify_bundle, parsed, cert_key,
                      EMPTY_IMAGE_DIGEST)
    assert "2 signatures" in message

    bad = json.loads(read("cosign-oci-attestation.sigstore.json"))
    bad["mediaType"] = "this is completely wrong"
    refused(Reason.NOT_A_SIGNATURE, bundle.parse_bundle, json.dumps(bad).encode())
    refused(Reason.NOT_A_SIGNATURE, bundle.parse_bundle, b"[]")


def test_bundle_round_trip_and_refusals_for_every_key_type(signer: keys.PrivateKey) -> None:
    made = bundle.build_bundle(signer, VALID_DIGEST)
    doc = json.loads(made)
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert doc["verificationMaterial"] == {"publicKey": {"hint": signer.public().hint()}}
    assert list(doc["dsseEnvelope"]) == ["payload", "payloadType", "signatures"]
    verdict = bundle.verify_any_bundle([made], signer.public(), VALID_DIGEST)
    assert verdict.predicate_type == dsse.COSIGN_SIGN_PREDICATE

    refused(Reason.DIGEST_MISMATCH, bundle.verify_any_bundle, [made], signer.public(),
            OTHER_DIGEST)
    wrong = keys.generate_private_key().public()
    refused(Reason.WRONG_KEY, bundle.verify_any_bundle, [made], wrong, VALID_DIGEST)
    statement = base64.b64decode(doc["dsseEnvelope"]["payload"])
    doc["dsseEnvelope"]["payload"] = base64.b64encode(
        statement.replace(VALID_DIGEST[7:].encode(), OTHER_DIGEST[7:].encode())
    ).decode()
    tampered = json.dumps(doc).encode()
    refused(Reason.TAMPERED, bundle.verify_any_bundle, [tampered], signer.public(), OTHER_DIGEST)


def test_a_signed_non_intoto_payload_is_not_an_image_signature() -> None:
    signer = keys.generate_private_key()
    body = dsse.build_statement(VALID_DIGEST)
    envelope = dsse.Envelope(body, "text/plain", (signer.sign(dsse.pae("text/plain", body)),))
    made = json.dumps(
        {
            "mediaType": bundle.BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {"publicKey": {"hint": signer.public().hint()}},
            "dsseEnvelope": envelope.to_json(),
        }
    ).encode()
    refused(Reason.NOT_A_SIGNATURE, bundle.verify_any_bundle, [made], signer.public(),
            VALID_DIGEST)
    refused(Reason.NO_SIGNATURE, bundle.verify_any_bundle, [], signer.public(), VALID_DIGEST)


def test_bundle_referrer_manifest_is_the_one_cosign_pushes() -> None:
    made = bundle.build_bundle(keys.generate_private_key(), VALID_DIGEST)
    subject = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 428,
               "digest": VALID_DIGEST}
    manifest = json.loads(bundle.bundle_referrer_manifest(made, subject, "2026-01-01T00:00:00Z"))
    assert list(manifest) == ["schemaVersion", "mediaType", "config", "layers", "annotations",
                              "subject", "artifactType"]
    assert manifest["config"]["digest"] == (
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    assert manifest["layers"] == [
        {"mediaType": bundle.BUNDLE_MEDIA_TYPE, "size": len(made), "digest": sha256(made)}
    ]
    assert manifest["subject"] == subject
    assert bundle.is_bundle_referrer(manifest)
    assert not bundle.is_bundle_referrer({"layers": manifest["layers"] * 2})
    assert not bundle.is_bundle_referrer({"layers": [{"mediaType": "application/json"}]})


def test_the_core_imports_neither_httpx_nor_trio() -> None:
    code = (
        "import sys, kitfs.signing.bundle, kitfs.signing.classic, kitfs.signing.keys,"
        " kitfs.signing.policy, kitfs.signing.flags, kitfs.signing.trust;"
        "print(sorted(m for m in ('httpx', 'trio', 'pyfuse3') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- keyless and transparency-log entries (offline, against cosign's trusted root) -----------

GITHUB = "https://github.com/login/oauth"


def trusted_root(edit: Any = None) -> trustroot.TrustedRoot:
    doc = json.loads(read("cosign-trusted_root_pgi.json"))
    if edit is not None:
        edit(doc)
    return trustroot.load_trusted_root(json.dumps(doc).encode(), "trusted_root_pgi.json")


def test_trusted_root_is_read() -> None:
    root = trusted_root()
    rekor = public("ci-rekor.pub")
    assert [log.log_id for log in root.logs] == [hashlib.sha256(rekor.der()).hexdigest()]
    assert len(root.authorities) == 2
    with pytest.raises(SignatureError, match="not a usable sigstore trusted root"):
        trustroot.load_trusted_root(b'{"mediaType": "x"}', "bad.json")


def test_published_keyless_classic_signature_verifies_at_log_time() -> None:
    sig = containers_image_signature("ci-fulcio-rekor-valid.signature-1")
    assert sha256(read("ci-fulcio-rekor-valid.manifest.json")) == REKOR_DIGEST
    who = keyless.Identity("mitr@redhat.com", GITHUB)
    verdict = keyless.verify_classic_keyless(sig, trusted_root(), who, REKOR_DIGEST)
    assert verdict.tlog_checked
    assert "mitr@redhat.com" in verdict.describe()

    refused(Reason.IDENTITY_MISMATCH, keyless.verify_classic_keyless, sig, trusted_root(),
            keyless.Identity("someone@else", GITHUB), REKOR_DIGEST)
    refused(Reason.IDENTITY_MISMATCH, keyless.verify_classic_keyless, sig, trusted_root(),
            keyless.Identity("mitr@redhat.com", "https://accounts.google.com"), REKOR_DIGEST)
    refused(Reason.DIGEST_MISMATCH, keyless.verify_classic_keyless, sig, trusted_root(), who,
            VALID_DIGEST)
    # Without the log's word on when it signed, the 10-minute certificate is long expired.
    message = refused(Reason.EXPIRED_CERTIFICATE, keyless.verify_classic_keyless, sig,
                      trusted_root(), who, REKOR_DIGEST, True)
    assert "2023-01-20T21:01:31Z" in message


def test_keyless_classic_refused_without_trust() -> None:
    sig = containers_image_signature("ci-fulcio-rekor-valid.signature-1")
    who = keyless.Identity("mitr@redhat.com", GITHUB)

    def no_cas(doc: dict[str, Any]) -> None:
        doc["certificateAuthorities"] = doc["certificateAuthorities"][:1]  # expired in 2022

    refused(Reason.UNTRUSTED, keyless.verify_classic_keyless, sig, trusted_root(no_cas), who,
            REKOR_DIGEST)

    def only_the_old_ca(doc: dict[str, Any]) -> None:
        no_cas(doc)
        del doc["certificateAuthorities"][0]["validFor"]["end"]  # valid, but not the issuer

    message = refused(Reason.UNTRUSTED, keyless.verify_classic_keyless, sig,
                      trusted_root(only_the_old_ca), who, REKOR_DIGEST)
    assert "does not chain" in message

    def other_ct_log_keys(doc: dict[str, Any]) -> None:
        for ctlog in doc["ctlogs"]:
            other = keys.generate_private_key().public()
            ctlog["publicKey"]["rawBytes"] = base64.b64encode(other.der()).decode()

    message = refused(Reason.UNTRUSTED, keyless.verify_classic_keyless, sig,
                      trusted_root(other_ct_log_keys), who, REKOR_DIGEST)
    assert "certificate-transparency" in message

    def other_log_key(doc: dict[str, Any]) -> None:
        other = keys.generate_private_key().public()
        doc["tlogs"][0]["publicKey"]["rawBytes"] = base64.b64encode(other.der()).decode()

    message = refused(Reason.UNTRUSTED, keyless.verify_classic_keyless, sig,
                      trusted_root(other_log_key), who, REKOR_DIGEST)
    assert "signed entry timestamp" in message
    annotations = dict(sig.annotations)
    rekor = json.loads(annotations[classic.ANNOTATION_REKOR_BUNDLE])
    rekor["Payload"]["integratedTime"] += 1
    annotations[classic.ANNOTATION_REKOR_BUNDLE] = json.dumps(rekor)
    moved = classic.ClassicSignature(sig.payload, annotations)
    refused(Reason.UNTRUSTED, keyless.verify_classic_keyless, moved, trusted_root(), who,
            REKOR_DIGEST)
    del annotations[classic.ANNOTATION_REKOR_BUNDLE]
    unlogged = classic.ClassicSignature(sig.payload, annotations)
    refused(Reason.UNTRUSTED, keyless.verify_classic_keyless, unlogged, trusted_root(), who,
            REKOR_DIGEST)
    keyed = containers_image_signature("ci-valid.signature-1")
    refused(Reason.WRONG_KEY, keyless.verify_classic_keyless, keyed, trusted_root(), who,
            VALID_DIGEST)
    # Among several signatures, one keyless signature that passes is enough.
    verdict = first_pass(
        [keyed, unlogged, sig],
        lambda s: keyless.verify_classic_keyless(s, trusted_root(), who, REKOR_DIGEST),
        REKOR_DIGEST,
    )
    assert verdict.tlog_checked


def test_published_keyed_signature_with_rekor_entry_verifies_logged() -> None:
    sig = containers_image_signature("ci-key-rekor-valid.signature-1")
    key = public("ci-cosign2.pub")
    assert keyless.verify_classic_logged(sig, key, REKOR_DIGEST, trusted_root()).tlog_checked
    # The entry must be about this signature: another signer's entry is refused.
    keyless_sig = containers_image_signature("ci-fulcio-rekor-valid.signature-1")
    swapped = dict(sig.annotations)
    swapped[classic.ANNOTATION_REKOR_BUNDLE] = keyless_sig.annotations[
        classic.ANNOTATION_REKOR_BUNDLE
    ]
    message = refused(Reason.UNTRUSTED, keyless.verify_classic_logged,
                      classic.ClassicSignature(sig.payload, swapped), key, REKOR_DIGEST,
                      trusted_root())
    assert "another" in message
    unlogged = containers_image_signature("ci-valid.signature-1")
    refused(Reason.UNTRUSTED, keyless.verify_classic_logged, unlogged, public("ci-cosign.pub"),
            VALID_DIGEST, trusted_root())


def test_cosigns_keyless_bundle_verifies_offline() -> None:
    parsed = bundle.parse_bundle(read("cosign-oci-attestation.sigstore.json"))
    who = keyless.Identity("cody@soyland.com", GITHUB)
    verdict = keyless.verify_bundle_keyless(parsed, trusted_root(), who, EMPTY_IMAGE_DIGEST)
    assert verdict.tlog_checked and verdict.format == "bundle"
    refused(Reason.IDENTITY_MISMATCH, keyless.verify_bundle_keyless, parsed, trusted_root(),
            keyless.Identity("mitr@redhat.com", GITHUB), EMPTY_IMAGE_DIGEST)
    refused(Reason.DIGEST_MISMATCH, keyless.verify_bundle_keyless, parsed, trusted_root(), who,
            VALID_DIGEST)
    refused(Reason.EXPIRED_CERTIFICATE, keyless.verify_bundle_keyless, parsed, trusted_root(),
            who, EMPTY_IMAGE_DIGEST, True)

    def edited(edit: Any) -> bundle.Bundle:
        doc = json.loads(read("cosign-oci-attestation.sigstore.json"))
        edit(doc["verificationMaterial"]["tlogEntries"][0])
        return bundle.parse_bundle(json.dumps(doc).encode())

    def other_index(entry: dict[str, Any]) -> None:
        entry["logIndex"] = str(int(entry["logIndex"]) + 1)

    def other_path(entry: dict[str, Any]) -> None:
        hashes = entry["inclusionProof"]["hashes"]
        hashes[3], hashes[4] = hashes[4], hashes[3]

    def other_checkpoint(entry: dict[str, Any]) -> None:
        proof = entry["inclusionProof"]
        signed = " wNI9ajBFAiEAuh"  # the log's key hint, then its signature
        assert signed in proof["checkpoint"]["envelope"]
        proof["checkpoint"]["envelope"] = proof["checkpoint"]["envelope"].replace(
            signed, signed[:-1] + "H"
        )

    def short_path(entry: dict[str, Any]) -> None:
        entry["inclusionProof"]["hashes"].pop()

    for edit, why in (
        (other_index, "signed entry timestamp"),
        (other_path, "does not lead to the logged tree root"),
        (short_path, "shorter than its tree is deep"),
        (other_checkpoint, "checkpoint's signature does not verify"),
    ):
        message = refused(Reason.UNTRUSTED, keyless.verify_bundle_keyless, edited(edit),
                          trusted_root(), who, EMPTY_IMAGE_DIGEST)
        assert why in message
    signer = keys.generate_private_key()
    keyed = bundle.parse_bundle(bundle.build_bundle(signer, VALID_DIGEST))
    refused(Reason.WRONG_KEY, keyless.verify_bundle_keyless, keyed, trusted_root(), who,
            VALID_DIGEST)
    message = refused(Reason.UNTRUSTED, keyless.verify_bundle_logged, keyed, signer.public(),
                      VALID_DIGEST, trusted_root())
    assert "no transparency-log entry" in message


def test_log_entries_must_describe_the_signature_they_vouch_for() -> None:
    """A log of our own (its key in an edited trusted root) vouches for entries that
    name another signature, payload or signer: each is refused."""
    log = keys.generate_private_key()
    log_id = hashlib.sha256(log.public().der()).hexdigest()

    def our_log(doc: dict[str, Any]) -> None:
        doc["tlogs"][0]["publicKey"]["rawBytes"] = base64.b64encode(log.public().der()).decode()
        doc["tlogs"][0]["logId"]["keyId"] = base64.b64encode(bytes.fromhex(log_id)).decode()

    root = trusted_root(our_log)
    signer = keys.generate_private_key()
    layer = classic.sign_classic(signer, "r/x", VALID_DIGEST)
    signature = layer.descriptor["annotations"][classic.ANNOTATION_SIGNATURE]

    def logged(**changes: Any) -> classic.ClassicSignature:
        spec = {
            "data": {"hash": {"algorithm": "sha256",
                              "value": hashlib.sha256(layer.payload).hexdigest()}},
            "signature": {"content": signature, "publicKey": {
                "content": base64.b64encode(signer.public().pem()).decode()}},
        }
        spec.update(changes)
        body = base64.b64encode(json.dumps(
            {"apiVersion": "0.0.1", "kind": "hashedrekord", "spec": spec}).encode()).decode()
        promise = {"body": body, "integratedTime": 1767225600, "logID": log_id, "logIndex": 7}
        canonical = json.dumps(promise, sort_keys=True, separators=(",", ":")).encode()
        rekor = {"SignedEntryTimestamp": base64.b64encode(log.sign(canonical)).decode(),
                 "Payload": promise}
        annotations = {**layer.descriptor["annotations"],
                       classic.ANNOTATION_REKOR_BUNDLE: json.dumps(rekor)}
        return classic.ClassicSignature(layer.payload, annotations)

    assert keyless.verify_classic_logged(logged(), signer.public(), VALID_DIGEST, root)
    other = classic.sign_classic(signer, "r/x", VALID_DIGEST).descriptor["annotations"]
    cases = {
        "another signature": {"signature": {
            "content": other[classic.ANNOTATION_SIGNATURE],
            "publicKey": {"content": base64.b64encode(signer.public().pem()).decode()}}},
        "another signer": {"signature": {"content": signature, "publicKey": {
            "content": base64.b64encode(keys.generate_private_key().public().pem()).decode()}}},
        "another payload": {"data": {"hash": {"algorithm": "sha256", "value": "00" * 32}}},
    }
    for what, change in cases.items():
        message = refused(Reason.UNTRUSTED, keyless.verify_classic_logged, logged(**change),
                          signer.public(), VALID_DIGEST, root)
        assert what in message


def test_bundle_log_entries_must_describe_the_envelope() -> None:
    log = keys.generate_private_key()
    log_id = hashlib.sha256(log.public().der()).hexdigest()

    def our_log(doc: dict[str, Any]) -> None:
        doc["tlogs"][0]["publicKey"]["rawBytes"] = base64.b64encode(log.public().der()).decode()
        doc["tlogs"][0]["logId"]["keyId"] = base64.b64encode(bytes.fromhex(log_id)).decode()

    root = trusted_root(our_log)
    signer = keys.generate_private_key()
    made = json.loads(bundle.build_bundle(signer, VALID_DIGEST))
    envelope = made["dsseEnvelope"]

    def logged(signature_b64: str) -> bundle.Bundle:
        spec = {
            "payloadHash": {"algorithm": "sha256", "value": hashlib.sha256(
                base64.b64decode(envelope["payload"])).hexdigest()},
            "signatures": [{"signature": signature_b64, "verifier": base64.b64encode(
                signer.public().pem()).decode()}],
        }
        body = base64.b64encode(json.dumps(
            {"apiVersion": "0.0.1", "kind": "dsse", "spec": spec}).encode()).decode()
        promise = {"body": body, "integratedTime": 1767225600, "logID": log_id, "logIndex": 9}
        canonical = json.dumps(promise, sort_keys=True, separators=(",", ":")).encode()
        made["verificationMaterial"]["tlogEntries"] = [{
            "logIndex": "9", "logId": {"keyId": base64.b64encode(bytes.fromhex(log_id)).decode()},
            "kindVersion": {"kind": "dsse", "version": "0.0.1"}, "integratedTime": "1767225600",
            "inclusionPromise": {"signedEntryTimestamp": base64.b64encode(
                log.sign(canonical)).decode()},
            "canonicalizedBody": body,
        }]
        return bundle.parse_bundle(json.dumps(made).encode())

    real = envelope["signatures"][0]["sig"]
    assert keyless.verify_bundle_logged(logged(real), signer.public(), VALID_DIGEST, root)
    forged = base64.b64encode(signer.sign(b"something else")).decode()
    message = refused(Reason.UNTRUSTED, keyless.verify_bundle_logged, logged(forged),
                      signer.public(), VALID_DIGEST, root)
    assert "another signature" in message


def test_a_junk_signature_beside_a_valid_one_does_not_hide_it() -> None:
    """Anyone who can attach to a digest can attach junk: a bundle whose base64 is not
    ASCII, a classic layer whose annotations are a list. Each is refused in one line, and
    the valid signature next to them still passes."""
    from kitfs.signing.trust import FoundSignatures, Trust, check_signatures

    signer = keys.generate_private_key()
    good = classic.sign_classic(signer, "r/x", VALID_DIGEST)
    junk_bundle = json.dumps({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "dsseEnvelope": {"payload": "é", "payloadType": "x", "signatures": [{"sig": "é"}]},
    }).encode()
    junk_layer = classic.ClassicSignature.from_layer(
        {"mediaType": classic.SIMPLESIGNING_MEDIA_TYPE, "annotations": ["a"]}, b"{}")
    odd_sig = classic.ClassicSignature.from_layer(
        {"mediaType": classic.SIMPLESIGNING_MEDIA_TYPE,
         "annotations": {classic.ANNOTATION_SIGNATURE: "é"}}, good.payload)
    trust = Trust(key=signer.public(), ignore_tlog=True)
    found = FoundSignatures(
        (junk_layer, odd_sig, classic.ClassicSignature.from_layer(good.descriptor, good.payload)),
        (junk_bundle,))
    assert check_signatures(found, VALID_DIGEST, trust).format == "classic"
    with pytest.raises(SignatureRefused):
        check_signatures(FoundSignatures((junk_layer, odd_sig), (junk_bundle,)), VALID_DIGEST,
                         trust)
