"""What a signature check that passed vouches for, for the one line a user reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """A passed check: which format, which key and scheme, which digest.

    `tlog_checked` is False for everything this package verifies: no transparency
    log proof was looked at (cosign's `--insecure-ignore-tlog`); callers must not
    present the signature as logged.
    """

    format: str  # "classic" or "bundle"
    manifest_digest: str
    key: str  # e.g. "ECDSA P-256 key cosign.pub"
    scheme: str  # e.g. "ECDSA P-256 SHA256"
    predicate_type: str | None = None  # bundles: the in-toto predicate type
    docker_reference: str | None = None  # classic: the (unchecked) reference it names
    tlog_checked: bool = False

    def describe(self) -> str:
        what = f"{self.format} signature"
        if self.predicate_type:
            what += f" ({self.predicate_type})"
        return f"{self.manifest_digest}: {what} verified with {self.key} ({self.scheme})"
