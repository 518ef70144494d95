"""Why a signature was refused, in words a user can act on.

Several signatures may sit on one digest (other keys, other tools); when none
passes, the user needs the most telling reason, not the last one tried, so
every refusal carries a ranked `Reason`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import TypeVar

from kitfs.errors import SignatureError

T = TypeVar("T")
V = TypeVar("V")


class Reason(IntEnum):
    """Ranked: a higher value says more about what is wrong, and wins in `most_telling`."""

    NO_SIGNATURE = 0
    NOT_A_SIGNATURE = 1
    UNSUPPORTED_KEY = 2
    WRONG_KEY = 3
    UNTRUSTED = 4  # chain or transparency-log proof does not hold
    EXPIRED_CERTIFICATE = 5
    IDENTITY_MISMATCH = 6
    TAMPERED = 7
    DIGEST_MISMATCH = 8


class SignatureRefused(SignatureError):
    """A signature (or every signature) failed a check; `reason` says which kind of failure."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def most_telling(refusals: Iterable[SignatureRefused], what: str) -> SignatureRefused:
    """The refusal to show when no signature passed (`what` names the signed thing)."""
    best: SignatureRefused | None = None
    for refusal in refusals:
        if best is None or refusal.reason > best.reason:
            best = refusal
    if best is None:
        return SignatureRefused(Reason.NO_SIGNATURE, f"no signatures found for {what}")
    return best


def first_pass(candidates: Iterable[T], check: Callable[[T], V], what: str) -> V:
    """The verdict of the first candidate `check` accepts (cosign needs just one valid
    signature); else the most telling of the refusals, NO_SIGNATURE when there were none."""
    refusals: list[SignatureRefused] = []
    for candidate in candidates:
        try:
            return check(candidate)
        except SignatureRefused as refusal:
            refusals.append(refusal)
    raise most_telling(refusals, what)
