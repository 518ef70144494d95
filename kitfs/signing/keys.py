"""cosign's keys: PEM public keys, and the encrypted `cosign.key` private key file.

Only the key types cosign itself accepts are taken (ECDSA P-256/384/521, RSA
2048/3072/4096, Ed25519; sigstore `cryptoutils.ValidatePubKey`), so a key that
works here works with `cosign verify --key` and the other way round.

The hash rules follow what cosign does (sigstore `signature/algorithm_registry.go`):
- ECDSA signs with the curve's hash (SHA-256/384/512); `cosign verify --key` checks
  with SHA-256 whatever the curve, so verification tries the curve's hash, then SHA-256;
- RSA is PKCS#1 v1.5 with SHA-256 (PSS with SHA-256 is also accepted on verify);
- Ed25519 signs pure (what `cosign verify --key` checks); verify also accepts
  Ed25519ph (SHA-512 prehash, RFC 8032), which is what `cosign sign` v3 makes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.secret
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kitfs.errors import SignatureError
from kitfs.signing.gojson import go_json
from kitfs.signing.refusal import Reason, SignatureRefused

PublicKeyType = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKeyType = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: PEM types cosign reads for its encrypted private key; it writes the first.
SIGSTORE_PRIVATE_KEY_PEM = "ENCRYPTED SIGSTORE PRIVATE KEY"
COSIGN_PRIVATE_KEY_PEM = "ENCRYPTED COSIGN PRIVATE KEY"

#: The scrypt cost parameters go-securesystemslib accepts (Legacy, Standard, OWASP);
#: cosign writes Standard.
_SCRYPT_PARAMS = ((32768, 8, 1), (65536, 8, 1), (131072, 8, 1))
_SCRYPT_WRITE = (65536, 8, 1)
# OpenSSL refuses N=2^17, r=8 under its 32 MiB default (128 MiB plus overhead needed).
_SCRYPT_MAXMEM = 256 << 20

_CURVE_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_CURVE_NAME = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_RSA_SIZES = (2048, 3072, 4096)


def describe_key(key: PublicKeyType) -> str:
    """A key's type in the words cosign's docs use ("ECDSA P-256", "RSA 4096", "Ed25519")."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {_CURVE_NAME.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return "Ed25519"


def _check_supported(key: object, source: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name in _CURVE_HASH:
            return
        what = f"ECDSA curve {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size in _RSA_SIZES:
            return
        what = f"RSA {key.key_size}-bit key"
    elif isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return
    else:
        what = type(key).__name__
    raise SignatureRefused(
        Reason.UNSUPPORTED_KEY,
        f"{source}: unsupported key type {what} (cosign keys are ECDSA P-256/384/521, "
        "RSA 2048/3072/4096 or Ed25519)",
    )


@dataclass(frozen=True)
class PublicKey:
    """A verified-supported public key and where it came from (for messages)."""

    key: PublicKeyType
    source: str

    @property
    def kind(self) -> str:
        return describe_key(self.key)

    def der(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def pem(self) -> bytes:
        """PKIX PEM, the `cosign.pub` format."""
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def hint(self) -> str:
        """base64(sha256(PKIX DER)): the `publicKey.hint` cosign puts in keyed bundles."""
        return base64.b64encode(hashlib.sha256(self.der()).digest()).decode()

    def verify(self, signature: bytes, data: bytes) -> str:
        """The scheme that verified `signature` over `data`; SignatureRefused(WRONG_KEY) if none.

        "Wrong key" is also what a changed `data` looks like; callers that can tell
        the two apart (a layer digest, a key hint) say "tampered" themselves.
        """
        for scheme, check in self._schemes(signature):
            try:
                check(data)
            except (InvalidSignature, nacl.exceptions.CryptoError, ValueError, TypeError):
                continue
            return scheme
        raise SignatureRefused(
            Reason.WRONG_KEY, f"the signature does not verify with {self.kind} key {self.source}"
        )

    def _schemes(self, signature: bytes) -> list[tuple[str, Any]]:
        key = self.key
        if isinstance(key, ec.EllipticCurvePublicKey):
            curve = _CURVE_NAME[key.curve.name]
            der = _ecdsa_der(signature, key.curve.key_size)
            algs = [_CURVE_HASH[key.curve.name]]
            if algs[0] is not hashes.SHA256:
                algs.append(hashes.SHA256)
            return [
                (
                    f"ECDSA {curve} {alg().name.upper()}",
                    lambda data, alg=alg: key.verify(der, data, ec.ECDSA(alg())),
                )
                for alg in algs
            ]
        if isinstance(key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            return [
                (
                    "RSA PKCS#1 v1.5 SHA256",
                    lambda data: key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256()),
                ),
                ("RSA PSS SHA256", lambda data: key.verify(signature, data, pss, hashes.SHA256())),
            ]
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return [
            ("Ed25519", lambda data: key.verify(signature, data)),
            ("Ed25519ph", lambda data: _ed25519ph_verify(signature, data, raw)),
        ]


def _ecdsa_der(signature: bytes, curve_bits: int) -> bytes:
    """DER as given, or converted from IEEE P1363 r||s (sigstore's verifier accepts both)."""
    size = (curve_bits + 7) // 8
    if len(signature) == 2 * size and signature[:1] != b"\x30":
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        return encode_dss_signature(r, s)
    return signature


def _ed25519ph_verify(signature: bytes, data: bytes, public_raw: bytes) -> None:
    state = nacl.bindings.crypto_sign_ed25519ph_state()
    nacl.bindings.crypto_sign_ed25519ph_update(state, data)
    nacl.bindings.crypto_sign_ed25519ph_final_verify(state, signature, public_raw)


def supported_public_key(key: object, source: str) -> PublicKey:
    """`key` (e.g. a certificate's) as a PublicKey, if it is of a type cosign accepts."""
    _check_supported(key, source)
    assert isinstance(key, PublicKeyType)
    return PublicKey(key, source)


def load_public_key(data: bytes, source: str) -> PublicKey:
    """A cosign public key file: PEM `PUBLIC KEY` (PKIX) or `RSA PUBLIC KEY` (PKCS#1)."""
    try:
        if b"-----BEGIN" in data:
            key: object = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SignatureRefused(
            Reason.UNSUPPORTED_KEY, f"{source}: not a PEM public key ({e})"
        ) from None
    return supported_public_key(key, source)


@dataclass(frozen=True)
class PrivateKey:
    """A signing key, with the signature scheme cosign verifies for its type."""

    key: PrivateKeyType
    source: str

    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key(), self.source)

    def sign(self, data: bytes) -> bytes:
        key = self.key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(_CURVE_HASH[key.curve.name]()))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return key.sign(data)  # pure Ed25519: what `cosign verify --key` checks

    def pkcs8(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def generate_private_key() -> PrivateKey:
    """ECDSA P-256, the only type `cosign generate-key-pair` makes."""
    return PrivateKey(ec.generate_private_key(ec.SECP256R1()), "generated key")


def _pem_body(data: bytes, source: str) -> tuple[str, bytes]:
    text = data.decode("ascii", errors="replace").strip()
    lines = text.splitlines()
    if not lines or not lines[0].startswith("-----BEGIN ") or not lines[0].endswith("-----"):
        raise SignatureError(f"{source}: not a PEM file")
    label = lines[0][len("-----BEGIN ") : -len("-----")]
    end = f"-----END {label}-----"
    if end not in lines:
        raise SignatureError(f"{source}: PEM block {label!r} has no end line")
    body = "".join(line.strip() for line in lines[1 : lines.index(end)])
    try:
        return label, base64.b64decode(body, validate=True)
    except binascii.Error:
        raise SignatureError(f"{source}: PEM body is not base64") from None


def _b64field(obj: Any, *path: str) -> bytes:
    for name in path:
        if not isinstance(obj, dict) or name not in obj:
            raise ValueError(f"missing {'.'.join(path)}")
        obj = obj[name]
    if not isinstance(obj, str):
        raise ValueError(f"{'.'.join(path)} is not a string")
    return base64.b64decode(obj, validate=True)


def _is_pkcs8(der: bytes) -> bool:
    """PrivateKeyInfo is SEQUENCE { INTEGER, SEQUENCE algorithm, ... }; SEC1's second
    element is an OCTET STRING. cosign (Go's ParsePKCS8PrivateKey) takes PKCS#8 only."""
    outer = _tlv(der, 0)
    if outer is None or der[0] != 0x30:
        return False
    version = _tlv(der, outer[0])
    if version is None or der[outer[0]] != 0x02:
        return False
    after = version[0] + version[1]
    return after < len(der) and der[after] == 0x30


def _tlv(der: bytes, pos: int) -> tuple[int, int] | None:
    """(content start, content length) of the DER element at `pos`, None if cut short."""
    if pos + 2 > len(der):
        return None
    first = der[pos + 1]
    if first < 0x80:
        return pos + 2, first
    count = first & 0x7F
    if count == 0 or pos + 2 + count > len(der):
        return None
    return pos + 2 + count, int.from_bytes(der[pos + 2 : pos + 2 + count], "big")


def load_encrypted_private_key(data: bytes, password: bytes, source: str) -> PrivateKey:
    """Decrypt a `cosign.key` (scrypt + NaCl secretbox over PKCS#8 DER, as go-securesystemslib).

    The password is the caller's business (COSIGN_PASSWORD in cosign); it is never logged.
    """
    label, body = _pem_body(data, source)
    if label not in (SIGSTORE_PRIVATE_KEY_PEM, COSIGN_PRIVATE_KEY_PEM):
        raise SignatureError(
            f"{source}: unsupported PEM type {label!r} (expected {SIGSTORE_PRIVATE_KEY_PEM!r}, "
            "as written by `cosign generate-key-pair`)"
        )
    try:
        doc = json.loads(body)
        kdf, cipher = doc["kdf"], doc["cipher"]
        if kdf.get("name") != "scrypt" or cipher.get("name") != "nacl/secretbox":
            raise ValueError(f"unsupported kdf {kdf.get('name')!r} / cipher {cipher.get('name')!r}")
        params = kdf["params"]
        n, r, p = params["N"], params["r"], params["p"]
        salt = _b64field(kdf, "salt")
        nonce = _b64field(cipher, "nonce")
        ciphertext = _b64field(doc, "ciphertext")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise SignatureError(f"{source}: malformed encrypted key ({e})") from None
    if (n, r, p) not in _SCRYPT_PARAMS:
        raise SignatureError(f"{source}: unsupported scrypt parameters N={n} r={r} p={p}")
    secret = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=_SCRYPT_MAXMEM)
    try:
        der = nacl.secret.SecretBox(secret).decrypt(ciphertext, nonce)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SignatureError(f"{source}: decryption failed (wrong password?)") from None
    if not _is_pkcs8(der):
        raise SignatureError(
            f"{source}: the decrypted key is not PKCS#8 (cosign refuses SEC1 EC keys too; "
            "re-import it with `cosign import-key-pair`)"
        )
    try:
        key = serialization.load_der_private_key(der, None)
    except (ValueError, UnsupportedAlgorithm, TypeError) as e:
        raise SignatureError(f"{source}: cannot parse the decrypted key ({e})") from None
    _check_supported(key, source)
    assert isinstance(key, PrivateKeyType)
    return PrivateKey(key, source)


def encrypt_private_key(key: PrivateKey, password: bytes) -> bytes:
    """The `cosign.key` bytes for `key` (Standard scrypt parameters, as cosign writes)."""
    n, r, p = _SCRYPT_WRITE
    salt = os.urandom(32)
    nonce = os.urandom(nacl.secret.SecretBox.NONCE_SIZE)
    secret = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=_SCRYPT_MAXMEM)
    ciphertext = nacl.secret.SecretBox(secret).encrypt(key.pkcs8(), nonce).ciphertext
    doc = {
        "kdf": {"name": "scrypt", "params": {"N": n, "r": r, "p": p},
                "salt": base64.b64encode(salt).decode()},
        "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(nonce).decode()},
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
    body = base64.b64encode(go_json(doc)).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        f"-----BEGIN {SIGSTORE_PRIVATE_KEY_PEM}-----\n"
        + "\n".join(lines)
        + f"\n-----END {SIGSTORE_PRIVATE_KEY_PEM}-----\n"
    ).encode()
