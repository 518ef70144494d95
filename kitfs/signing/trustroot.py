"""A sigstore trusted-root file: whose transparency-log keys and Fulcio CAs to believe.

Keyless verification is offline in kitfs: everything it trusts comes from this
file (`--trusted-root`, the JSON of protobuf-specs' `TrustedRoot`), never from
the network, and each key or CA only counts inside its `validFor` window.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from kitfs.errors import SignatureError
from kitfs.signing.keys import PublicKey, load_public_key


@dataclass(frozen=True)
class Window:
    start: datetime | None
    end: datetime | None

    def holds(self, when: datetime) -> bool:
        return (self.start is None or self.start <= when) and (self.end is None or when <= self.end)


@dataclass(frozen=True)
class LogKey:
    """A transparency log's key, by its log ID (hex of sha256 of the key's PKIX DER)."""

    log_id: str
    key: PublicKey
    valid: Window


@dataclass(frozen=True)
class CertificateAuthority:
    """A Fulcio CA: its chain, intermediates first, root last."""

    chain: tuple[x509.Certificate, ...]
    valid: Window


@dataclass(frozen=True)
class TrustedRoot:
    logs: tuple[LogKey, ...]  # transparency logs (Rekor)
    authorities: tuple[CertificateAuthority, ...]
    source: str
    ct_logs: tuple[LogKey, ...] = ()  # certificate-transparency logs (SCTs in Fulcio certs)

    def log_key(self, log_id: str, when: datetime) -> PublicKey | None:
        return _key_at(self.logs, log_id, when)

    def ct_log_key(self, log_id: str, when: datetime) -> PublicKey | None:
        return _key_at(self.ct_logs, log_id, when)

    def authorities_at(self, when: datetime) -> list[CertificateAuthority]:
        return [ca for ca in self.authorities if ca.valid.holds(when)]


def _key_at(logs: tuple[LogKey, ...], log_id: str, when: datetime) -> PublicKey | None:
    for log in logs:
        if log.log_id == log_id and log.valid.holds(when):
            return log.key
    return None


def _log_keys(entries: Any, source: str) -> tuple[LogKey, ...]:
    logs = []
    for tlog in entries or []:
        raw = base64.b64decode(tlog["publicKey"]["rawBytes"], validate=True)
        log_id = base64.b64decode(tlog["logId"]["keyId"], validate=True).hex()
        key = load_public_key(raw, f"{source}: log {tlog.get('baseUrl', log_id)}")
        logs.append(LogKey(log_id, key, _window(tlog["publicKey"])))
    return tuple(logs)


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _window(doc: Any) -> Window:
    valid = doc.get("validFor") if isinstance(doc, dict) else None
    if not isinstance(valid, dict):
        return Window(None, None)
    return Window(_time(valid.get("start")), _time(valid.get("end")))


def load_trusted_root(data: bytes, source: str) -> TrustedRoot:
    """Parse a trusted-root JSON file; a one-line SignatureError if it is not one."""
    try:
        doc = json.loads(data)
        media_type = doc.get("mediaType", "")
        if not str(media_type).startswith("application/vnd.dev.sigstore.trustedroot"):
            raise ValueError(f"media type {media_type!r} is not a sigstore trusted root")
        authorities = []
        for ca in doc.get("certificateAuthorities") or []:
            chain = tuple(
                x509.load_der_x509_certificate(base64.b64decode(c["rawBytes"], validate=True))
                for c in ca["certChain"]["certificates"]
            )
            if not chain:
                raise ValueError("a certificate authority with no certificates")
            authorities.append(CertificateAuthority(chain, _window(ca)))
        return TrustedRoot(
            _log_keys(doc.get("tlogs"), source),
            tuple(authorities),
            source,
            _log_keys(doc.get("ctlogs"), source),
        )
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise SignatureError(f"{source}: not a usable sigstore trusted root ({e})") from None
