"""Who must have signed a ModelKit, as a user typed it: file paths and names, nothing loaded.

A mount passes these to its daemon (mounts.py daemon_argv) and the CSI driver to its
mounter, so they stay plain strings here; kitfs.signing.policy loads the keys and
trusted roots they name. Kept free of heavy imports: `kitfs mount` builds a
MountConfig holding one before it starts anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kitfs.errors import UsageError


def is_pem(text: str) -> bool:
    """A key given as PEM text (CSI attributes, policy files) rather than a file's path."""
    return text.lstrip().startswith("-----BEGIN")


@dataclass(frozen=True)
class FlagNames:
    """How the interface at hand spells each setting, for errors that name what to change."""

    key: str = "--signature-key"
    identity: str = "--signature-identity"
    issuer: str = "--signature-issuer"
    trusted_root: str = "--trusted-root"
    ignore_tlog: str = "--insecure-ignore-tlog"


MOUNT_FLAGS = FlagNames()
VERIFY_FLAGS = FlagNames(key="--key", identity="--certificate-identity",
                         issuer="--certificate-oidc-issuer")


@dataclass(frozen=True)
class SignatureFlags:
    """A public key (a PEM file's path, or the PEM itself), or a keyless identity and
    issuer; a trusted root file; whether to accept signatures without a log entry."""

    key: str | None = None
    identity: str | None = None
    issuer: str | None = None
    trusted_root: str | None = None
    ignore_tlog: bool = False

    @property
    def given(self) -> bool:
        return bool(self.key or self.identity or self.issuer)

    def describe(self, names: FlagNames) -> str:
        """Who asked, as the refusal names it: the flag and its value."""
        if self.key:
            shown = "(inline PEM)" if is_pem(self.key) else self.key
            return f"{names.key} {shown}"
        return f"{names.identity} {self.identity} {names.issuer} {self.issuer}"

    def problem(self, names: FlagNames) -> str | None:
        """Why these settings cannot make a check (None: they can), in `names`' words.

        The same rules as `cosign verify` offline: a key, or an identity with its
        issuer; keyless needs the trusted root; a key needs the trusted root to check
        its transparency-log entry, or an explicit choice not to.
        """
        if not self.given:
            if self.trusted_root or self.ignore_tlog:
                return (f"{names.trusted_root} and {names.ignore_tlog} need {names.key}, or "
                        f"{names.identity} and {names.issuer}")
            return None
        if self.key and (self.identity or self.issuer):
            return (f"give {names.key}, or {names.identity} and {names.issuer}, "
                    "not both")
        if not self.key and not (self.identity and self.issuer):
            return f"keyless verification needs both {names.identity} and {names.issuer}"
        if not self.key and not self.trusted_root:
            return (f"keyless verification needs {names.trusted_root} (kitfs fetches nothing "
                    "from Sigstore's TUF repository)")
        if self.key and not self.trusted_root and not self.ignore_tlog:
            return (f"{names.key} without {names.trusted_root} cannot check a "
                    f"transparency-log entry offline: give {names.trusted_root}, or "
                    f"{names.ignore_tlog} to accept keyed signatures without one "
                    "(`kitfs sign` makes those)")
        return None


#: The node's policy (kitfs/signing/policy.py): it applies whenever it exists.
NODE_POLICY = Path("/etc/kitfs/policy.yaml")
#: Another policy file that must hold as well (it adds to the node's, never replaces it).
POLICY_ENV = "KITFS_POLICY"


def signatures_asked(flags: SignatureFlags, environ: Mapping[str, str]) -> bool:
    """Whether a signature check may be needed at all: flags ask for one, or a policy file
    is there (anything but "no such file" counts: kitfs.enforcement then says what is
    wrong). Lets a mount or unpack that asks for nothing skip loading the signing code
    (cryptography, YAML: about 0.2 s of imports)."""
    if flags.given or environ.get(POLICY_ENV, "").strip():
        return True
    try:
        os.lstat(NODE_POLICY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def cosign_environment(flags: SignatureFlags, environ: Mapping[str, str]) -> SignatureFlags:
    """`flags` with what was not given on the command line taken from cosign's variables:
    cosign reads every flag from COSIGN_<FLAG> (its viper binding, options/root.go), so
    `COSIGN_KEY=cosign.pub cosign verify REF` works, and so must `kitfs verify REF`."""
    def get(name: str) -> str | None:
        return environ.get(name, "").strip() or None

    return SignatureFlags(
        key=flags.key or get("COSIGN_KEY"),
        identity=flags.identity or get("COSIGN_CERTIFICATE_IDENTITY"),
        issuer=flags.issuer or get("COSIGN_CERTIFICATE_OIDC_ISSUER"),
        trusted_root=flags.trusted_root or get("COSIGN_TRUSTED_ROOT"),
        ignore_tlog=flags.ignore_tlog or parse_bool(
            environ.get("COSIGN_INSECURE_IGNORE_TLOG", ""), "COSIGN_INSECURE_IGNORE_TLOG"),
    )


def parse_bool(text: str, name: str) -> bool:
    """A boolean as Go's strconv.ParseBool reads it (cosign's COSIGN_* variables)."""
    value = text.strip()
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("", "0", "f", "F", "false", "FALSE", "False"):
        return False
    raise UsageError(f"{name}={text!r} is not a boolean (true or false)")
